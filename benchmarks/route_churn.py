"""What a peer that subscribes and unsubscribes in a loop costs everyone else's emits.

The broker's core (sans-io, one process, no sockets) with SUBSCRIBERS subscribing connections
(one subscription each, to one of KINDS kinds of event of a well-known source) and an emitter
emitting those kinds in turn; beside it, in the same run, the same with an attacker making a
subscription and ending it before every honest emit. Printed: the core's CPU per honest emit
(us, wall clock of ``BrokerCore.receive``) quiet and under churn, their ratio, and what the
attacker's subscribe + unsubscribe cost. Rounds alternate quiet and churn.

Run:  python benchmarks/route_churn.py [--subscribers N] [--kinds K] [--emits E] [--rounds R]

Before the twenty-first pass of issue 13 every subscription that came or went made the core
forget every kind's route, so each honest emit after it worked its route out again with a
pass over every subscription on the bus (180 subscribers: 141 us an emit against 5 quiet);
now a subscription changes only the kept kinds it matches, in its own request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bus.core.broker import BrokerCore  # noqa: E402
from bus.core.policy import Policy  # noqa: E402
from bus.wire.identity import Identity, PublicKey  # noqa: E402

ADMIN = Identity.from_seed(b"A" * 32).public_key
EMITTER = Identity.from_seed(b"E" * 32).public_key
RULES = f"""
[[rule]]
name = "everyone"
identities = ["*"]
connect = true
see = ["*"]

[[rule]]
name = "emitter"
identities = ["{EMITTER.id}"]
connect = true
own = ["org.bench.*"]
see = ["*"]
emit = ["org.bench.*"]
"""


def one_run(churn: bool, subscribers: int, kinds: int, emits: int) -> tuple[float, float]:
    """(us per honest emit, us per attacker subscribe + unsubscribe) in the core."""
    core = BrokerCore(Policy.from_mapping(ADMIN, tomllib.loads(RULES)), clock=time.time)
    ids = iter(range(1, 1 << 30))

    def receive(conn: int, message: dict[str, Any]) -> list[Any]:
        return list(core.receive(conn, {"id": next(ids), **message}))

    def connect(key: PublicKey) -> int:
        conn = core.connect(key, "unix").id
        receive(conn, {"op": "hello"})
        return conn

    emitter = connect(EMITTER)
    receive(emitter, {"op": "request_name", "name": "org.bench.Source"})
    for i in range(subscribers):  # (a fresh key every 60: connections_per_identity is 64)
        conn = connect(Identity.from_seed(bytes([1 + i // 60]) * 32).public_key)
        receive(conn, {"op": "subscribe", "source": "org.bench.*", "member": f"K{i % kinds}"})
    attacker = connect(Identity.from_seed(b"Z" * 32).public_key)
    spent = churned = 0.0
    clock = time.perf_counter
    for n in range(emits):
        if churn:
            started = clock()
            reply = receive(attacker, {"op": "subscribe", "member": "Z*"})
            sub = reply[0][1]["result"]["subscription"]
            receive(attacker, {"op": "unsubscribe", "subscription": sub})
            churned += clock() - started
        started = clock()
        receive(emitter, {"op": "emit", "source": "org.bench.Source", "member": f"K{n % kinds}", "payload": b"x", "quiet": True})
        spent += clock() - started
    return spent / emits * 1e6, churned / emits * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=180)
    parser.add_argument("--kinds", type=int, default=10)
    parser.add_argument("--emits", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    quiet, churn, attacker = [], [], []
    for _ in range(args.rounds):
        quiet.append(one_run(False, args.subscribers, args.kinds, args.emits)[0])
        per_emit, per_churn = one_run(True, args.subscribers, args.kinds, args.emits)
        churn.append(per_emit)
        attacker.append(per_churn)
    q, c, a = min(quiet), min(churn), min(attacker)
    print(f"{args.subscribers} subscribers, {args.kinds} kinds, {args.emits} emits a round, best of {args.rounds} rounds")
    print(f"honest emit, quiet:           {q:8.1f} us")
    print(f"honest emit, under churn:     {c:8.1f} us   ({c / q:.2f}x quiet)")
    print(f"attacker subscribe+unsubscribe: {a:6.1f} us")
    print(json.dumps({"quiet_us": q, "churn_us": c, "ratio": c / q, "attacker_pair_us": a, "rounds": {"quiet": quiet, "churn": churn}}))


if __name__ == "__main__":
    main()
