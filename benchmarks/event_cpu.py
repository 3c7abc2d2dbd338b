#!/usr/bin/env python3
"""CPU per event of each party of the event path, one at a time, without the noise of the
other parties' scheduling (issue 13): for judging a change to one of them.

Run:  python benchmarks/event_cpu.py [--parts subscriber,floor,publish,busd] [--size 64] [--json FILE]

* **subscriber**: this process holds N client connections (``open_bus`` + ``subscribe``,
  consumed by one ``async for`` task each, counting) to a scripted broker in the same process
  (a real Unix socket, a real shs1 handshake, hello and subscribe answered), which then writes
  bursts of B pre-encoded event frames to every connection (one ``send`` each) and waits until
  every consumer has the burst.  CPU of the process per delivered event; the broker's part is
  one ``send`` per burst per connection.  Bursts of 16 and of 2 events.
* **floor** (only when asked for): the same harness with ``events.py``'s API-shaped floor as
  the client (plain sockets, no handshake; a reader task decoding with cbor2 into a deque and
  a consumer task behind ``async for``): the least an ``async for`` API costs here, beside
  the subscriber figures.
* **publish**: ``bus.publish`` in a loop into a scripted broker in the same process that only
  reads and drops.  CPU of the process per event.
* **busd**: ``python -m bus`` as its own process; this one is a raw emitter (after the
  handshake and hello: bursts of B pre-encoded quiet emits in one write) and N raw subscriber
  connections (frames counted, nothing decoded); each burst must reach every subscriber before
  the next.  busd's CPU (``/proc/PID/task/*/schedstat``, nanoseconds) per event and per delivery.

Every figure is CPU time, not wall time, so other work on the machine changes it less than it
changes rates (it still changes it: caches, frequency); compare a change side by side, run
after run.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402
import trio.testing  # noqa: E402

from bus.io.fdpass import FdSocketStream  # noqa: E402
from bus.io.framed import FramedStream  # noqa: E402
from bus.io.secure import SecureStream  # noqa: E402
from bus.wire.address import parse_address  # noqa: E402
from bus.wire.frames import HEADER, encode_control  # noqa: E402
from bus.wire.identity import Identity, save_identity  # noqa: E402
from clients import open_bus  # noqa: E402
from clients.events import Event  # noqa: E402

SOURCE, MEMBER = "org.bench.Emitter", "Tick"
HEAD = struct.Struct("<qqq")


async def _listen(tmp: str) -> tuple[trio.socket.SocketType, str]:
    path = os.path.join(tmp, "s")
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(256)
    return listener, path


async def _accept(listener: trio.socket.SocketType, key: Identity) -> tuple[Any, FramedStream]:
    """Accept one client: handshake (plain, as on a Unix socket) and hello answered."""
    sock, _ = await listener.accept()
    secure = SecureStream.server(trio.SocketStream(sock), key, encrypted=False)
    await secure.do_handshake()
    framed = FramedStream(secure, receive_stream=secure.plain_transport())
    frame = await framed.receive_frame()
    assert frame is not None and frame.message["op"] == "hello"  # type: ignore[union-attr]
    await framed.send_message({"re": frame.message["id"], "result": {"unique_id": ":9"}})  # type: ignore[union-attr]
    return sock, framed


class _Bursts:
    """What the subscriber harnesses share: consumers counting what they take, and a writer
    sending a burst of pre-encoded event frames to every connection (one ``send`` each), then
    waiting until every consumer has it, until ``events`` were sent."""

    def __init__(self, n: int, burst: int, size: int, identity: str) -> None:
        self.got = [0] * n
        self.need = 0
        self.done = trio.Event()
        self.burst = burst
        payload = HEAD.pack(1, 2, 0) + b"x" * (size - HEAD.size)
        event = {"source": SOURCE, "member": MEMBER, "payload": payload, "sender": ":3", "identity": identity, "event": "event"}
        self.data = encode_control(0, event) * burst

    async def consume(self, sub: Any, i: int, kind: type) -> None:
        count = 0
        async for item in sub:
            assert type(item) is kind
            count += 1
            if count >= self.need:
                self.got[i] = count
                if min(self.got) >= self.need:
                    self.done.set()

    async def feed(self, raw: list[Any], events: int) -> tuple[float, int]:
        """CPU seconds of this process while ``events`` per connection went out, and how many."""
        sent = 0
        started = time.process_time()
        while sent < events:
            sent += self.burst
            self.need, self.done = sent, trio.Event()
            for sock in raw:
                sock.send(self.data)
            with trio.fail_after(30):
                await self.done.wait()
        return time.process_time() - started, sent


async def subscriber_cpu(n: int, burst: int, events: int, size: int) -> float:
    key, emitter = Identity.generate(), Identity.generate()
    listener, path = await _listen(tempfile.mkdtemp())
    socks: list[Any] = []
    bursts = _Bursts(n, burst, size, emitter.id)

    async def serve_one() -> None:
        sock, framed = await _accept(listener, key)
        frame = await framed.receive_frame()
        assert frame is not None and frame.message["op"] == "subscribe"  # type: ignore[union-attr]
        await framed.send_message({"re": frame.message["id"], "result": {"subscription": 1}})  # type: ignore[union-attr]
        socks.append(sock)
        while await framed.receive_frame() is not None:
            pass

    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        identity = Identity.generate()
        subs = []
        for _ in range(n):
            nursery.start_soon(serve_one)
            bus = await stack.enter_async_context(open_bus(f"unix:path={path},key={key.id}", identity=identity, reconnect=False))
            subs.append(await stack.enter_async_context(bus.subscribe(SOURCE, MEMBER)))
        async with trio.open_nursery() as consumers:
            for i, sub in enumerate(subs):
                consumers.start_soon(bursts.consume, sub, i, Event)
            await trio.testing.wait_all_tasks_blocked()
            cpu, sent = await bursts.feed([sock._sock for sock in socks], events)
            consumers.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    return cpu / (sent * n) * 1e6


async def floor_cpu(n: int, burst: int, events: int, size: int) -> float:
    """:func:`subscriber_cpu` with ``events.py``'s API-shaped floor as the client (a reader
    task decoding with cbor2 into a deque, a consumer task behind ``async for``: no checks,
    bounds, routing or event object), fed the same frames by the same writer: the least an
    ``async for`` API costs in this harness."""
    from benchmarks.events import ApiShapedSubscription

    listener, path = await _listen(tempfile.mkdtemp())
    bursts = _Bursts(n, burst, size, Identity.generate().id)
    async with trio.open_nursery() as nursery:
        raw, clients = [], []
        for _ in range(n):
            client = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
            await client.connect(path)
            server, _ = await listener.accept()
            clients.append(client)
            raw.append(server._sock)  # type: ignore[attr-defined]
        async with trio.open_nursery() as consumers:
            for i, client in enumerate(clients):
                sub = ApiShapedSubscription()
                consumers.start_soon(sub.read, client)
                consumers.start_soon(bursts.consume, sub, i, dict)
            await trio.testing.wait_all_tasks_blocked()
            cpu, sent = await bursts.feed(raw, events)
            consumers.cancel_scope.cancel()
        for client in clients:
            client.close()
        nursery.cancel_scope.cancel()
    return cpu / (sent * n) * 1e6


async def publish_cpu(events: int, size: int) -> float:
    key = Identity.generate()
    listener, path = await _listen(tempfile.mkdtemp())

    async def drain() -> None:
        sock, _ = await _accept(listener, key)
        raw = sock._sock
        while True:
            await trio.lowlevel.wait_readable(raw)
            if not raw.recv(1 << 18):
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        async with open_bus(f"unix:path={path},key={key.id}", identity=Identity.generate(), name=SOURCE, reconnect=False) as bus:
            pad = b"x" * (size - HEAD.size)
            started = time.process_time()
            for seq in range(events):
                await bus.publish(MEMBER, HEAD.pack(time.monotonic_ns(), seq, 0) + pad, source=SOURCE)
            cpu = time.process_time() - started
        nursery.cancel_scope.cancel()
    return cpu / events * 1e6


def _cpu_ns(pid: int) -> int:
    return sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0]) for t in os.listdir(f"/proc/{pid}/task"))


async def _raw_client(address: str, identity: Identity, hello: dict[str, Any]) -> tuple[FramedStream, FdSocketStream]:
    ep = parse_address(address)[0]
    assert ep.path is not None
    transport = await FdSocketStream.connect(ep.path)
    stream = SecureStream.client(transport, identity, ep.key, encrypted=False)
    await stream.do_handshake()
    framed = FramedStream(stream, receive_stream=stream.plain_transport(), trusted=True)
    await framed.send_message({"op": "hello", "id": 1, **hello})
    while True:
        frame = await framed.receive_frame()
        assert frame is not None
        if frame.message.get("re") == 1:  # type: ignore[union-attr]
            assert "result" in frame.message, frame  # type: ignore[union-attr]
            return framed, transport


async def busd_cpu(n: int, burst: int, events: int, size: int) -> float:
    tmp = Path(tempfile.mkdtemp())
    save_identity(tmp / "busd.key", Identity.generate())
    (tmp / "run").mkdir(mode=0o700)
    (tmp / "busd.toml").write_text(
        '[[rule]]\nname = "bench"\nidentities = ["*"]\nconnect = true\nown = ["org.bench.*"]\nsee = ["*"]\nemit = ["org.bench.*"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bus", "--no-tcp", "--key", str(tmp / "busd.key"), "--config", str(tmp / "busd.toml"),
         "--runtime-dir", str(tmp / "run"), "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, XDG_CONFIG_HOME=str(tmp / "cfg"), PYTHONPATH=str(ROOT)),
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip().split("=", 1)[1]
        _, emitter = await _raw_client(address, Identity.generate(), {"name": SOURCE})
        subscribers = []
        for i in range(n):
            if i % 25 == 0:
                identity = Identity.generate()  # (connections per identity are limited)
            framed, transport = await _raw_client(address, identity, {})
            await framed.send_message({"op": "subscribe", "id": 2, "source": SOURCE, "member": MEMBER})
            while (frame := await framed.receive_frame()) is not None and frame.message.get("re") != 2:  # type: ignore[union-attr]
                pass
            subscribers.append(transport)
        payload = b"x" * size
        data = b"".join(
            encode_control(0, {"member": MEMBER, "payload": payload, "quiet": True, "source": SOURCE, "op": "emit", "id": 100 + i})
            for i in range(burst)
        )
        state: dict[str, Any] = {"target": 0, "left": n, "done": trio.Event()}

        async def count(transport: FdSocketStream) -> None:
            sock, rest, got = transport._raw, b"", 0
            while True:
                await trio.lowlevel.wait_readable(sock)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return
                chunk, pos = rest + chunk, 0
                while len(chunk) - pos >= HEADER.size:
                    end = pos + HEADER.size + HEADER.unpack_from(chunk, pos)[3]
                    if end > len(chunk):
                        break
                    got, pos = got + 1, end
                rest = chunk[pos:]
                if got == state["target"]:
                    state["left"] -= 1
                    if not state["left"]:
                        state["done"].set()

        async with trio.open_nursery() as nursery:
            for transport in subscribers:
                nursery.start_soon(count, transport)
            rounds, warmup = max(1, events // burst), 20
            for r in range(rounds + warmup):
                if r == warmup:
                    cpu_before = _cpu_ns(proc.pid)
                state["target"] += burst
                state["left"], state["done"] = n, trio.Event()
                emitter._raw.send(data)
                with trio.fail_after(30):
                    await state["done"].wait()
            cpu = (_cpu_ns(proc.pid) - cpu_before) / 1e9
            nursery.cancel_scope.cancel()
        return cpu / (rounds * burst) * 1e6
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="subscriber,publish,busd", help="which parties, comma-separated")
    parser.add_argument("--size", type=int, default=64, help="payload bytes (64; the fan-out table's rows have 64 and 1024)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()
    size = args.size
    if size < HEAD.size:
        parser.error(f"--size: at least {HEAD.size} bytes (the payload's header)")
    parts = args.parts.split(",")
    results: dict[str, float] = {}

    def show(label: str, value: float, unit: str = "us CPU per event") -> None:
        results[label] = round(value, 2)
        print(f"{label:<44} {value:7.2f} {unit}", flush=True)

    if "subscriber" in parts:
        show("subscriber process, 10 conns, 16-event bursts", trio.run(subscriber_cpu, 10, 16, 30000, size))
        show("subscriber process, 10 conns, 2-event bursts", trio.run(subscriber_cpu, 10, 2, 8000, size))
    if "floor" in parts:
        show("API-shaped floor, 10 conns, 16-event bursts", trio.run(floor_cpu, 10, 16, 30000, size))
        show("API-shaped floor, 10 conns, 2-event bursts", trio.run(floor_cpu, 10, 2, 8000, size))
    if "publish" in parts:
        show(f"publish ({size} B payload)", trio.run(publish_cpu, 100000, size))
    if "busd" in parts:
        show("busd, 1 subscriber, 16-emit bursts", trio.run(busd_cpu, 1, 16, 30000, size))
        show("busd, 10 subscribers, 16-emit bursts", trio.run(busd_cpu, 10, 16, 10000, size))
        per_event = trio.run(busd_cpu, 100, 16, 1500, size)
        show("busd, 100 subscribers, 16-emit bursts", per_event / 100, "us CPU per delivery")
    if args.json:
        Path(args.json).write_text(json.dumps({"python": sys.version.split()[0], "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
