#!/usr/bin/env python3
"""Isolation: does one peer's misbehaviour harm another?  A canary measured under attack.

Run:  python benchmarks/isolation.py [--quick] [--json FILE] [--attacks KEY,KEY...]

A real ``busd`` runs as its own process (own runtime dir, HOME and XDG_CONFIG_HOME in a temp
dir, so it makes its own key; ``--tcp 127.0.0.1:0``; default ``[limits]``; a config whose
``[[rule]]`` lets any key connect, see and open, and own ``org.attack.*``).  It starts with the
soft descriptor limit a login shell usually gives (1,024, ``--busd-nofile``; the hard limit is
left as it is, so a busd that raises its own soft limit at start gets the hard one).

The canary, beside it:

* a **service** plugin (``clients.rpc.Service`` on ``org.canary.Echo``), its own process;
* a **caller**, in this process: a relayed RPC call (``route="relay"``) on one held channel every
  100 ms (deadline 1 s), a call on a *fresh* relayed channel every 0.5 s, and a fresh connect
  (handshake + hello + ping) as the broker's owner on the Unix socket and on TCP every 1 s;
* a **watcher** (``watch(["*"])``), its own process, which only reports when it is cut off.

Then each attack runs alone, from its own process (this script with ``--attack KEY``), for a few
seconds, while the canary keeps measuring.  One row per attack: the canary's p50/p99/max and
failed calls in the attack's window, fresh channels and connects that worked, how often the
service and the watcher lost their connection, busd's RSS (``VmRSS``) before, at its peak and
~1 s after, busd's CPU seconds, what the attack itself saw (refusals, disconnects, victims), and
what busd logged.  A busd that exits or stops answering is recorded and restarted for the next
row.  Targets (issue 9): canary p99 <= 50 ms under every attack, <= 250 ms while many
connections close at once, and no failed call.

Attack classes (issue 9's numbered findings):

1. pre-auth: 1,100 TCP connections that never send a byte, held; 1,100 that replay one msg1,
   held, while two loops send 64 bytes of garbage on fresh connections.  They come from 138
   loopback source addresses (127.0.1.x, 8 each), so a cap per source does not hide what many
   sources do together; the canary's own TCP connects come from 127.0.0.1.
2. content: hello whose info.metadata is nested as deep as busd accepts (with victims that list
   and watch); 16 KiB info, 64 long names and 255 channels (an admin asks ``info``); a 64 KiB
   reset reason; a target rejecting channels with a 64 KiB reason; a 64 KiB tcp ``host``.
3. relay memory: pairs of connections of one identity, 255 relayed channels each; the senders
   send every byte of credit busd grants them, the receivers never read (grant no credit).
   A frame a byte: a sender sends all its credit as 1-byte DATA frames (4,096 a write) on 8
   relayed channels to a receiver of its own that reads everything and grants credit back.
4. wrong party: a name carrying 16 KiB info churned in bursts under watchers; thousands of
   ``open_channel`` requests to the canary service in one write; 256 idle channels held to it;
   calls to the canary service over 8 relayed channels, each byte of them in a DATA frame of
   its own (32 calls a write and channel), its shs1 channel handshake done by the client library;
   an event flood (32 KiB quiet emits as fast as the socket takes them) to a subscriber of the
   attacker's that never reads, while an honest emitter's events must all reach an honest
   subscriber with no gap.
5. CPU: watch/unwatch with distinct worst-case glob patterns; 64 KiB control frames holding
   64k-item arrays (or as many items as busd accepts); many connections closing at once.

An attack that busd refuses outright steps down to the worst case busd does accept (metadata
depth, patterns per watch, items per frame) and keeps going for its whole window, so each row
measures the worst that is still allowed.

Everything runs over loopback TCP and Unix sockets on this machine; every loop is bounded in
count and time.  ``--quick`` (about a minute) uses shorter windows and fewer connections.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cbor2  # noqa: E402
import trio  # noqa: E402
from _report import emit_json  # noqa: E402

from bus.errors import ChannelRejected, RequestError  # noqa: E402
from bus.io.framed import FramedStream  # noqa: E402
from bus.io.secure import SecureStream  # noqa: E402
from bus.wire.address import Endpoint, format_address, parse_address  # noqa: E402
from bus.wire.frames import ControlFrame, DataFrame, Frame, check_cbor, encode_control, encode_data  # noqa: E402
from bus.wire.identity import Identity, load_identity, save_identity  # noqa: E402
from bus.wire.shs import DEFAULT_NETWORK_KEY, ClientHandshake  # noqa: E402
from clients import Service, open_bus  # noqa: E402
from clients.rpc import RpcConnection  # noqa: E402
from clients.channels import RelayStream  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CANARY_NAME = "org.canary.Echo"
CALL_INTERVAL = 0.1  # the canary's relayed call
CALL_DEADLINE = 1.0
FRESH_INTERVAL = 0.5  # a call on a fresh relayed channel
FRESH_DEADLINE = 2.0
PROBE_INTERVAL = 1.0  # a fresh connect, Unix and TCP
PROBE_DEADLINE = 3.0
RSS_INTERVAL = 0.05
PAYLOAD = "canary-" + "x" * 57  # 64 characters
TARGET_P99_MS = 50.0
TARGET_MASS_CLOSE_P99_MS = 250.0
# docs/broker.md: what one identity can make the broker hold is bounded by
# connections_per_identity (64) times outbound_bytes (1 MiB).
DOCUMENTED_PER_IDENTITY_BOUND_MIB = 32  # relay_bytes_per_identity (docs/broker.md, Limits)
INFO_BYTES = 16 * 1024  # the default [limits] info_bytes
MAX_CONTROL = 64 * 1024
PER_SOURCE = 8  # pre-auth connections per loopback source address
ATTACK_SETUP_LIMIT = 40.0  # an attack process gives up after this plus its window
RUN_BUDGET = {False: 170.0, True: 90.0}  # seconds for a whole run; later attacks are skipped past it

# Counts: (full run, --quick).
COUNTS = {
    "preauth": (1100, 1100),
    "garbage_loops": (2, 2),
    "garbage_max": (20_000, 8_000),
    "relay_pairs": (2, 1),
    "relay_channels": (255, 255),
    "tiny_channels": (8, 8),
    "tiny_burst": (4096, 4096),  # 1-byte DATA frames per write of the tiny-frame flood
    "tiny_calls": (32, 32),  # calls per write and channel of the tiny-frame calls to the canary
    "churn_pairs": (100, 100),
    "churn_watchers": (3, 3),
    "pipelined_opens": (4000, 4000),
    "idle_channels": (256, 256),
    "flood_batch": (64, 64),  # 32 KiB events per write of the event flood
    "watch_conns": (2, 2),
    "watch_max": (20_000, 10_000),
    "array_conns": (4, 4),
    "array_max": (20_000, 8_000),
    "array_items": (65_500, 65_500),
    "channel_items_conns": (4, 4),  # connections sending channel CONTROL frames of many items
    "reset_max": (200, 100),
    "mass_close": (10_000, 900),
}


def count(key: str, quick: bool) -> int:
    return COUNTS[key][1 if quick else 0]


def now() -> float:
    """One clock for every process of the run (CLOCK_MONOTONIC is system-wide on Linux)."""
    return time.monotonic()


def emit_line(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def raise_nofile(want: int | None = None) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(max(soft, want), hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def error_label(exc: BaseException) -> str:
    """A short name for what went wrong: the wire code's last part, or the exception type."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, RequestError):
        return exc.code.rsplit(".", 1)[-1]
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    return type(exc).__name__


def reply_label(reply: dict[str, Any]) -> str:
    if "error" in reply:
        code = reply["error"].get("code", "?") if isinstance(reply["error"], dict) else "?"
        return str(code).rsplit(".", 1)[-1]
    return "ok"


# ----------------------------------------------------------------------------------------------
# A connection spoken by hand (shs1 + frames), for what the client library would never send.
# ----------------------------------------------------------------------------------------------


class RawClosed(Exception):
    """The broker ended a raw connection."""


class _Slot:
    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: dict[str, Any] | None = None


class RawConn:
    """shs1 + frames by hand, with replies matched by id (run :meth:`run` as the reader)."""

    def __init__(self, stream: SecureStream) -> None:
        self.stream = stream
        self.framed = FramedStream(stream, receive_stream=stream.plain_transport())
        self._lock = trio.Lock()
        self._next_id = 1
        self.waiting: dict[int, _Slot] = {}
        self.closed = trio.Event()
        self.reason: str | None = None
        # Answers the broker's requests other than ping (channel_request): a reply or None.
        self.on_request: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None
        # Sees every frame on a channel other than 0.
        self.on_channel: Callable[[Frame], None] | None = None

    @classmethod
    async def open(cls, ep: Endpoint, identity: Identity, network_key: bytes, *, timeout: float = 10.0) -> RawConn:
        with trio.fail_after(timeout):
            transport: trio.SocketStream
            if ep.transport == "unix":
                assert ep.path is not None
                transport = await trio.open_unix_socket(ep.path)
            else:
                assert ep.host is not None and ep.port is not None
                transport = await trio.open_tcp_stream(ep.host, ep.port)
            stream = SecureStream.client(transport, identity, ep.key, network_key=network_key, encrypted=ep.uses_box_stream)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return cls(stream)

    def new_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def expect(self, rid: int) -> _Slot:
        slot = self.waiting[rid] = _Slot()
        return slot

    async def send_raw(self, data: bytes) -> None:
        async with self._lock:
            await self.stream.send_all(data)

    async def send_message(self, message: dict[str, Any], channel: int = 0) -> None:
        await self.send_raw(encode_control(channel, message))

    async def request(self, op: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        """The raw reply (``result`` or ``error``); raises RawClosed or TooSlowError."""
        rid = self.new_id()
        slot = self.expect(rid)
        try:
            await self.send_message({**args, "op": op, "id": rid})
            with trio.move_on_after(timeout):
                await slot.event.wait()
        finally:
            self.waiting.pop(rid, None)
        if slot.reply is None:
            if self.closed.is_set():
                raise RawClosed(self.reason or "closed")
            raise trio.TooSlowError(f"{op}: no reply within {timeout:g} s")
        return slot.reply

    async def hello_direct(self, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        """hello with no reader task running (read inline until its reply)."""
        rid = self.new_id()
        with trio.fail_after(timeout):
            await self.send_message({**args, "op": "hello", "id": rid})
            while True:
                frame = await self.framed.receive_frame()
                if frame is None:
                    raise RawClosed("closed during hello")
                if isinstance(frame, ControlFrame) and frame.message.get("re") == rid:
                    return frame.message

    async def run(self) -> None:
        """Read until the broker ends the connection: replies, pings, channel requests."""
        reason = "the broker closed the connection"
        try:
            while True:
                frame = await self.framed.receive_frame()
                if frame is None:
                    break
                if frame.channel != 0:
                    if self.on_channel is not None:
                        self.on_channel(frame)
                    continue
                if not isinstance(frame, ControlFrame):
                    continue
                msg = frame.message
                if "re" in msg:
                    slot = self.waiting.pop(msg["re"], None)
                    if slot is not None:
                        slot.reply = msg
                        slot.event.set()
                elif "op" in msg:
                    answer: dict[str, Any] | None
                    if msg["op"] == "ping":
                        answer = {"re": msg["id"], "result": {}}
                    else:
                        answer = self.on_request(msg) if self.on_request is not None else None
                    if answer is not None:
                        with trio.move_on_after(5):
                            await self.send_message(answer)
                elif msg.get("event") == "error":
                    reason = f"{msg.get('code')}: {str(msg.get('message'))[:160]}"
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc)[:160]}"
        finally:
            self.reason = self.reason or reason
            self.closed.set()
            for slot in self.waiting.values():
                slot.event.set()
            self.waiting.clear()

    def close_now(self) -> None:
        """Close the socket at once, no goodbye (no task may be using it)."""
        transport = self.stream.transport
        if isinstance(transport, trio.SocketStream):
            transport.socket.close()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def open_channels(self, name: str, protocol: str, route: str, n: int, timeout: float) -> tuple[list[int], collections.Counter[str]]:
        """``n`` open_channel requests in one write; the channel ids opened and the other answers."""
        ids = [self.new_id() for _ in range(n)]
        slots = [self.expect(i) for i in ids]
        data = b"".join(
            encode_control(0, {"op": "open_channel", "id": i, "name": name, "protocol": protocol, "route": route}) for i in ids
        )
        outcome: collections.Counter[str] = collections.Counter()
        opened: list[int] = []
        try:
            await self.send_raw(data)
            with trio.move_on_after(timeout):
                for slot in slots:
                    await slot.event.wait()
        except Exception as exc:
            outcome[f"send: {error_label(exc)}"] += 1
        for rid, slot in zip(ids, slots):
            self.waiting.pop(rid, None)
            if slot.reply is None:
                outcome["no reply (connection ended)" if self.closed.is_set() else "no reply yet"] += 1
            elif "result" in slot.reply:
                opened.append(slot.reply["result"]["channel"])
            else:
                outcome[reply_label(slot.reply)] += 1
        outcome["opened"] = len(opened)
        return opened, outcome

    async def open_channels_batched(
        self, name: str, protocol: str, route: str, n: int, timeout: float, batch: int = 32
    ) -> tuple[list[int], collections.Counter[str]]:
        """``n`` channels, ``batch`` requests per write (a broker may cap the opens pending per
        opener): stops at the first batch that opens nothing."""
        opened: list[int] = []
        outcome: collections.Counter[str] = collections.Counter()
        deadline = now() + timeout
        while len(opened) < n and now() < deadline and not self.closed.is_set():
            more, answers = await self.open_channels(name, protocol, route, min(batch, n - len(opened)), deadline - now())
            opened += more
            answers.pop("opened", None)
            outcome.update(answers)
            if not more:
                break
        outcome["opened"] = len(opened)
        return opened, outcome


def accept_channels(conn: RawConn, seen: list[int] | None = None) -> Callable[[dict[str, Any]], dict[str, Any] | None]:
    """A target that accepts every channel (and never grants it credit)."""

    def answer(msg: dict[str, Any]) -> dict[str, Any] | None:
        if msg.get("op") == "channel_request":
            if seen is not None:
                seen.append(msg.get("channel", 0))
            return {"re": msg["id"], "result": {}}
        return {"re": msg["id"], "error": {"code": "minibus.Error.UnknownOperation", "message": "no"}}

    return answer


def padded_info(limit: int = INFO_BYTES) -> dict[str, Any]:
    """Plugin info of exactly ``limit`` bytes as CBOR (the broker's info_bytes check)."""
    base = {"description": "", "version": "", "metadata": {"pad": ""}}
    overhead = len(cbor2.dumps(base))
    pad = "i" * (limit - overhead - 2)  # its 3-byte head replaces the empty text's 1-byte one
    metadata = {"pad": pad}
    info: dict[str, Any] = {"description": "", "version": "", "metadata": metadata}
    while len(cbor2.dumps(info)) > limit:
        pad = pad[:-1]
        metadata["pad"] = pad
    return info


def largest_text(build: Callable[[str], dict[str, Any]], channel: int = 0) -> str:
    """The longest text ``build`` can carry in one control frame (what a peer may send)."""
    low, high = 0, MAX_CONTROL
    while low < high:
        mid = (low + high + 1) // 2
        try:
            encode_control(channel, build("x" * mid))
            low = mid
        except Exception:
            high = mid - 1
    return "x" * low


def nested(depth: int) -> dict[str, Any]:
    inner: dict[str, Any] = {"x": 1}
    for _ in range(depth - 1):
        inner = {"x": inner}
    return inner


def deepest_metadata() -> int:
    """The deepest metadata nesting a hello can carry inside minibus's CBOR profile."""
    best = 1
    for depth in range(1, 40):
        msg = {"op": "hello", "id": 1, "name": "org.attack.Deep", "info": {"description": "", "version": "", "metadata": nested(depth)}}
        try:
            check_cbor(cbor2.dumps(msg))
        except Exception:
            break
        best = depth
    return best


# ----------------------------------------------------------------------------------------------
# Attacks: each runs in its own process and fills ctx.result; ctx.ready() marks the moment the
# harmful part begins (what came before is setup).
# ----------------------------------------------------------------------------------------------


@dataclass
class AttackContext:
    endpoints: list[Endpoint]
    network_key: bytes
    owner_key: str | None
    duration: float
    quick: bool
    result: dict[str, Any] = field(default_factory=dict)
    ready_at: float | None = None

    @property
    def unix(self) -> Endpoint:
        return next(ep for ep in self.endpoints if ep.transport == "unix")

    @property
    def tcp(self) -> Endpoint:
        return next(ep for ep in self.endpoints if ep.transport == "tcp")

    @property
    def unix_address(self) -> str:
        return format_address([self.unix])

    def n(self, key: str) -> int:
        return count(key, self.quick)

    def ready(self) -> None:
        self.ready_at = now()
        emit_line({"ready": self.ready_at})

    def remaining(self) -> float:
        start = self.ready_at if self.ready_at is not None else now()
        return max(0.0, start + self.duration - now())

    async def raw(self, ep: Endpoint | None = None, identity: Identity | None = None) -> RawConn:
        return await RawConn.open(ep or self.unix, identity or Identity.generate(), self.network_key)


class Victim:
    """A well-behaved library client in the attack process: counts what it suffered."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.bus: Any = None

    @property
    def reconnects(self) -> int:
        return int(self.bus.reconnects) if self.bus is not None else 0

    def report(self) -> dict[str, Any]:
        return {"outcomes": dict(self.outcomes), "reconnects": self.reconnects}


async def _hold_sockets(socks: list[trio.SocketStream], seconds: float, seen: dict[str, int]) -> None:
    """Keep sockets open; count (in ``seen``) the ones busd closes and those it sent bytes on."""
    seen.setdefault("closed_by_busd", 0)
    seen.setdefault("got_bytes", 0)

    async def watch(sock: trio.SocketStream) -> None:
        got = False
        try:
            while True:
                data = await sock.receive_some(4096)
                if not data:
                    break
                if not got:
                    got = True
                    seen["got_bytes"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        seen["closed_by_busd"] += 1

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for sock in socks:
                nursery.start_soon(watch, sock)


def loopback_source(i: int) -> str:
    """The i-th of many loopback source addresses (127.0.1.1 ...), so that a cap per source
    address does not hide what many sources together do (the whole of 127/8 is loopback)."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


async def _open_tcp_many(ctx: AttackContext, n: int, first: bytes, r: dict[str, Any]) -> list[trio.SocketStream]:
    socks: list[trio.SocketStream] = []
    failures: collections.Counter[str] = collections.Counter()
    limiter = trio.CapacityLimiter(64)
    ep = ctx.tcp

    async def one(i: int) -> None:
        async with limiter:
            try:
                with trio.fail_after(3):
                    sock = await trio.open_tcp_stream(
                        ep.host or "127.0.0.1", ep.port or 0, local_address=loopback_source(i // PER_SOURCE)
                    )
                    if first:
                        await sock.send_all(first)
            except Exception as exc:
                failures[error_label(exc)] += 1
                return
            socks.append(sock)

    with trio.move_on_after(15):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
    r["connected"] = len(socks)
    r["sources"] = math.ceil(n / PER_SOURCE)
    r["connect_failed"] = dict(failures)
    return socks


async def attack_preauth_silent(ctx: AttackContext) -> None:
    r = ctx.result
    n = ctx.n("preauth")
    r["connections"] = n
    ctx.ready()
    socks = await _open_tcp_many(ctx, n, b"", r)
    seen: dict[str, int] = {}
    await _hold_sockets(socks, ctx.remaining(), seen)
    r.update(seen)
    for sock in socks:
        sock.socket.close()
    r["summary"] = (
        f"{r['connected']}/{n} from {r['sources']} sources, {r['closed_by_busd']} closed by busd within the window; "
        f"connect failed {sum(r['connect_failed'].values())}"
    )


async def attack_preauth_replay(ctx: AttackContext) -> None:
    r = ctx.result
    n = ctx.n("preauth")
    r["connections"] = n
    msg1 = ClientHandshake(Identity.generate(), ctx.tcp.key, ctx.network_key).data_to_send()
    assert len(msg1) == 64
    garbage = {"sent": 0, "closed_by_busd": 0, "failed": 0}
    ctx.ready()
    socks = await _open_tcp_many(ctx, n, msg1, r)

    async def garbage_loop(k: int, limit: int) -> None:
        ep = ctx.tcp
        source = loopback_source(1000 + k)
        while garbage["sent"] < limit:
            try:
                with trio.fail_after(1):
                    sock = await trio.open_tcp_stream(ep.host or "127.0.0.1", ep.port or 0, local_address=source)
            except Exception:
                garbage["failed"] += 1
                await trio.sleep(0.05)
                continue
            try:
                await sock.send_all(os.urandom(64))
                garbage["sent"] += 1
                with trio.move_on_after(1):
                    while await sock.receive_some(4096):
                        pass
                    garbage["closed_by_busd"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                garbage["closed_by_busd"] += 1
            finally:
                sock.socket.close()
                await trio.lowlevel.checkpoint()

    held: dict[str, int] = {}
    with trio.move_on_after(ctx.remaining()):
        async with trio.open_nursery() as nursery:
            for k in range(ctx.n("garbage_loops")):
                nursery.start_soon(garbage_loop, k, ctx.n("garbage_max"))
            nursery.start_soon(_hold_sockets, socks, ctx.remaining() + 1, held)
    for sock in socks:
        sock.socket.close()
    r["replays"] = {"msg2_received": held.get("got_bytes", 0), "closed_by_busd": held.get("closed_by_busd", 0)}
    r["garbage"] = garbage
    r["summary"] = (
        f"{r['connected']}/{n} replays from {r['sources']} sources, {held.get('got_bytes', 0)} got msg2, "
        f"{held.get('closed_by_busd', 0)} closed by busd; garbage {garbage['sent']} sent"
    )


async def _lister(ctx: AttackContext, victim: Victim, target: str, interval: float, admin: bool = False) -> None:
    """A victim that asks about ``target`` every ``interval`` (list + resolve, or info as admin)."""
    identity = load_identity(ctx.owner_key) if admin and ctx.owner_key else Identity.generate()
    try:
        async with open_bus(ctx.unix_address, identity=identity, network_key=ctx.network_key, reconnect=True) as bus:
            victim.bus = bus
            while True:
                try:
                    with trio.fail_after(3):
                        if admin:
                            await bus.info(target)
                        else:
                            await bus.list_names()
                            await bus.resolve(target)
                    victim.outcomes["ok"] += 1
                except Exception as exc:
                    victim.outcomes[error_label(exc)] += 1
                await trio.sleep(interval)
    except Exception as exc:
        victim.outcomes[f"gave up: {error_label(exc)}"] += 1


async def _watcher(ctx: AttackContext, victim: Victim, patterns: list[str]) -> None:
    try:
        async with open_bus(ctx.unix_address, identity=Identity.generate(), network_key=ctx.network_key, reconnect=True) as bus:
            victim.bus = bus
            while True:
                try:
                    async with bus.watch(patterns) as watch:
                        async for _event in watch:
                            victim.outcomes["events"] += 1
                except Exception as exc:
                    victim.outcomes[error_label(exc)] += 1
                    await trio.sleep(0.2)
    except Exception as exc:
        victim.outcomes[f"gave up: {error_label(exc)}"] += 1


def _victims_summary(victims: dict[str, Victim]) -> str:
    return ", ".join(f"{name} reconnected {v.reconnects}x" for name, v in victims.items())


async def attack_content_deep(ctx: AttackContext) -> None:
    r = ctx.result
    victims = {"lister": Victim(), "watcher": Victim()}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_lister, ctx, victims["lister"], "org.attack.Deep", 0.5)
        nursery.start_soon(_watcher, ctx, victims["watcher"], ["org.attack.*"])
        await trio.sleep(0.5)
        attacker = await ctx.raw()
        nursery.start_soon(attacker.run)
        ctx.ready()
        depth = deepest_metadata()
        refusals: collections.Counter[str] = collections.Counter()
        while depth > 0:
            info = {"description": "", "version": "", "metadata": nested(depth)}
            try:
                reply = await attacker.request("hello", name="org.attack.Deep", info=info)
            except Exception as exc:
                refusals[error_label(exc)] += 1
                break
            if "result" in reply:
                break
            refusals[reply_label(reply)] += 1
            depth -= 1
        r["accepted_depth"] = depth
        r["refused_deeper"] = dict(refusals)
        await trio.sleep(ctx.remaining())
        r["attacker_disconnected"] = attacker.reason if attacker.closed.is_set() else None
        nursery.cancel_scope.cancel()
    r["victims"] = {k: v.report() for k, v in victims.items()}
    refused = f" (deeper: {', '.join(refusals)})" if refusals else ""
    r["summary"] = f"metadata depth {depth} accepted{refused}; {_victims_summary(victims)}"


async def attack_content_info(ctx: AttackContext) -> None:
    r = ctx.result
    admin = Victim()
    async with trio.open_nursery() as nursery:
        seen: list[int] = []
        sink = await ctx.raw()
        sink.on_request = accept_channels(sink, seen)
        nursery.start_soon(sink.run)
        await sink.request("hello", name="org.attack.Sink")
        big = await ctx.raw()
        nursery.start_soon(big.run)
        ctx.ready()
        info = padded_info()
        reply = await big.request("hello", name="org.attack.Big", info=info)
        r["hello"] = reply_label(reply)
        names: collections.Counter[str] = collections.Counter()
        for i in range(63):
            name = f"org.attack.Big.n{'x' * 225}{i:02d}"
            try:
                names[reply_label(await big.request("request_name", name=name))] += 1
            except Exception as exc:
                names[error_label(exc)] += 1
                break
        r["names"] = dict(names)
        opened, outcome = await big.open_channels_batched("org.attack.Sink", "raw", "relay", 255, timeout=5)
        r["channels"] = dict(outcome)
        nursery.start_soon(_lister, ctx, admin, "org.attack.Big", 0.5, True)
        await trio.sleep(ctx.remaining())
        r["attacker_disconnected"] = big.reason if big.closed.is_set() else None
        nursery.cancel_scope.cancel()
    r["victims"] = {"admin_info": admin.report()}
    r["summary"] = f"hello {r['hello']}, {names.get('ok', 0) + 1} names, {len(opened)} channels; admin info: {dict(admin.outcomes)}"


async def attack_content_reset(ctx: AttackContext) -> None:
    r = ctx.result
    told: dict[int, str] = {}
    seen: list[int] = []
    stats = collections.Counter[str]()
    async with trio.open_nursery() as nursery:
        sink = await ctx.raw()
        sink.on_request = accept_channels(sink, seen)

        def on_channel(frame: Frame) -> None:
            if isinstance(frame, ControlFrame) and "reset" in frame.message:
                told[frame.channel] = str(frame.message["reset"])[:80]

        sink.on_channel = on_channel
        nursery.start_soon(sink.run)
        await sink.request("hello", name="org.attack.Sink")
        ctx.ready()
        reason = largest_text(lambda text: {"reset": text}, channel=1 << 20)
        for _ in range(ctx.n("reset_max")):
            if ctx.remaining() <= 0.3:
                break
            a: RawConn | None = None
            try:
                a = await ctx.raw()
                async with trio.open_nursery() as inner:
                    inner.start_soon(a.run)
                    await a.request("hello")
                    reply = await a.request("open_channel", name="org.attack.Sink", protocol="raw", route="relay")
                    if "result" in reply:
                        peer_channel = seen[-1] if seen else -1
                        await a.send_message({"reset": reason}, channel=reply["result"]["channel"])
                        stats["reset sent"] += 1
                        with trio.move_on_after(1.0):
                            while peer_channel not in told:
                                await trio.sleep(0.01)
                        stats["peer told" if peer_channel in told else "peer never told"] += 1
                        await trio.sleep(0.05)
                        stats["attacker disconnected" if a.closed.is_set() else "attacker kept"] += 1
                    else:
                        stats[f"open: {reply_label(reply)}"] += 1
                    inner.cancel_scope.cancel()
            except Exception as exc:
                stats[error_label(exc)] += 1
            finally:
                if a is not None:
                    await a.aclose()
        nursery.cancel_scope.cancel()
    r["outcomes"] = dict(stats)
    r["summary"] = (
        f"{stats['reset sent']} resets: peer told {stats['peer told']}, never told {stats['peer never told']}; "
        f"attacker cut {stats['attacker disconnected']}"
    )


async def _open_loop(ctx: AttackContext, victim: Victim, name: str, route: str) -> None:
    """A victim that opens channels to ``name`` and counts what happens to it."""
    try:
        async with open_bus(ctx.unix_address, identity=Identity.generate(), network_key=ctx.network_key, reconnect=True) as bus:
            victim.bus = bus
            while ctx.remaining() > 0:
                try:
                    with trio.fail_after(3):
                        channel = await bus.open_channel(name, "raw", route=route)
                    victim.outcomes["opened"] += 1
                    await trio.aclose_forcefully(channel)
                except ChannelRejected:
                    victim.outcomes["rejected (as it should)"] += 1
                except Exception as exc:
                    victim.outcomes[error_label(exc)] += 1
                    with trio.move_on_after(6):
                        while not bus.connected:
                            await trio.sleep(0.05)
                await trio.sleep(0.1)
    except Exception as exc:
        victim.outcomes[f"gave up: {error_label(exc)}"] += 1


async def attack_content_reject(ctx: AttackContext) -> None:
    r = ctx.result
    victim = Victim()
    reason = largest_text(lambda text: {"re": 1 << 20, "error": {"code": ChannelRejected.wire_code, "message": text}})
    async with trio.open_nursery() as nursery:
        target = await ctx.raw()

        def reject(msg: dict[str, Any]) -> dict[str, Any]:
            return {"re": msg["id"], "error": {"code": ChannelRejected.wire_code, "message": reason}}

        target.on_request = reject
        nursery.start_soon(target.run)
        await target.request("hello", name="org.attack.Rejecter")
        ctx.ready()
        await _open_loop(ctx, victim, "org.attack.Rejecter", "relay")
        r["attacker_disconnected"] = target.reason if target.closed.is_set() else None
        nursery.cancel_scope.cancel()
    r["victims"] = {"opener": victim.report()}
    r["summary"] = f"opener: {dict(victim.outcomes)}, reconnected {victim.reconnects}x"


async def attack_content_host(ctx: AttackContext) -> None:
    r = ctx.result
    victim = Victim()
    host = largest_text(lambda text: {"re": 1 << 20, "result": {"host": text, "port": 9}})
    async with trio.open_nursery() as nursery:
        target = await ctx.raw(ctx.tcp)  # on TCP, so a direct route is a tcp one

        def answer(msg: dict[str, Any]) -> dict[str, Any]:
            if msg.get("route") == "tcp":
                return {"re": msg["id"], "result": {"host": host, "port": 9}}
            return {"re": msg["id"], "result": {}}

        target.on_request = answer
        nursery.start_soon(target.run)
        await target.request("hello", name="org.attack.Host")
        ctx.ready()
        await _open_loop(ctx, victim, "org.attack.Host", "direct")
        r["attacker_disconnected"] = target.reason if target.closed.is_set() else None
        nursery.cancel_scope.cancel()
    r["victims"] = {"opener": victim.report()}
    r["summary"] = f"opener: {dict(victim.outcomes)}, reconnected {victim.reconnects}x"


async def attack_relay_memory(ctx: AttackContext) -> None:
    """Senders that use all the credit busd grants them, receivers that never grant any."""
    r = ctx.result
    pairs, per_pair = ctx.n("relay_pairs"), ctx.n("relay_channels")
    identity = Identity.generate()  # every connection of this attack is one identity
    sent = 0
    opened_total = collections.Counter[str]()
    conns: list[RawConn] = []
    credit: dict[tuple[int, int], int] = collections.defaultdict(int)  # (pair, channel) -> unused credit
    granted = 0
    resets: collections.Counter[str] = collections.Counter()

    def watch_channels(pair: int) -> Callable[[Frame], None]:
        def on_channel(frame: Frame) -> None:
            nonlocal granted
            if isinstance(frame, ControlFrame):
                if isinstance(frame.message.get("credit"), int):
                    credit[(pair, frame.channel)] += frame.message["credit"]
                    granted += frame.message["credit"]
                elif "reset" in frame.message:
                    resets[str(frame.message["reset"])[:60]] += 1

        return on_channel

    async with trio.open_nursery() as nursery:
        channels: list[tuple[int, RawConn, list[int]]] = []
        for p in range(pairs):
            b = await ctx.raw(identity=identity)
            b.on_request = accept_channels(b)
            nursery.start_soon(b.run)
            await b.request("hello", name=f"org.attack.Hoard{p}")
            a = await ctx.raw(identity=identity)
            a.on_channel = watch_channels(p)
            nursery.start_soon(a.run)
            await a.request("hello")
            conns += [a, b]
            opened, outcome = await a.open_channels_batched(f"org.attack.Hoard{p}", "raw", "relay", per_pair, timeout=10)
            opened_total.update(outcome)
            channels.append((p, a, opened))
        with trio.move_on_after(1):  # the initial credit follows each open reply
            while any(credit[(p, ch)] == 0 for p, _, opened in channels for ch in opened):
                await trio.sleep(0.01)
        ctx.ready()
        with trio.move_on_after(ctx.remaining()):
            while True:  # send every byte of credit busd grants (more comes only if it grows)
                progress = False
                for p, a, opened in channels:
                    for ch in opened:
                        while credit[(p, ch)] > 0 and not a.closed.is_set():
                            size = min(credit[(p, ch)], 64 * 1024)
                            credit[(p, ch)] -= size
                            await a.send_raw(encode_data(ch, bytes(size)))
                            sent += size
                            progress = True
                if not progress:
                    await trio.sleep(0.05)
        r["credit_granted_mib"] = round(granted / 2**20, 1)
        r["sent_mib"] = round(sent / 2**20, 1)
        r["channels_reset"] = dict(resets)
        r["disconnected"] = sum(1 for c in conns if c.closed.is_set())
        r["reasons"] = sorted({c.reason or "" for c in conns if c.closed.is_set()})[:3]
        nursery.cancel_scope.cancel()
    r["channels"] = dict(opened_total)
    r["summary"] = (
        f"{pairs} pair(s), {opened_total['opened']} channels: {r['sent_mib']} MiB sent unread "
        f"(all the credit granted); {sum(resets.values())} resets, {r['disconnected']} conns cut"
    )


async def attack_tiny_frames(ctx: AttackContext) -> None:
    """A sender of a frame a byte: every byte of credit busd grants goes out as a 1-byte DATA
    frame (up to ``tiny_burst`` of them a write) on ``tiny_channels`` relayed channels, to a
    receiver of the attacker's own that reads everything and grants credit back as it reads,
    so the flood runs for the whole window: busd's CPU per frame, at the most frames a byte."""
    r = ctx.result
    n_channels, burst = ctx.n("tiny_channels"), ctx.n("tiny_burst")
    identity = Identity.generate()
    credit: dict[int, int] = collections.defaultdict(int)  # sender's channel -> unused credit
    seen: list[int] = []  # the receiver's channel ids
    read: dict[int, int] = collections.defaultdict(int)  # receiver's channel -> bytes not yet granted back
    got = sent = frames = 0
    resets: collections.Counter[str] = collections.Counter()
    window = 256 * 1024

    def on_sender(frame: Frame) -> None:
        if isinstance(frame, ControlFrame):
            if isinstance(frame.message.get("credit"), int):
                credit[frame.channel] += frame.message["credit"]
            elif "reset" in frame.message:
                resets[str(frame.message["reset"])[:60]] += 1

    def on_receiver(frame: Frame) -> None:
        nonlocal got
        if isinstance(frame, DataFrame):
            read[frame.channel] += len(frame.data)
            got += len(frame.data)

    async with trio.open_nursery() as nursery:
        b = await ctx.raw(identity=identity)
        b.on_request = accept_channels(b, seen)
        b.on_channel = on_receiver
        nursery.start_soon(b.run)
        await b.request("hello", name="org.attack.Tiny")
        a = await ctx.raw(identity=identity)
        a.on_channel = on_sender
        nursery.start_soon(a.run)
        await a.request("hello")
        opened, outcome = await a.open_channels_batched("org.attack.Tiny", "raw", "relay", n_channels, timeout=10)

        async def grant() -> None:  # the receiver: its window at once, then what it read
            granted: set[int] = set()
            while not b.closed.is_set():
                for ch in seen:
                    if ch not in granted:
                        granted.add(ch)
                        await b.send_message({"credit": window}, ch)
                for ch, n in list(read.items()):
                    if n >= window // 2:
                        read[ch] = 0
                        await b.send_message({"credit": n}, ch)
                await trio.sleep(0.002)

        nursery.start_soon(grant)
        ctx.ready()
        with trio.move_on_after(ctx.remaining()):
            while not a.closed.is_set():
                progress = False
                for ch in opened:
                    k = min(credit[ch], burst)
                    if k > 0:
                        credit[ch] -= k
                        await a.send_raw(encode_data(ch, b"t") * k)
                        sent += k
                        frames += k
                        progress = True
                if not progress:
                    await trio.sleep(0.001)
        r["channels"] = dict(outcome)
        r["frames_sent"] = frames
        r["bytes_received"] = got
        r["channels_reset"] = dict(resets)
        r["disconnected"] = sum(1 for c in (a, b) if c.closed.is_set())
        r["reasons"] = sorted({c.reason or "" for c in (a, b) if c.closed.is_set()})[:3]
        nursery.cancel_scope.cancel()
    r["summary"] = (
        f"{outcome['opened']} channels: {frames:,} 1-byte frames sent, {got:,} bytes received; "
        f"{sum(resets.values())} resets, {r['disconnected']} conns cut"
    )


async def attack_tiny_calls(ctx: AttackContext) -> None:
    """Calls to the canary's own service, each byte of them in a DATA frame of its own (the
    channel opened, and its shs1 handshake done, by the client library; then its frames
    written by hand, within the credit busd grants): the service's bus connection gets its
    reads full of 1-byte frames, as busd lets them through (at most half its queue's frames,
    the rest joined), and must still answer the canary."""
    r = ctx.result
    n_channels, burst = ctx.n("tiny_channels"), ctx.n("tiny_calls")
    stats = collections.Counter[str]()

    async def caller(bus: Any) -> None:
        ch = await bus.open_channel(CANARY_NAME, "rpc", route="relay")
        relay = ch.raw
        assert isinstance(relay, RelayStream), type(relay)
        link = relay._link  # (an attacker's tool: the channel's own frames, cut by hand)
        call_id = itertools.count(1)

        async def read_replies() -> None:
            while data := await ch.receive_some():
                stats["replies"] += data.count(b"\xa2bre")  # (each reply's map head and "re")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_replies)
            while True:
                wire = b"".join(
                    encode_control(0, {"op": "call", "id": next(call_id), "method": "echo", "args": [b"x"]}) for _ in range(burst)
                )
                while relay._credit < len(wire) or stats["calls"] - stats["replies"] > 4 * burst * n_channels:
                    await trio.sleep(0.001)
                relay._credit -= len(wire)
                link.send.send_nowait(b"".join(encode_data(relay.channel, wire[i : i + 1]) for i in range(len(wire))))
                stats["calls"] += burst
                stats["frames"] += len(wire)
                await trio.sleep(0)

    try:
        async with open_bus(ctx.unix_address, identity=Identity.generate(), network_key=ctx.network_key, reconnect=False) as bus:
            ctx.ready()
            with trio.move_on_after(ctx.remaining()):
                async with trio.open_nursery() as nursery:
                    for _ in range(n_channels):
                        nursery.start_soon(caller, bus)
    except Exception as exc:
        stats[f"bus: {error_label(exc)}"] += 1
    r["outcomes"] = dict(stats)
    r["summary"] = f"{n_channels} channels: {stats['calls']:,} calls in {stats['frames']:,} 1-byte frames, {stats['replies']:,} answered"


async def attack_churn(ctx: AttackContext) -> None:
    r = ctx.result
    victims = {f"watcher{i}": Victim() for i in range(ctx.n("churn_watchers"))}
    bursts = collections.Counter[str]()
    async with trio.open_nursery() as nursery:
        for v in victims.values():
            nursery.start_soon(_watcher, ctx, v, ["*"])
        info = padded_info()
        x1 = await ctx.raw()
        nursery.start_soon(x1.run)
        r["x1_hello"] = reply_label(await x1.request("hello", name="org.attack.Churn", flags=["allow-replacement"], info=info))
        x2 = await ctx.raw()
        nursery.start_soon(x2.run)
        r["x2_hello"] = reply_label(await x2.request("hello", info=info))
        await trio.sleep(0.5)
        ctx.ready()
        pairs = ctx.n("churn_pairs")
        while ctx.remaining() > 0.2 and not x2.closed.is_set():
            started = now()
            slots = []
            frames = []
            for _ in range(pairs):
                for op, args in (("request_name", {"flags": ["replace-existing"]}), ("release_name", {})):
                    rid = x2.new_id()
                    slots.append(x2.expect(rid))
                    frames.append(encode_control(0, {"op": op, "id": rid, "name": "org.attack.Churn", **args}))
            try:
                await x2.send_raw(b"".join(frames))
                with trio.move_on_after(5):
                    for slot in slots:
                        await slot.event.wait()
                bursts["bursts"] += 1
                bursts["answered"] += sum(1 for s in slots if s.reply is not None)
            except Exception as exc:
                bursts[error_label(exc)] += 1
            await trio.sleep(max(0.0, started + 1.0 - now()))
        r["attackers_disconnected"] = [c.reason for c in (x1, x2) if c.closed.is_set()]
        nursery.cancel_scope.cancel()
    r["bursts"] = dict(bursts)
    r["victims"] = {k: v.report() for k, v in victims.items()}
    lost = sum(v.reconnects for v in victims.values())
    r["summary"] = f"{bursts['bursts']} bursts of {2 * ctx.n('churn_pairs')} owner changes; {len(victims)} watchers reconnected {lost}x in all"


async def attack_event_flood(ctx: AttackContext) -> None:
    """An emitter publishes 32 KiB events as fast as its socket takes them, to a subscriber of
    its own that never reads; an honest emitter's event every 0.1 s must still reach an honest
    subscriber, every one, with no gap (the flood pays from its own share of each queue)."""
    from clients.events import Gap

    r = ctx.result
    victim = Victim()
    got: list[int] = []
    gaps = collections.Counter[str]()
    sent = 0
    async with trio.open_nursery() as nursery:
        sink = await ctx.raw()  # subscribes to everything, never reads
        await sink.send_raw(encode_control(0, {"op": "hello", "id": 1}) + encode_control(0, {"op": "subscribe", "id": 2}))
        flood = await ctx.raw()
        nursery.start_soon(flood.run)
        await flood.request("hello")
        async with open_bus(ctx.unix_address, identity=Identity.generate(), network_key=ctx.network_key) as honest, open_bus(
            ctx.unix_address, identity=Identity.generate(), network_key=ctx.network_key
        ) as listener:
            victim.bus = listener

            async def listen(subscription: Any) -> None:
                async for item in subscription:
                    if isinstance(item, Gap):
                        gaps[item.reason] += 1
                    else:
                        got.append(item.payload)

            subscription = listener.subscribe(honest.unique_id)
            await subscription.__aenter__()
            nursery.start_soon(listen, subscription)
            await trio.sleep(0.3)
            ctx.ready()

            async def flood_loop() -> None:
                payload = b"f" * 32000
                batch = b"".join(
                    encode_control(0, {"op": "emit", "id": 1000 + i, "member": "Flood", "payload": payload, "quiet": True})
                    for i in range(ctx.n("flood_batch"))
                )
                while not flood.closed.is_set():
                    await flood.send_raw(batch)
                    r["flood_bytes"] = r.get("flood_bytes", 0) + len(batch)

            nursery.start_soon(flood_loop)
            while ctx.remaining() > 0.3:
                await honest.publish("Honest", sent)
                sent += 1
                await trio.sleep(0.1)
            await trio.sleep(0.5)  # the last honest events arrive
            await subscription.aclose()
        r["flood_cut"] = flood.reason if flood.closed.is_set() else None
        nursery.cancel_scope.cancel()
    r["honest"] = {"sent": sent, "received": len(got), "in_order": got == sorted(got), "gaps": dict(gaps)}
    r["victims"] = {"listener": victim.report()}
    mib = r.get("flood_bytes", 0) / (1 << 20)
    lost = sent - len(got)
    r["summary"] = (
        f"flood {mib:.0f} MiB of events to a sink that never reads; honest events {len(got)}/{sent}"
        + (f" (LOST {lost})" if lost else "") + (f", gaps {dict(gaps)}" if gaps else ", no gap")
    )


async def attack_pipelined_opens(ctx: AttackContext) -> None:
    r = ctx.result
    n = ctx.n("pipelined_opens")
    async with trio.open_nursery() as nursery:
        p = await ctx.raw()
        nursery.start_soon(p.run)
        await p.request("hello")
        ctx.ready()
        opened, outcome = await p.open_channels(CANARY_NAME, "rpc", "relay", n, timeout=ctx.remaining())
        await trio.sleep(ctx.remaining())
        r["attacker_disconnected"] = p.reason if p.closed.is_set() else None
        nursery.cancel_scope.cancel()
    r["answers"] = dict(outcome)
    others = {k: v for k, v in outcome.items() if k != "opened"}
    r["summary"] = f"{n} opens in one write: {len(opened)} opened, {others}" + ("; attacker cut" if r["attacker_disconnected"] else "")


async def attack_idle_channels(ctx: AttackContext) -> None:
    r = ctx.result
    n = ctx.n("idle_channels")
    outcomes = collections.Counter[str]()
    held = []
    try:
        async with open_bus(ctx.unix_address, identity=Identity.generate(), network_key=ctx.network_key, reconnect=False) as bus:
            refused_in_a_row = 0
            with trio.move_on_after(20):
                for _ in range(n):
                    try:
                        with trio.fail_after(3):
                            held.append(await bus.open_channel(CANARY_NAME, "rpc", route="relay"))
                        outcomes["held"] += 1
                        refused_in_a_row = 0
                    except Exception as exc:
                        outcomes[error_label(exc)] += 1
                        refused_in_a_row += 1
                        if refused_in_a_row >= 3:
                            break
            ctx.ready()
            await trio.sleep(ctx.remaining())
            for channel in held:
                await trio.aclose_forcefully(channel)
    except Exception as exc:
        outcomes[f"bus: {error_label(exc)}"] += 1
    r["outcomes"] = dict(outcomes)
    others = {k: v for k, v in outcomes.items() if k != "held"}
    r["summary"] = f"{outcomes['held']}/{n} channels held idle" + (f"; refused {others}" if others else "; none refused")


async def attack_watch_patterns(ctx: AttackContext) -> None:
    """watch/unwatch with distinct worst-case globs, as many and as long as busd accepts."""
    r = ctx.result
    stats = collections.Counter[str]()
    serial = itertools.count()
    limit = ctx.n("watch_max")
    # (patterns per watch, '*a' pairs per pattern): from the default limits' worst case down,
    # one step each time busd refuses the shape.
    shapes = [(32, 120), (16, 120), (8, 120), (4, 120), (2, 120), (1, 120), (1, 60), (1, 30), (1, 15), (1, 4)]
    shape = [0]

    async def worker(conn: RawConn) -> None:
        while ctx.remaining() > 0 and stats["watch sent"] < limit and not conn.closed.is_set():
            per_watch, stars = shapes[shape[0]]
            patterns = [f"{'*a' * stars}*{next(serial):x}b" for _ in range(per_watch)]
            stats["watch sent"] += 1
            try:
                reply = await conn.request("watch", patterns=patterns, timeout=10)
            except Exception as exc:
                stats[error_label(exc)] += 1
                return
            stats[f"watch {reply_label(reply)}"] += 1
            if "result" in reply:
                stats["distinct patterns"] += per_watch
                try:
                    await conn.request("unwatch", watch=reply["result"]["watch"], timeout=10)
                except Exception as exc:
                    stats[error_label(exc)] += 1
                    return
            elif shape[0] + 1 < len(shapes) and shapes[shape[0]] == (per_watch, stars):
                shape[0] += 1

    async with trio.open_nursery() as nursery:
        conns = []
        for _ in range(ctx.n("watch_conns")):
            c = await ctx.raw()
            nursery.start_soon(c.run)
            await c.request("hello")
            conns.append(c)
        ctx.ready()
        async with trio.open_nursery() as workers:
            for c in conns:
                workers.start_soon(worker, c)
        await trio.sleep(ctx.remaining())
        r["attackers_disconnected"] = [c.reason for c in conns if c.closed.is_set()]
        nursery.cancel_scope.cancel()
    per_watch, stars = shapes[shape[0]]
    r["outcomes"] = dict(stats)
    r["accepted_shape"] = {"patterns_per_watch": per_watch, "pattern_chars": len(f"{'*a' * stars}*fffb")} if stats["watch ok"] else None
    refused = stats["watch sent"] - stats["watch ok"]
    r["summary"] = (
        f"{stats['watch ok']} watch/unwatch ({stats['distinct patterns']} distinct patterns, "
        f"{per_watch} x {2 * stars + 5} chars each); {refused} refused"
    )


async def attack_complex_watches(ctx: AttackContext) -> None:
    """Complex watch patterns (``?`` and sets between stars, run by the broker's automaton),
    as many as one identity may hold, then names of 250 characters churned under them: every
    change is matched against every one of them."""
    r = ctx.result
    stats = collections.Counter[str]()
    attacker = Identity.generate()
    pattern = "*" + "[!b]" * 8 + "b*"
    patterns = [pattern] * (1024 // len(pattern))
    async with trio.open_nursery() as nursery:
        watchers = []
        for _ in range(4):  # complex_watches_per_connection x 4 = complex_watches_per_identity
            c = await ctx.raw(identity=attacker)
            nursery.start_soon(c.run)
            await c.request("hello")
            watchers.append(c)
            for _ in range(8):
                reply = await c.request("watch", patterns=patterns, timeout=10)
                stats[f"watch {reply_label(reply)}"] += 1
        churner = await ctx.raw(identity=attacker)
        nursery.start_soon(churner.run)
        await churner.request("hello")
        for i in range(60):  # names present for every snapshot page too
            await churner.request("request_name", name=f"org.attack.{'a' * 236}{i:03}")
        ctx.ready()
        long_name = "org.attack." + "a" * 243
        while ctx.remaining() > 0:
            for op in ("request_name", "release_name"):
                try:
                    reply = await churner.request(op, name=long_name, timeout=10)
                except Exception as exc:
                    stats[error_label(exc)] += 1
                    break
                stats[f"{op} {reply_label(reply)}"] += 1
        r["attackers_disconnected"] = [c.reason for c in watchers + [churner] if c.closed.is_set()]
        nursery.cancel_scope.cancel()
    r["outcomes"] = dict(stats)
    r["summary"] = (
        f"{stats['watch ok']} complex watches held ({len(patterns)} x {len(pattern)} chars), "
        f"{stats['watch QuotaExceeded']} refused; {stats['request_name ok']} name changes of 254-char names under them"
    )


def array_frame(rid: int, items: int) -> bytes:
    """A ping of about 64 KiB whose ``pad`` holds ``items`` items (small items when many)."""
    width = max(0, 65_400 // items - 1)
    pad: list[Any] = [0] * items if width == 0 else ["x" * min(width, 23)] * items
    return encode_control(0, {"op": "ping", "id": rid, "pad": pad})


async def reconnecting_flooders(
    ctx: AttackContext,
    count: int,
    stats: collections.Counter[str],
    flood: Callable[[RawConn], Awaitable[None]],
    more: Callable[[], bool] = lambda: True,
) -> None:
    """``count`` connections, each running ``flood`` on a fresh raw connection (its reader
    running) while the attack's window lasts and ``more()`` says so, and connecting again
    when cut: what ends them is counted in ``stats`` ("attacker cut" for a connection busd
    closed)."""

    async def worker() -> None:
        while ctx.remaining() > 0 and more():
            conn: RawConn | None = None
            try:
                conn = await ctx.raw()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.run)
                    try:
                        await flood(conn)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        conn.closed.set()  # (cut while writing: busd closed the connection)
                    if conn.closed.is_set():
                        stats["attacker cut"] += 1
                    nursery.cancel_scope.cancel()
            except Exception as exc:
                stats[error_label(exc)] += 1
                await trio.sleep(0.05)
            finally:
                if conn is not None:
                    await conn.aclose()

    ctx.ready()
    async with trio.open_nursery() as workers:
        for _ in range(count):
            workers.start_soon(worker)


async def attack_big_arrays(ctx: AttackContext) -> None:
    """64 KiB control frames holding as many items as busd accepts (found first by a binary
    search on throwaway connections), sent back to back from a few connections."""
    r = ctx.result
    stats = collections.Counter[str]()
    limit = ctx.n("array_max")

    async def accepted(items: int) -> bool:
        ok = False
        try:
            conn = await ctx.raw()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.run)
                    await conn.request("hello")
                    rid = conn.new_id()
                    slot = conn.expect(rid)
                    await conn.send_raw(array_frame(rid, items))
                    with trio.move_on_after(5):
                        await slot.event.wait()
                    ok = slot.reply is not None
                    if not ok:
                        r.setdefault("refusal", conn.reason)
                    nursery.cancel_scope.cancel()
            finally:
                await conn.aclose()
        except Exception as exc:
            stats[f"probe {error_label(exc)}"] += 1
        return ok

    first = ctx.n("array_items")
    low, high = 0, first + 1  # low: accepted, high: refused
    if await accepted(first):
        low = first
    else:
        high = first
        while high - low > 1:
            mid = (low + high) // 2
            if await accepted(mid):
                low = mid
            else:
                high = mid
    items = max(low, 1)
    r["accepted_items"] = low
    r["frame_bytes"] = len(array_frame(1, items))

    async def flood(conn: RawConn) -> None:
        await conn.request("hello")
        rid = conn.new_id()
        frame = array_frame(rid, items)
        while ctx.remaining() > 0 and stats["sent"] < limit and not conn.closed.is_set():
            slot = conn.expect(rid)
            stats["sent"] += 1
            await conn.send_raw(frame)
            with trio.fail_after(10):
                await slot.event.wait()
            if slot.reply is not None:
                stats["answered"] += 1

    await reconnecting_flooders(ctx, ctx.n("array_conns"), stats, flood, lambda: stats["sent"] < limit)
    r["outcomes"] = dict(stats)
    refused = "" if low == first else f" ({low + 1}+ items cut the sender)"
    r["summary"] = f"{stats['answered']} frames of {r['frame_bytes']} B, {low} items each, answered{refused}; {stats['attacker cut']} flooders cut"


async def attack_channel_items(ctx: AttackContext) -> None:
    """CONTROL frames on a channel nobody has (77), each a channel message padded to 4,093
    items (within what a request may hold, ``max_control_items``), 63 of them a write (256 KiB),
    straight after the handshake (no hello: no quota spent), from a few connections that
    reconnect when cut.  Before the twenty-first pass of issue 13 busd checked each body against
    the requests' 4,096-item budget and dropped it (an unknown channel): 155 ms of busd a
    write, in one step (63 frames never reach the reader's 128-frame slice); now a channel's
    bodies have 16 items at most and the first one cuts its sender."""
    r = ctx.result
    stats = collections.Counter[str]()
    frame = encode_control(77, {"credit": 1, "pad": [{}] * 4090})
    burst = frame * (256 * 1024 // len(frame))

    async def flood(conn: RawConn) -> None:
        while ctx.remaining() > 0 and not conn.closed.is_set():
            stats["writes"] += 1
            await conn.send_raw(burst)
            stats["frames sent"] += len(burst) // len(frame)
            with trio.move_on_after(1):
                await conn.closed.wait()
        if conn.reason:
            r.setdefault("refusal", conn.reason)

    await reconnecting_flooders(ctx, ctx.n("channel_items_conns"), stats, flood)
    r["outcomes"] = dict(stats)
    r["summary"] = f"{stats['writes']} writes of {len(frame)}-B frames, {stats['frames sent']} taken whole, {stats['attacker cut']} flooders cut" + (
        f" ({r['refusal'][:60]})" if r.get("refusal") else ""
    )


async def attack_mass_close(ctx: AttackContext) -> None:
    r = ctx.result
    n = ctx.n("mass_close")
    per_identity = 60  # under the default connections_per_identity (64)
    identities = [Identity.generate() for _ in range(math.ceil(n / per_identity))]
    conns: list[RawConn] = []
    failures = collections.Counter[str]()
    limiter = trio.CapacityLimiter(16)
    started = now()

    async def one(i: int, nursery: trio.Nursery) -> None:
        async with limiter:
            try:
                c = await RawConn.open(ctx.unix, identities[i // per_identity], ctx.network_key, timeout=3)
            except Exception as exc:
                failures[error_label(exc)] += 1
                if sum(failures.values()) >= 64:  # busd takes no more (its fd limit?): stop trying
                    nursery.cancel_scope.cancel()
                return
            conns.append(c)
            try:
                reply = await c.hello_direct(timeout=3)
                if "result" not in reply:
                    failures[f"hello {reply_label(reply)}"] += 1
            except Exception as exc:
                failures[f"hello {error_label(exc)}"] += 1

    with trio.move_on_after(25 if not ctx.quick else 15):
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i, nursery)
    r["connected"] = len(conns)
    r["connect_failed"] = dict(failures)
    r["seconds_to_connect"] = round(now() - started, 2)
    ctx.ready()
    t0 = now()
    for c in conns:
        c.close_now()
    r["seconds_to_close"] = round(now() - t0, 3)
    await trio.sleep(ctx.remaining())
    r["summary"] = f"{len(conns)}/{n} connected in {r['seconds_to_connect']} s, closed at once; connect failed {sum(failures.values())}"


@dataclass(frozen=True)
class AttackSpec:
    key: str
    klass: int
    label: Callable[[bool], str]
    func: Callable[[AttackContext], Awaitable[None]]
    target_ms: float = TARGET_P99_MS
    min_duration: float = 0.0


ATTACKS = [
    AttackSpec("preauth-silent", 1, lambda q: f"pre-auth: {count('preauth', q)} silent TCP conns", attack_preauth_silent),
    AttackSpec("preauth-replay", 1, lambda q: f"pre-auth: {count('preauth', q)} msg1 replays+garbage", attack_preauth_replay),
    AttackSpec("content-deep", 2, lambda q: "content: metadata at the depth limit", attack_content_deep),
    AttackSpec("content-info", 2, lambda q: "content: 16K info, 64 names, 255 chans", attack_content_info),
    AttackSpec("content-reset", 2, lambda q: "content: 64 KiB reset reasons", attack_content_reset),
    AttackSpec("content-reject", 2, lambda q: "content: 64 KiB rejection reason", attack_content_reject),
    AttackSpec("content-host", 2, lambda q: "content: 64 KiB tcp host", attack_content_host),
    AttackSpec("relay-memory", 3, lambda q: f"relay: {count('relay_pairs', q)} pair(s) x 255 chans unread", attack_relay_memory),
    AttackSpec("tiny-frames", 3, lambda q: f"relay: a frame a byte, {count('tiny_channels', q)} chans", attack_tiny_frames),
    AttackSpec("tiny-calls", 4, lambda q: "wrong party: calls to the canary, a frame a byte", attack_tiny_calls),
    AttackSpec("churn", 4, lambda q: "wrong party: 16K-info name churn", attack_churn),
    AttackSpec("pipelined-opens", 4, lambda q: f"wrong party: {count('pipelined_opens', q)} opens in 1 write", attack_pipelined_opens),
    AttackSpec("idle-channels", 4, lambda q: f"wrong party: {count('idle_channels', q)} idle chans to canary", attack_idle_channels),
    AttackSpec("event-flood", 4, lambda q: "wrong party: event flood, sink unread", attack_event_flood),
    AttackSpec("watch-patterns", 5, lambda q: "CPU: worst-case watch patterns", attack_watch_patterns),
    AttackSpec("watch-complex", 5, lambda q: "CPU: complex watches, long names churned", attack_complex_watches),
    AttackSpec("big-arrays", 5, lambda q: "CPU: 64 KiB frames, most items allowed", attack_big_arrays),
    AttackSpec("channel-items", 5, lambda q: "CPU: channel frames of 4,093 items", attack_channel_items),
    AttackSpec(
        "mass-close", 5, lambda q: f"CPU: {count('mass_close', q)} conns closing at once", attack_mass_close,
        target_ms=TARGET_MASS_CLOSE_P99_MS, min_duration=3.0,
    ),
]
ATTACK_BY_KEY = {a.key: a for a in ATTACKS}


def run_attack_process(args: argparse.Namespace) -> int:
    raise_nofile()
    spec = ATTACK_BY_KEY[args.attack]
    ctx = AttackContext(
        endpoints=parse_address(args.address),
        network_key=DEFAULT_NETWORK_KEY,
        owner_key=args.owner_key,
        duration=args.duration,
        quick=args.quick,
    )

    async def main() -> None:
        # Setup gets its own allowance; the harness kills a process that overstays anyway.
        with trio.move_on_after(ATTACK_SETUP_LIMIT + ctx.duration):
            await spec.func(ctx)

    try:
        trio.run(main)
    except BaseException as exc:  # the harness must get a result whatever happened
        ctx.result["error"] = f"{error_label(exc)}: {str(exc)[:300]}"
    emit_line({"result": ctx.result})
    return 0


# ----------------------------------------------------------------------------------------------
# Canary roles that run as their own processes: the service and the watcher.
# ----------------------------------------------------------------------------------------------


class _LossReporter(logging.Handler):
    """Turns the client library's "bus connection ended" log line into a JSON line."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("bus connection ended"):
            emit_line({"t": now(), "lost": message[len("bus connection ended: "):][:200]})


def run_role_process(args: argparse.Namespace) -> int:
    logger = logging.getLogger("minibus.client")
    logger.setLevel(logging.INFO)
    logger.addHandler(_LossReporter())
    logger.propagate = False
    identity = load_identity(args.identity)

    async def service() -> None:
        svc = Service(CANARY_NAME, description="isolation canary", version="1")

        @svc.method
        async def echo(value: object) -> object:
            """Return the value unchanged."""
            return value

        async with open_bus(args.address, identity=identity, name=CANARY_NAME, info=svc.info) as bus:
            emit_line({"ready": now(), "unique_id": bus.unique_id})
            await svc.serve(bus)

    async def watcher() -> None:
        async with open_bus(args.address, identity=identity) as bus:
            emit_line({"ready": now(), "unique_id": bus.unique_id})
            while True:
                try:
                    async with bus.watch(["*"]) as watch:
                        async for _event in watch:
                            pass
                except Exception as exc:
                    emit_line({"t": now(), "watch_error": error_label(exc)})
                    await trio.sleep(0.2)

    try:
        trio.run(service if args.role == "service" else watcher)
    except KeyboardInterrupt:
        pass
    return 0


# ----------------------------------------------------------------------------------------------
# The harness: busd, the canary's measurements, one phase per attack.
# ----------------------------------------------------------------------------------------------


def read_status_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def read_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_nofile(pid: int) -> tuple[int, int] | None:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    except (OSError, ValueError):
        return None
    return None


LOG_CLASSES = {
    "slow_consumer": re.compile(r"slow consumer"),
    "cannot_encode": re.compile(r"cannot encode|could not be sent"),
    "internal_error": re.compile(r"internal error"),
    "traceback": re.compile(r"^Traceback"),
    "accept_failed": re.compile(r"accept failed"),
    "handshake_failed": re.compile(r"handshake failed|lost during the handshake"),
    "refused": re.compile(r"refused"),
    "framing": re.compile(r"framing violation"),
    "warnings": re.compile(r"^busd: WARNING"),
    "errors": re.compile(r"^busd: (ERROR|CRITICAL)"),
}
LOG_SHORT = {
    "slow_consumer": "slow", "cannot_encode": "enc", "internal_error": "int", "traceback": "tb",
    "accept_failed": "accept", "handshake_failed": "hs", "refused": "refused", "framing": "frame",
}


class Busd:
    def __init__(self, tmp: Path, config: Path, nofile: int) -> None:
        self.tmp = tmp
        self.config = config
        self.nofile = nofile
        self.log_path = tmp / "busd.log"
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.starts = 0

    async def start(self) -> None:
        env = dict(
            os.environ,
            HOME=str(self.tmp / "home"),
            XDG_CONFIG_HOME=str(self.tmp / "cfg"),
            XDG_RUNTIME_DIR=str(self.tmp / "run"),
            PYTHONPATH=str(REPO),
        )
        env.pop("MINIBUS_ADDRESS", None)
        env.pop("MINIBUS_NETWORK_KEY", None)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        soft = min(self.nofile, hard)
        argv = [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0", "--config", str(self.config), "--log-level", "info"]
        with open(self.log_path, "ab") as log:
            # The soft limit is set by a shell that then execs busd (same pid, no preexec_fn).
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", 'ulimit -S -n "$0" 2>/dev/null; exec "$@"', str(soft), *argv],
                env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=log, text=True,
            )
        self.starts += 1
        assert self.proc.stdout is not None
        with trio.fail_after(30):
            line = await trio.to_thread.run_sync(self.proc.stdout.readline, abandon_on_cancel=True)
        if not line.startswith("MINIBUS_ADDRESS="):
            raise RuntimeError(f"busd did not start: {line!r}; see {self.log_path}")
        self.address = line.strip().split("=", 1)[1]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def endpoint(self, transport: str) -> Endpoint:
        return next(ep for ep in parse_address(self.address) if ep.transport == transport)

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_counts(self, start: int, end: int) -> dict[str, int]:
        with open(self.log_path, "rb") as f:
            f.seek(start)
            text = f.read(max(0, end - start)).decode(errors="replace")
        counts = {k: 0 for k in LOG_CLASSES}
        for line in text.splitlines():
            for key, pattern in LOG_CLASSES.items():
                if pattern.search(line):
                    counts[key] += 1
        counts["lines"] = len(text.splitlines())
        return counts

    def stop(self, kill: bool = False) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


class Series:
    """Timed outcomes of one kind of canary operation."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float | None, str | None]] = []  # (start, seconds, error)

    def ok(self, t: float, seconds: float) -> None:
        self.samples.append((t, seconds, None))

    def fail(self, t: float, label: str) -> None:
        self.samples.append((t, None, label))

    def window(self, t0: float, t1: float) -> list[tuple[float, float | None, str | None]]:
        return [s for s in self.samples if t0 <= s[0] < t1]

    def stats(self, t0: float, t1: float) -> dict[str, Any]:
        samples = self.window(t0, t1)
        good = sorted(s[1] * 1000 for s in samples if s[1] is not None)
        errors = collections.Counter(s[2] for s in samples if s[2] is not None)

        def pct(q: float) -> float | None:
            return round(good[max(0, math.ceil(q * len(good)) - 1)], 2) if good else None

        return {
            "calls": len(samples),
            "ok": len(good),
            "failed": len(samples) - len(good),
            "errors": dict(errors),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_ms": round(good[-1], 2) if good else None,
        }


class Process:
    """A child of this script (a canary role or an attack), its JSON lines collected."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.proc: trio.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.ready = trio.Event()
        self.done = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log, "ab") as err:
            self.proc = await trio.lowlevel.open_process(self.argv, stdout=subprocess.PIPE, stderr=err, env=env, cwd=str(REPO))
        task_status.started()
        buffer = b""
        try:
            assert self.proc.stdout is not None
            while True:
                data = await self.proc.stdout.receive_some(65536)
                if not data:
                    break
                buffer += data
                *complete, buffer = buffer.split(b"\n")
                for raw in complete:
                    try:
                        line = json.loads(raw)
                    except ValueError:
                        continue
                    self.lines.append(line)
                    if "ready" in line:
                        self.ready.set()
            await self.proc.wait()
        finally:
            self.done.set()

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()

    def ready_time(self) -> float | None:
        return next((float(line["ready"]) for line in self.lines if "ready" in line), None)

    def result(self) -> dict[str, Any] | None:
        return next((line["result"] for line in self.lines if "result" in line), None)

    def losses(self, t0: float, t1: float) -> list[str]:
        return [
            str(line.get("lost") or line.get("watch_error"))
            for line in self.lines
            if ("lost" in line or "watch_error" in line) and t0 <= float(line["t"]) < t1
        ]

    def log_tail(self, n: int = 5) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.duration = args.duration or (2.5 if args.quick else 6.0)
        self.tmp = Path(tempfile.mkdtemp(prefix="minibus-isolation-"))
        for sub in ("home", "cfg", "run", "keys", "logs"):
            (self.tmp / sub).mkdir(mode=0o700)
        self.caller = Identity.generate()
        self.service_identity = Identity.generate()
        self.watcher_identity = Identity.generate()
        for name, ident in (("service", self.service_identity), ("watcher", self.watcher_identity)):
            save_identity(self.tmp / "keys" / name, ident)
        self.config = self.tmp / "busd.toml"
        canaries = ", ".join(f'"{i.id}"' for i in (self.caller, self.service_identity, self.watcher_identity))
        self.config.write_text(
            "# isolation benchmark: default [limits]; the canary owns org.canary.*, anyone may get in\n"
            f'[[rule]]\nname = "canary"\nidentities = [{canaries}]\nconnect = true\n'
            'own = ["org.canary.*"]\nsee = ["*"]\nopen = ["*"]\n\n'
            '[[rule]]\nname = "anyone"\nidentities = ["*"]\nconnect = true\n'
            'own = ["org.attack.*"]\nsee = ["*"]\nopen = ["*"]\n'
        )
        self.config.chmod(0o600)
        self.busd = Busd(self.tmp, self.config, args.busd_nofile)
        self.owner: Identity | None = None
        self.owner_key = self.tmp / "cfg" / "minibus" / "secret"
        self.held = Series()
        self.fresh = Series()
        self.connect = {"unix": Series(), "tcp": Series()}
        self.rss: list[tuple[float, int]] = []
        self.roles: dict[str, Process] = {}
        self.bus: Any = None
        self.nofile: tuple[int, int] | None = None
        self.skipped: list[str] = []

    def unix_address(self) -> str:
        return format_address([self.busd.endpoint("unix")])

    # -- background measurements -------------------------------------------------------------

    async def sample_rss(self) -> None:
        while True:
            if self.busd.alive():
                kib = read_status_kib(self.busd.pid)
                if kib is not None:
                    self.rss.append((now(), kib))
            await trio.sleep(RSS_INTERVAL)

    async def held_calls(self) -> None:
        """A call on one held relayed channel every 100 ms (reopened when it breaks)."""
        rpc: RpcConnection | None = None
        tick = now()
        async with trio.open_nursery() as nursery:
            while True:
                t0 = now()
                try:
                    with trio.fail_after(CALL_DEADLINE):
                        if rpc is None or rpc.closed is not None:
                            if rpc is not None:
                                await trio.aclose_forcefully(rpc.channel)
                                rpc = None
                            channel = await self.bus.open_channel(CANARY_NAME, "rpc", route="relay")
                            rpc = RpcConnection(channel)
                            await nursery.start(rpc.run)
                            t0 = now()  # the call is measured, not the reopening
                        await rpc.call("echo", PAYLOAD)
                    self.held.ok(t0, now() - t0)
                except Exception as exc:
                    self.held.fail(t0, error_label(exc))
                tick = max(tick + CALL_INTERVAL, now())
                await trio.sleep(max(0.0, tick - now()))

    async def fresh_calls(self) -> None:
        """Open a relayed channel, call once, close it: every 0.5 s."""
        tick = now()
        while True:
            t0 = now()
            try:
                with trio.fail_after(FRESH_DEADLINE):
                    channel = await self.bus.open_channel(CANARY_NAME, "rpc", route="relay")
                    try:
                        rpc = RpcConnection(channel)
                        async with trio.open_nursery() as nursery:
                            await nursery.start(rpc.run)
                            await rpc.call("echo", PAYLOAD)
                            await rpc.aclose()
                    finally:
                        await trio.aclose_forcefully(channel)
                self.fresh.ok(t0, now() - t0)
            except Exception as exc:
                self.fresh.fail(t0, error_label(exc))
            tick = max(tick + FRESH_INTERVAL, now())
            await trio.sleep(max(0.0, tick - now()))

    async def probe(self, transport: str) -> None:
        """A fresh connection as the broker's owner (handshake, hello, ping) every second."""
        tick = now()
        while True:
            t0 = now()
            try:
                address = format_address([self.busd.endpoint(transport)])
                with trio.fail_after(PROBE_DEADLINE):
                    async with open_bus(address, identity=self.owner, reconnect=False, connect_timeout=PROBE_DEADLINE) as bus:
                        await bus.ping()
                self.connect[transport].ok(t0, now() - t0)
            except Exception as exc:
                self.connect[transport].fail(t0, error_label(exc))
            tick = max(tick + PROBE_INTERVAL, now())
            await trio.sleep(max(0.0, tick - now()))

    async def wait_healthy(self, timeout: float) -> float | None:
        """When three calls in a row on the held channel have worked (None: not in time)."""
        deadline = now() + timeout
        while now() < deadline:
            recent = self.held.samples[-3:]
            if len(recent) == 3 and all(s[1] is not None for s in recent) and now() - recent[0][0] < 1.0:
                return now()
            await trio.sleep(0.05)
        return None

    # -- roles and busd ----------------------------------------------------------------------

    async def start_role(self, nursery: trio.Nursery, role: str, key: Path) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--address", self.unix_address(), "--identity", str(key)]
        proc = Process(role, argv, self.tmp / "logs" / f"{role}.log")
        await nursery.start(proc.run)
        self.roles[role] = proc
        with trio.fail_after(30):
            await proc.ready.wait()

    async def restart_busd(self, kill: bool) -> int | None:
        code = self.busd.stop(kill=kill)
        await self.busd.start()
        self.nofile = read_nofile(self.busd.pid) or self.nofile
        return code

    # -- phases ------------------------------------------------------------------------------

    def window_row(self, t0: float, t1: float, t_after: float) -> dict[str, Any]:
        peak = max((kib for t, kib in self.rss if t0 <= t <= t_after), default=None)
        return {
            "canary": self.held.stats(t0, t1),
            "fresh_channel": self.fresh.stats(t0, t1),
            "connect_unix": self.connect["unix"].stats(t0, t1),
            "connect_tcp": self.connect["tcp"].stats(t0, t1),
            "service_lost": self.roles["service"].losses(t0, t_after),
            "watcher_lost": self.roles["watcher"].losses(t0, t_after),
            "rss_peak_kib": peak,
        }

    async def rest_phase(self) -> dict[str, Any]:
        seconds = 3.0 if self.quick else 6.0
        rss0 = read_status_kib(self.busd.pid)
        cpu0 = read_cpu_seconds(self.busd.pid) or 0.0
        log0 = self.busd.log_size()
        t0 = now()
        await trio.sleep(seconds)
        t1 = now()
        row = {"key": "rest", "class": 0, "label": "at rest", "target_p99_ms": TARGET_P99_MS, "window_s": round(t1 - t0, 2)}
        row.update(self.window_row(t0, t1, t1))
        row["rss_kib"] = {"rest": rss0, "peak": row.pop("rss_peak_kib"), "after": read_status_kib(self.busd.pid)}
        row["busd_cpu_s"] = round((read_cpu_seconds(self.busd.pid) or 0.0) - cpu0, 2)
        row["broker_log"] = self.busd.log_counts(log0, self.busd.log_size())
        row["attack"] = {"summary": "-"}
        return row

    async def attack_phase(self, nursery: trio.Nursery, spec: AttackSpec) -> dict[str, Any]:
        row: dict[str, Any] = {"key": spec.key, "class": spec.klass, "label": spec.label(self.quick), "target_p99_ms": spec.target_ms}
        duration = max(self.duration, spec.min_duration)
        pid = self.busd.pid
        rss0 = read_status_kib(pid)
        cpu0 = read_cpu_seconds(pid) or 0.0
        log0 = self.busd.log_size()
        argv = [
            sys.executable, str(Path(__file__).resolve()), "--attack", spec.key, "--address", self.busd.address,
            "--duration", str(duration), "--owner-key", str(self.owner_key), *(["--quick"] if self.quick else []),
        ]
        proc = Process(spec.key, argv, self.tmp / "logs" / f"attack-{spec.key}.log")
        t_start = now()
        await nursery.start(proc.run)
        limit = duration + ATTACK_SETUP_LIMIT + 10
        with trio.move_on_after(limit) as scope:
            await proc.done.wait()
        if scope.cancelled_caught:
            proc.kill()
            row["attack_killed"] = f"still running after {limit:g} s"
            with trio.move_on_after(10):
                await proc.done.wait()
        t_end = now()
        after_s = 1.0
        await trio.sleep(after_s)
        t_after = now()
        ready = proc.ready_time()
        t_ready = ready if ready is not None and t_start <= ready <= t_end else t_start
        row["setup_s"] = round(t_ready - t_start, 2)
        row["window_s"] = round(t_end - t_ready, 2)
        row.update(self.window_row(t_ready, t_end, t_after))
        row.pop("rss_peak_kib")
        row["setup_canary"] = self.held.stats(t_start, t_ready)
        alive = self.busd.alive()
        row["rss_kib"] = {
            "rest": rss0,
            "peak": max((kib for t, kib in self.rss if t_start <= t <= t_after), default=None),
            "after": read_status_kib(pid) if alive else None,
        }
        row["busd_cpu_s"] = round((read_cpu_seconds(pid) or 0.0) - cpu0, 2) if alive else None
        row["broker_log"] = self.busd.log_counts(log0, self.busd.log_size())
        result = proc.result()
        if result is None:
            result = {"error": f"the attack process gave no result (exit {proc.proc.returncode if proc.proc else '?'})", "stderr_tail": proc.log_tail()}
        result.setdefault("summary", result.get("error", "?"))
        row["attack"] = result
        row["busd_alive_after"] = alive
        row["busd_restarted"] = None
        if not alive:
            code = self.busd.proc.returncode if self.busd.proc else None
            row["busd_exit_code"] = code
            row["busd_log_tail"] = self.busd.log_path.read_text(errors="replace").splitlines()[-8:]
            await self.restart_busd(kill=False)
            row["busd_restarted"] = "busd exited"
            await self.wait_healthy(30)
        else:
            healthy = await self.wait_healthy(15)
            if healthy is None:
                row["busd_restarted"] = "wedged: no canary call worked for 15 s after the attack"
                row["busd_log_tail"] = self.busd.log_path.read_text(errors="replace").splitlines()[-8:]
                await self.restart_busd(kill=True)
                await self.wait_healthy(30)
        first_ok = next((s[0] for s in self.held.samples if s[0] >= t_end and s[1] is not None), None)
        row["recovered_s"] = round(first_ok - t_end, 2) if first_ok is not None and row["canary"]["failed"] else 0.0
        return row

    async def run(self) -> dict[str, Any]:
        selected = [ATTACK_BY_KEY[k] for k in self.args.attacks] if self.args.attacks else ATTACKS
        started = now()
        rows = []
        await self.busd.start()
        self.nofile = read_nofile(self.busd.pid)
        self.owner = load_identity(self.owner_key)
        try:
            async with trio.open_nursery() as nursery:
                await self.start_role(nursery, "service", self.tmp / "keys" / "service")
                await self.start_role(nursery, "watcher", self.tmp / "keys" / "watcher")
                nursery.start_soon(self.sample_rss)
                async with open_bus(self.unix_address(), identity=self.caller, reconnect=True) as bus:
                    self.bus = bus
                    async with trio.open_nursery() as loops:
                        loops.start_soon(self.held_calls)
                        loops.start_soon(self.fresh_calls)
                        loops.start_soon(self.probe, "unix")
                        loops.start_soon(self.probe, "tcp")
                        if await self.wait_healthy(30) is None:
                            raise RuntimeError("the canary never got a call through busd at rest")
                        rows.append(await self.rest_phase())
                        self.progress(rows[-1])
                        budget = self.args.budget or RUN_BUDGET[self.quick]
                        for spec in selected:
                            if now() - started + max(self.duration, spec.min_duration) + 5 > budget:
                                self.skipped.append(spec.key)
                                continue
                            rows.append(await self.attack_phase(nursery, spec))
                            self.progress(rows[-1])
                        loops.cancel_scope.cancel()
                for role in self.roles.values():
                    role.terminate()
                nursery.cancel_scope.cancel()
        finally:
            for role in self.roles.values():
                role.kill()
            self.busd.stop()
        return {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "config": {
                "quick": self.quick,
                "attack_seconds": self.duration,
                "call_interval_s": CALL_INTERVAL,
                "call_deadline_s": CALL_DEADLINE,
                "fresh_channel_interval_s": FRESH_INTERVAL,
                "connect_probe_interval_s": PROBE_INTERVAL,
                "busd_nofile_soft_hard": list(self.nofile) if self.nofile else None,
                "busd_limits": "defaults (docs/broker.md)",
                "busd_starts": self.busd.starts,
                "counts": {k: count(k, self.quick) for k in COUNTS},
                "documented_per_identity_bound_mib": DOCUMENTED_PER_IDENTITY_BOUND_MIB,
                "seconds": round(now() - started, 1),
                "skipped_for_time": self.skipped,
                "tmp": str(self.tmp) if self.args.keep_tmp else None,
            },
            "targets": {"canary_p99_ms": TARGET_P99_MS, "canary_p99_ms_mass_close": TARGET_MASS_CLOSE_P99_MS, "failed_calls": 0},
            "rows": [finish_row(row) for row in rows],
        }

    def progress(self, row: dict[str, Any]) -> None:
        c = row["canary"]
        print(f"  [{now():.0f}] {row['label']}: p99 {fmt_ms(c['p99_ms'])} ms, {c['failed']} failed", file=sys.stderr, flush=True)


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    c = row["canary"]
    row["target_met"] = c["failed"] == 0 and c["p99_ms"] is not None and c["p99_ms"] <= row["target_p99_ms"]
    return row


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def fmt_mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def okn(stats: dict[str, Any]) -> str:
    return f"{stats['ok']}/{stats['calls']}"


def print_tables(r: dict[str, Any]) -> None:
    cfg = r["config"]
    nofile = cfg["busd_nofile_soft_hard"]
    print(
        f"isolation: a relayed RPC call every {cfg['call_interval_s'] * 1000:.0f} ms on a held channel while each attack runs "
        f"(~{cfg['attack_seconds']:g} s each, one at a time)"
    )
    print(
        f"busd: default limits, soft fd limit {nofile[0] if nofile else '?'} (hard {nofile[1] if nofile else '?'}); "
        f"target p99 <= {TARGET_P99_MS:.0f} ms (mass close <= {TARGET_MASS_CLOSE_P99_MS:.0f} ms) and no failed call"
    )
    print()
    head = f"{'#':>1} {'attack':40} {'calls':>5} {'fail':>4} {'p50':>6} {'p99':>6} {'max':>6} {'target':>9} {'fresh ch':>8} {'unix':>5} {'tcp':>5} {'svc':>3} {'wat':>3}"
    print(head)
    print(f"{'':42}{'':>11}{'-- ms --':^20}{'':9} {'ok/n':>8} {'conn':>5} {'conn':>5} {'cut':>3} {'cut':>3}")
    for row in r["rows"]:
        c = row["canary"]
        verdict = f"<={row['target_p99_ms']:.0f} " + ("ok" if row["target_met"] else "NO")
        klass = "-" if row["class"] == 0 else str(row["class"])
        print(
            f"{klass:>1} {row['label'][:40]:40} {c['calls']:5d} {c['failed']:4d} {fmt_ms(c['p50_ms']):>6} {fmt_ms(c['p99_ms']):>6} "
            f"{fmt_ms(c['max_ms']):>6} {verdict:>9} {okn(row['fresh_channel']):>8} {okn(row['connect_unix']):>5} "
            f"{okn(row['connect_tcp']):>5} {len(row['service_lost']):3d} {len(row['watcher_lost']):3d}"
        )
    print()
    print(f"{'#':>1} {'attack':40} {'busd RSS MiB':>17} {'CPU':>5}  what the attack saw / busd log")
    print(f"{'':42}{'rest  peak after':>17} {'s':>5}")
    for row in r["rows"]:
        rss = row["rss_kib"]
        klass = "-" if row["class"] == 0 else str(row["class"])
        cpu = "-" if row.get("busd_cpu_s") is None else f"{row['busd_cpu_s']:.1f}"
        log = row["broker_log"]
        logged = " ".join(f"{short}:{log[k]}" for k, short in LOG_SHORT.items() if log.get(k))
        notes = []
        if row.get("busd_restarted"):
            notes.append(f"BUSD RESTARTED ({row['busd_restarted']}, exit {row.get('busd_exit_code')})")
        if row.get("attack_killed"):
            notes.append(f"attack killed: {row['attack_killed']}")
        for what, key in (("canary", "canary"), ("fresh channel", "fresh_channel"), ("unix connect", "connect_unix"), ("tcp connect", "connect_tcp")):
            if row[key]["errors"]:
                notes.append(f"{what} errors {row[key]['errors']}")
        if row.get("recovered_s"):
            notes.append(f"recovered {row['recovered_s']} s after")
        print(
            f"{klass:>1} {row['label'][:40]:40} {fmt_mib(rss['rest']):>5} {fmt_mib(rss['peak']):>5} {fmt_mib(rss['after']):>5} {cpu:>5}  "
            f"{row['attack'].get('summary', '')}"
        )
        extra = "; ".join(filter(None, [("busd log " + logged) if logged else "", *notes]))
        if extra:
            print(f"{'':73}{extra}")
    if cfg["skipped_for_time"]:
        print(f"not run (time budget reached): {', '.join(cfg['skipped_for_time'])}")
    relay = next((row for row in r["rows"] if row["key"] == "relay-memory"), None)
    if relay and relay["rss_kib"]["peak"] and relay["rss_kib"]["rest"]:
        grew = (relay["rss_kib"]["peak"] - relay["rss_kib"]["rest"]) / 1024
        print()
        print(
            f"relay memory: busd grew {grew:.0f} MiB for one identity (documented bound {DOCUMENTED_PER_IDENTITY_BOUND_MIB} MiB per "
            f"identity of relay buffers: relay_bytes_per_identity); {fmt_mib(relay['rss_kib']['after'])} MiB resident after"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer connections (about a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    parser.add_argument("--attacks", type=lambda s: [k for k in s.split(",") if k], help=f"only these, comma-separated: {','.join(ATTACK_BY_KEY)}")
    parser.add_argument("--duration", type=float, help="seconds per attack (default 6, --quick 2.5)")
    parser.add_argument("--busd-nofile", type=int, default=1024, help="busd's soft descriptor limit at start (default 1024)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (busd.log, attack logs)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run; attacks that would end later are skipped (default 170, --quick 90)")
    # Modes of the child processes (this same script).
    parser.add_argument("--attack", help=argparse.SUPPRESS)
    parser.add_argument("--role", choices=["service", "watcher"], help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--identity", help=argparse.SUPPRESS)
    parser.add_argument("--owner-key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        sys.exit(run_attack_process(args))
    if args.role:
        sys.exit(run_role_process(args))
    for key in args.attacks or []:
        if key not in ATTACK_BY_KEY:
            parser.error(f"unknown attack {key!r} (known: {', '.join(ATTACK_BY_KEY)})")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    harness = Harness(args)
    try:
        result = trio.run(harness.run)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(harness.tmp, ignore_errors=True)
    print_tables(result)
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
