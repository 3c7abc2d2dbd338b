#!/usr/bin/env python3
"""Event fan-out benchmark (issues 11 and 13): minibus events beside D-Bus signals, NATS and the
trio limit, in one run.

Run:  python benchmarks/events.py [--quick] [--seconds S] [--rounds N] [--only minibus,nats,limit,...] [--json FILE]
      python benchmarks/events.py --profile [--seconds S] [--counts 1,100] [--only minibus,limit]
          # minibus publish (and the limit), 100 subscribers by default: the broker and the first
          # subscriber process under py-spy

One emitter sends to 1, 10 and 100 subscribing connections, with 64-byte and 1 KiB payloads.
Subscribers are spread over up to 4 processes (1 -> one process; 10 -> 3+3+2+2; 100 -> 4 x 25),
the emitter is its own process and so is every broker.  Every party is started by this script,
which only sends each one commands on its stdin and reads what it measured.

Each payload is exactly 64 or 1,024 bytes: a header of three little-endian int64 -- the emitter's
``time.monotonic_ns()`` just before it emits (CLOCK_MONOTONIC is one clock for the whole
machine on Linux), the event's sequence number and the cell's epoch -- and padding.  A
subscriber takes its own ``monotonic_ns()`` when its client library hands it the event, so the
latency is emit call to delivery in the subscriber's code, through the broker.

Rows (per subscriber count and payload size), all measured in the same run:

* **minibus**: ``busd`` as its own process (Unix socket, as ``channels.py`` starts it, with a
  ``[[rule]]`` letting any key connect, see everything, own and emit as ``org.bench.*``); the
  emitter is ``open_bus(name="org.bench.Emitter")`` and ``await bus.publish("Tick", payload,
  source="org.bench.Emitter")`` in a loop (one-way, as a D-Bus signal is: the column the
  target is judged on), and a variant with ``PIPELINE`` emitter tasks each calling ``await
  bus.emit(...)``, which waits for the broker's ``{delivered}`` answer (``emit xN``).  Each subscriber process makes its
  own identity; each of its connections is ``open_bus(...)`` + ``bus.subscribe(
  "org.bench.Emitter", "Tick")``, consumed with ``async for``.
* **D-Bus**: signals (``/bench``, ``org.bench.Events.Tick``, body ``ay``) sent by jeepney through
  a private ``dbus-daemon`` and a private ``dbus-broker``; the emitter owns a well-known name and
  each subscriber connection has a match rule (``AddMatch`` on type, sender -- that name --,
  interface, member and path).  Both jeepney flavours run, like with like: trio
  (``jeepney.io.trio``: ``conn.send`` / ``await conn.receive()`` per connection task) and
  blocking (``jeepney.io.blocking`` to connect and add the match; then one selector over the
  process's sockets feeding each connection's jeepney ``Parser``).  The better flavour of the
  better daemon is the D-Bus column.  (Both flavours' processes are up at once on each daemon,
  so each flavour's emitter has its own name.)
* **NATS**: ``nats-server`` (TCP on 127.0.0.1: it has no Unix socket for clients), nats-py
  (asyncio) publishing to and subscribing on subject ``bench.tick``, one connection per
  subscriber.

* **trio limit** (issue 13's yardstick: "a trio process writing one pre-encoded frame to N
  sockets"): ONE trio process that is both the emitter and the broker -- there is no emitter
  process and nothing is received, decoded, checked or routed per event.  It accepts the
  subscribers' N Unix sockets (no handshake, no hello, no subscribe request), and per event
  builds the frame busd would send for it (minibus's 10-byte header + the CBOR body busd encodes
  for this script's event: source, member, payload, sender, identity, event, encoded once with
  the project's ``encode_control``; per event only the payload is put in place, one bytes
  concatenation, since CBOR writes a byte string's length before its bytes) and writes it to
  every socket with ONE non-blocking ``socket.send`` per socket (a plain stdlib socket, no trio
  checkpoint per send: trio only waits when a socket is full, which the lead rule makes rare).
  That is the literal limit and the column the >= 0.8 target is judged on.  A coalescing variant
  (``limit batched xB``, ``--limit-batch``, 16) joins up to B events -- as many as the lead rule
  lets it make at once -- and sends them with one ``send`` per socket; it is reported, not
  judged: busd also writes a subscriber one burst per read of the emitter's socket, but how
  many events a read brings depends on the emitter, and a limit that picks its own batch has no
  such input.  A third, ``limit fed`` (reported, not judged), has minibus's topology: an
  emitter process sends each event's pre-encoded quiet-``emit`` frame (one ``send`` each) to a
  trio forwarder process that, per read of the emitter's socket, cuts the frames,
  ``cbor2.loads`` each body, ``cbor2.dumps`` the event map busd would send, and writes the
  read's events with one ``send`` per subscriber socket (as busd writes once per read burst):
  what a broker between an emitter and its subscribers must do at the least.  The limit
  obeys the same lead rule as every emitter (the shared page, polled every
  0.2 ms while ahead), and its subscribers are laid out like the others (same processes, same
  slots).  Each subscriber connection is a minimal trio client: ``await sock.recv(65536)`` on a
  ``trio.socket`` socket, frames cut by the 10-byte header, each body ``cbor2.loads``-ed (no
  profile check), the payload handed to the same ``Tally.record``.  Its "broker" CPU is the
  limit process (emitter CPU is 0: the same process).

* **Floors** (reported beside the limit in a table of their own, never judged; ``--no-floors``
  leaves them out): each swaps one part of the limit for minibus's, so that one run shows, as
  ratios to the limit, which part holds minibus below the target.
  ``limit -> minibus subs``: the limit's process and writing, unchanged, feeding real minibus
  subscriber connections (``open_bus`` + ``subscribe`` + ``async for``, as minibus's column
  has them); the limit's process lets each in first as busd would -- the shs1 handshake (plain,
  as on a Unix socket) with a key of its own, ``hello`` and ``subscribe`` answered -- then
  writes the same pre-encoded frames.  ``limit -> API-shaped subs``: the limit unchanged, its
  subscribers reading and decoding as the limit's do but in a reader task that hands each
  decoded event to a buffer and wakes a consumer task (once per read), which takes them with
  ``async for`` (``__anext__`` returns a buffered event without yielding): the least an API with
  a separate consumer must do.  ``busd -> limit subs``: minibus's broker and emitter (busd,
  ``publish``) feeding the limit's minimal subscribers, each of which joins busd for real
  (handshake, ``hello``, ``subscribe`` with the project's stream classes) before its socket is
  read as the limit's are; its emitter owns ``FLOOR_EMITTER_NAME`` (busd is shared with the
  minibus columns; the name is as long, so the frames are the same size).
  ``limit fed xB`` (B is ``--limit-batch``, 16): ``limit fed`` with its emitter writing as
  ``publish`` does -- up to B pre-encoded emit frames joined, one ``send`` a batch (fewer when
  the lead rule stops it first) -- so the forwarder's reads, and its one write per subscriber a
  read, carry bursts as busd's do: minibus's topology at the least CPU per event.  It swaps
  all three parts at once, and it can beat the judged limit, whose writer sends each event on
  its own to every socket.  ``limit fed xB checked``: the protocol's shape at that least CPU --
  ``limit fed xB`` with the profile check where the protocol puts it (the forwarder decodes
  each emit with ``bus.wire.frames.decode_control_body``, as busd checks every frame a peer
  sends; a client trusts what its broker sends, so the subscribers only ``cbor2.loads``) and
  the API-shaped subscribers: what minibus's topology, protocol and API cost together with
  nothing else of minibus's (no routing, no accounting, no queues, no event objects).

How a cell is measured: the emitter emits for a fixed window (``--seconds``) as fast as its API
lets it, but never more than ``LEAD`` events ahead of the slowest subscriber.  (Subscribers write
the last sequence number they got into a shared page -- an mmap'd file -- that the emitter reads;
it is the same rule for every system, and every emitter looks again every 0.2 ms while it is
ahead: the async ones run their event loop once and then sleep 0.2 ms blocking, as the
blocking one does, since ``trio.sleep``/``asyncio.sleep`` cannot wait less than 1 ms.  Without
the rule D-Bus and NATS queue without bound when the subscribers are slower than the emitter,
and each cell would end after minutes of draining.)
When the window closes the script waits until every subscriber has the last event (or none got
anything for 0.5 s, at most 10 s), then collects counts and latency histograms.  Events/s is
all the events every subscriber received divided by the time from the first emit to the last
receipt; p99 is over every received event (log buckets, 1.6% wide).  Where the subscribers are
what limits, p99 is mostly the ``LEAD`` events queued ahead of each one (the same rule for every
system): it is the latency at full load, not at rest.  Events a system dropped (minibus ``Gap``s;
NATS slow consumers) are not counted, and reported.  For each subscriber count every system's
processes are started together (idle ones block in a read) and ``--rounds`` rounds run every
cell in turn, the best round kept, so a slow moment of this shared machine costs no system
alone.  The CPU each party (broker, emitter, all subscriber processes) used during the cell, in
cores, is printed per cell and kept in the JSON.

Peers are optional: a missing binary or Python package, or a broker that does not start, skips
its column with the reason printed.  ``apt-get install dbus-daemon dbus-broker nats-server``,
``pip install jeepney nats-py`` bring them; minibus and its tests need none of them.

dbus-broker runs without systemd: ``dbus-broker-launch`` cannot start here (it opens the
journal socket and needs a systemd to activate through), so this script is the launcher: it
starts ``dbus-broker --controller FD`` on one end of a socketpair, authenticates on the other
(SASL EXTERNAL), and calls ``org.bus1.DBus.Broker.AddListener`` with a listening socket and a
policy that allows everything (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import mmap
import os
import platform
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import emit_json  # noqa: E402

EMITTER_NAME = "org.bench.Emitter"  # minibus's event source
#: The source of the floor variant "busd -> limit subs", which shares busd with the minibus
#: columns (one owner per name): as long as EMITTER_NAME, so its frames are the same size.
FLOOR_EMITTER_NAME = "org.bench.Emitted"
# D-Bus: each jeepney flavour has its own emitter name (both run on each daemon at once, and a
# subscriber's match rule names its own emitter, so neither flavour's subscribers see the other's)
DBUS_EMITTER = {"trio": "org.bench.EmitterTrio", "blocking": "org.bench.EmitterBlocking"}
INTERFACE = "org.bench.Events"
MEMBER = "Tick"
OBJECT_PATH = "/bench"
SUBJECT = "bench.tick"
HEAD = struct.Struct("<qqq")  # emit time (monotonic ns), sequence number, epoch
SIZES = (64, 1024)
COUNTS = (1, 10, 100)
MAX_PROCS = 4  # subscriber processes per row
SLOTS = 128  # progress slots in the shared page (one per subscribing connection)
LEAD = 64  # the emitter is never more than this many events ahead of the slowest subscriber
PIPELINE = 8  # emitter tasks in minibus's pipelined variant
TARGET = 1.5  # minibus >= 1.5 x the better D-Bus on every row
LIMIT_TARGET = 0.8  # issue 13: minibus publish >= 0.8 x the trio limit (one send per frame per socket)
LIMIT_BATCH = 16  # events per send in the limit's coalescing variant (reported, not the target)
# The floors (reported beside the judged limit, never judged): the flavours and their columns.
FLOOR_MINIBUS_SUBS, FLOOR_API_SUBS, FLOOR_BUSD = "minibus-subs", "api-subs", "limit-subs"
FLOOR_FED_CHECKED = "fed-checked"  # (labelled by checked_floor_label(): its emitter batches)
FLOOR_LABELS = {FLOOR_MINIBUS_SUBS: "limit -> minibus subs", FLOOR_API_SUBS: "limit -> API-shaped subs",
                FLOOR_BUSD: "busd -> limit subs"}
FLOORS = True  # --no-floors leaves them out


def checked_floor_label() -> str:
    """The protocol-shaped floor's column: ``limit fed xB`` with the profile check where the
    protocol puts it and the API's shape at the subscribers (see "Floors")."""
    return f"limit fed x{LIMIT_BATCH} checked"


def fed_batched_label() -> str:
    """The floor of minibus's topology with the emitter writing as ``publish`` does."""
    return f"limit fed x{LIMIT_BATCH}"


def monotonic_ns() -> int:
    return time.monotonic_ns()


def split(total: int) -> list[int]:
    """Connections per subscriber process: at most MAX_PROCS processes, as even as can be."""
    procs = min(total, MAX_PROCS)
    return [total // procs + (1 if i < total % procs else 0) for i in range(procs)]


# ---------------------------------------------------------------------------------------------
# Measuring, in every subscriber process


class Progress:
    """The shared page: one int64 per subscribing connection, its last sequence number."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "r+b")  # noqa: SIM115 -- lives as long as the process
        self._map = mmap.mmap(self._file.fileno(), SLOTS * 8)
        self.slots = memoryview(self._map).cast("q")

    def reset(self) -> None:
        for i in range(SLOTS):
            self.slots[i] = -1

    def floor(self, n: int) -> int:
        return int(min(self.slots[:n]))


def bucket_top(index: int) -> int:
    """The largest latency (ns) a bucket holds."""
    if index < 512:
        return index
    bits, mantissa = index >> 6, index & 63
    return ((65 + mantissa) << (bits - 7)) - 1


class Tally:
    """What one subscriber process received in the current epoch."""

    def __init__(self, progress: Progress) -> None:
        self.slots = progress.slots
        self.epoch = -1
        self.reset(-1)

    def reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.count = 0
        self.last = 0
        self.missed = 0
        self.gaps = 0
        self.hist: dict[int, int] = {}

    def record(self, slot: int, data: bytes) -> None:
        now = time.monotonic_ns()
        sent, seq, epoch = HEAD.unpack_from(data)
        if epoch != self.epoch:
            return
        self.count += 1
        self.last = now
        latency = now - sent
        # a log bucket: 64 per power of two above 127 ns (about 1.6% wide); below, one per ns
        if latency < 128:
            index = max(latency, 0)
        else:
            bits = latency.bit_length()
            index = (bits << 6) | ((latency >> (bits - 7)) & 63)
        hist = self.hist
        hist[index] = hist.get(index, 0) + 1
        slots = self.slots
        if seq > slots[slot]:
            slots[slot] = seq

    def gap(self, missed: int | None) -> None:
        self.gaps += 1
        self.missed += missed or 0

    def stats(self) -> dict[str, Any]:
        return {"count": self.count, "last": self.last, "missed": self.missed, "gaps": self.gaps, "hist": sorted(self.hist.items())}

    def command(self, line: str) -> dict[str, Any] | None:
        """Handle one control line; None means quit."""
        cmd = json.loads(line)
        if cmd["cmd"] == "epoch":
            self.reset(cmd["epoch"])
            return {"ok": True}
        if cmd["cmd"] == "stats":
            return self.stats()
        return None


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def trio_lines() -> Any:
    """Control lines from stdin, in a trio process."""
    import trio

    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stream:
        while True:
            while b"\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()


async def trio_control(tally: Tally) -> None:
    async for line in trio_lines():
        answer = tally.command(line)
        if answer is None:
            return
        reply(answer)


# ---------------------------------------------------------------------------------------------
# Emitting, the same loop for every system


class Emitter:
    """The window loop: emit until the deadline, never more than ``lead`` ahead of the slowest
    subscriber (read from the shared page)."""

    def __init__(self, progress: Progress, cmd: dict[str, Any]) -> None:
        self.progress = progress
        self.epoch: int = cmd["epoch"]
        self.pad: bytes = b"x" * (cmd["size"] - HEAD.size)
        self.n: int = cmd["n"]
        self.lead: int = cmd["lead"]
        self.seq = 0
        self.floor: int = -1
        self.waits = 0
        self.t0 = monotonic_ns()
        self.t1 = self.t0
        self.deadline = self.t0 + int(cmd["seconds"] * 1e9)

    def ahead(self) -> bool:
        """Whether the next event would be too far ahead (refreshing the floor first)."""
        if self.seq - self.floor <= self.lead:
            return False
        self.floor = self.progress.floor(self.n)
        return bool(self.seq - self.floor > self.lead)

    def next_payload(self) -> bytes | None:
        """The next event's payload, or None when the window is over."""
        now = monotonic_ns()
        if now >= self.deadline:
            return None
        seq = self.seq
        self.seq = seq + 1
        if seq == 0:
            self.t0 = now
        self.t1 = now
        return HEAD.pack(now, seq, self.epoch) + self.pad

    def result(self, **extra: Any) -> dict[str, Any]:
        return {"sent": self.seq, "t0": self.t0, "t1": self.t1, "last_seq": self.seq - 1, "lead_waits": self.waits, **extra}


async def trio_pause(seconds: float) -> None:
    """The emitter's wait while it is LEAD events ahead: one pass of the event loop (its own
    tasks run), then a blocking sleep of ``seconds``.  ``trio.sleep`` and ``asyncio.sleep``
    cannot wait less than a millisecond (epoll counts in milliseconds, rounded up), which
    would make an async emitter poll five times less often than the blocking one's
    ``time.sleep(0.0002)``: every emitter polls every 0.2 ms."""
    import trio

    await trio.lowlevel.checkpoint()
    time.sleep(seconds)


async def asyncio_pause(seconds: float) -> None:
    """``trio_pause`` for the asyncio emitter (NATS)."""
    await asyncio.sleep(0)
    time.sleep(seconds)


async def wait_for_lead(em: Emitter, sleep: Callable[[float], Awaitable[None]]) -> bool:
    """Wait while the next event would be more than the lead ahead of the slowest subscriber
    (polling every 0.2 ms); False once the window is over."""
    while em.ahead():
        if monotonic_ns() >= em.deadline:
            return False
        em.waits += 1
        await sleep(0.0002)
    return True


async def emit_async(
    em: Emitter, send: Callable[[bytes], Awaitable[Any]], sleep: Callable[[float], Awaitable[None]], tasks: int = 1
) -> list[Any]:
    """Run the window with ``tasks`` concurrent senders (``tasks`` > 1 needs trio)."""
    answers: list[Any] = []

    async def sender() -> None:
        while True:
            if not await wait_for_lead(em, sleep):
                return
            payload = em.next_payload()
            if payload is None:
                return
            answer = await send(payload)
            if len(answers) < 1:
                answers.append(answer)

    if tasks == 1:
        await sender()
    else:
        import trio

        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(sender)
    return answers


# ---------------------------------------------------------------------------------------------
# minibus roles


def _minibus_imports() -> Any:
    import trio

    from bus.wire.identity import Identity
    from clients import open_bus
    from clients.events import Event

    return trio, Identity, open_bus, Event


def role_sub_minibus(address: str, count: int, slot0: int, shm: str) -> None:
    trio, Identity, open_bus, Event = _minibus_imports()
    tally = Tally(Progress(shm))

    async def consume(sub: Any, slot: int) -> None:
        record = tally.record
        async for item in sub:
            if type(item) is Event:
                payload = item.payload
                if type(payload) is bytes:
                    record(slot, payload)
            else:
                tally.gap(item.missed)

    async def main() -> None:
        identity = Identity.generate()
        async with AsyncExitStack() as stack:
            subs = []
            for _ in range(count):
                bus = await stack.enter_async_context(open_bus(address, identity=identity, reconnect=False))
                subs.append(await stack.enter_async_context(bus.subscribe(EMITTER_NAME, MEMBER)))
            async with trio.open_nursery() as nursery:
                for i, sub in enumerate(subs):
                    nursery.start_soon(consume, sub, slot0 + i)
                reply({"ready": True})
                await trio_control(tally)
                nursery.cancel_scope.cancel()

    trio.run(main)


def role_emit_minibus(address: str, shm: str, name: str = EMITTER_NAME) -> None:
    trio, Identity, open_bus, _ = _minibus_imports()
    progress = Progress(shm)

    async def main() -> None:
        async with open_bus(address, identity=Identity.generate(), name=name, reconnect=False) as bus:
            reply({"ready": True})

            async def send(payload: bytes) -> int:
                delivered: int = await bus.emit(MEMBER, payload, source=name)
                return delivered

            async def publish(payload: bytes) -> None:
                await bus.publish(MEMBER, payload, source=name)

            async for line in trio_lines():
                cmd = json.loads(line)
                if cmd["cmd"] != "run":
                    return
                em = Emitter(progress, cmd)
                tasks = cmd.get("tasks", 1)
                # One task: one-way ``publish`` (what a D-Bus signal is); several: ``emit``,
                # each waiting for the broker's answer.
                delivered = await emit_async(em, publish if tasks == 1 else send, trio_pause, tasks)
                reply(em.result(delivered=delivered[0] if delivered else None))

    trio.run(main)


# ---------------------------------------------------------------------------------------------
# D-Bus roles (jeepney)


def _match_rule(flavour: str) -> Any:
    from jeepney.bus_messages import MatchRule

    return MatchRule(type="signal", sender=DBUS_EMITTER[flavour], interface=INTERFACE, member=MEMBER, path=OBJECT_PATH)


def role_sub_dbus_trio(address: str, count: int, slot0: int, shm: str) -> None:
    import trio
    from jeepney import MessageType
    from jeepney.bus_messages import message_bus
    from jeepney.io.trio import open_dbus_connection

    tally = Tally(Progress(shm))
    signal_type = MessageType.signal

    async def consume(conn: Any, slot: int) -> None:
        record = tally.record
        while True:
            msg = await conn.receive()
            if msg.header.message_type is signal_type and msg.body and type(msg.body[0]) is bytes:
                record(slot, msg.body[0])

    async def main() -> None:
        conns = []
        try:
            for _ in range(count):
                conn = await open_dbus_connection(address)
                conns.append(conn)
                await conn.send(message_bus.AddMatch(_match_rule("trio")))
                while (await conn.receive()).header.message_type not in (MessageType.method_return, MessageType.error):
                    pass
            async with trio.open_nursery() as nursery:
                for i, conn in enumerate(conns):
                    nursery.start_soon(consume, conn, slot0 + i)
                reply({"ready": True})
                await trio_control(tally)
                nursery.cancel_scope.cancel()
        finally:
            for conn in conns:
                await conn.aclose()

    trio.run(main)


def role_sub_dbus_blocking(address: str, count: int, slot0: int, shm: str) -> None:
    from jeepney import MessageType
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    tally = Tally(Progress(shm))
    conns = [open_dbus_connection(address) for _ in range(count)]
    selector = selectors.DefaultSelector()
    for i, conn in enumerate(conns):
        conn.send_and_get_reply(message_bus.AddMatch(_match_rule("blocking")), timeout=10)
        conn.selector.unregister(conn.sock)  # ours multiplexes all of them
        selector.register(conn.sock, selectors.EVENT_READ, (conn.parser, slot0 + i))
    stdin = sys.stdin.fileno()
    selector.register(stdin, selectors.EVENT_READ, None)
    signal_type = MessageType.signal
    record = tally.record
    reply({"ready": True})
    buffer = b""
    try:
        while True:
            for key, _ in selector.select(5.0):
                if key.data is None:
                    data = os.read(stdin, 65536)
                    if not data:
                        return
                    buffer += data
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        answer = tally.command(line.decode())
                        if answer is None:
                            return
                        reply(answer)
                    continue
                parser, slot = key.data
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                if not data:
                    return
                parser.add_data(data)
                while (msg := parser.get_next_message()) is not None:
                    if msg.header.message_type is signal_type and msg.body and type(msg.body[0]) is bytes:
                        record(slot, msg.body[0])
    finally:
        for conn in conns:
            conn.close()


def _request_name_blocking(conn: Any) -> None:
    from jeepney.bus_messages import message_bus

    name = DBUS_EMITTER["blocking"]
    reply_msg = conn.send_and_get_reply(message_bus.RequestName(name), timeout=10)
    if reply_msg.body[0] != 1:  # 1: primary owner
        raise RuntimeError(f"RequestName({name}) answered {reply_msg.body}")


def role_emit_dbus_trio(address: str, shm: str) -> None:
    import trio
    from jeepney import DBusAddress, MessageType, new_signal
    from jeepney.bus_messages import message_bus
    from jeepney.io.trio import open_dbus_connection

    progress = Progress(shm)
    target = DBusAddress(OBJECT_PATH, interface=INTERFACE)

    async def main() -> None:
        conn = await open_dbus_connection(address)
        async with conn:
            name = DBUS_EMITTER["trio"]
            await conn.send(message_bus.RequestName(name))
            while (msg := await conn.receive()).header.message_type != MessageType.method_return:
                pass
            if msg.body[0] != 1:
                raise RuntimeError(f"RequestName({name}) answered {msg.body}")
            reply({"ready": True})

            async def send(payload: bytes) -> None:
                await conn.send(new_signal(target, MEMBER, "ay", (payload,)))

            async for line in trio_lines():
                cmd = json.loads(line)
                if cmd["cmd"] != "run":
                    return
                em = Emitter(progress, cmd)
                await emit_async(em, send, trio_pause)
                reply(em.result())

    trio.run(main)


def role_emit_dbus_blocking(address: str, shm: str) -> None:
    from jeepney import DBusAddress, new_signal
    from jeepney.io.blocking import open_dbus_connection

    progress = Progress(shm)
    target = DBusAddress(OBJECT_PATH, interface=INTERFACE)
    with open_dbus_connection(address) as conn:
        _request_name_blocking(conn)
        reply({"ready": True})
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] != "run":
                return
            em = Emitter(progress, cmd)
            send = conn.send
            while True:
                while em.ahead():
                    if monotonic_ns() >= em.deadline:
                        break
                    em.waits += 1
                    time.sleep(0.0002)
                payload = em.next_payload()
                if payload is None:
                    break
                send(new_signal(target, MEMBER, "ay", (payload,)))
            reply(em.result())


# ---------------------------------------------------------------------------------------------
# NATS roles (nats-py, asyncio)


async def asyncio_lines() -> Any:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        yield line.decode()


def role_sub_nats(url: str, count: int, slot0: int, shm: str) -> None:
    import nats

    tally = Tally(Progress(shm))

    async def main() -> None:
        conns = []

        async def on_error(exc: Exception) -> None:
            tally.gap(None)  # a slow consumer: the client dropped messages

        try:
            for i in range(count):
                nc = await nats.connect(url, allow_reconnect=False, error_cb=on_error)
                conns.append(nc)

                async def on_message(msg: Any, slot: int = slot0 + i) -> None:
                    tally.record(slot, msg.data)

                await nc.subscribe(SUBJECT, cb=on_message)
                await nc.flush()
            reply({"ready": True})
            async for line in asyncio_lines():
                answer = tally.command(line)
                if answer is None:
                    return
                reply(answer)
        finally:
            for nc in conns:
                await nc.close()

    asyncio.run(main())


def role_emit_nats(url: str, shm: str) -> None:
    import nats

    progress = Progress(shm)

    async def main() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            reply({"ready": True})

            async def send(payload: bytes) -> None:
                await nc.publish(SUBJECT, payload)

            async for line in asyncio_lines():
                cmd = json.loads(line)
                if cmd["cmd"] != "run":
                    return
                em = Emitter(progress, cmd)
                await emit_async(em, send, asyncio_pause)
                await nc.flush()
                reply(em.result())
        finally:
            await nc.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# The trio limit (issue 13): one trio process writing one pre-encoded frame to N sockets


def limit_frame_parts(size: int) -> tuple[bytes, bytes]:
    """The bytes before and after the payload in the frame busd sends a subscriber for one of
    this script's events: the project's own encoder (``encode_control`` on channel 0, as
    ``Framed.encode_message`` does) applied to the message the core builds in ``emit``
    (bus/core/broker.py: source, member, payload, sender, identity, event, in that order), with
    a unique id and an identity key of the real lengths.  CBOR writes a byte string's length
    before its bytes, so ``before + payload + after`` is that frame for any payload of ``size``
    bytes: the limit pays one concatenation per event, never a CBOR encoding."""
    from bus.wire.frames import encode_control
    from bus.wire.identity import Identity

    marker = b"\xa5" * size
    message = {"source": EMITTER_NAME, "member": MEMBER, "payload": marker, "sender": ":10", "identity": Identity.generate().id,
               "event": "event"}
    frame = encode_control(0, message)
    at = frame.index(marker)
    return frame[:at], frame[at + size :]


async def send_rest(sock: socket.socket, data: bytes, sent: int) -> None:
    """What a socket did not take of ``data`` at once (``sent`` bytes did go): wait until it can."""
    import trio

    view = memoryview(data)[sent:]
    while view:
        await trio.lowlevel.wait_writable(sock)
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            pass


async def admit_minibus_subscribers(listener: socket.socket, n: int, key_file: str) -> list[socket.socket]:
    """Accept ``n`` real minibus client connections as busd would let them in -- the shs1
    handshake (plain, as on a Unix socket) with the key in ``key_file``, ``hello`` answered with
    a unique id, one ``subscribe`` answered with subscription 1 -- and hand back their sockets,
    plain and non-blocking, for writing event frames to.  (The floor variant "limit -> minibus
    subs": the limit's writer feeding minibus's subscriber client.)"""
    import trio

    from bus.io.framed import FramedStream
    from bus.io.secure import SecureStream
    from bus.wire.identity import load_identity

    key = load_identity(key_file)
    socks: list[socket.socket] = []
    listening = trio.socket.from_stdlib_socket(listener)

    async def admit(conn: Any, number: int) -> None:
        stream = trio.SocketStream(conn)
        secure = SecureStream.server(stream, key, encrypted=False)
        await secure.do_handshake()
        framed = FramedStream(secure, receive_stream=secure.plain_transport())
        for op, result in (("hello", {"unique_id": f":{100 + number}"}), ("subscribe", {"subscription": 1})):
            frame = await framed.receive_frame()
            message = getattr(frame, "message", None)
            if not isinstance(message, dict) or message.get("op") != op:
                raise RuntimeError(f"a subscriber sent {message!r} where {op} was expected")
            await framed.send_message({"re": message["id"], "result": result})
        if framed.buffered:
            raise RuntimeError("a subscriber sent more than hello and subscribe")
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        sock.setblocking(False)
        socks.append(sock)
        conn.detach()  # (the duplicate is the socket from now on: nothing else reads it)

    async with trio.open_nursery() as nursery:
        for number in range(n):
            conn, _ = await listening.accept()
            nursery.start_soon(admit, conn, number)
    return socks


def role_limit_broker(listen_fd: int, n: int, shm: str, key_file: str = "") -> None:
    """The limit: accept ``n`` subscriber sockets on the listening socket it is given, then run
    windows on command, writing each event's frame to every socket (see the module docstring).
    With ``key_file``, the subscribers are minibus clients, let in as busd would first
    (:func:`admit_minibus_subscribers`); what is written per event is the same."""
    import trio

    progress = Progress(shm)
    listener = socket.socket(fileno=listen_fd)
    socks: list[socket.socket] = []
    if key_file:
        socks = trio.run(admit_minibus_subscribers, listener, n, key_file)
    else:
        listener.setblocking(True)
        for _ in range(n):
            conn, _ = listener.accept()
            conn.setblocking(False)
            socks.append(conn)
    listener.close()

    async def write_all(data: bytes) -> None:
        """One ``send`` of ``data`` per socket, in subscriber order."""
        for sock in socks:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent != len(data):
                await send_rest(sock, data, sent)

    async def main() -> None:
        reply({"ready": True})
        async for line in trio_lines():
            cmd = json.loads(line)
            if cmd["cmd"] != "run":
                return
            before, after = limit_frame_parts(cmd["size"])
            em = Emitter(progress, cmd)
            batch = cmd.get("tasks", 1)
            if batch == 1:
                # The literal limit: per event, the frame built once and one send per socket.
                async def send(payload: bytes) -> None:
                    await write_all(before + payload + after)

                await emit_async(em, send, trio_pause)
            else:
                # Coalescing: up to ``batch`` events (as many as the lead rule allows at
                # once) joined, then one send of them per socket.
                await emit_coalesced(em, batch, before, after, write_all)
            reply(em.result())

    try:
        trio.run(main)
    finally:
        for sock in socks:
            sock.close()


async def emit_coalesced(em: Emitter, batch: int, before: bytes, after: bytes, write: Callable[[bytes], Awaitable[None]]) -> None:
    """The window, up to ``batch`` events at a time (as many as the lead rule allows at
    once), each ``before + payload + after``, joined and written with one ``write``."""
    while await wait_for_lead(em, trio_pause):
        frames: list[bytes] = []
        while len(frames) < batch and not em.ahead():
            payload = em.next_payload()
            if payload is None:
                break
            frames.append(before + payload + after)
        if not frames:
            break
        await write(b"".join(frames))


def limit_emit_parts(size: int) -> tuple[bytes, bytes]:
    """Like :func:`limit_frame_parts`, for the frame minibus's ``publish`` sends busd: a quiet
    ``emit`` request (member, payload, quiet, source, op, id; a 3-byte id)."""
    from bus.wire.frames import encode_control

    marker = b"\xa5" * size
    frame = encode_control(0, {"member": MEMBER, "payload": marker, "quiet": True, "source": EMITTER_NAME, "op": "emit", "id": 1000})
    at = frame.index(marker)
    return frame[:at], frame[at + size :]


def role_emit_limit(path: str, shm: str) -> None:
    """The fed limit's emitter: each event's pre-encoded quiet-emit frame, one ``send`` each;
    or (``limit fed xB``) up to B of them joined, one ``send`` a batch, as minibus's
    ``publish`` writes its frames (a write per 16 events, or fewer when it has to wait)."""
    import trio

    from clients.link import BUS_SEND_BUFFER

    progress = Progress(shm)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The send buffer minibus's emitter has (its bus connection's), like with like: it decides
    # how much of a burst the forwarder finds to read at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUS_SEND_BUFFER)
    sock.connect(path)
    sock.setblocking(False)

    async def main() -> None:
        reply({"ready": True})
        async for line in trio_lines():
            cmd = json.loads(line)
            if cmd["cmd"] != "run":
                return
            before, after = limit_emit_parts(cmd["size"])
            em = Emitter(progress, cmd)

            async def write(frame: bytes) -> None:
                try:
                    sent = sock.send(frame)
                except BlockingIOError:
                    sent = 0
                if sent != len(frame):
                    await send_rest(sock, frame, sent)

            async def send(payload: bytes) -> None:
                await write(before + payload + after)

            batch = cmd.get("tasks", 1)
            if batch == 1:
                await emit_async(em, send, trio_pause)
            else:
                await emit_coalesced(em, batch, before, after, write)
            reply(em.result())

    try:
        trio.run(main)
    finally:
        sock.close()


def role_limit_forward(sub_fd: int, emit_fd: int, n: int, checked: int = 0) -> None:
    """The fed limit's middle: what a broker must do at the least.  Per read of the emitter's
    socket: cut the frames, ``cbor2.loads`` each body, build the event map busd sends (source,
    member, payload from the emit; sender and identity its own), ``cbor2.dumps`` it once with a
    10-byte header, then one ``send`` per subscriber socket of all the read's events joined (busd
    too writes a subscriber once per read burst).  No checks, no routing, no queues.  With
    ``checked`` (the protocol-shaped floor), each body is decoded by the profile check every
    peer's frames get where they enter busd (``bus.wire.frames.decode_control_body``) instead."""
    import cbor2
    import trio

    from bus.wire.frames import HEADER, decode_control_body
    from bus.wire.identity import Identity

    socks = []
    with socket.socket(fileno=sub_fd) as listener:
        listener.setblocking(True)
        for _ in range(n):
            conn, _ = listener.accept()
            conn.setblocking(False)
            socks.append(conn)
    with socket.socket(fileno=emit_fd) as listener:
        listener.setblocking(True)
        emitter, _ = listener.accept()
        emitter.setblocking(False)
    identity = Identity.generate().id

    async def pump() -> None:
        loads, dumps, pack, unpack = decode_control_body if checked else cbor2.loads, cbor2.dumps, HEADER.pack, HEADER.unpack_from
        rest = b""
        while True:
            await trio.lowlevel.wait_readable(emitter)
            try:
                data = emitter.recv(65536)
            except BlockingIOError:
                continue
            if not data:
                return
            if rest:
                data = rest + data
            pos, end_of_data = 0, len(data)
            frames = []
            while end_of_data - pos >= 10:
                end = pos + 10 + unpack(data, pos)[3]
                if end > end_of_data:
                    break
                m = loads(data[pos + 10 : end])
                body = dumps({"source": m["source"], "member": m["member"], "payload": m["payload"], "sender": ":10",
                              "identity": identity, "event": "event"})
                frames.append(pack(1, 0, 0, len(body)) + body)
                pos = end
            rest = data[pos:]
            if frames:
                out = frames[0] if len(frames) == 1 else b"".join(frames)
                for sock in socks:
                    try:
                        sent = sock.send(out)
                    except BlockingIOError:
                        sent = 0
                    if sent != len(out):
                        await send_rest(sock, out, sent)

    async def main() -> None:
        reply({"ready": True})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            async for _line in trio_lines():  # until "quit" or EOF
                break
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        emitter.close()
        for sock in socks:
            sock.close()


async def limit_consume(tally: Tally, sock: Any, slot: int) -> None:
    """The limit's subscriber connection (a minimal trio client): ``await sock.recv`` on a
    ``trio.socket`` socket, frames cut by minibus's 10-byte header, each body
    ``cbor2.loads``-ed (no profile check), the payload recorded, all in the one task."""
    import cbor2

    from bus.wire.frames import HEADER

    record, loads, unpack = tally.record, cbor2.loads, HEADER.unpack_from
    rest = b""
    while True:
        data = await sock.recv(65536)
        if not data:
            return
        if rest:
            data = rest + data
        pos, end_of_data = 0, len(data)
        while end_of_data - pos >= 10:
            end = pos + 10 + unpack(data, pos)[3]
            if end > end_of_data:
                break
            message = loads(data[pos + 10 : end])
            payload = message.get("payload")
            if type(payload) is bytes:
                record(slot, payload)
            pos = end
        rest = data[pos:]


class ApiShapedSubscription:
    """The least an ``async for`` subscription API must do (the floor variant "limit -> API-
    shaped subs"): a reader task reads and decodes as :func:`limit_consume` does, but hands each
    decoded event to a buffer and wakes the consumer task (at most once per read: once woken,
    the consumer takes what the read brought in the same turn); the consumer iterates with
    ``async for`` over ``__anext__``, which returns a buffered event without yielding and parks
    only when the buffer is empty.  No bound, no cancellation check, no event object, no
    routing: what an API with a separate consumer cannot do without."""

    def __init__(self) -> None:
        import collections

        self.buffer: collections.deque[dict[str, Any]] = collections.deque()
        self.waiter: Any = None

    async def read(self, sock: Any) -> None:
        import cbor2
        import trio

        from bus.wire.frames import HEADER

        loads, unpack, buffer, reschedule = cbor2.loads, HEADER.unpack_from, self.buffer, trio.lowlevel.reschedule
        rest = b""
        while True:
            data = await sock.recv(65536)
            if not data:
                return
            if rest:
                data = rest + data
            pos, end_of_data = 0, len(data)
            while end_of_data - pos >= 10:
                end = pos + 10 + unpack(data, pos)[3]
                if end > end_of_data:
                    break
                buffer.append(loads(data[pos + 10 : end]))
                pos = end
            rest = data[pos:]
            if self.waiter is not None and buffer:
                reschedule(self.waiter)
                self.waiter = None

    def __aiter__(self) -> ApiShapedSubscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        import trio

        buffer = self.buffer
        while not buffer:
            self.waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
        return buffer.popleft()


async def limit_subscribers(count: int, connect: Callable[[], Awaitable[Any]], consume: Callable[..., Awaitable[None]],
                            tally: Tally, slot0: int) -> None:
    """``count`` connections made by ``connect``, each read by ``consume(tally, sock, slot)``,
    until the script says quit."""
    import trio

    socks = []
    try:
        for _ in range(count):
            socks.append(await connect())
        async with trio.open_nursery() as nursery:
            for i, sock in enumerate(socks):
                nursery.start_soon(consume, tally, sock, slot0 + i)
            reply({"ready": True})
            await trio_control(tally)
            nursery.cancel_scope.cancel()
    finally:
        for sock in socks:
            sock.close()


async def api_shaped_consume(tally: Tally, sock: Any, slot: int) -> None:
    """One connection read through :class:`ApiShapedSubscription`: a reader and a consumer task."""
    import trio

    sub = ApiShapedSubscription()
    record = tally.record
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sub.read, sock)
        async for message in sub:
            payload = message.get("payload")
            if type(payload) is bytes:
                record(slot, payload)


def _limit_connector(path: str) -> Callable[[], Awaitable[Any]]:
    async def connect() -> Any:
        import trio

        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def role_sub_limit(path: str, count: int, slot0: int, shm: str) -> None:
    """The limit's subscribers: a minimal trio client (:func:`limit_consume`); no handshake."""
    import trio

    trio.run(limit_subscribers, count, _limit_connector(path), limit_consume, Tally(Progress(shm)), slot0)


def role_sub_limit_api(path: str, count: int, slot0: int, shm: str) -> None:
    """The floor variant "limit -> API-shaped subs": the limit's subscribers with a consumer
    task behind an ``async for`` (:class:`ApiShapedSubscription`)."""
    import trio

    trio.run(limit_subscribers, count, _limit_connector(path), api_shaped_consume, Tally(Progress(shm)), slot0)


def role_sub_busd_limit(address: str, count: int, slot0: int, shm: str, source: str) -> None:
    """The floor variant "busd -> limit subs": each connection joins busd for real (handshake,
    ``hello``, ``subscribe`` to ``source``'s events, with the project's own stream classes, as a
    client does), then is read by the limit's minimal client (:func:`limit_consume`), its socket
    taken over from the stream classes."""
    import trio

    from bus.io.fdpass import FdSocketStream
    from bus.io.framed import FramedStream
    from bus.io.secure import SecureStream
    from bus.wire.address import parse_address
    from bus.wire.identity import Identity

    endpoint = parse_address(address)[0]
    identity = Identity.generate()  # (one per process, as the minibus subscribers have)
    path = endpoint.path
    assert path is not None

    async def connect() -> Any:
        transport = await FdSocketStream.connect(path)
        try:
            stream = SecureStream.client(transport, identity, endpoint.key, encrypted=False)
            await stream.do_handshake()
            framed = FramedStream(stream, receive_stream=stream.plain_transport(), trusted=True)
            for number, request in ((1, {"op": "hello"}), (2, {"op": "subscribe", "source": source, "member": MEMBER})):
                await framed.send_message({**request, "id": number})
                while True:
                    frame = await framed.receive_frame()
                    message = getattr(frame, "message", None)
                    if not isinstance(message, dict):
                        raise RuntimeError(f"busd sent {frame!r} during {request['op']}")
                    if message.get("re") == number:
                        if "result" not in message:
                            raise RuntimeError(f"busd refused {request['op']}: {message}")
                        break
            if framed.buffered:
                raise RuntimeError("busd sent more than the answers before the first event")
            return trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(transport.socket.fileno())))
        finally:
            await transport.aclose()  # (the duplicate stays open)

    trio.run(limit_subscribers, count, connect, limit_consume, Tally(Progress(shm)), slot0)


ROLES: dict[str, Callable[..., None]] = {
    "sub-minibus": role_sub_minibus,
    "emit-minibus": role_emit_minibus,
    "sub-dbus-trio": role_sub_dbus_trio,
    "sub-dbus-blocking": role_sub_dbus_blocking,
    "emit-dbus-trio": role_emit_dbus_trio,
    "emit-dbus-blocking": role_emit_dbus_blocking,
    "sub-nats": role_sub_nats,
    "emit-nats": role_emit_nats,
    "limit-broker": role_limit_broker,
    "limit-forward": role_limit_forward,
    "emit-limit": role_emit_limit,
    "sub-limit": role_sub_limit,
    "sub-limit-api": role_sub_limit_api,
    "sub-busd-limit": role_sub_busd_limit,
}


# ---------------------------------------------------------------------------------------------
# The script's side: processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a process's main thread so far."""
    counts = {"voluntary_ctxt_switches": 0, "nonvoluntary_ctxt_switches": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in counts:
                counts[key] = int(value)
    except OSError:
        pass
    return counts["voluntary_ctxt_switches"], counts["nonvoluntary_ctxt_switches"]


class Proc:
    """A child speaking JSON lines on stdin/stdout; its stderr goes to a file."""

    def __init__(self, name: str, argv: list[str], tmp: Path, **kw: Any) -> None:
        self.name = name
        self.log = tmp / f"{name.replace(' ', '-').replace('/', '-')}-{uuid.uuid4().hex[:6]}.log"
        self._stderr = open(self.log, "wb")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, cwd=ROOT, **kw)
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                raise RuntimeError(f"{self.name}: no answer within {timeout:.0f} s{self.tail()}")
            data = os.read(self.proc.stdout.fileno(), 65536)
            if not data:
                self.proc.poll()
                raise RuntimeError(f"{self.name} exited (status {self.proc.returncode}){self.tail()}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace").strip()
        except OSError:
            return ""
        return f": {text[-1500:]}" if text else ""

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def answer(self, timeout: float) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.readline(timeout))
        return result

    def ask(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(cmd)
        return self.answer(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()
        self._selector.close()


def me(role: str, *args: Any) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, "--", *map(str, args)]


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# The brokers


class Busd:
    """busd as its own process on a Unix socket, as channels.py starts it, with a rule for the
    benchmark's keys (each process makes its own)."""

    label = "minibus"

    def __init__(self, tmp: Path) -> None:
        from bus.wire.identity import Identity, save_identity

        key_file = tmp / "busd.key"
        save_identity(key_file, Identity.generate())
        (tmp / "run").mkdir(mode=0o700)
        config = tmp / "busd.toml"
        # The floor variant "busd -> limit subs" reads its connections as the limit does: it
        # answers no ping, so with the default keepalive busd would drop them once they had
        # been silent for keepalive_timeout (45 s; a round of cells takes longer), and every
        # later round of that variant would find no subscriber.  No keepalive in these runs.
        config.write_text(
            '[limits]\nkeepalive_interval = 86400.0\nkeepalive_timeout = 172800.0\n\n'
            '[[rule]]\nname = "bench"\nidentities = ["*"]\nconnect = true\n'
            'own = ["org.bench.*"]\nsee = ["*"]\nemit = ["org.bench.*"]\n'
        )
        argv = [sys.executable, "-m", "bus", "--no-tcp", "--key", str(key_file), "--config", str(config),
                "--runtime-dir", str(tmp / "run"), "--log-level", "warning"]
        self.log = tmp / "busd.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                env=dict(os.environ, XDG_CONFIG_HOME=str(tmp / "cfg"), PYTHONPATH=str(ROOT)),
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("MINIBUS_ADDRESS="):
            stop_process(self.proc)
            raise RuntimeError(f"busd did not start: {line!r} {self.log.read_text()[-500:]}")
        self.address = line.split("=", 1)[1]
        self.pid = self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()


class DbusDaemon:
    """A private dbus-daemon with the session bus's policy and limits, on a Unix socket."""

    label = "dbus-daemon"

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("dbus-daemon")
        if binary is None:
            raise RuntimeError("dbus-daemon is not installed (apt-get install dbus-daemon)")
        conf = tmp / "dbus-daemon.conf"
        limits = "".join(
            f'<limit name="{name}">{value}</limit>'
            for name, value in (("max_incoming_bytes", 1000000000), ("max_outgoing_bytes", 1000000000),
                                ("max_message_size", 1000000000), ("max_match_rules_per_connection", 50000),
                                ("max_completed_connections", 100000), ("max_connections_per_user", 100000))
        )
        conf.write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            f"<busconfig><type>session</type><listen>unix:path={tmp}/dbus-daemon.sock</listen><auth>EXTERNAL</auth>\n"
            '<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>'
            f'<allow own="*"/></policy>{limits}</busconfig>\n'
        )
        self.log = tmp / "dbus-daemon.log"
        with open(self.log, "wb") as log:  # it warns that it may not raise its fd limit: harmless here
            self.proc = subprocess.Popen([binary, f"--config-file={conf}", "--nofork", "--print-address"],
                                         stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            stop_process(self.proc)
            raise RuntimeError("dbus-daemon did not start")
        self.pid = self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()


class DbusBroker:
    """A private dbus-broker, this script acting as its launcher (no systemd needed).

    The broker is given a controller socket; on it the script authenticates (SASL EXTERNAL,
    with unix fds), then calls ``AddListener(o path, h socket, v policy)`` once.  The policy's
    D-Bus type is what dbus-broker-launch sends (src/launch/policy.c in dbus-broker): a list of
    per-uid batches, per-gid batches, SELinux names, an AppArmor flag and the bus type; a batch
    is (connect verdict, priority), own rules, send rules, receive rules.  Ours is one default
    batch (uid -1) that allows connecting, owning any name (prefix ""), and sending and
    receiving anything."""

    label = "dbus-broker"
    BATCH = "bta(btbs)a(btssssuutt)a(btssssuutt)"
    POLICY = f"a(u({BATCH}))a(buu({BATCH}))a(ss)bs"

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("dbus-broker")
        if binary is None:
            raise RuntimeError("dbus-broker is not installed (apt-get install dbus-broker)")
        from jeepney import MessageType, Parser
        from jeepney.auth import BEGIN, Authenticator
        from jeepney.low_level import Endianness, Header, HeaderFields, Message

        path = tmp / "dbus-broker.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(512)
        listener.setblocking(False)  # the broker accepts until EAGAIN
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.controller = ours
        self.proc = subprocess.Popen(
            [binary, "--controller", str(theirs.fileno()), "--machine-id", uuid.uuid4().hex,
             "--max-bytes", str(1 << 30), "--max-fds", "100000", "--max-matches", "100000", "--max-objects", "100000"],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self.pid = self.proc.pid
        try:
            ours.settimeout(10)
            auth = Authenticator(enable_fds=True)
            for line in auth:
                ours.sendall(line)
                auth.feed(ours.recv(4096))
            ours.sendall(BEGIN)
            everything = (True, 1, "", "", "", "", 0, 0, 0, 2**64 - 1)  # verdict, priority, name, path, iface, member, type, broadcast, fds
            batch = (True, 1, [(True, 1, True, "")], [everything], [everything])
            policy: tuple[Any, ...] = ([(2**32 - 1, batch)], [], [], False, "session")
            header = Header(
                Endianness.little, MessageType.method_call, flags=0, protocol_version=1, body_length=-1, serial=-1,
                fields={
                    HeaderFields.path: "/org/bus1/DBus/Broker",
                    HeaderFields.interface: "org.bus1.DBus.Broker",
                    HeaderFields.member: "AddListener",
                    HeaderFields.signature: "ohv",
                },
            )  # no destination: the controller connection is peer to peer
            call = Message(header, ("/org/bus1/DBus/Listener/0", listener.fileno(), (f"({self.POLICY})", policy)))
            fds = array.array("i")
            data = call.serialise(serial=1, fds=fds)
            ours.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            parser = Parser()
            answer = None
            while answer is None:
                chunk = ours.recv(65536)
                if not chunk:
                    raise RuntimeError(f"dbus-broker closed its controller (status {self.proc.poll()})")
                parser.add_data(chunk)
                answer = parser.get_next_message()
            if answer.header.message_type != MessageType.method_return:
                raise RuntimeError(f"AddListener failed: {answer.body}")
        except BaseException:
            self.stop()
            raise
        finally:
            listener.close()  # dbus-broker holds its own copy
        self.address = f"unix:path={path}"

    def stop(self) -> None:
        stop_process(self.proc)
        self.controller.close()


class NatsServer:
    label = "nats"

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        try:
            import nats  # noqa: F401
        except ImportError:
            raise RuntimeError("nats-py is not installed (pip install nats-py)") from None
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.log = tmp / "nats.log"
        self.proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "-l", str(self.log)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    stop_process(self.proc)
                    raise RuntimeError(f"nats-server did not start: {self.log.read_text()[-300:] if self.log.exists() else ''}") from None
                time.sleep(0.05)
        self.address = f"nats://127.0.0.1:{port}"

    def stop(self) -> None:
        stop_process(self.proc)


# ---------------------------------------------------------------------------------------------
# Cells


def p99_of(hists: list[list[list[int]]]) -> float | None:
    """The 99th percentile (ms) of merged histograms."""
    merged: dict[int, int] = {}
    for hist in hists:
        for index, count in hist:
            merged[index] = merged.get(index, 0) + count
    total = sum(merged.values())
    if not total:
        return None
    rank = max(1, int(total * 0.99 + 0.999999))
    seen = 0
    for index in sorted(merged):
        seen += merged[index]
        if seen >= rank:
            return float(bucket_top(index) / 1e6)
    return None


class LimitHandle:
    """The limit in ``Bench.brokers`` (nothing runs until a setup starts its process) and, in a
    setup, that process: broker and emitter in one."""

    label = "limit"

    def __init__(self, pid: int | None = None, address: str = "") -> None:
        self.pid, self.address = pid, address

    def stop(self) -> None:
        pass  # the setup stops the process (it is the setup's emitter)


class Setup:
    """One system's emitter and subscriber processes for one subscriber count."""

    def __init__(self, bench: Bench, system: str, flavour: str, broker: Any, n: int) -> None:
        """Start the processes; :meth:`ready` waits for them."""
        self.bench, self.system, self.flavour, self.broker, self.n = bench, system, flavour, broker, n
        self.procs: list[Proc] = []
        self.emitter: Proc | None = None
        self.middle: Proc | None = None  # the fed limit's forwarder
        role = {"minibus": "minibus", "dbus-daemon": f"dbus-{flavour}", "dbus-broker": f"dbus-{flavour}", "nats": "nats",
                "limit": "limit"}[system]
        # What each subscriber process runs, and its arguments after the address (the floor
        # variants: see "Floors" in the module's docstring).
        sub_role, sub_extra, emit_extra = f"sub-{role}", [], []
        if (system, flavour) == ("minibus", FLOOR_BUSD):
            sub_role, sub_extra, emit_extra = "sub-busd-limit", [FLOOR_EMITTER_NAME], [FLOOR_EMITTER_NAME]
        elif (system, flavour) == ("limit", FLOOR_MINIBUS_SUBS):
            sub_role = "sub-minibus"
        elif system == "limit" and flavour in (FLOOR_API_SUBS, FLOOR_FED_CHECKED):
            sub_role = "sub-limit-api"
        try:
            if system == "limit":
                # The limit's processes get listening sockets made here (so that subscribers
                # and emitter can connect before it runs), new ones for each setup.
                path = bench.tmp / f"limit-{n}-{uuid.uuid4().hex[:6]}.sock"
                emit_path = path.with_suffix(".emit")
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                emit_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    listener.bind(str(path))
                    listener.listen(256)
                    if flavour in ("fed", FLOOR_FED_CHECKED):
                        # 3 processes, like minibus: emitter -> forwarder -> subscribers
                        emit_listener.bind(str(emit_path))
                        emit_listener.listen(1)
                        fds = (listener.fileno(), emit_listener.fileno())
                        checked = int(flavour == FLOOR_FED_CHECKED)
                        self.middle = Proc("limit forwarder", me("limit-forward", *fds, n, checked), bench.tmp, pass_fds=fds)
                        self.broker = LimitHandle(self.middle.pid, str(path))
                    elif flavour == FLOOR_MINIBUS_SUBS:
                        # 1 process, as the limit, letting minibus clients in as busd would first
                        from bus.wire.identity import Identity, save_identity

                        key = Identity.generate()
                        key_file = path.with_suffix(".key")
                        save_identity(key_file, key)
                        self.emitter = Proc("limit broker (minibus subs)",
                                            me("limit-broker", listener.fileno(), n, bench.shm, key_file), bench.tmp,
                                            pass_fds=(listener.fileno(),))
                        self.broker = LimitHandle(self.emitter.pid, f"unix:path={path},key={key.id}")
                    else:
                        # 1 process: broker and emitter at once
                        self.emitter = Proc("limit broker", me("limit-broker", listener.fileno(), n, bench.shm), bench.tmp,
                                            pass_fds=(listener.fileno(),))
                        self.broker = LimitHandle(self.emitter.pid, str(path))
                finally:
                    listener.close()
                    emit_listener.close()
            slot = 0
            for i, count in enumerate(split(n)):
                self.procs.append(Proc(f"{system} {flavour} sub{i}", me(sub_role, self.broker.address, count, slot, bench.shm, *sub_extra),
                                       bench.tmp))
                slot += count
            if self.emitter is None:
                address = str(emit_path) if system == "limit" else broker.address
                self.emitter = Proc(f"{system} {flavour} emitter", me(f"emit-{role}", address, bench.shm, *emit_extra), bench.tmp)
        except BaseException:
            self.stop()
            raise

    def ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self.emitter is not None
        for proc in [*self.procs, self.emitter, *([self.middle] if self.middle else [])]:
            first = proc.answer(max(1.0, deadline - time.monotonic()))
            if not first.get("ready"):
                raise RuntimeError(f"{proc.name}: {first}")

    @property
    def subscribers(self) -> list[Proc]:
        return self.procs

    def cell(self, size: int, seconds: float, tasks: int = 1) -> dict[str, Any]:
        bench = self.bench
        bench.epoch += 1
        bench.progress.reset()
        for proc in self.subscribers:
            proc.send({"cmd": "epoch", "epoch": bench.epoch})
        for proc in self.subscribers:
            proc.answer(10)
        assert self.emitter is not None
        pids = {"broker": [self.broker.pid], "emitter": [self.emitter.pid] if self.emitter.pid != self.broker.pid else [],
                "subscribers": [p.pid for p in self.subscribers]}
        cpu0 = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        switches0 = context_switches(self.broker.pid)
        wall0 = time.monotonic()
        run = self.emitter.ask(
            {"cmd": "run", "epoch": bench.epoch, "size": size, "seconds": seconds, "n": self.n, "lead": LEAD, "tasks": tasks},
            seconds + 60,
        )
        # Drain: until every subscriber has the last event, or nothing moved for 0.5 s (10 s at most).
        slots = bench.progress.slots
        last_seq = run["last_seq"]
        deadline = time.monotonic() + 10
        moved, before = time.monotonic(), -2
        while time.monotonic() < deadline:
            floor = min(slots[: self.n])
            if floor >= last_seq:
                break
            total = sum(slots[: self.n])
            if total != before:
                before, moved = total, time.monotonic()
            elif time.monotonic() - moved > 0.5:
                break
            time.sleep(0.002)
        wall = time.monotonic() - wall0
        cpu = {k: (sum(cpu_seconds(p) for p in v) - cpu0[k]) / wall for k, v in pids.items()}
        switches = [b - a for a, b in zip(switches0, context_switches(self.broker.pid))]
        stats = [proc.ask({"cmd": "stats"}, 10) for proc in self.subscribers]
        received = sum(s["count"] for s in stats)
        last = max((s["last"] for s in stats if s["count"]), default=0)
        elapsed = (last - run["t0"]) / 1e9 if last else 0.0
        expected = run["sent"] * self.n
        return {
            "events_per_s": received / elapsed if elapsed > 0 else 0.0,
            "p99_ms": p99_of([s["hist"] for s in stats]),
            "sent": run["sent"],
            "received": received,
            "lost": expected - received,
            "gaps": sum(s["gaps"] for s in stats),
            "emit_rate": run["sent"] / max((run["t1"] - run["t0"]) / 1e9, 1e-9),
            "lead_waits": run["lead_waits"],
            "delivered_reply": run.get("delivered"),
            "elapsed_s": elapsed,
            "cpu_cores": {k: round(v, 2) for k, v in cpu.items()},
            # the broker's main thread: CPU microseconds per delivered event, and how often it
            # gave up the CPU (voluntary: waiting for input) or had it taken (involuntary:
            # preempted, e.g. by a subscriber process its write woke), per 1,000 deliveries
            "broker_us_per_event": round(cpu["broker"] * wall / received * 1e6, 2) if received else None,
            # the emitter's CPU per event emitted, the subscriber processes' per event received
            "emitter_us_per_event": round(cpu["emitter"] * wall / run["sent"] * 1e6, 2) if run["sent"] and pids["emitter"] else None,
            "subscriber_us_per_event": round(cpu["subscribers"] * wall / received * 1e6, 2) if received else None,
            "broker_switches_per_1000": [round(x * 1000 / received, 1) for x in switches] if received else None,
        }

    def stop(self) -> None:
        for proc in [*self.procs, *([self.emitter] if self.emitter is not None else []), *([self.middle] if self.middle else [])]:
            proc.stop()


def variants_list() -> list[tuple[str, str, int, str]]:
    """(system, flavour, emitter tasks, the column's label), in the order they run."""
    return [
        ("minibus", "trio", 1, "minibus"),
        ("minibus", "trio", PIPELINE, f"minibus emit x{PIPELINE}"),
        ("dbus-daemon", "trio", 1, "dbus-daemon trio"),
        ("dbus-daemon", "blocking", 1, "dbus-daemon blocking"),
        ("dbus-broker", "trio", 1, "dbus-broker trio"),
        ("dbus-broker", "blocking", 1, "dbus-broker blocking"),
        ("nats", "asyncio", 1, "nats"),
        ("limit", "trio", 1, "limit"),
        *([("limit", "trio", LIMIT_BATCH, f"limit batched x{LIMIT_BATCH}")] if LIMIT_BATCH > 1 else []),
        ("limit", "fed", 1, "limit fed"),
        *([("limit", "fed", LIMIT_BATCH, fed_batched_label())] if FLOORS and LIMIT_BATCH > 1 else []),
        *([("limit", FLOOR_FED_CHECKED, LIMIT_BATCH, checked_floor_label())] if FLOORS else []),
        *([("limit", FLOOR_MINIBUS_SUBS, 1, FLOOR_LABELS[FLOOR_MINIBUS_SUBS]),
           ("limit", FLOOR_API_SUBS, 1, FLOOR_LABELS[FLOOR_API_SUBS]),
           ("minibus", FLOOR_BUSD, 1, FLOOR_LABELS[FLOOR_BUSD])] if FLOORS else []),
    ]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="minibus-events-"))
        self.shm = str(self.tmp / "progress")
        Path(self.shm).write_bytes(b"\xff" * (SLOTS * 8))
        self.progress = Progress(self.shm)
        self.epoch = 0
        self.brokers: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        #: Rounds of a cell that lost events (a subscriber that got fewer than were emitted):
        #: the best round is kept, so these are said at the end, not hidden behind it.
        self.lossy: list[str] = []

    def start_brokers(self, systems: list[str]) -> None:
        for system in systems:
            try:
                if system in ("dbus-daemon", "dbus-broker"):
                    try:
                        import jeepney  # noqa: F401
                        import jeepney.io.trio  # noqa: F401
                    except ImportError:
                        raise RuntimeError("jeepney is not installed (pip install jeepney)") from None
                kind = {"minibus": Busd, "dbus-daemon": DbusDaemon, "dbus-broker": DbusBroker, "nats": NatsServer,
                        "limit": LimitHandle}[system]
                self.brokers[system] = LimitHandle() if system == "limit" else kind(self.tmp)
            except Exception as exc:  # noqa: BLE001 -- a peer that cannot start is skipped
                if system == "minibus":
                    raise
                self.skipped[system] = str(exc)
                print(f"{system}: skipped: {exc}", flush=True)

    def stop(self) -> None:
        for broker in self.brokers.values():
            try:
                broker.stop()
            except Exception as exc:  # noqa: BLE001
                print(f"stopping {broker.label}: {exc}", file=sys.stderr)

    def run(self, counts: tuple[int, ...], variants: list[tuple[str, str, int, str]], seconds: float, rounds: int,
            profile: bool = False) -> dict[str, dict[str, Any]]:
        """cells[f"{n}x{size}"][label] = the best round's measurement (all rounds' rates kept).

        For each subscriber count every system's processes are started together and stay up
        (idle ones block in a read); then the rounds run every cell in turn, so a slow moment
        of this shared machine costs no system alone."""
        cells: dict[str, dict[str, Any]] = {}
        warm = min(0.3, seconds / 2)
        for n in counts:
            started = time.monotonic()
            setups: dict[tuple[str, str], Setup] = {}
            setup: Setup | None
            try:
                for system, flavour in dict.fromkeys((v[0], v[1]) for v in variants):
                    if system in self.brokers:
                        setups[(system, flavour)] = Setup(self, system, flavour, self.brokers[system], n)
                for key, setup in list(setups.items()):
                    try:
                        setup.ready(120)
                        setup.cell(SIZES[0], warm)  # warm up connections and code paths
                    except Exception as exc:  # noqa: BLE001 -- a peer that fails is reported and skipped
                        if key[0] == "minibus":
                            raise
                        print(f"{key[0]} {key[1]} with {n} subscribers: skipped: {str(exc).strip().splitlines()[-1]}", flush=True)
                        self.skipped[f"{key[0]} {key[1]} x{n}"] = str(exc)
                        setups.pop(key).stop()
                if self.args.verbose:
                    print(f"    ({n} subscribers: {len(setups)} setups ready in {time.monotonic() - started:.1f} s)", flush=True)
                for round_no in range(rounds):
                    order = variants if round_no % 2 == 0 else variants[::-1]
                    for size in SIZES:
                        for system, flavour, tasks, label in order:
                            setup = setups.get((system, flavour))
                            if setup is None:
                                continue
                            spies = self._spies(setup, label, seconds) if profile else {}
                            try:
                                result = setup.cell(size, seconds, tasks)
                            except Exception as exc:  # noqa: BLE001 -- a peer that breaks is dropped, reported
                                if system == "minibus":
                                    raise
                                print(f"{system} {flavour} with {n} subscribers: dropped: {str(exc).strip().splitlines()[-1]}", flush=True)
                                self.skipped[f"{system} {flavour} x{n}"] = str(exc)
                                setups.pop((system, flavour)).stop()
                                continue
                            if spies:
                                result["profile"] = {party: self._spy_report(spy) for party, spy in spies.items()}
                            if result["lost"]:
                                self.lossy.append(f"{n} x {size} B {label}, round {round_no + 1}: {result['lost']} lost")
                            row = cells.setdefault(f"{n}x{size}", {})
                            rates = [*row.get(label, {}).get("rounds", []), round(result["events_per_s"])]
                            if label not in row or result["events_per_s"] > row[label]["events_per_s"]:
                                row[label] = result
                            row[label]["rounds"] = rates
                            print(
                                f"  {n:3} subs {size:5} B  {label:22} {result['events_per_s']:10.0f} ev/s  "
                                f"p99 {result['p99_ms'] or 0:8.2f} ms  lost {result['lost']:6}  "
                                f"cores: broker {result['cpu_cores']['broker']:.2f} emitter {result['cpu_cores']['emitter']:.2f} "
                                f"subs {result['cpu_cores']['subscribers']:.2f}  us/ev: broker {result['broker_us_per_event'] or 0:5.1f} "
                                f"emitter {result['emitter_us_per_event'] or 0:5.1f} subs {result['subscriber_us_per_event'] or 0:5.1f}",
                                flush=True,
                            )
            finally:
                for setup in setups.values():
                    setup.stop()
            if self.args.verbose:
                print(f"    ({n} subscribers: {time.monotonic() - started:.1f} s)", flush=True)
        return cells

    # -- profiling busd with py-spy ------------------------------------------------------------

    def _spies(self, setup: Setup, label: str, seconds: float) -> dict[str, tuple[subprocess.Popen[bytes], Path]]:
        """py-spy on the broker (busd, or the limit's process), the emitter (where it is a process
        of its own) and the first subscriber process."""
        spy = shutil.which("py-spy")
        if spy is None or setup.system not in ("minibus", "limit"):
            return {}
        spies = {}
        parties = [("broker", setup.broker.pid), ("subscriber process 0", setup.subscribers[0].pid)]
        if setup.emitter is not None:
            parties.append(("emitter", setup.emitter.pid))
        for party, pid in parties:
            out = self.tmp / f"{party.replace(' ', '')}-{label.replace(' ', '')}-{setup.n}-{self.epoch}.txt"
            spies[party] = (subprocess.Popen([spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "250",
                                              "-f", "raw", "-o", str(out), "--nonblocking"],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
        time.sleep(0.3)  # let them attach
        return spies

    def _spy_report(self, spy: tuple[subprocess.Popen[bytes], Path]) -> dict[str, Any]:
        proc, out = spy
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not out.exists():
            return {"error": "py-spy wrote nothing"}
        own: dict[str, int] = {}
        inclusive: dict[str, int] = {}
        total = 0
        for line in out.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
            if not frames:
                continue
            total += count
            own[frames[-1]] = own.get(frames[-1], 0) + count
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + count
        def top(table: dict[str, int]) -> list[tuple[str, float]]:
            return [(f, round(c / total, 3)) for f, c in sorted(table.items(), key=lambda kv: -kv[1])[:25]]

        return {"samples": total, "self": top(own), "inclusive": top(inclusive)}


# ---------------------------------------------------------------------------------------------
# Report


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summarise(cells: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:  # noqa: C901
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    header = (f"{'subs x size':>12} | {'minibus':>9} {'p99':>6} | {'emit x' + str(PIPELINE):>9} {'p99':>6} | "
              f"{'best D-Bus':>9} {'p99':>6} {'(which)':<21}| {'ratio':>5} {'x' + str(PIPELINE):>5} | "
              f"{'NATS':>9} {'p99':>6} | {'ratio':>5} {'x' + str(PIPELINE):>5} | target | "
              f"{'trio limit':>10} {'p99':>6} | {'ratio':>5} | {'batch x' + str(LIMIT_BATCH):>10} {'ratio':>5} | "
              f"{'fed (3 p.)':>10} {'ratio':>5} | >= {LIMIT_TARGET}")
    lines.append(header)
    lines.append("-" * len(header))
    for key, cell in cells.items():
        n, size = key.split("x")
        mb, mbp, nats = cell.get("minibus"), cell.get(f"minibus emit x{PIPELINE}"), cell.get("nats")
        limit, batched, fed = cell.get("limit"), cell.get(f"limit batched x{LIMIT_BATCH}"), cell.get("limit fed")
        dbus = [(label, r) for label, r in cell.items() if label.startswith("dbus")]
        best_label, best = max(dbus, key=lambda lr: lr[1]["events_per_s"], default=(None, None))

        def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
            if not a or not b or not b["events_per_s"]:
                return None
            return float(a["events_per_s"] / b["events_per_s"])

        row: dict[str, Any] = {
            "subscribers": int(n), "payload": int(size),
            "minibus": mb and mb["events_per_s"], "minibus_p99_ms": mb and mb["p99_ms"],
            "minibus_pipelined": mbp and mbp["events_per_s"], "minibus_pipelined_p99_ms": mbp and mbp["p99_ms"],
            "best_dbus": best and best["events_per_s"], "best_dbus_p99_ms": best and best["p99_ms"], "best_dbus_is": best_label,
            "ratio_dbus": ratio(mb, best), "ratio_dbus_pipelined": ratio(mbp, best),
            "nats": nats and nats["events_per_s"], "nats_p99_ms": nats and nats["p99_ms"],
            "ratio_nats": ratio(mb, nats), "ratio_nats_pipelined": ratio(mbp, nats),
        }
        row.update({
            "limit": limit and limit["events_per_s"], "limit_p99_ms": limit and limit["p99_ms"], "ratio_limit": ratio(mb, limit),
            "limit_batched": batched and batched["events_per_s"], "ratio_limit_batched": ratio(mb, batched),
            "limit_fed": fed and fed["events_per_s"], "ratio_limit_fed": ratio(mb, fed),
        })
        best_ratio = row["ratio_dbus"]  # publish, one-way like a signal: the column judged
        row["target_met"] = None if best_ratio is None else best_ratio >= TARGET
        # issue 13's target: publish against the literal limit (one send per frame per socket)
        row["limit_target_met"] = None if row["ratio_limit"] is None else row["ratio_limit"] >= LIMIT_TARGET
        rows.append(row)
        def r(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        verdict = "-" if row["target_met"] is None else ("met" if row["target_met"] else "MISSED")
        limit_verdict = "-" if row["limit_target_met"] is None else ("met" if row["limit_target_met"] else "MISSED")
        lines.append(
            f"{n + ' x ' + size + ' B':>12} | {fmt_rate(row['minibus']):>9} {fmt_ms(row['minibus_p99_ms']):>6} | "
            f"{fmt_rate(row['minibus_pipelined']):>9} {fmt_ms(row['minibus_pipelined_p99_ms']):>6} | "
            f"{fmt_rate(row['best_dbus']):>9} {fmt_ms(row['best_dbus_p99_ms']):>6} {best_label or '-':<21}| "
            f"{r(row['ratio_dbus']):>5} {r(row['ratio_dbus_pipelined']):>5} | "
            f"{fmt_rate(row['nats']):>9} {fmt_ms(row['nats_p99_ms']):>6} | "
            f"{r(row['ratio_nats']):>5} {r(row['ratio_nats_pipelined']):>5} | {verdict:<6} | "
            f"{fmt_rate(row['limit']):>10} {fmt_ms(row['limit_p99_ms']):>6} | {r(row['ratio_limit']):>5} | "
            f"{fmt_rate(row['limit_batched']):>10} {r(row['ratio_limit_batched']):>5} | "
            f"{fmt_rate(row['limit_fed']):>10} {r(row['ratio_limit_fed']):>5} | {limit_verdict}"
        )
    floor_lines = floors_table(cells, rows)
    if floor_lines:
        lines.extend(["", *floor_lines])
    return rows, lines


def floors_table(cells: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    """The floors beside the judged limit, each as a ratio to the limit of the same run: which
    part (busd, the subscriber client, the API's shape) holds minibus below the target, and
    the CPU per delivered event of each party (broker/writer + emitter + subscribers)."""
    labels = [*([fed_batched_label()] if LIMIT_BATCH > 1 else []), checked_floor_label(), *(FLOOR_LABELS[f] for f in (FLOOR_MINIBUS_SUBS, FLOOR_API_SUBS, FLOOR_BUSD))]
    if not any(label in cell for cell in cells.values() for label in labels):
        return []

    def cpu(result: dict[str, Any] | None, n: int) -> str:
        if not result:
            return "-"
        emitter = (result["emitter_us_per_event"] or 0) / n
        return f"{result['broker_us_per_event'] or 0:.1f}+{emitter:.1f}+{result['subscriber_us_per_event'] or 0:.1f}"

    header = (f"{'subs x size':>12} | {'trio limit':>10} | {'minibus':>9} {'ratio':>5} | "
              + " | ".join(f"{label:>24} {'ratio':>5}" for label in labels)
              + " || us CPU per delivered event (writer/broker + emitter + subscribers): limit; minibus; "
              + "; ".join(labels))
    lines = ["floors (reported, not judged): ratio = variant / trio limit, same run", header, "-" * 120]
    for (key, cell), row in zip(cells.items(), rows):
        n, size = key.split("x")
        limit = cell.get("limit")

        def rate(label: str) -> str:
            result = cell.get(label)
            if not result or not limit or not limit["events_per_s"]:
                return f"{fmt_rate(result and result['events_per_s']):>24} {'-':>5}"
            value = result["events_per_s"] / limit["events_per_s"]
            row[f"ratio_limit_{label}"] = value
            return f"{fmt_rate(result['events_per_s']):>24} {value:5.2f}"

        lines.append(
            f"{n + ' x ' + size + ' B':>12} | {fmt_rate(limit and limit['events_per_s']):>10} | "
            f"{fmt_rate(row['minibus']):>9} {'-' if row['ratio_limit'] is None else format(row['ratio_limit'], '5.2f'):>5} | "
            + " | ".join(rate(label) for label in labels)
            + " || " + "; ".join(cpu(cell.get(label), int(n)) for label in ["limit", "minibus", *labels])
        )
    return lines


def main() -> None:
    global LEAD, PIPELINE, LIMIT_BATCH, FLOORS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run, under a minute)")
    parser.add_argument("--seconds", type=float, default=None, help="emitting window per cell (default 1.5; 0.4 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over every cell, best kept (default 2; 1 with --quick)")
    parser.add_argument("--profile", action="store_true",
                        help="only minibus publish (and the limit, with --only minibus,limit) on the 100-subscriber rows "
                             "(or --counts), the broker and the first subscriber process under py-spy")
    parser.add_argument("--counts", default=None, help="comma-separated subscriber counts (default 1,10,100)")
    parser.add_argument("--only", default=None, help="comma-separated systems (minibus,dbus-daemon,dbus-broker,nats,limit)")
    parser.add_argument("--lead", type=int, default=LEAD,
                        help=f"how far the emitter may run ahead of the slowest subscriber (default {LEAD})")
    parser.add_argument("--pipeline", type=int, default=PIPELINE, help=f"emitter tasks in minibus's pipelined variant (default {PIPELINE})")
    parser.add_argument("--limit-batch", type=int, default=LIMIT_BATCH,
                        help=f"events per send in the trio limit's coalescing variant and in the 'limit fed xB' floor's emitter"
                             f" (default {LIMIT_BATCH}; 1 leaves both out)")
    parser.add_argument("--no-floors", action="store_true",
                        help="leave out the floor variants (limit fed xB, limit -> minibus subs, limit -> API-shaped subs, busd -> limit subs)")
    parser.add_argument("--verbose", action="store_true", help="print how long each setup took")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        func = ROLES[args.role]
        values = [int(a) if a.lstrip("-").isdigit() else a for a in args.role_args]
        func(*values)
        return

    LEAD, PIPELINE, LIMIT_BATCH, FLOORS = args.lead, args.pipeline, args.limit_batch, not args.no_floors
    seconds = args.seconds or (0.4 if args.quick else 1.5)
    rounds = args.rounds or (1 if args.quick or args.profile else 2)
    variants = variants_list()
    counts: tuple[int, ...] = COUNTS
    if args.counts:
        counts = tuple(int(c) for c in args.counts.split(","))
    if args.profile:
        variants = [v for v in variants if v[0] in ("minibus", "limit") and v[2] == 1 and v[1] not in FLOOR_LABELS]
        if not args.only:
            variants = [v for v in variants if v[0] == "minibus"]
        counts = counts if args.counts else (100,)
    if args.only:
        wanted = set(args.only.split(","))
        variants = [v for v in variants if v[0] in wanted]
    systems = list(dict.fromkeys(v[0] for v in variants))
    print(f"events: {seconds:g} s per cell, best of {rounds} round(s), emitter at most {LEAD} events ahead of the slowest subscriber, "
          f"subscribers over up to {MAX_PROCS} processes; {os.cpu_count()} CPUs", flush=True)
    print(f"targets: minibus >= {TARGET}x the better D-Bus on every row (publish, one-way); "
          "the NATS ratio is reported (reaching it is the goal beyond); "
          f"minibus >= {LIMIT_TARGET}x the trio limit (one process writing each event's pre-encoded frame "
          f"with one send per subscriber socket; the batched variant, {LIMIT_BATCH} events per send, is reported)", flush=True)
    bench = Bench(args)
    started = time.monotonic()
    try:
        bench.start_brokers(systems)
        cells = bench.run(counts, variants, seconds, rounds, profile=args.profile)
    finally:
        bench.stop()
    took = time.monotonic() - started
    rows, lines = summarise(cells)
    print()
    print("events/s delivered in total (all subscribers), p99 emit -> receipt in ms; ratio = minibus / peer")
    for line in lines:
        print(line)
    for system, reason in bench.skipped.items():
        print(f"skipped {system}: {reason.strip().splitlines()[-1] if reason.strip() else reason}")
    for line in bench.lossy:
        print(f"LOST EVENTS in {line} (the best round is kept in the tables)")
    if args.profile:
        for key, cell in cells.items():
            for label, result in cell.items():
                for party, prof in (result.get("profile") or {"broker": None}).items():
                    if not prof or "self" not in prof:
                        print(f"\n{party} profile {key} {label}: {prof}")
                        continue
                    print(f"\n{party} under py-spy, {key} B, {label} ({prof['samples']} samples): self time")
                    for frame, share in prof["self"][:15]:
                        print(f"  {share * 100:5.1f}%  {frame}")
                    print("  inclusive:")
                    for frame, share in prof["inclusive"][:25]:
                        print(f"  {share * 100:5.1f}%  {frame}")
    print(f"\n({took:.0f} s)")
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "seconds": seconds,
        "rounds": rounds,
        "lead": LEAD,
        "pipeline": PIPELINE,
        "target": TARGET,
        "limit_target": LIMIT_TARGET,
        "limit_batch": LIMIT_BATCH,
        "rows": rows,
        "cells": {k: {label: {kk: vv for kk, vv in r.items() if kk != "profile"} for label, r in v.items()} for k, v in cells.items()},
        "skipped": bench.skipped,
        "lossy_rounds": bench.lossy,
        "took_s": took,
    }
    if args.profile:
        result["profiles"] = {k: {label: r.get("profile") for label, r in v.items()} for k, v in cells.items()}
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
