#!/usr/bin/env python3
"""Broker benchmarks, each beside its limit, measured in one run on this machine.

Run:  python benchmarks/broker.py [--quick] [--idle N] [--json FILE]

* **connect + handshake + register per second** against a bare shs1 server (a process that
  accepts and completes the handshake, nothing else): the Python connect-plus-handshake limit.
  Both servers run as separate processes; the client loop is the same.
* **owner-changed fan-out latency** to 1,000 watching connections: from the request that moves a
  name to each watcher holding the event, p50 and p99.
* **broker memory per idle connection**, with 10,000 connections held (``--idle N``; 500 with
  ``--quick``): the broker process's resident memory with them minus without, divided by
  their number.  Each process holds one end of each, so the file limit is raised to that
  many plus some (within the hard limit; fewer are held, and said so, if it is lower).

Everything runs over Unix sockets on this machine (loopback only); every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402
from _report import emit_json  # noqa: E402

from bus.io.framed import FramedStream  # noqa: E402
from bus.io.fdpass import FdSocketStream  # noqa: E402
from bus.io.secure import SecureStream  # noqa: E402
from bus.wire.address import parse_address  # noqa: E402
from bus.wire.frames import ControlFrame, encode_control  # noqa: E402
from bus.wire.identity import Identity, save_identity  # noqa: E402

BARE_SERVER = r"""
import os, sys, socket, trio
from bus.io.secure import SecureStream
from bus.wire.identity import Identity
identity = Identity.from_seed(bytes.fromhex(sys.argv[2]))
async def handle(stream):
    s = SecureStream.server(stream, identity, encrypted=False, direct_handshake=True)  # (as busd's)
    try:
        await s.do_handshake()
        await s.receive_some()   # until the client closes
    except Exception:
        pass
    finally:
        await trio.aclose_forcefully(s)
async def main():
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(sys.argv[1]); sock.listen(1024)
    print("ready", flush=True)
    await trio.serve_listeners(handle, [trio.SocketListener(sock)])
trio.run(main)
"""


def raise_file_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, want), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Busd:
    def __init__(self, tmp: Path, identity_file: Path) -> None:
        config = tmp / "busd.toml"
        config.write_text("[limits]\nconnections_per_identity = 100000\nwatches_per_identity = 100000\n")
        env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp / "run"), XDG_CONFIG_HOME=str(tmp / "cfg"))
        (tmp / "run").mkdir(mode=0o700, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bus", "--no-tcp", "--key", str(identity_file), "--config", str(config), "--log-level", "warning"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.address = line.strip().split("=", 1)[1]
        ep = parse_address(self.address)[0]
        assert ep.path is not None
        self.path = ep.path

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()


async def connect(path: str, identity: Identity, server: Identity, early: bytes = b"") -> SecureStream:
    """A handshake over minibus's client socket; ``early``: bytes sent behind msg3, as the client
    library sends its hello (docs/protocol.md, section 2.6)."""
    transport = await FdSocketStream.connect(path)  # (minibus's client socket)
    stream = SecureStream.client(transport, identity, server.public_key, encrypted=False)
    if early:
        stream.early_data = lambda: early
    await stream.do_handshake()
    return stream


async def reply_to(framed: FramedStream, request_id: int) -> dict[str, Any]:
    while True:
        frame = await framed.receive_frame()
        assert isinstance(frame, ControlFrame)
        if frame.message.get("re") == request_id:
            return frame.message


async def request(framed: FramedStream, message: dict[str, Any]) -> dict[str, Any]:
    await framed.send_message(message)
    return await reply_to(framed, message["id"])


async def connect_rate(path: str, identity: Identity, server: Identity, count: int, register: bool) -> float:
    start = time.perf_counter()
    hello = encode_control(0, {"op": "hello", "id": 1})
    for _ in range(count):
        # (registering: the hello goes behind msg3, as the client library sends it)
        stream = await connect(path, identity, server, early=hello if register else b"")
        if register:
            reply = await reply_to(FramedStream(stream), 1)
            assert "result" in reply
        await trio.aclose_forcefully(stream)
    return count / (time.perf_counter() - start)


async def fanout(path: str, identity: Identity, server: Identity, watchers: int, rounds: int) -> list[float]:
    arrivals: list[list[float]] = [[] for _ in range(rounds)]
    streams: list[FramedStream] = []
    async with trio.open_nursery() as nursery:
        for _ in range(watchers):
            framed = FramedStream(await connect(path, identity, server))
            await request(framed, {"op": "hello", "id": 1})
            await request(framed, {"op": "watch", "id": 2, "patterns": ["org.bench.Target"]})
            streams.append(framed)

        round_no = [0]

        async def listen(framed: FramedStream) -> None:
            while True:
                frame = await framed.receive_frame()
                if frame is None:
                    return
                if isinstance(frame, ControlFrame) and frame.message.get("event") == "name":
                    arrivals[round_no[0]].append(time.perf_counter())

        for framed in streams:
            nursery.start_soon(listen, framed)
        owner = FramedStream(await connect(path, identity, server))
        await request(owner, {"op": "hello", "id": 1, "name": "org.bench.Target", "flags": ["allow-replacement"]})
        mover = FramedStream(await connect(path, identity, server))
        await request(mover, {"op": "hello", "id": 1})
        # the 'connected' events from the owner's hello are not measured
        with trio.fail_after(60):
            while len(arrivals[0]) < watchers:
                await trio.sleep(0.01)
        latencies: list[float] = []
        rid = 10
        for r in range(rounds):
            arrivals[r].clear()
            round_no[0] = r
            rid += 1
            op = {"op": "request_name", "id": rid, "name": "org.bench.Target", "flags": ["replace-existing"]} if r % 2 == 0 else {"op": "release_name", "id": rid, "name": "org.bench.Target"}
            t0 = time.perf_counter()
            await mover.send_message(op)
            with trio.fail_after(60):
                while len(arrivals[r]) < watchers:
                    await trio.sleep(0.001)
            latencies += [t - t0 for t in arrivals[r]]
            # drain the mover's reply
            with trio.fail_after(10):
                while True:
                    frame = await mover.receive_frame()
                    if isinstance(frame, ControlFrame) and frame.message.get("re") == rid:
                        break
        nursery.cancel_scope.cancel()
    for framed in [*streams, owner, mover]:
        await trio.aclose_forcefully(framed.stream)
    return latencies


async def idle_memory(busd: Busd, identity: Identity, server: Identity, count: int) -> tuple[float, int, int]:
    await trio.sleep(0.5)
    before = rss_kib(busd.proc.pid)
    streams = []
    for _ in range(count):
        framed = FramedStream(await connect(busd.path, identity, server))
        await request(framed, {"op": "hello", "id": 1})
        streams.append(framed)
    await trio.sleep(1.0)
    after = rss_kib(busd.proc.pid)
    for framed in streams:
        await trio.aclose_forcefully(framed.stream)
    return (after - before) * 1024 / count, before, after


async def main_async(quick: bool, idle: int | None = None) -> dict[str, Any]:
    idle_count = idle if idle is not None else 500 if quick else 10_000
    watchers = 100 if quick else 1000
    rounds = 4 if quick else 20
    connects = 50 if quick else 300
    limit = raise_file_limit(idle_count + 300)  # (busd inherits it; each process holds one end)
    if limit < idle_count + 300:
        print(f"file limit {limit}: holding {limit - 300} idle connections, not {idle_count}", file=sys.stderr)
        idle_count = limit - 300

    tmp = Path(tempfile.mkdtemp(prefix="minibus-bench-"))
    server = Identity.generate()
    key_file = tmp / "broker.key"
    save_identity(key_file, server)
    client = server  # the owner identity: every right, no policy in the way

    busd = Busd(tmp, key_file)
    bare_path = str(tmp / "bare.sock")
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, bare_path, server.seed.hex()], stdout=subprocess.PIPE, text=True)
    assert bare.stdout is not None
    bare.stdout.readline()
    try:
        limit_rates, broker_rates = [], []
        for _ in range(3):  # alternate, best of three each
            limit_rates.append(await connect_rate(bare_path, client, server, connects, register=False))
            broker_rates.append(await connect_rate(busd.path, client, server, connects, register=True))
        latencies = await fanout(busd.path, client, server, watchers, rounds)
        per_conn, rss_before, rss_after = await idle_memory(busd, client, server, idle_count)
    finally:
        busd.stop()
        bare.terminate()
        bare.wait(timeout=30)
        bare.stdout.close()

    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    limit, broker = max(limit_rates), max(broker_rates)
    return {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "connect": {
            "bare_handshake_per_s": limit,
            "broker_connect_handshake_register_per_s": broker,
            "ratio": broker / limit,
            "connections_per_round": connects,
        },
        "fanout": {
            "watchers": watchers,
            "rounds": rounds,
            "p50_ms": q[49] * 1000,
            "p99_ms": q[98] * 1000,
            "max_ms": latencies[-1] * 1000,
        },
        "idle_memory": {
            "connections": idle_count,
            "broker_rss_before_kib": rss_before,
            "broker_rss_after_kib": rss_after,
            "bytes_per_connection": per_conn,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    parser.add_argument("--idle", type=int, metavar="N", help="idle connections held for the memory figure (10,000; 500 with --quick)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    args = parser.parse_args()
    r = trio.run(main_async, args.quick, args.idle)
    c, f, m = r["connect"], r["fanout"], r["idle_memory"]
    print(f"{'connect + handshake (+ register), Unix socket':52} {'per s':>9} {'ratio':>7}")
    print(f"{'  bare shs1 server (the limit)':52} {c['bare_handshake_per_s']:9.0f} {1.0:7.2f}")
    print(f"{'  busd: connect + handshake + hello':52} {c['broker_connect_handshake_register_per_s']:9.0f} {c['ratio']:7.2f}")
    print()
    print(f"owner-changed fan-out to {f['watchers']} watchers ({f['rounds']} rounds): p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms, max {f['max_ms']:.1f} ms")
    print(f"broker memory per idle connection ({m['connections']} held): {m['bytes_per_connection'] / 1024:.1f} KiB")
    emit_json(r, args.json)


if __name__ == "__main__":
    main()
