#!/usr/bin/env python3
"""Relayed RPC calls per second at several numbers of calls in flight (issue 13, *Bursts*).

Run:  python benchmarks/in_flight.py [--counts 8,16,24,32,64,128] [--rounds 3] [--seconds S] [--pin]

``rpc.py``'s relayed row measures 32 calls in flight; how a caller writes the calls made while
others are in flight (``clients.rpc.call_burst``) matters at every other number too.  This
script starts ``rpc.py``'s processes (busd, the service, the caller, each its own process; the
limits' processes too, idle, so that ``--pin`` places everything as ``rpc.py --pin`` does) and
measures the relayed echo of 64 bytes (``RpcConnection.call``, as the table's relay rows) with
each number of calls in flight, round after round, printing the median rate of each.  Minibus
only, no limit: it is for holding two trees of this repository side by side (run it in each,
in turn), not a ratio to a limit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import rpc  # noqa: E402  (the roles and processes of the RPC benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="8,16,24,32,64,128", help="calls in flight, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every count (the median is printed)")
    parser.add_argument("--seconds", type=float, default=0.6, help="measuring window per count and round")
    parser.add_argument("--pin", action="store_true", help="place the processes as rpc.py --pin does")
    args = parser.parse_args()
    counts = [int(n) for n in args.counts.split(",")]
    if any(n < 1 for n in counts):
        parser.error("--counts: each number of calls in flight must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="minibus-in-flight-"))
    minibus = rpc.Minibus(tmp)
    limits = None
    try:
        limits = rpc.Limits(tmp, minibus.owner.seed.hex())
        if args.pin:
            rpc.pin(minibus, limits)
        rates: dict[int, list[float]] = {n: [] for n in counts}
        for _ in range(args.rounds):
            for n in counts:
                answer = minibus.worker.ask({"row": "mb-relay-xn", "n": n, "seconds": args.seconds, "warmup": 0.2},
                                            args.seconds * 3 + rpc.ROW_GRACE)
                if "error" in answer:
                    raise SystemExit(f"{n} in flight: {answer['error']}")
                rates[n].append(answer["value"])
        print(f"relayed 64-byte echo, calls/s (median of {args.rounds} rounds of {args.seconds:g} s){', pinned' if args.pin else ''}")
        for n in counts:
            print(f"  {n:5d} in flight  {statistics.median(rates[n]):>10,.0f}/s   (rounds {', '.join(f'{v:,.0f}' for v in rates[n])})")
    finally:
        if limits is not None:
            limits.stop()
        minibus.stop()


if __name__ == "__main__":
    main()
