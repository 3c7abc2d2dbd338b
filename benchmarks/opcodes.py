"""What one call costs in Python: bytecodes executed (and, with valgrind, instructions), by
part and by function, for the 1-in-flight rows of ``rpc.py`` beside their limits.

Every party of a row runs in this one process and one trio loop, on real Unix sockets: a
real ``Broker`` (in process, as the tests run it), the service and the caller through the
public client API; the limits are ``rpc.py``'s own (its ``limit_serve``, ``forward_frames`` and
``LimitClient``) over socket pairs.  Nothing here is timed: the counts are the same run to
run (a tree's figure moves only when its code does), so two trees are told apart by a few
dozen bytecodes a call, where ``rpc.py``'s rates, swinging by a tenth from one run to the
next on this machine, cannot tell them apart.  What a count leaves out is what the system
does for the process (the system calls, the waits, the caches): ``rpc.py`` measures that.

Rows (as ``rpc.py`` names them):

* ``limit2-x1``: the 2-process limit's ping-pong (raw CBOR, cbor2, no check);
* ``limit2t-x1``: the same with a deadline per call (a trio cancel scope, as ``bus.call`` has);
* ``mb-fd-x1``: ``bus.call`` on its unix-fd route;
* ``limit3-x1``: the 3-process limit (the ping-pong through a forwarder);
* ``limit3p-x1``: the protocol's shape at the ends (each RPC frame in a DATA frame, the reply
  handed to a parked call by a reader task) through the forwarder;
* ``mb-relay-x1``: ``RpcConnection.call`` on a relayed channel through ``busd``.

Each row's bytecodes are also split by the party whose task ran them: the caller (the counted
loop, and its bus connection's reader, which hands a relayed reply to its call), busd (its
sessions' tasks; in the 3-process limits, the forwarder in its place), the service, and trio's
own loop between tasks.

``--instructions`` also counts the machine instructions a call takes in user space, under
valgrind's callgrind (each row run twice in a process of its own, with two numbers of calls;
the difference over the difference of calls), when ``valgrind`` is installed.

    python benchmarks/opcodes.py                 # about 25 s
    python benchmarks/opcodes.py --top 25        # the 25 functions that run the most bytecodes, per row
    python benchmarks/opcodes.py --only mb-relay-x1 --party busd --top 30   # one party's functions
    python benchmarks/opcodes.py --instructions  # and instructions a call, about 4 minutes
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import trio  # noqa: E402

from rpc import PAYLOAD, SERVICE, LimitClient, forward_frames, limit_serve, recv_some  # noqa: E402

ROWS = ("limit2-x1", "limit2t-x1", "mb-fd-x1", "limit3-x1", "limit3p-x1", "mb-relay-x1")
#: Each minibus row against its limit (the table's ratio) and the floor rpc.py judges it by.
AGAINST = {"mb-fd-x1": ("limit2-x1", "limit2t-x1"), "mb-relay-x1": ("limit3-x1", "limit3p-x1")}
WARM_UP = 300  # calls before counting (the first calls learn shapes, fill caches of their own)


def part_of(filename: str) -> str:
    """Which part a function belongs to: minibus (bus/, clients/), trio (with outcome and the
    attrs methods it generates), the benchmark's own code, or anything else (the stdlib)."""
    path = Path(filename)
    try:
        relative = path.resolve().relative_to(ROOT)
    except (ValueError, OSError):
        relative = None
    if relative is not None:
        top = relative.parts[0]
        return "minibus" if top in ("bus", "clients") else "benchmark"
    if "/trio/" in filename or "/outcome/" in filename or filename.startswith("<attrs generated"):
        return "trio"
    return "other"


def short(filename: str) -> str:
    try:
        return str(Path(filename).resolve().relative_to(ROOT))
    except (ValueError, OSError):
        marker = "site-packages/"
        return filename.split(marker, 1)[1] if marker in filename else Path(filename).name


#: Which end a bus connection is (id of its BusConnection: "caller" or "service"), set by
#: with_minibus, for party_of.
ENDS: dict[int, str] = {}


def party_of(task: Any) -> str:
    """Whose work a task does: busd's (its sessions' readers and writers, its timers), the
    caller's (the counted loop; its bus connection's reader, which hands a relayed reply to
    its call) or the service's (its bus connection's reader, which answers a relayed call;
    a unix-fd channel's reader); another task by its name."""
    name: str = task.name
    if name.startswith("bus.broker.") or name.endswith("forward_frames"):
        return "busd"  # (or the limit's forwarder, in its place)
    if name.endswith(("with_row", "_report_direct_channels", "LimitClient.reader")):
        return "caller"
    if name.endswith(("_serve_channel", "limit_serve")):
        return "service"
    frame = getattr(task.coro, "cr_frame", None)
    owner = frame.f_locals.get("self") if frame is not None else None
    return ENDS.get(id(owner), name)


class OpcodeCounter:
    """Bytecodes executed per function while on (``sys.settrace`` with opcode events)."""

    def __init__(self) -> None:
        #: Bytecodes by the party whose task ran them (see party_of) and function.
        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self._locals: dict[str, Callable[[FrameType, str, Any], Any]] = {}
        self._parties: dict[Any, str] = {}

    def by_function(self) -> collections.Counter[tuple[str, str]]:
        """Bytecodes by function (filename, name), whoever ran them."""
        out: collections.Counter[tuple[str, str]] = collections.Counter()
        for (_party, filename, name), n in self.counts.items():
            out[(filename, name)] += n
        return out

    def by_party(self) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for (party, _filename, _name), n in self.counts.items():
            out[party] += n
        return out

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        frame.f_trace_opcodes = True
        code = frame.f_code
        self.calls[(code.co_filename, code.co_name)] += 1  # (a coroutine's every resumption)
        try:
            task = trio.lowlevel.current_task()
        except RuntimeError:
            party = "trio's loop"  # (the scheduler itself, between tasks)
        else:
            known = self._parties.get(task)
            party = known if known is not None else self._parties.setdefault(task, party_of(task))
        local = self._locals.get(party)
        if local is None:
            local = self._locals[party] = self._local_for(party)
        return local

    def _local_for(self, party: str) -> Callable[[FrameType, str, Any], Any]:
        counts = self.counts

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                code = frame.f_code
                counts[(party, code.co_filename, code.co_name)] += 1
            return local

        return local

    def __enter__(self) -> OpcodeCounter:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


def socket_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def with_row(row: str, use: Callable[[Callable[[], Awaitable[Any]]], Awaitable[None]]) -> None:
    """Set up ``row``, hand its call to ``use``, tear it down."""
    async with trio.open_nursery() as nursery:
        if row.startswith("limit"):
            caller_end, far = socket_pair()
            nested = row == "limit3p-x1"
            client = LimitClient("", project_codec=nested, deadline=row == "limit2t-x1", nested=nested, sock=caller_end)
            if row.startswith("limit3"):
                # The forwarder, as rpc.py's: the mode byte passed on, then both directions.
                down = far
                up, far = socket_pair()
                up.send(await recv_some(down, 1))
                nursery.start_soon(forward_frames, down, up, 7)
                nursery.start_soon(forward_frames, up, down, 1)
            nursery.start_soon(limit_serve, far)
            if nested:
                nursery.start_soon(client.reader)
                await use(client.call)
            else:
                await use(client.pingpong)
        else:
            await with_minibus(row, use)
        nursery.cancel_scope.cancel()


async def with_minibus(row: str, use: Callable[[Callable[[], Awaitable[Any]]], Awaitable[None]]) -> None:
    from bus.broker import Broker, BrokerConfig
    from bus.core.policy import Policy
    from bus.wire.identity import Identity
    from clients import Service, open_bus
    from clients.rpc import RpcConnection

    owner = Identity.from_seed(b"o" * 32)
    with tempfile.TemporaryDirectory(prefix="minibus-opcodes-") as tmp:
        run = Path(tmp) / "run"
        config = BrokerConfig(
            identity=owner, policy=Policy.from_mapping(owner.public_key, {}), unix_path=run / "bus.sock", tcp=None, runtime_dir=run
        )
        async with trio.open_nursery() as nursery:
            broker = Broker(config)
            address = await nursery.start(broker.serve)
            service = Service(SERVICE)

            @service.method
            def echo(value: bytes) -> bytes:
                return value

            async with open_bus(address, identity=owner, name=SERVICE) as service_bus:
                service.attach(service_bus)
                async with open_bus(address, identity=owner) as bus:
                    ENDS.clear()
                    ENDS.update({id(bus._connection): "caller", id(service_bus._connection): "service"})
                    if row == "mb-fd-x1":
                        assert (await bus.open_channel(SERVICE, "rpc")).route == "unix-fd"
                        await use(lambda: bus.call(SERVICE, "echo", PAYLOAD))
                    else:
                        relay = RpcConnection(await bus.open_channel(SERVICE, "rpc", "relay"))
                        async with trio.open_nursery() as calls:
                            await calls.start(relay.run)
                            await use(lambda: relay.call("echo", PAYLOAD))
                            calls.cancel_scope.cancel()
            nursery.cancel_scope.cancel()


def count_row(row: str, calls: int) -> dict[str, Any]:
    """Bytecodes a call of ``row`` runs, by part and by function."""
    result: dict[str, Any] = {}

    async def use(call: Callable[[], Awaitable[Any]]) -> None:
        for _ in range(WARM_UP):
            assert await call() == PAYLOAD
        gc.collect()
        with OpcodeCounter() as counter:
            for _ in range(calls):
                await call()
        by_function = counter.by_function()
        by_part: collections.Counter[str] = collections.Counter()
        for (filename, _name), n in by_function.items():
            by_part[part_of(filename)] += n
        result["opcodes"] = sum(counter.counts.values()) / calls
        result["by_part"] = {part: n / calls for part, n in by_part.most_common()}
        result["by_task"] = {party: n / calls for party, n in counter.by_party().most_common()}
        result["party_functions"] = {}
        for (party, filename, name), n in counter.counts.most_common():
            result["party_functions"].setdefault(party, []).append({"function": f"{short(filename)}:{name}", "opcodes": n / calls})
        result["functions"] = [
            {"function": f"{short(filename)}:{name}", "opcodes": n / calls, "calls": counter.calls[(filename, name)] / calls}
            for (filename, name), n in by_function.most_common()
        ]

    trio.run(with_row, row, use)
    return result


def run_calls(row: str, calls: int) -> None:
    """``--run-calls``: make ``calls`` calls of ``row`` after the warm-up, nothing else (the
    process valgrind counts)."""

    async def use(call: Callable[[], Awaitable[Any]]) -> None:
        for _ in range(WARM_UP + calls):
            await call()

    trio.run(with_row, row, use)


def instructions(row: str, few: int, many: int) -> float:
    """Instructions a call of ``row`` takes in user space: callgrind's totals for ``many`` and
    ``few`` calls, their difference over ``many - few`` (the setup cancels out)."""

    def total(calls: int) -> int:
        env = dict(os.environ, PYTHONHASHSEED="0")
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__, "--run-calls", row, str(calls)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        for line in out.stderr.splitlines():
            if "Collected :" in line:
                return int(line.split(":")[1])
        raise RuntimeError(f"no count from callgrind for {row}: {out.stderr[-500:]}")

    return (total(many) - total(few)) / (many - few)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls counted per row (after a warm-up of 300)")
    parser.add_argument("--top", type=int, default=12, help="functions shown per minibus row (the most bytecodes first)")
    parser.add_argument("--only", help="comma-separated rows to count (default: all)")
    parser.add_argument("--party", help="show the functions of this party (caller, busd, service) instead of the whole row's")
    parser.add_argument("--instructions", action="store_true", help="also instructions a call, under valgrind (about 4 minutes)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--run-calls", nargs=2, metavar=("ROW", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_calls:
        run_calls(args.run_calls[0], int(args.run_calls[1]))
        return
    rows = [r for r in ROWS if args.only is None or r in args.only.split(",")]
    results = {row: count_row(row, args.calls) for row in rows}
    valgrind = shutil.which("valgrind")
    if args.instructions:
        if valgrind is None:
            print("instructions: skipped, valgrind is not installed (apt-get install valgrind)")
        else:
            for row in rows:
                results[row]["instructions"] = instructions(row, 200, 1200)

    parts = ("minibus", "trio", "benchmark", "other")
    print(f"Python bytecodes per call, every party in one process ({args.calls:,} calls per row after {WARM_UP} to warm up)")
    header = f"{'row':<13}{'bytecodes':>10}" + "".join(f"{p:>11}" for p in parts) + f"{'instructions':>14}{'to limit':>10}{'to floor':>10}"
    print(header)
    for row in rows:
        r = results[row]
        line = f"{row:<13}{r['opcodes']:>10,.0f}" + "".join(f"{r['by_part'].get(p, 0):>11,.0f}" for p in parts)
        line += f"{r['instructions']:>14,.0f}" if "instructions" in r else f"{'-':>14}"
        for ref in AGAINST.get(row, ()):
            if ref in results:
                key = "instructions" if "instructions" in r and "instructions" in results[ref] else "opcodes"
                line += f"{r[key] / results[ref][key]:>10.2f}"
            else:
                line += f"{'-':>10}"
        print(line)
    print("(to limit, to floor: minibus's count over the limit's and the judged floor's; instructions where counted)")
    print("\nBy party (the task that ran them; busd's column is the forwarder's in the 3-process limits):")
    parties = ("caller", "busd", "service", "trio's loop")
    print(f"{'row':<13}" + "".join(f"{p:>13}" for p in parties))
    for row in rows:
        by_task = results[row]["by_task"]
        print(f"{row:<13}" + "".join(f"{by_task.get(p, 0):>13,.0f}" for p in parties))
    for row in rows:
        if not row.startswith("mb-"):
            continue
        if args.party:
            print(f"\n{row}, {args.party}: the functions that run the most bytecodes (per call)")
            for f in results[row]["party_functions"].get(args.party, [])[: args.top]:
                print(f"  {f['opcodes']:8.1f}  {f['function']}")
            continue
        print(f"\n{row}: the functions that run the most bytecodes (per call; calls per call, resumptions counted)")
        for f in results[row]["functions"][: args.top]:
            print(f"  {f['opcodes']:8.1f}  {f['calls']:5.1f}  {f['function']}")
    print()
    print(json.dumps({"calls": args.calls, "rows": {row: {k: v for k, v in r.items() if "functions" not in k} for row, r in results.items()}}))
    if args.json:
        args.json.write_text(json.dumps({"calls": args.calls, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
