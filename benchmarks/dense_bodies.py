#!/usr/bin/env python3
"""What a large RPC body of many small items costs the service that takes it, and its caller.

Run:  python benchmarks/dense_bodies.py [--rounds N] [--max-message BYTES] [--json FILE]

A service decodes a call's body in the call's own task, synchronously (``_Body.message``:
``decode_control_body`` on the buffer the body was read into): while it does, the service
answers nobody else.  The item budget bounds that work (``max_message // BYTES_PER_ITEM``
items, 65,536 for the default 1 MiB), and this measures it at the budget, for several shapes
of items (each body as close to the budget as the shape allows), beside:

* the **limit**: ``cbor2.loads`` on the same buffer, no profile check (the C decoder alone,
  what a receiver that trusts its peer does);
* the **caller's** cost to send the same call (``_encode_message``: the profile check of the
  value and its encoding), what the sender pays for each such body it makes the service take;
* a 1 MiB byte string, the common large call, for scale.

Side by side in one process, the ways taken in turn in every round (each body decoded from a
fresh mmap, as a large body's buffer is); the table gives each way's median over the rounds
and the ratios: the service's decode against the limit, and against the caller's encode (who
pays: above 1 the service pays more than the caller for the same body).
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bus.wire.frames import decode_control_body  # noqa: E402
from clients.rpc import BYTES_PER_ITEM, DEFAULT_MAX_MESSAGE, _encode_message, _flat  # noqa: E402


def shapes(max_message: int) -> dict[str, list[Any]]:
    """The argument of each shape, at (about) the budget of items: its list counts one item,
    the body's map, key and args array three more."""
    items = max_message // BYTES_PER_ITEM - 8
    return {
        "15-byte strings": [b"s" * 15] * items,  # (16 bytes an item: the densest 1 MiB of strings)
        "small integers": list(range(items)),
        "empty arrays": [[] for _ in range(items)],
        "maps {0: 0}": [{0: 0} for _ in range(items // 3)],
        "maps of 8 text keys": [{f"k{i}": i for i in range(8)} for _ in range(items // 17)],
        "one byte string (for scale)": [b"b" * (max_message - 64)],
    }


def fresh_buffer(body: bytes) -> mmap.mmap:
    buffer = mmap.mmap(-1, len(body))
    buffer[:] = body
    return buffer


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(argument: list[Any], max_message: int, rounds: int) -> dict[str, Any]:
    max_items = max_message // BYTES_PER_ITEM
    call = {"op": "call", "id": 1, "method": "take", "args": [argument]}
    body = cbor2.dumps({"args": [argument]})  # (what follows the call's header: its DATA frames)
    flat = _flat(call.values())
    # (the service's and the limit's results checked once, outside the timing)
    assert decode_control_body(fresh_buffer(body), max_items) == {"args": [argument]}
    times: dict[str, list[float]] = {"encode": [], "decode": [], "limit": []}
    for _ in range(rounds):
        encode = timed(lambda: _encode_message(call, max_message, flat=flat))
        buffer = fresh_buffer(body)
        decode = timed(lambda: decode_control_body(buffer, max_items))
        buffer = fresh_buffer(body)
        limit = timed(lambda: cbor2.loads(buffer))
        times["encode"].append(encode)
        times["decode"].append(decode)
        times["limit"].append(limit)
    median = {key: statistics.median(values) for key, values in times.items()}
    items = _count_items(body)
    return {
        "body_bytes": len(body),
        "items": items,
        "encode_ms": median["encode"] * 1e3,
        "decode_ms": median["decode"] * 1e3,
        "limit_ms": median["limit"] * 1e3,
        "decode_to_limit": median["decode"] / median["limit"],
        "decode_to_encode": median["decode"] / median["encode"],
        "decode_us_per_item": median["decode"] / items * 1e6,
    }


def _count_items(body: bytes) -> int:
    """Data items in ``body`` (keys, values and container heads), as the budget counts them."""

    def walk(value: Any) -> int:
        if type(value) is dict:
            return 1 + sum(walk(k) + walk(v) for k, v in value.items())
        if type(value) is list:
            return 1 + sum(walk(v) for v in value)
        return 1

    return walk(cbor2.loads(body))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-message", type=int, default=DEFAULT_MAX_MESSAGE)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {name: measure(argument, args.max_message, args.rounds) for name, argument in shapes(args.max_message).items()}
    budget = args.max_message // BYTES_PER_ITEM
    print(f"max_message {args.max_message:,} bytes: at most {budget:,} items a body; medians of {args.rounds} rounds")
    print()
    print("| body's items | bytes | items | caller's encode | service's decode | limit (cbor2.loads) | decode / limit | decode / encode |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['body_bytes']:,} | {r['items']:,} | {r['encode_ms']:.1f} ms | {r['decode_ms']:.1f} ms"
            f" ({r['decode_us_per_item']:.2f} us an item) | {r['limit_ms']:.1f} ms | {r['decode_to_limit']:.1f}x | {r['decode_to_encode']:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"max_message": args.max_message, "rounds": args.rounds, "shapes": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
