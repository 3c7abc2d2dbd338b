#!/usr/bin/env python3
"""Channel benchmarks, side by side in one run: RPC round trips and bulk throughput.

Run:  python benchmarks/channels.py [--quick] [--json FILE]

Rows (all on this machine, loopback only, every loop bounded):

* RPC round trips per second with 64-byte payloads, 1 and 32 calls in flight, over relayed
  channels: Unix (plain) and TCP (box-stream end to end);
* bulk throughput with 64 KiB writes over the same routes;
* RPC with 1 MiB arguments and 1 MiB results (an echo, one call in flight) on the Unix relay
  and unix-fd routes, in MB/s of argument and result bytes carried, beside the raw socket's bulk;
* the limit: a raw trio socket pair of the same kind (ping-pong of 64 bytes, and bulk);
* dbus-daemon with jeepney (method-call echo and one-way bulk), when both are installed (the
  Debian package ``dbus-daemon`` and the PyPI package ``jeepney``): the script starts a private
  dbus-daemon and stops it.  Otherwise those rows are skipped with the reason printed.

Routes measured: relay (Unix and TCP), unix-fd (a socketpair passed by the broker) and direct
TCP (box-stream end to end).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402
from _report import emit_json  # noqa: E402

from bus.broker import Broker, BrokerConfig  # noqa: E402
from bus.core.policy import Policy  # noqa: E402
from bus.io.testing import tcp_stream_pair, unix_stream_pair  # noqa: E402
from bus.wire.identity import Identity, save_identity  # noqa: E402
from clients import Channel, Service, open_bus  # noqa: E402
from clients.rpc import RpcConnection  # noqa: E402

PAYLOAD = b"p" * 64
WRITE = 64 * 1024
BIG = 1024 * 1024  # the large RPC rows' argument (and result)


async def calls_per_second(call: Callable[[], Awaitable[Any]], seconds: float, in_flight: int) -> float:
    """Round trips per second with ``in_flight`` callers, each waiting for its reply."""
    count = 0
    start = time.perf_counter()

    async def caller() -> None:
        nonlocal count
        while time.perf_counter() - start < seconds:
            await call()
            count += 1

    async with trio.open_nursery() as callers:
        for _ in range(in_flight):
            callers.start_soon(caller)
    return count / (time.perf_counter() - start)


async def raw_pingpong(kind: str, seconds: float) -> float:
    a, b = unix_stream_pair() if kind == "unix" else await tcp_stream_pair()
    count = 0
    async with trio.open_nursery() as nursery:

        async def echo() -> None:
            while data := await b.receive_some():
                await b.send_all(data)

        nursery.start_soon(echo)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            await a.send_all(PAYLOAD)
            got = 0
            while got < len(PAYLOAD):
                got += len(await a.receive_some())
            count += 1
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    await a.aclose()
    await b.aclose()
    return count / elapsed


async def raw_bulk(kind: str, total: int) -> float:
    a, b = unix_stream_pair() if kind == "unix" else await tcp_stream_pair()
    block = os.urandom(WRITE)
    received = 0
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            for _ in range(total // WRITE):
                await a.send_all(block)

        nursery.start_soon(send)
        while received < total // WRITE * WRITE:
            received += len(await b.receive_some(1 << 18))
    elapsed = time.perf_counter() - start
    await a.aclose()
    await b.aclose()
    return received / elapsed


class Busd:
    """``busd`` as its own process, as dbus-daemon is for the peer rows."""

    def __init__(self, tmp: Path, identity: Identity) -> None:
        key_file = tmp / "broker.key"
        save_identity(key_file, identity)
        (tmp / "run").mkdir(mode=0o700)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0", "--key", str(key_file), "--runtime-dir", str(tmp / "run"), "--log-level", "warning"],
            env=dict(os.environ, XDG_CONFIG_HOME=str(tmp / "cfg")),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip().split("=", 1)[1]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()


async def bus_rows(seconds: float, total: int, in_process: bool) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="minibus-bench-"))
    owner = Identity.generate()
    busd = None if in_process else Busd(tmp, owner)
    try:
        async with trio.open_nursery() as nursery:
            if busd is None:
                config = BrokerConfig(
                    identity=owner,
                    policy=Policy(owner.public_key),
                    unix_path=tmp / "bus.sock",
                    tcp=("127.0.0.1", 0),
                    runtime_dir=tmp,
                    write_address_file=False,
                )
                address = await nursery.start(Broker(config).serve)
            else:
                address = busd.address
            rows = await _bus_measure(address, owner, seconds, total)
            nursery.cancel_scope.cancel()
    finally:
        if busd is not None:
            busd.stop()
    return rows


async def _bus_measure(address: str, owner: Identity, seconds: float, total: int) -> dict[str, float]:
    rows: dict[str, float] = {}
    service = Service("org.bench.Echo")

    @service.method
    async def echo(value: bytes) -> bytes:
        return value

    @service.channel("sink")
    async def sink(channel: Channel) -> None:
        while await channel.receive_some(1 << 18):
            pass
        await channel.send_all(b"done")

    unix, tcp = address.split(";")
    async with trio.open_nursery() as nursery:
        for kind, addr, route in (("unix", unix, "relay"), ("unix", unix, "direct"), ("tcp", tcp, "relay"), ("tcp", tcp, "direct")):
            label = f"{kind} {'relay' if route == 'relay' else ('unix-fd' if kind == 'unix' else 'direct')}"
            async with open_bus(addr, identity=owner, name=service.name) as sbus, open_bus(addr, identity=owner) as cbus:
                service.attach(sbus)
                rpc = RpcConnection(await cbus.open_channel(service.name, "rpc", route))
                await nursery.start(rpc.run)
                await rpc.call("echo", PAYLOAD)
                for in_flight in (1, 32):
                    rows[f"rpc {label} x{in_flight}"] = await calls_per_second(
                        lambda: rpc.call("echo", PAYLOAD), seconds, in_flight
                    )
                if kind == "unix":  # 1 MiB each way: a header and the body in DATA frames
                    big = os.urandom(BIG)
                    assert await rpc.call("echo", big) == big
                    calls = await calls_per_second(lambda: rpc.call("echo", big), seconds, 1)
                    rows[f"rpc 1MiB {label}"] = calls * 2 * BIG  # bytes carried per second, both ways
                await rpc.aclose()
                channel = await cbus.open_channel(service.name, "sink", route)
                block = os.urandom(WRITE)
                start = time.perf_counter()
                for _ in range(total // WRITE):
                    await channel.send_all(block)
                await channel.send_eof()
                assert await channel.receive_some() == b"done"
                rows[f"bulk {label}"] = total // WRITE * WRITE / (time.perf_counter() - start)
                await channel.aclose()
        nursery.cancel_scope.cancel()
    return rows


def dbus_rows(seconds: float, total: int) -> tuple[dict[str, float], str | None]:
    """The peer: a private dbus-daemon with a jeepney trio service and client."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        return {}, "dbus-daemon is not installed (Debian package dbus-daemon)"
    try:
        import jeepney  # noqa: F401
        import jeepney.io.trio  # noqa: F401
    except ImportError:
        return {}, "jeepney is not installed (pip install jeepney)"
    tmp = Path(tempfile.mkdtemp(prefix="minibus-dbus-"))
    conf = tmp / "bus.conf"
    conf.write_text(
        f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path={tmp}/bus</listen>
<auth>EXTERNAL</auth><policy context="default"><allow send_destination="*" eavesdrop="true"/>
<allow eavesdrop="true"/><allow own="*"/></policy>
<limit name="max_message_size">134217728</limit></busconfig>"""
    )
    proc = subprocess.Popen([daemon, f"--config-file={conf}", "--nofork", "--print-address"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        return trio.run(_dbus_measure, address, seconds, total), None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


async def _dbus_measure(address: str, seconds: float, total: int) -> dict[str, float]:
    from jeepney import DBusAddress, MessageType, new_method_call, new_method_return
    from jeepney.bus_messages import message_bus
    from jeepney.io.trio import open_dbus_connection, open_dbus_router

    rows: dict[str, float] = {}
    name = "org.bench.Echo"
    target = DBusAddress("/echo", bus_name=name, interface=name)
    async with trio.open_nursery() as nursery:
        service_conn = await open_dbus_connection(address)
        await service_conn.send(message_bus.RequestName(name))
        while (await service_conn.receive()).header.message_type != MessageType.method_return:
            pass  # the NameAcquired signal may come first

        async def serve() -> None:
            received = 0
            while True:
                msg = await service_conn.receive()
                if msg.header.message_type != MessageType.method_call:
                    continue
                if msg.header.fields.get(3) == "Echo":  # 3 = member
                    await service_conn.send(new_method_return(msg, "ay", msg.body))
                else:  # Bulk: one-way, counted
                    received += len(msg.body[0])
                    if msg.body[0] == b"":
                        await service_conn.send(new_method_return(msg, "t", (received,)))
                        received = 0

        nursery.start_soon(serve)
        async with open_dbus_router(address) as router:
            for in_flight in (1, 32):
                rows[f"rpc dbus-daemon+jeepney x{in_flight}"] = await calls_per_second(
                    lambda: router.send_and_get_reply(new_method_call(target, "Echo", "ay", (PAYLOAD,))),
                    seconds,
                    in_flight,
                )
            block = os.urandom(WRITE)
            start = time.perf_counter()
            for _ in range(total // WRITE):
                msg = new_method_call(target, "Bulk", "ay", (block,))
                msg.header.flags |= 1  # NO_REPLY_EXPECTED
                await router.send(msg)
            await router.send_and_get_reply(new_method_call(target, "Bulk", "ay", (b"",)))
            rows["bulk dbus-daemon+jeepney"] = total // WRITE * WRITE / (time.perf_counter() - start)
        nursery.cancel_scope.cancel()
        await service_conn.aclose()
    return rows


async def ours(seconds: float, total: int, in_process: bool) -> dict[str, float]:
    rows: dict[str, float] = {}
    for kind in ("unix", "tcp"):
        rows[f"rpc raw {kind} socket x1"] = await raw_pingpong(kind, seconds)
        rows[f"bulk raw {kind} socket"] = await raw_bulk(kind, total * 4)
    rows.update(await bus_rows(seconds, total * 4, in_process))  # as much as the raw rows move
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter rounds (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    parser.add_argument(
        "--in-process", action="store_true", help="run the broker inside the benchmark's process (for profiling) instead of as busd"
    )
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds, best of each row kept (default 3; 1 with --quick)")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 2.0
    total = (16 if args.quick else 64) * 1024 * 1024
    rounds = args.rounds or (1 if args.quick else 3)
    # Ours and the peer's rows alternate, round by round, and each row keeps its best round:
    # a slow moment of this machine then costs neither side alone.
    rows: dict[str, float] = {}
    peer: dict[str, float] = {}
    skipped: str | None = None
    for _ in range(rounds):
        for key, value in trio.run(ours, seconds, total, args.in_process).items():
            rows[key] = max(rows.get(key, 0.0), value)
        measured, skipped = dbus_rows(seconds, total)
        for key, value in measured.items():
            peer[key] = max(peer.get(key, 0.0), value)
    rows.update(peer)
    ratios: dict[str, float] = {}
    for label, kind in (("unix relay", "unix"), ("unix unix-fd", "unix"), ("tcp relay", "tcp"), ("tcp direct", "tcp")):
        for n in (1, 32):
            ratios[f"rpc {label} x{n} vs raw {kind} ping-pong"] = rows[f"rpc {label} x{n}"] / rows[f"rpc raw {kind} socket x1"]
            if peer:
                ratios[f"rpc {label} x{n} vs dbus-daemon+jeepney x{n}"] = rows[f"rpc {label} x{n}"] / rows[f"rpc dbus-daemon+jeepney x{n}"]
        ratios[f"bulk {label} vs raw {kind}"] = rows[f"bulk {label}"] / rows[f"bulk raw {kind} socket"]
        if f"rpc 1MiB {label}" in rows:
            ratios[f"rpc 1MiB {label} vs bulk raw {kind}"] = rows[f"rpc 1MiB {label}"] / rows[f"bulk raw {kind} socket"]
        if peer:
            ratios[f"bulk {label} vs dbus-daemon+jeepney"] = rows[f"bulk {label}"] / rows["bulk dbus-daemon+jeepney"]
    print(f"{'row':44} {'value':>12}")
    for key, value in rows.items():
        unit = "calls/s" if key.startswith("rpc") and "MiB" not in key else "MB/s"
        print(f"{key:44} {value / (1 if unit == 'calls/s' else 1e6):12.0f} {unit}")
    if skipped:
        print(f"dbus-daemon rows skipped: {skipped}")
    print()
    for key, value in ratios.items():
        print(f"{key:60} {value:6.2f}")
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "rounds": rounds,
        "rows": rows,
        "ratios": ratios,
        "skipped": skipped,
    }
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
