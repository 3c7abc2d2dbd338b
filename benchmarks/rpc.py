#!/usr/bin/env python3
"""RPC benchmark for the performance issue: minibus beside D-Bus and beside the Python + trio limits.

Run:  python benchmarks/rpc.py [--quick] [--rounds N] [--seconds S] [--slices K] [--no-peers] [--pin] [--only ROW,...] [--json FILE]
      python benchmarks/rpc.py --budget [--budget-row ROW] [--budget-limit FLOOR] [--quick]   # the per-hop budget of one row

``--pin`` runs every caller (minibus's and the limits') on one CPU and their other processes
on another, both sides of a row in the same placement: unpinned, which of three busy processes
shares a CPU with which decides the 32-in-flight row's rounds (benchmarks/README.md,
*Placement*).  The table's judged figures are unpinned runs.

Every party is its own process, as a D-Bus user has them: ``busd``, the service (a
``clients.rpc.Service``), the caller; the limits' ends and forwarder; the D-Bus daemons, their
jeepney services and callers.  The script only starts them, sends each caller one row at a
time over a pipe and collects what it measured.  In each round a table row's time is cut
into ``--slices`` windows (3; 1 with ``--quick``), the row, its limit and its floors taken in
turn, each pass's order the last one rotated by one (A B C, B C A, C A B; the row first in odd
rounds, last in even ones), then D-Bus: a slow moment of this busy machine that would fall on
one side of a pair in one long window falls on both.  Each round gives a paired ratio,
minibus over its limit; the table shows their median and range (what a target is judged on:
a lucky window of either side moves a median of pairs little) beside the best of each side's
rounds and their ratio (best/best, as before).  Its last three columns judge the row: the
floor it is held against (``JUDGED_FLOOR``: the row's limit with what each minibus call of
the row must do added, below) as the median of its paired ratios to the limit, minibus's
median to that floor, and the status: met; missed at its floor (within ``AT_FLOOR`` of it);
missed under its floor; or missed with a floor that reaches the target.  The rates and
best/best of this scheme (a key's rate in a round is its work over its time in all its
windows) are not those of tables before windows (fe920b1), which took each key's best single
window.

Rows (64-byte payloads are ``bytes``; the service's ``echo`` returns its argument, ``take``
returns the length of its 1 MiB argument):

* ``bus.call`` at 1 call in flight: the default route between two plugins on the broker's Unix
  socket, unix-fd (the script checks that the route is unix-fd and says so);
* a relayed ``rpc`` channel (``bus.open_channel(name, "rpc", "relay")`` under a
  ``clients.rpc.RpcConnection``, which is what ``bus.call`` runs on whatever the route) at 1
  and 32 calls in flight;
* 1 MiB arguments with 8 calls in flight, unix-fd and relay, in MB/s of argument bytes;
* connect + shs1 handshake + hello with a name, per second (``open_bus(name=...)`` entered and
  left, the whole public-API connection);

beside the limits, all trio on Unix sockets, each end its own process:

* **2-process**: a caller and an echo server ping-ponging the same RPC maps minibus sends
  (``{"op": "call", "id", "method", "args"}`` and ``{"re", "result"}``), in frames with
  minibus's 10-byte header, encoded with ``cbor2.dumps`` and decoded with ``cbor2.loads``
  after cutting by the header: *raw length-prefixed CBOR*, no profile check.  (The same with
  the project's own codec, ``bus.wire.frames.encode_control`` + ``FrameDecoder`` with its
  CBOR profile check, is measured too and printed under the table: the check's cost.)  Both
  ends read and write the socket directly (``trio.lowlevel.wait_readable``/``wait_writable``
  around non-blocking ``recv``/``send``), the echo server answers inline, one task;
* **3-process**: the same caller and server with a forwarder between them that cuts the byte
  stream by the frame header, rewrites each header's channel id and forwards the rest as it
  arrives (no copy of bodies, no decoding), as busd's relay forwards DATA frames.  At 32 in
  flight the caller runs 32 tasks, each waiting for its own reply from one reader task (the
  shape ``RpcConnection`` has).  Printed under the table, never judged: ``limit3p-x1``, the
  same at 1 in flight in the protocol's shape at both ends (each RPC frame in a DATA frame of
  the connection, cut by two ``FrameDecoder``\ s, as a relayed ``RpcConnection`` and
  ``Service`` cut them; the reply handed by a reader task to a parked call), the relay row's
  floor at its ends.  The caller's socket asks for the send buffer a client's bus connection
  asks for (``clients.link.BUS_SEND_BUFFER``), like with like; the forwarder's keep the
  default, as busd's do;
* **bulk**: a raw Unix socket between two processes (256 KiB writes, ``recv_into`` one buffer)
  and the same through the forwarder in 256 KiB DATA frames, in MB/s.  Printed under the
  table, never judged: ``bulk-floor``, the unix-fd 1 MiB row's floor at the receiving end --
  minibus's 1 MiB call bodies (``{"args": [1 MiB], "method": "take"}`` as CBOR) written on a
  raw socket to a receiver that reads each into one buffer (the same for every body) and
  decodes it with cbor2 from there: the least a receiver does that hands the method a
  ``bytes`` it decoded (``bulk_floor.py`` has variants);
* **bare shs1 connect**: a process that accepts on a Unix socket and completes the shs1
  handshake (``SecureStream.server``, plain, its messages written and read straight on the
  socket as busd's are: ``direct_handshake``), nothing else; the client connects
  (``FdSocketStream``, minibus's client socket: each message and its answer in one step),
  handshakes and closes (as ``broker.py`` measures it).

The peer column, when installed (skipped with the reason otherwise): a private ``dbus-daemon``
and a private ``dbus-broker``, each with jeepney services and callers in trio and in blocking
I/O (like with like), the best of the four kept per row.  Method calls carry ``ay``;
connect is connect + SASL + Hello + RequestName.  dbus-broker runs without systemd: the script
is its controller (``dbus-broker --controller FD``; see benchmarks/README.md).
``apt-get install dbus-daemon dbus-broker`` (or ``dbus``) and ``pip install jeepney`` bring
them; neither the tests nor minibus need them.

``--budget`` runs one row alone (the 1-in-flight relayed call unless ``--budget-row`` says
another; ``mb-connect`` is a connect beside the bare shs1 connect) beside its limit, in
windows: clean ones (CPU time per call of each process from /proc/PID/task/*/schedstat,
context switches per call; best of two each side), one under ``strace -c`` for each side
(system calls per call, each process; skipped when strace is missing) and one under cProfile
with a CPU-time clock for minibus (switched by SIGUSR1/SIGUSR2 in busd and the service, by
command in the caller: where each process's time goes, and counts per call such as task
steps).
"""

from __future__ import annotations

import argparse
import functools
import json
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PAYLOAD = b"p" * 64
BIG = 1024 * 1024
PART = 256 * 1024  # body of one bulk DATA frame (as MESSAGE_PART in clients.rpc)
SERVICE = "org.bench.Echo"
HEADER = struct.Struct(">BBII")  # minibus's frame header: kind, flags, channel, length
CONTROL, DATA = 1, 2
MAX_BODY = 1 << 20
UNIX_FD_SEND_BUFFER = 1 << 20  # (bus.broker's: the send buffer of a unix-fd channel's sockets)
SMALL_READ = 1 << 16
ROW_GRACE = 30.0  # a row that has not answered this long after its window is a failure

# ------------------------------------------------------------------------------------------
# Shared by the trio roles: direct socket I/O, the way a careful trio program does it.
# ------------------------------------------------------------------------------------------


class Sender:
    """Writes whole frames to a non-blocking socket from any task, in order.

    The common case is one ``send`` that takes everything, with no checkpoint; whatever the
    kernel does not take waits in a backlog that one task flushes while others append."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.backlog = bytearray()
        self.flushing = False

    async def send(self, data: bytes | memoryview) -> None:
        import trio

        if not self.flushing:
            view = memoryview(data)
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                sent = 0
            if sent == len(view):
                return
            self.flushing = True
            try:
                view = view[sent:]
                while view:  # a bulk write: no copy while we are the only writer
                    await trio.lowlevel.wait_writable(self.sock)
                    try:
                        view = view[self.sock.send(view) :]
                    except BlockingIOError:
                        pass
                while self.backlog:  # what others appended meanwhile
                    await trio.lowlevel.wait_writable(self.sock)
                    try:
                        del self.backlog[: self.sock.send(self.backlog)]
                    except BlockingIOError:
                        pass
            finally:
                self.flushing = False
        else:
            self.backlog += data


class Cutter:
    """Cuts frames out of received bytes by minibus's header (no CBOR check)."""

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        if self.rest:
            data = self.rest + data
        frames = []
        pos, n = 0, len(data)
        while n - pos >= 10:
            kind, _flags, channel, length = HEADER.unpack_from(data, pos)
            end = pos + 10 + length
            if end > n:
                break
            frames.append((kind, channel, data[pos + 10 : end]))
            pos = end
        self.rest = data[pos:] if pos < n else b""
        return frames


def raw_frame(channel: int, message: dict[str, Any]) -> bytes:
    import cbor2

    body = cbor2.dumps(message)
    return HEADER.pack(CONTROL, 0, channel, len(body)) + body


class Codec:
    """Encode a map into a frame and decode the maps in received bytes: raw or the project's."""

    def __init__(self, project: bool, nested: bool = False) -> None:
        import cbor2

        self.project = project
        if nested:
            # The protocol's shape on a relayed RPC channel: each RPC frame (the project's
            # codec) rides in a DATA frame of the connection, so a message is cut twice, by
            # the connection's decoder and by the channel's (as RpcConnection and Service do).
            from bus.wire.frames import ControlFrame, DataFrame, FrameDecoder, encode_control, encode_data

            self.encode = lambda message: encode_data(1, encode_control(1, message))
            link, inner = FrameDecoder(), FrameDecoder()

            def decode(data: bytes) -> list[dict[Any, Any]]:
                link.receive_data(data)
                out = []
                while (frame := link.next_frame()) is not None:
                    assert type(frame) is DataFrame
                    inner.receive_data(frame.data)
                    while (message := inner.next_frame()) is not None:
                        assert type(message) is ControlFrame
                        out.append(message.message)
                return out

        elif project:
            from bus.wire.frames import ControlFrame, FrameDecoder, encode_control

            self.encode = lambda message: encode_control(1, message)
            decoder = FrameDecoder()
            self._decoder = decoder

            def decode(data: bytes) -> list[dict[Any, Any]]:
                decoder.receive_data(data)
                out = []
                while (frame := decoder.next_frame()) is not None:
                    assert type(frame) is ControlFrame
                    out.append(frame.message)
                return out

        else:
            cutter = Cutter()
            loads = cbor2.loads
            self.encode = lambda message: raw_frame(1, message)

            def decode(data: bytes) -> list[dict[Any, Any]]:
                return [loads(body) for _kind, _channel, body in cutter.feed(data)]

        self.decode = decode


async def recv_some(sock: socket.socket, size: int = SMALL_READ) -> bytes:
    """Wait until readable, then read (one system call when data is there)."""
    import trio

    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(size)
        except BlockingIOError:
            continue


def unix_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    return sock


def bus_send_buffer(sock: socket.socket) -> None:
    """Give a 3-process limit's caller the send buffer a client's bus connection has
    (``clients.link.BUS_SEND_BUFFER``), like with like: the caller's socket decides how much
    its forwarder (busd) finds to read at once.  The forwarder's own sockets keep the
    default, as busd's do."""
    from clients.link import BUS_SEND_BUFFER

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUS_SEND_BUFFER)


def unix_listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def accept_loop(listener: socket.socket, handle: Callable[[socket.socket], Awaitable[None]]) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            nursery.start_soon(_close_after, handle, conn)


async def _close_after(handle: Callable[[socket.socket], Awaitable[None]], conn: socket.socket) -> None:
    try:
        await handle(conn)
    except Exception:  # (an OSError, or a group of them from a nursery): this connection only
        pass
    finally:
        conn.close()


def say(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def stdin_lines():  # type: ignore[no-untyped-def]
    """Command lines from the orchestrator, read without a thread."""
    import trio

    stream = trio.lowlevel.FdStream(os.dup(0))
    buffer = b""
    while True:
        while b"\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        line, buffer = buffer.split(b"\n", 1)
        yield json.loads(line)


async def rate(call: Callable[[], Awaitable[Any]], seconds: float, in_flight: int, warmup: float) -> dict[str, Any]:
    """Calls per second with ``in_flight`` tasks each calling in a loop until the deadline."""
    import trio

    async def run(window: float) -> tuple[int, float]:
        count = 0
        start = time.perf_counter()
        deadline = start + window

        async def loop() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                await call()
                count += 1

        with trio.fail_after(window + ROW_GRACE):
            async with trio.open_nursery() as nursery:
                for _ in range(in_flight):
                    nursery.start_soon(loop)
        return count, time.perf_counter() - start

    if warmup > 0:
        await run(warmup)
    count, elapsed = await run(seconds)
    return {"value": count / elapsed, "calls": count, "elapsed": elapsed}


async def sink_rate(sink: Any, data: bytes, seconds: float, warmup: float) -> dict[str, Any]:
    """Bytes per second written to the service's ``sink`` channel (``data`` at a time), each
    window ending when the service has said it took them all (a byte for each ``len(data)``)."""

    async def run(window: float) -> tuple[int, float]:
        sent = acks = 0
        start = time.perf_counter()
        deadline = start + window
        while time.perf_counter() < deadline:
            await sink.send_all(data)
            sent += 1
        while acks < sent:
            got = await sink.receive_some(64)
            if not got:
                raise EOFError("the sink closed its channel")
            acks += len(got)
        if acks != sent:
            raise RuntimeError(f"the sink acknowledged {acks} writes, {sent} were made")
        return sent, time.perf_counter() - start

    if warmup > 0:
        await run(warmup)
    sent, elapsed = await run(seconds)
    return {"value": sent * len(data) / elapsed, "bytes": sent * len(data), "elapsed": elapsed}


# ------------------------------------------------------------------------------------------
# Roles: the limits
# ------------------------------------------------------------------------------------------


@functools.cache
def bulk_body() -> bytes:
    """The body of minibus's 1 MiB call as CBOR (``{"args": [1 MiB], "method": "take"}``)."""
    import cbor2

    return cbor2.dumps({"args": [os.urandom(BIG)], "method": "take"})


def role_limit_server(path: str) -> None:
    """The far end of every limit: echo (raw or project codec) or a byte sink (raw or framed)."""
    import trio

    async def main() -> None:
        listener = unix_listen(path)
        say("ready")
        await accept_loop(listener, limit_serve)

    trio.run(main)


async def limit_serve(sock: socket.socket) -> None:
    """The far end of every limit, one connection: its first byte says which (an echo of
    raw CBOR, the project's codec or the protocol's shape; a byte sink, raw or framed; 1 MiB
    call bodies)."""
    import trio

    mode = await recv_some(sock, 1)
    if mode in (b"E", b"C", b"P"):
        codec = Codec(project=mode != b"E", nested=mode == b"P")
        sender = Sender(sock)
        encode, decode = codec.encode, codec.decode
        while data := await recv_some(sock):
            out = [encode({"re": m["id"], "result": m["args"][0]}) for m in decode(data)]
            if out:
                await sender.send(out[0] if len(out) == 1 else b"".join(out))
    elif mode == b"D":
        # The 1 MiB row's floor at the receiving end: each call body read into one
        # buffer (the same for every body, as minibus keeps a decoded body's buffer for
        # the next body of its size), decoded by cbor2 from it, the value let go at once
        # (the row's method returns the argument's length); then the byte count, as "R"
        # acks.
        import cbor2

        size = len(bulk_body())
        total = 0
        view = memoryview(bytearray(size))
        while True:
            filled = 0
            while filled < size:
                await trio.lowlevel.wait_readable(sock)
                try:
                    n = sock.recv_into(view[filled:])
                except BlockingIOError:
                    continue
                if not n:
                    break
                filled += n
            total += filled
            if filled < size:
                break
            cbor2.loads(view)  # (as minibus decodes a filled body that is not flat)
        await Sender(sock).send(struct.pack(">Q", total))
    elif mode in (b"R", b"F"):
        buffer = bytearray(PART + 4096)
        total = 0
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                n = sock.recv_into(buffer)
            except BlockingIOError:
                continue
            if not n:
                break
            total += n
        ack = struct.pack(">Q", total)
        await Sender(sock).send(ack if mode == b"R" else HEADER.pack(DATA, 0, 1, 8) + ack)


def role_limit_forward(listen: str, upstream: str) -> None:
    """The middle of the 3-process limit: frames in, channel id rewritten, frames out."""
    import trio

    async def handle(down: socket.socket) -> None:
        mode = await recv_some(down, 1)
        up = unix_connect(upstream)
        try:
            up.send(mode)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward_frames, down, up, 7)
                await forward_frames(up, down, 1)
                nursery.cancel_scope.cancel()
        finally:
            up.close()

    async def main() -> None:
        listener = unix_listen(listen)
        say("ready")
        await accept_loop(listener, handle)

    trio.run(main)


async def forward_frames(src: socket.socket, dst: socket.socket, channel: int) -> None:
    """The middle of the 3-process limit, one direction: frames in, channel id rewritten,
    frames out (the bodies views of one read, no decoding), as busd forwards DATA frames."""
    import trio

    buffer = bytearray(PART + 4096)
    view = memoryview(buffer)
    sender = Sender(dst)
    header = bytearray()  # a header cut between two reads
    remaining = 0  # body bytes of the current frame still to pass on
    pack, unpack = HEADER.pack, HEADER.unpack_from
    while True:
        await trio.lowlevel.wait_readable(src)
        try:
            n = src.recv_into(buffer)
        except BlockingIOError:
            continue
        if not n:
            dst.shutdown(socket.SHUT_WR)
            return
        parts: list[bytes | memoryview] = []
        pos = 0
        while pos < n:
            if remaining:
                take = min(remaining, n - pos)
                parts.append(view[pos : pos + take])
                pos += take
                remaining -= take
                continue
            if not header and n - pos >= 10:
                kind, flags, _channel, length = unpack(buffer, pos)
                pos += 10
            else:
                take = min(10 - len(header), n - pos)
                header += view[pos : pos + take]
                pos += take
                if len(header) < 10:
                    break
                kind, flags, _channel, length = unpack(header, 0)
                header = bytearray()
            if kind not in (CONTROL, DATA) or flags or length > MAX_BODY:
                raise OSError("a bad frame")
            parts.append(pack(kind, 0, channel, length))
            remaining = length
        if parts:
            # one write; the bodies are views of our buffer, which is not reused before
            # the write returns (the Sender copies only what the kernel did not take)
            await sender.send(parts[0] if len(parts) == 1 else b"".join(parts))


def role_bare_shs(path: str, seed_hex: str) -> None:
    """A bare shs1 server: accept on a Unix socket, complete the handshake, nothing else."""
    import trio

    from bus.io.secure import SecureStream
    from bus.wire.identity import Identity

    identity = Identity.from_seed(bytes.fromhex(seed_hex))

    async def handle(stream: trio.SocketStream) -> None:
        # The handshake's messages written and read straight on the socket, as busd does
        # (direct_handshake): the best a trio shs1 server does, so the limit is not weaker
        # than minibus's own handshake I/O.
        secure = SecureStream.server(stream, identity, encrypted=False, direct_handshake=True)
        try:
            await secure.do_handshake()
            await secure.receive_some()  # until the client closes
        except Exception:
            pass
        finally:
            await trio.aclose_forcefully(secure)

    async def main() -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(1024)
        say("ready")
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])

    trio.run(main)


class LimitClient:
    """The caller's end of the limits: ping-pong (1 in flight) or tasks with a reader."""

    def __init__(
        self,
        path: str,
        project_codec: bool,
        deadline: bool = False,
        nested: bool = False,
        bus_buffer: bool = False,
        sock: socket.socket | None = None,
    ) -> None:
        # (``sock``: a connected non-blocking socket to use instead of ``path``'s)
        self.sock = unix_connect(path) if sock is None else sock
        if bus_buffer:
            bus_send_buffer(self.sock)
        # ``deadline``: every call waits under a deadline of its own, as a bus call does
        # (``request_timeout``): a trio cancel scope entered and left per call.
        self.deadline = deadline
        # ``nested``: RPC frames inside DATA frames (the protocol's shape, see Codec).
        self.sock.send(b"P" if nested else b"C" if project_codec else b"E")
        self.codec = Codec(project_codec, nested)
        self.parked = nested  # the protocol-shaped row parks its calls as RpcConnection does
        self.sender = Sender(self.sock)
        self.next_id = 1
        self.waiting: dict[int, list[Any]] = {}

    def request(self) -> tuple[int, bytes]:
        i = self.next_id
        self.next_id += 1
        return i, self.codec.encode({"op": "call", "id": i, "method": "echo", "args": [PAYLOAD]})

    async def pingpong(self) -> Any:
        if self.deadline:
            import trio

            with trio.move_on_after(CALL_DEADLINE):
                return await self._pingpong()
            raise TimeoutError
        return await self._pingpong()

    async def _pingpong(self) -> Any:
        i, frame = self.request()
        await self.sender.send(frame)
        while True:
            data = await recv_some(self.sock)
            if not data:
                raise EOFError
            for message in self.codec.decode(data):
                if message["re"] == i:
                    return message["result"]

    async def reader(self) -> None:
        import trio

        while data := await recv_some(self.sock):
            for message in self.codec.decode(data):
                slot = self.waiting.pop(message["re"])
                slot[1] = message["result"]
                if self.parked:
                    task, slot[0] = slot[0], None
                    if task is not None:
                        trio.lowlevel.reschedule(task)
                else:
                    slot[0].set()
        raise trio.BrokenResourceError("the limit server went away")

    async def _call_parked(self) -> Any:
        """:meth:`_call` with the call's task parked by trio's lowlevel API (no ``Event``
        per call), as ``RpcConnection`` does."""
        import trio

        i, frame = self.request()
        slot: list[Any] = [trio.lowlevel.current_task(), None]
        self.waiting[i] = slot
        await self.sender.send(frame)

        def abort(_raise_cancel: Any) -> Any:
            slot[0] = None
            self.waiting.pop(i, None)
            return trio.lowlevel.Abort.SUCCEEDED

        if slot[0] is not None:
            await trio.lowlevel.wait_task_rescheduled(abort)
        return slot[1]

    async def call(self) -> Any:
        import trio

        call = self._call_parked if self.parked else self._call
        if self.deadline:
            with trio.move_on_after(CALL_DEADLINE):
                return await call()
            raise TimeoutError
        return await call()

    async def _call(self) -> Any:
        import trio

        i, frame = self.request()
        slot: list[Any] = [trio.Event(), None]
        self.waiting[i] = slot
        await self.sender.send(frame)
        await slot[0].wait()
        return slot[1]

    def close(self) -> None:
        self.sock.close()


async def limit_bulk(path: str, mode: str, seconds: float, warmup: float) -> dict[str, Any]:
    """Bulk into the limit server: ``R`` raw bytes (256 KiB writes), ``F`` the same in DATA
    frames, ``D`` minibus's 1 MiB call bodies to a receiver that decodes each (MB/s of
    argument bytes, as the 1 MiB rows count them).  The first ``warmup`` seconds' writes are
    not counted; the window ends when the server has acknowledged every byte."""
    import trio

    sock = unix_connect(path)
    try:
        if mode in ("R", "D"):
            # The unix-fd rows' limits: the send buffer busd gives a unix-fd channel's sockets
            # (UNIX_FD_SEND_BUFFER: a wake-up per MiB, not five), like with like.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_FD_SEND_BUFFER)
        else:
            bus_send_buffer(sock)  # (the 3-process limit's caller: as a client's bus connection)
        sock.send(mode.encode())
        if mode == "D":
            chunk = bulk_body()
            counts = BIG  # (argument bytes a body carries)
        else:
            block = os.urandom(PART)
            chunk = HEADER.pack(DATA, 0, 1, PART) + block if mode == "F" else block
            counts = PART
        sender = Sender(sock)
        sent = chunks = 0
        with trio.fail_after(warmup + seconds + ROW_GRACE):
            start = time.perf_counter()
            while time.perf_counter() - start < warmup:
                await sender.send(chunk)
                chunks += 1
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                await sender.send(chunk)
                sent += counts
                chunks += 1
            sock.shutdown(socket.SHUT_WR)
            want = 18 if mode == "F" else 8
            got = b""
            while len(got) < want:
                data = await recv_some(sock)
                if not data:
                    raise EOFError("no ack from the sink")
                got += data
        elapsed = time.perf_counter() - start
        total = struct.unpack(">Q", got[-8:])[0]
        expect = chunks * len(chunk)
        if total != expect:
            raise RuntimeError(f"the sink counted {total} bytes, {expect} were sent")
        return {"value": sent / elapsed, "bytes": sent, "elapsed": elapsed}
    finally:
        sock.close()


async def bare_connects(path: str, seed_hex: str, seconds: float, warmup: float) -> dict[str, Any]:
    import trio

    from bus.io.secure import SecureStream
    from bus.wire.identity import Identity

    identity = Identity.from_seed(bytes.fromhex(seed_hex))

    from bus.io.fdpass import FdSocketStream

    async def one() -> None:
        # The client's socket as minibus's (connected at once when the listener has room,
        # each handshake message and its answer in one step: FdSocketStream.connect_nowait,
        # send_then_receive), the best a trio shs1 client does.
        transport = FdSocketStream.connect_nowait(path) or await FdSocketStream.connect(path)
        stream = SecureStream.client(transport, identity, identity.public_key, encrypted=False)
        await stream.do_handshake()
        await trio.aclose_forcefully(stream)

    return await rate(one, seconds, 1, warmup)


LIMIT_PINGPONG_ROWS = (
    "limit2-x1", "limit3-x1", "limit3-x32", "limit2c-x1", "limit3c-x1", "limit3c-x32",
    "limit2d-x1", "limit2t-x1", "limit3r-x1", "limit3p-x1",
)
CALL_DEADLINE = 60.0  # the deadline rows' per-call deadline (never reached)


def role_limit_worker(config_json: str) -> None:
    """Runs the limit rows on command (one JSON line in, one JSON line out)."""
    import trio

    config = json.loads(config_json)

    async def main() -> None:
        say({"ready": True})
        async for cmd in stdin_lines():
            row, seconds, warmup = cmd["row"], cmd["seconds"], cmd["warmup"]
            try:
                if row in LIMIT_PINGPONG_ROWS:
                    path = config["limit2"] if row.startswith("limit2") else config["limit3"]
                    client = LimitClient(
                        path,
                        project_codec=row[6] in "cdrp",
                        deadline=row[6] in "dt",
                        nested=row[6] == "p",
                        bus_buffer=path == config["limit3"],
                    )
                    try:
                        if row.endswith("x1") and row[6] not in "rp":
                            result = await rate(client.pingpong, seconds, 1, warmup)
                        else:
                            async with trio.open_nursery() as nursery:
                                nursery.start_soon(client.reader)
                                result = await rate(client.call, seconds, 1 if row.endswith("x1") else 32, warmup)
                                nursery.cancel_scope.cancel()
                    finally:
                        client.close()
                elif row == "bulk-raw":
                    result = await limit_bulk(config["limit2"], "R", seconds, warmup)
                elif row == "bulk-3p":
                    result = await limit_bulk(config["limit3"], "F", seconds, warmup)
                elif row == "bulk-floor":
                    result = await limit_bulk(config["limit2"], "D", seconds, warmup)
                elif row == "bare-shs":
                    result = await bare_connects(config["bare"], config["seed"], seconds, warmup)
                else:
                    result = {"error": f"unknown row {row}"}
            except Exception as exc:  # reported on the row, the run goes on
                result = {"error": f"{type(exc).__name__}: {exc}"}
            say(result)

    trio.run(main)


# ------------------------------------------------------------------------------------------
# Roles: minibus
# ------------------------------------------------------------------------------------------


class ProfileSwitch:
    """cProfile started by SIGUSR1 and stopped (and written to ``path``) by SIGUSR2."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        if path:
            import cProfile

            self.profile = cProfile.Profile(time.thread_time)  # CPU time: waiting is not cost
            signal.signal(signal.SIGUSR1, lambda *_: self.profile.enable())
            signal.signal(signal.SIGUSR2, lambda *_: self.stop())

    def stop(self) -> None:
        self.profile.disable()
        assert self.path is not None
        self.profile.dump_stats(self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)


def role_busd(profile_out: str, argv: list[str]) -> None:
    """busd, unchanged (bus.__main__.main), with the profile switch installed first."""
    ProfileSwitch(profile_out or None)
    from bus.__main__ import main

    sys.exit(main(argv))


def role_service(address: str, key_file: str, profile_out: str) -> None:
    import trio

    from clients import Service, load_identity, open_bus
    from clients.rpc import PUSH_WINDOW

    ProfileSwitch(profile_out or None)
    service = Service(SERVICE, description="echoes (benchmark)")

    # Declared synchronous (plain functions): answered inline by the channel's reader.
    @service.method
    def echo(value: bytes) -> bytes:
        return value

    @service.method
    def take(value: bytes) -> int:
        return len(value)

    # The floor of the relayed 1 MiB row without RPC (--budget-row mb-relay-bulk): a plain
    # relayed channel whose bytes are taken as they come (push delivery, views) and dropped.
    # It answers one byte for each whole BIG it has taken, so that the caller's window ends
    # when the service has its bytes (as a call's ends with its reply), not when busd and the
    # sockets still hold up to a window of them, which would drain into the next key's window.
    @service.channel("sink")
    async def sink(channel: Any) -> None:
        ended = trio.Event()
        wake = trio.Event()
        got = acked = 0

        def take(data: Any) -> None:
            nonlocal got
            got += len(data)
            if got // BIG > acked:
                wake.set()  # (once a MiB: a task switch a MiB, not one a frame)

        def end(error: Any) -> None:
            ended.set()
            wake.set()

        # (The window an RPC channel's pushed bytes have, like with like: a smaller one would
        # have busd buffer the floor's bytes until each grant, which the RPC row never does.)
        if not channel.deliver_to(take, end, views=True, window=PUSH_WINDOW):
            raise RuntimeError("the sink channel must be a plain relay")
        while not ended.is_set():
            await wake.wait()
            wake = trio.Event()
            whole = got // BIG
            if whole > acked and not ended.is_set():
                await channel.send_all(bytes(whole - acked))
                acked = whole

    async def main() -> None:
        async with open_bus(address, identity=load_identity(key_file), name=service.name, info=service.info) as bus:
            service.attach(bus)
            say("ready")
            await trio.sleep_forever()

    trio.run(main)


def role_minibus_worker(address: str, key_file: str) -> None:
    """Runs the minibus rows on command, through the public client API."""
    import trio

    from clients import load_identity, open_bus
    from clients.rpc import RpcConnection

    owner = load_identity(key_file)
    profile = None

    async def main() -> None:
        nonlocal profile
        async with open_bus(address, identity=owner) as bus:
            probe = await bus.open_channel(SERVICE, "rpc")  # what bus.call's route is here
            route = probe.route
            await probe.aclose()
            assert await bus.call(SERVICE, "echo", PAYLOAD) == PAYLOAD
            relay = RpcConnection(await bus.open_channel(SERVICE, "rpc", "relay"))
            async with trio.open_nursery() as nursery:
                await nursery.start(relay.run)
                assert relay.channel.route == "relay"
                assert await relay.call("echo", PAYLOAD) == PAYLOAD
                big = os.urandom(BIG)
                sink: Any = None  # the plain relayed channel of mb-relay-bulk, opened when first run
                say({"ready": True, "bus.call route": route})
                connects = 0
                async for cmd in stdin_lines():
                    row, seconds, warmup = cmd.get("row"), cmd.get("seconds", 0), cmd.get("warmup", 0)
                    try:
                        if cmd.get("profile") == "on":
                            import cProfile

                            profile = cProfile.Profile(time.thread_time)
                            profile.enable()
                            result: dict[str, Any] = {"ok": True}
                        elif cmd.get("profile") == "off":
                            assert profile is not None
                            profile.disable()
                            profile.dump_stats(cmd["path"])
                            result = {"ok": True}
                        elif row == "mb-fd-x1":
                            result = await rate(lambda: bus.call(SERVICE, "echo", PAYLOAD), seconds, 1, warmup)
                        elif row == "mb-relay-x1":
                            result = await rate(lambda: relay.call("echo", PAYLOAD), seconds, 1, warmup)
                        elif row == "mb-relay-xn":  # (any number in flight: in_flight.py)
                            result = await rate(lambda: relay.call("echo", PAYLOAD), seconds, cmd["n"], warmup)
                        elif row == "mb-relay-x32":
                            result = await rate(lambda: relay.call("echo", PAYLOAD), seconds, 32, warmup)
                        elif row == "mb-fd-big-x8":
                            result = await rate(lambda: bus.call(SERVICE, "take", big), seconds, 8, warmup)
                            result["value"] *= BIG
                        elif row == "mb-relay-big-x8":
                            result = await rate(lambda: relay.call("take", big), seconds, 8, warmup)
                            result["value"] *= BIG
                        elif row == "mb-relay-bulk":
                            # minibus's framing and flow control, no RPC: 1 MiB writes on a
                            # plain relayed channel, the service's end dropping what comes.
                            if sink is None:
                                sink = await bus.open_channel(SERVICE, "sink", "relay")
                            result = await sink_rate(sink, big, seconds, warmup)
                        elif row == "mb-connect":

                            async def connect() -> None:
                                nonlocal connects
                                connects += 1
                                name = f"org.bench.Conn{os.getpid()}x{connects}"
                                async with open_bus(address, identity=owner, name=name, reconnect=False):
                                    pass

                            result = await rate(connect, seconds, 1, warmup)
                        else:
                            result = {"error": f"unknown row {row}"}
                    except Exception as exc:
                        result = {"error": f"{type(exc).__name__}: {exc}"}
                    say(result)
                nursery.cancel_scope.cancel()

    trio.run(main)


# ------------------------------------------------------------------------------------------
# Roles: the D-Bus peer (jeepney)
# ------------------------------------------------------------------------------------------


def role_dbus_service(address: str, flavour: str, name: str) -> None:
    from jeepney import MessageType, new_method_return
    from jeepney.bus_messages import message_bus
    from jeepney.low_level import HeaderFields

    def answer(msg):  # type: ignore[no-untyped-def]
        if msg.header.fields.get(HeaderFields.member) == "Echo":
            return new_method_return(msg, "ay", msg.body)
        return new_method_return(msg, "u", (len(msg.body[0]),))

    if flavour == "blocking":
        from jeepney.io.blocking import open_dbus_connection

        conn = open_dbus_connection(address)
        conn.send_and_get_reply(message_bus.RequestName(name), timeout=10)
        say("ready")
        while True:
            msg = conn.receive()
            if msg.header.message_type == MessageType.method_call:
                conn.send(answer(msg))
    else:
        import trio
        from jeepney.io.trio import open_dbus_connection as open_trio

        async def main() -> None:
            with trio.fail_after(10):
                conn = await open_trio(address)
                await conn.send(message_bus.RequestName(name))
                while (await conn.receive()).header.message_type != MessageType.method_return:
                    pass  # NameAcquired may come first
            say("ready")
            while True:
                msg = await conn.receive()
                if msg.header.message_type == MessageType.method_call:
                    await conn.send(answer(msg))

        trio.run(main)


def role_dbus_worker(address: str, flavour: str, name: str) -> None:
    from jeepney import DBusAddress, MessageType, new_method_call
    from jeepney.bus_messages import message_bus

    target = DBusAddress("/bench", bus_name=name, interface="org.bench.Echo")
    big = os.urandom(BIG)

    def echo():  # type: ignore[no-untyped-def]
        return new_method_call(target, "Echo", "ay", (PAYLOAD,))

    def take():  # type: ignore[no-untyped-def]
        return new_method_call(target, "Take", "ay", (big,))

    connects = 0

    def next_name() -> str:
        nonlocal connects
        connects += 1
        return f"org.bench.Conn{os.getpid()}x{connects}"

    if flavour == "blocking":
        from jeepney.io.blocking import open_dbus_connection

        conn = open_dbus_connection(address)

        def pipelined(make, in_flight: int, seconds: float) -> dict[str, Any]:  # type: ignore[no-untyped-def]
            """``in_flight`` calls kept outstanding on one connection, no threads."""
            for _ in range(in_flight):
                conn.send(make())
            outstanding, count = in_flight, 0
            start = time.perf_counter()
            while outstanding:
                msg = conn.receive(timeout=ROW_GRACE)
                kind = msg.header.message_type
                if kind == MessageType.error:
                    raise RuntimeError(f"D-Bus error: {msg.body}")
                if kind != MessageType.method_return:
                    continue
                count += 1
                if time.perf_counter() - start < seconds:
                    conn.send(make())
                else:
                    outstanding -= 1
            elapsed = time.perf_counter() - start
            return {"value": count / elapsed, "calls": count, "elapsed": elapsed}

        def connect_rate(seconds: float) -> dict[str, Any]:
            count = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                c = open_dbus_connection(address)
                c.send_and_get_reply(message_bus.RequestName(next_name()), timeout=ROW_GRACE)
                c.close()
                count += 1
            elapsed = time.perf_counter() - start
            return {"value": count / elapsed, "calls": count, "elapsed": elapsed}

        say({"ready": True})
        for line in sys.stdin:
            cmd = json.loads(line)
            row, seconds, warmup = cmd["row"], cmd["seconds"], cmd["warmup"]
            try:
                if row == "connect":
                    connect_rate(warmup)
                    result = connect_rate(seconds)
                else:
                    make, in_flight = {"x1": (echo, 1), "x32": (echo, 32), "big-x8": (take, 8)}[row]
                    pipelined(make, in_flight, warmup)
                    result = pipelined(make, in_flight, seconds)
                    if row == "big-x8":
                        result["value"] *= BIG
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            say(result)
        return

    import trio
    from jeepney.io.trio import open_dbus_connection as open_trio
    from jeepney.io.trio import open_dbus_router

    async def main() -> None:
        async with open_dbus_router(address) as router:

            async def connect() -> None:
                c = await open_trio(address)
                try:
                    async with c.router() as r:
                        await r.send_and_get_reply(message_bus.RequestName(next_name()))
                finally:
                    await c.aclose()

            say({"ready": True})
            async for cmd in stdin_lines():
                row, seconds, warmup = cmd["row"], cmd["seconds"], cmd["warmup"]
                try:
                    if row == "connect":
                        result = await rate(connect, seconds, 1, warmup)
                    else:
                        make, in_flight = {"x1": (echo, 1), "x32": (echo, 32), "big-x8": (take, 8)}[row]

                        async def call(make=make) -> None:  # type: ignore[no-untyped-def]
                            reply = await router.send_and_get_reply(make())
                            if reply.header.message_type == MessageType.error:
                                raise RuntimeError(f"D-Bus error: {reply.body}")

                        result = await rate(call, seconds, in_flight, warmup)
                        if row == "big-x8":
                            result["value"] *= BIG
                except Exception as exc:
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                say(result)

    trio.run(main)


# ------------------------------------------------------------------------------------------
# The orchestrator: processes
# ------------------------------------------------------------------------------------------


class Proc:
    """A child process that says ``ready`` (or an address) on its first line of stdout."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, stdin: bool = False, pass_fds: tuple[int, ...] = ()) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,
            pass_fds=pass_fds,
        )
        assert self.proc.stdout is not None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self._buffer = b""
        self.first = self.readline(60.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> str:
        """One line of the child's stdout within ``timeout`` seconds, or an error."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                raise RuntimeError(f"{self.name}: no answer within {timeout:.0f} s")
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError(f"{self.name} exited (status {self.proc.poll()})")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def ask(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self.readline(timeout))
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._selector.close()


def me(role: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, "--", *args]


class DbusBroker:
    """A private dbus-broker with this script as its controller, no systemd needed.

    ``dbus-broker-launch`` needs systemd (its journal socket, then the user's systemd bus), so
    the script does the launcher's part itself: it starts ``dbus-broker --controller FD`` with
    one end of a socketpair, authenticates on it (SASL EXTERNAL, unix fds) and calls
    ``org.bus1.DBus.Broker.AddListener(o path, h listener, v policy)`` with a non-blocking
    listening socket and a policy that lets everyone connect, own any name and send and
    receive anything (the policy dump format of dbus-broker 33, as its launcher sends it)."""

    POLICY_SIGNATURE = (
        "(a(u(bta(btbs)a(btssssuutt)a(btssssuutt)))a(buu(bta(btbs)a(btssssuutt)a(btssssuutt)))a(ss)bs)"
    )

    def __init__(self, tmp: Path, binary: str) -> None:
        import array

        from jeepney import Parser
        from jeepney.auth import BEGIN, Authenticator
        from jeepney.low_level import Endianness, Header, HeaderFields, Message, MessageType

        path = tmp / "dbus-broker.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(256)
        listener.setblocking(False)  # the broker accepts until EAGAIN: a blocking one hangs it
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.controller = ours
        self.proc = subprocess.Popen(
            [binary, "--controller", str(theirs.fileno()), "--machine-id", uuid.uuid4().hex,
             "--max-bytes", str(1 << 30), "--max-fds", "4096", "--max-matches", "16384", "--max-objects", "65536"],
            pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        try:
            ours.settimeout(10)
            auth = Authenticator(enable_fds=True)
            for request in auth:
                ours.sendall(request)
                auth.feed(ours.recv(1024))
            ours.sendall(BEGIN)
            anything = 2**64 - 1
            batch = (
                True, 1,  # connect: allowed
                [(True, 1, True, "")],  # own: any name (the empty prefix)
                [(True, 1, "", "", "", "", 0, 0, 0, anything)],  # send: anything
                [(True, 1, "", "", "", "", 0, 0, 0, anything)],  # receive: anything
            )
            policy: tuple[Any, ...] = ([(0xFFFFFFFF, batch)], [], [], False, "")  # default batch only; no AppArmor
            header = Header(
                Endianness.little, MessageType.method_call, flags=0, protocol_version=1, body_length=-1, serial=-1,
                fields={
                    HeaderFields.path: "/org/bus1/DBus/Broker",
                    HeaderFields.interface: "org.bus1.DBus.Broker",
                    HeaderFields.member: "AddListener",
                    HeaderFields.signature: "ohv",
                },
            )
            fds = array.array("i")
            data = Message(header, ("/org/bus1/DBus/Listener/0", listener, (self.POLICY_SIGNATURE, policy))).serialise(
                serial=1, fds=fds
            )
            ours.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            parser = Parser()
            while (reply := parser.get_next_message()) is None:
                chunk = ours.recv(4096)
                if not chunk:
                    raise RuntimeError("dbus-broker closed its controller connection")
                parser.add_data(chunk)
            if reply.header.message_type != MessageType.method_return:
                raise RuntimeError(f"AddListener: {reply.header.fields.get(HeaderFields.error_name)}")
        except BaseException:
            self.stop()
            raise
        finally:
            listener.close()  # the broker has its own copy
        self.address = f"unix:path={path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.controller.close()


class DbusDaemon:
    def __init__(self, tmp: Path, binary: str) -> None:
        conf = tmp / "dbus-daemon.conf"
        conf.write_text(
            '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
            f"<busconfig><type>session</type><listen>unix:path={tmp}/dbus-daemon.sock</listen>\n"
            # the session bus's default policy: anyone may own, send and receive anything
            '<auth>EXTERNAL</auth><policy context="default"><allow send_destination="*" eavesdrop="true"/>\n'
            '<allow eavesdrop="true"/><allow own="*"/></policy><limit name="max_message_size">134217728</limit>\n'
            '<limit name="max_incoming_bytes">1000000000</limit><limit name="max_outgoing_bytes">1000000000</limit>\n'
            "</busconfig>\n"
        )
        log = tmp / "dbus-daemon.log"  # (it may warn that it cannot raise its fd limit)
        with log.open("w") as errors:
            self.proc = subprocess.Popen([binary, f"--config-file={conf}", "--nofork", "--print-address"],
                                         stdout=subprocess.PIPE, stderr=errors, text=True)
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            self.stop()
            raise RuntimeError(f"dbus-daemon did not start: {log.read_text().strip()[-500:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


class Minibus:
    """busd, the service and the caller, each its own process."""

    def __init__(self, tmp: Path, profile_dir: Path | None = None) -> None:
        from bus.wire.identity import Identity, save_identity

        self.owner = Identity.generate()
        self.key_file = tmp / "owner.key"
        save_identity(self.key_file, self.owner)
        (tmp / "run").mkdir(mode=0o700)
        config = tmp / "busd.toml"
        config.write_text("[limits]\nconnections_per_identity = 10000\n")  # sequential connects may overlap their closes
        env = dict(os.environ, XDG_CONFIG_HOME=str(tmp / "cfg"), XDG_RUNTIME_DIR=str(tmp / "run"))
        self.procs: list[Proc] = []
        busd_profile = str(profile_dir / "busd.prof") if profile_dir else ""
        service_profile = str(profile_dir / "service.prof") if profile_dir else ""
        try:
            self.busd = self._start("busd", me("busd", busd_profile, "--no-tcp", "--key", str(self.key_file), "--config", str(config),
                                               "--runtime-dir", str(tmp / "run"), "--log-level", "warning"), env=env)
            self.address = self.busd.first.split("=", 1)[1]
            self.service = self._start("service", me("service", self.address, str(self.key_file), service_profile), env=env)
            self.worker = self._start("minibus caller", me("minibus-worker", self.address, str(self.key_file)), env=env, stdin=True)
            self.route = json.loads(self.worker.first)["bus.call route"]
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, argv: list[str], **kw: Any) -> Proc:
        proc = Proc(name, argv, **kw)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


class Limits:
    def __init__(self, tmp: Path, seed_hex: str) -> None:
        self.procs: list[Proc] = []
        try:
            server, forward, bare = str(tmp / "limit.sock"), str(tmp / "forward.sock"), str(tmp / "bare.sock")
            self.procs.append(Proc("limit server", me("limit-server", server)))
            self.procs.append(Proc("limit forwarder", me("limit-forward", forward, server)))
            self.procs.append(Proc("bare shs1 server", me("bare-shs", bare, seed_hex)))
            config = {"limit2": server, "limit3": forward, "bare": bare, "seed": seed_hex}
            self.worker = Proc("limit caller", me("limit-worker", json.dumps(config)), stdin=True)
            self.procs.append(self.worker)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


class Peers:
    """The D-Bus daemons that are installed, each with a trio and a blocking jeepney pair."""

    def __init__(self, tmp: Path) -> None:
        self.daemons: list[Any] = []
        self.procs: list[Proc] = []
        self.workers: dict[str, Proc] = {}
        self.skipped: dict[str, str] = {}
        try:
            import jeepney  # noqa: F401
            import jeepney.io.trio  # noqa: F401
        except ImportError:
            self.skipped["dbus-daemon"] = self.skipped["dbus-broker"] = "jeepney is not installed (pip install jeepney)"
            return
        try:
            for label, binary, kind in (("dbus-daemon", "dbus-daemon", DbusDaemon), ("dbus-broker", "dbus-broker", DbusBroker)):
                path = shutil.which(binary)
                if path is None:
                    self.skipped[label] = f"{binary} is not installed (apt-get install {binary})"
                    continue
                try:
                    daemon = kind(tmp, path)
                except Exception as exc:
                    self.skipped[label] = f"{binary} did not start: {exc}"
                    continue
                self.daemons.append(daemon)
                for flavour in ("trio", "blocking"):
                    name = f"org.bench.Echo{flavour.capitalize()}"
                    self.procs.append(Proc(f"{label} {flavour} service", me("dbus-service", daemon.address, flavour, name)))
                    worker = Proc(f"{label} {flavour} caller", me("dbus-worker", daemon.address, flavour, name), stdin=True)
                    self.procs.append(worker)
                    self.workers[f"{label}+jeepney {flavour}"] = worker
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for daemon in self.daemons:
            daemon.stop()


# ------------------------------------------------------------------------------------------
# The orchestrator: the run and the table
# ------------------------------------------------------------------------------------------

# The limits with the project's codec ("c"), printed under the table; with it, "d": a deadline
# per call, as ``bus.call`` has (``request_timeout``; the unix-fd row is ``bus.call``); "t": the
# raw codec (cbor2, no profile check) with that deadline: the unix-fd row's floor since its ends
# know a call and a reply by their shape or layout (no more CBOR work than cbor2's); "r":
# the reply handed to the call's task by a reader task, as a bus connection's reader (shared
# by every channel, watch and event on it) hands a relayed reply (the relay rows call an
# ``RpcConnection`` directly, with no deadline); "p": the protocol's shape at both ends, each RPC
# frame inside a DATA frame of the connection (cut by two decoders, as a relayed RpcConnection
# and Service cut them), with the reader task handing the reply to a parked call.  Each is
# measured beside the table row it is the floor of, after its two sides (before them when the
# round's order is reversed); ``mb-relay-bulk`` is the relayed 1 MiB row's floor without RPC.
FLOORS = {
    "mb-fd-x1": ["limit2c-x1", "limit2t-x1"],
    "mb-relay-x1": ["limit3p-x1", "limit3r-x1", "limit3c-x1"],
    "mb-relay-x32": ["limit3c-x32"],
    "mb-fd-big-x8": ["bulk-floor"],
    "mb-relay-big-x8": ["mb-relay-bulk"],
}
#: The floor each row is judged against where it misses its target (one of FLOORS: the limit
#: with what every minibus call of the row must do added), and its name in the table.  (Not
#: the 32-in-flight row's codec floor: minibus passes a burst of calls as one relayed frame, so
#: it runs above that floor, which then says nothing of what holds the row.)
JUDGED_FLOOR = {
    "mb-fd-x1": ("limit2t-x1", "a deadline per call"),
    "mb-relay-x1": ("limit3p-x1", "the protocol's shape"),
    "mb-fd-big-x8": ("bulk-floor", "bulk-floor"),
    "mb-relay-big-x8": ("mb-relay-bulk", "a plain relayed channel"),
}
#: A row within this share of its floor is at it (the rounds of one run spread wider than this).
AT_FLOOR = 0.95
PEER_ROWS = ["x1", "x32", "big-x8", "connect"]

TABLE = [
    # label, minibus row, peer row, limit row, limit label, unit, target ratio to the limit
    ("RPC 64 B, 1 in flight, `bus.call` (unix-fd)", "mb-fd-x1", "x1", "limit2-x1", "2-process", "calls", 0.8),
    ("RPC 64 B, 1 in flight, relay", "mb-relay-x1", "x1", "limit3-x1", "3-process", "calls", 0.85),
    ("RPC 64 B, 32 in flight, relay", "mb-relay-x32", "x32", "limit3-x32", "3-process", "calls", 0.85),
    ("RPC 1 MiB args, 8 in flight, unix-fd", "mb-fd-big-x8", "big-x8", "bulk-raw", "raw socket", "bytes", 0.6),
    ("RPC 1 MiB args, 8 in flight, relay", "mb-relay-big-x8", "big-x8", "bulk-3p", "3-process", "bytes", 0.8),
    ("connect + handshake + hello + name", "mb-connect", "connect", "bare-shs", "bare shs1 connect", "calls", 0.85),
]


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 1e6:,.0f} MB/s"
    return f"{value:,.0f}/s"


def paired_ratios(by_round: list[dict[str, float]], ours: str, ref: str) -> dict[str, Any] | None:
    """``ours / ref`` in each round that measured both (back to back): their median and range."""
    import statistics

    ratios = [r[ours] / r[ref] for r in by_round if r.get(ours) and r.get(ref)]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def row_status(target: float, row: dict[str, Any] | None, floor: dict[str, Any] | None, row_to_floor: dict[str, Any] | None) -> str:
    """How a row stands, from medians of paired ratios: its own to its limit (``row``), its
    floor's to the limit and its own to the floor (for a row that misses)."""
    if row is None:
        return "not measured"
    if row["median"] >= target:
        return "met"
    if floor is None or row_to_floor is None:
        return "missed"
    where = f"{floor['median']:.2f}; minibus {row_to_floor['median']:.2f} of it"
    if row_to_floor["median"] >= AT_FLOOR:
        if floor["median"] >= target:  # (the floor's rounds and the row's disagree: noise)
            return f"missed; at its floor ({where}), which reaches the target"
        return f"missed; at its floor ({where})"
    if floor["median"] >= target:
        return f"missed; its floor reaches the target ({where})"
    return f"missed; under its floor ({where})"


def pair_text(pair: dict[str, Any] | None) -> str:
    if pair is None:
        return "-"
    return f"{pair['median']:.2f} ({pair['min']:.2f}-{pair['max']:.2f})"


def pin(minibus: Minibus, limits: Limits) -> None:
    """``--pin``: every caller on the first CPU, every other process of minibus and of the
    limits (busd, the service; the forwarder, the server) on the second, so both sides of a
    row run in the same placement.  (Unpinned, three busy processes on two CPUs land as the
    scheduler puts them, and which one shares a CPU with which moves a throughput row by as
    much as half from round to round: see benchmarks/README.md, *Placement*.)"""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs two CPUs")
    first, second = {cpus[0]}, {cpus[1]}
    for proc in [*minibus.procs, *limits.procs]:
        # Every thread the process has (a thread made later inherits its maker's CPUs).
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), first if proc.name.endswith("caller") else second)


def run_benchmark(args: argparse.Namespace) -> None:
    seconds = args.seconds or (0.3 if args.quick else 0.6)
    warmup = 0.1 if args.quick else 0.2
    rounds = args.rounds or (1 if args.quick else 6)
    slices = args.slices or (1 if args.quick else 3)
    timeout = seconds * 2 + warmup + ROW_GRACE
    tmp = Path(tempfile.mkdtemp(prefix="minibus-rpc-"))
    values: dict[str, list[float]] = {}
    by_round: list[dict[str, float]] = []
    errors: dict[str, str] = {}
    started = time.perf_counter()
    minibus = limits = peers = None
    try:
        minibus = Minibus(tmp)
        limits = Limits(tmp, minibus.owner.seed.hex())
        if args.pin:
            pin(minibus, limits)
        peers = Peers(tmp) if not args.no_peers else None
        skipped = peers.skipped if peers else {"dbus-daemon": "--no-peers", "dbus-broker": "--no-peers"}
        setup = time.perf_counter() - started

        def measure(key: str, worker: Proc, row: str) -> None:
            answer = worker.ask({"row": row, "seconds": seconds, "warmup": warmup}, timeout)
            if "error" in answer:
                errors[key] = answer["error"]
                print(f"  {key}: {answer['error']}", file=sys.stderr)
            else:
                values.setdefault(key, []).append(answer["value"])
                by_round[-1][key] = answer["value"]

        def measure_sliced(keys: list[str], first_forward: bool) -> None:
            """Each of ``keys`` (a row, its limit, its floors) for ``seconds`` in all, in
            ``slices`` windows taken in turn, each pass's order the one before rotated by one
            (A B C, B C A, C A B: a drift in the machine's speed falls on each key alike, each
            key takes each place, and none runs twice in a row, which would give its second
            window processes just run; two keys take A B, A B, ...).  ``first_forward`` False
            starts from the keys reversed.  A key's rate for the round is its work over its
            time summed over its windows.  Each window warms its key up first: the first for
            ``warmup``, the later ones for a quarter of that (its processes sat idle while the
            others ran)."""
            work = {key: 0.0 for key in keys}
            spent = {key: 0.0 for key in keys}
            base = keys if first_forward else keys[::-1]
            for n in range(slices):
                turn = n % len(base) if len(base) > 2 else 0
                for key in base[turn:] + base[:turn]:
                    if key not in spent:
                        continue  # (it failed in an earlier window of this round)
                    worker = minibus.worker if key.startswith("mb-") else limits.worker
                    cmd = {"row": key, "seconds": seconds / slices, "warmup": warmup if n == 0 else warmup / 4}
                    answer = worker.ask(cmd, timeout)
                    if "error" in answer:
                        errors[key] = answer["error"]
                        print(f"  {key}: {answer['error']}", file=sys.stderr)
                        del work[key], spent[key]
                        continue
                    work[key] += answer["value"] * answer["elapsed"]
                    spent[key] += answer["elapsed"]
            for key, elapsed in spent.items():
                value = work[key] / elapsed
                values.setdefault(key, []).append(value)
                by_round[-1][key] = value

        for round_no in range(rounds):
            # a table row's minibus side, its limit and its floors in short windows taken in
            # turn (measure_sliced), so that a slow moment hits each alike; minibus first in
            # odd rounds, last in even ones.  Then D-Bus (each peer row once a round, in one
            # window: two table rows share x1 and big-x8).
            by_round.append({})
            peer_done: set[str] = set()
            for _label, ours, peer_row, limit_row, *_ in TABLE:
                if args.only and ours not in args.only:
                    continue
                measure_sliced([ours, limit_row, *FLOORS.get(ours, [])], round_no % 2 == 0)
                if peers and peer_row not in peer_done:
                    peer_done.add(peer_row)
                    for label, worker in peers.workers.items():
                        measure(f"{label} {peer_row}", worker, peer_row)
            print(f"round {round_no + 1}/{rounds} done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
        route = minibus.route
    finally:
        for part in (peers, limits, minibus):
            if part is not None:
                part.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    best = {key: max(vs) for key, vs in values.items()}
    paired: dict[str, dict[str, Any] | None] = {}  # "ours/ref": the per-round ratios, every pair printed

    def pair(ours: str, ref: str) -> dict[str, Any] | None:
        paired[f"{ours}/{ref}"] = result = paired_ratios(by_round, ours, ref)
        return result

    table = []
    lines = [
        "| row | minibus | best D-Bus | ratio | trio limit | ratio to limit (best/best) | **ratio to limit, median of rounds** (range)"
        " | target | floor (to the limit, paired) | minibus / floor (paired) | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, ours, peer_row, limit_row, limit_label, unit, target in TABLE:
        value = best.get(ours)
        peer_values = {k[: -len(peer_row) - 1]: v for k, v in best.items() if k.endswith(" " + peer_row) and "+jeepney" in k}
        peer_name, peer_value = max(peer_values.items(), key=lambda kv: kv[1]) if peer_values else (None, None)
        limit = best.get(limit_row)
        ratio = value / peer_value if value and peer_value else None
        to_limit = value / limit if value and limit else None
        rounds_ratio = pair(ours, limit_row)
        floor_row, floor_name = JUDGED_FLOOR.get(ours, (None, ""))
        floor_ratio = pair(floor_row, limit_row) if floor_row else None
        to_floor = pair(ours, floor_row) if floor_row else None
        status = row_status(target, rounds_ratio, floor_ratio, to_floor)
        table.append({
            "row": label, "minibus": value, "best_dbus": peer_value, "best_dbus_is": peer_name, "ratio": ratio,
            "limit": limit, "limit_is": limit_label, "ratio_to_limit": to_limit, "target_ratio_to_limit": target, "unit": unit,
            "ratio_to_limit_median": rounds_ratio and rounds_ratio["median"],
            "ratio_to_limit_min": rounds_ratio and rounds_ratio["min"],
            "ratio_to_limit_max": rounds_ratio and rounds_ratio["max"],
            "ratio_to_limit_rounds": rounds_ratio and rounds_ratio["rounds"],
            "meets_target": rounds_ratio["median"] >= target if rounds_ratio else None,
            "floor_row": floor_row,
            "floor_is": floor_name or None,
            "floor_ratio_to_limit_median": floor_ratio and floor_ratio["median"],
            "ratio_to_floor_median": to_floor and to_floor["median"],
            "status": status,
        })
        peer_cell = f"{fmt(peer_value, unit)} ({peer_name.replace('+jeepney', '')})" if peer_name else "skipped"
        if peer_row == "connect" and peer_name:
            peer_cell += ", no crypto"
        median_cell = f"**{rounds_ratio['median']:.2f}** ({rounds_ratio['min']:.2f}-{rounds_ratio['max']:.2f})" if rounds_ratio else "-"
        floor_cell = f"{floor_name}: {floor_ratio['median']:.2f}" if floor_ratio else "-"
        to_floor_cell = f"{to_floor['median']:.2f}" if to_floor else "-"
        lines.append(
            f"| {label} | {fmt(value, unit)} | {peer_cell} | {f'{ratio:.2f}x' if ratio else '-'} | "
            f"{fmt(limit, unit)} ({limit_label}) | {f'{to_limit:.2f}' if to_limit else '-'} | {median_cell} | >= {target} | "
            f"{floor_cell} | {to_floor_cell} | {status} |"
        )
    print("\n".join(lines))
    print()
    print(f"bus.call took the {route} route. Limits: raw length-prefixed CBOR (minibus's 10-byte header, cbor2, no profile check).")
    print("Floors (rates: best of rounds; in brackets best/best, then \"paired\": the median of the rounds' paired ratios and their range):")
    for row, what in (("limit2c-x1", "2-process x1"), ("limit3c-x1", "3-process x1"), ("limit3c-x32", "3-process x32")):
        raw_row = row.replace("c-", "-")
        raw = best.get(raw_row)
        if row in best and raw:
            print(f"  with the project's codec (encode_control + FrameDecoder) at both ends, {what}: {best[row]:,.0f}/s"
                  f" ({best[row] / raw:.2f} of raw; paired {pair_text(pair(row, raw_row))})")
    def against(floor_key: str, limit_key: str, limit_name: str, row_key: str, row_name: str) -> str:
        """A floor's ratio to its limit and the row's to the floor, best/best and paired."""
        floor = best[floor_key]
        return (f"({floor / best[limit_key]:.2f} of {limit_name}; paired {pair_text(pair(floor_key, limit_key))};"
                f" the {row_name} is {best.get(row_key, 0) / floor:.2f} of it, paired {pair_text(pair(row_key, floor_key))})")

    raw = best.get("limit2-x1")
    if "limit2d-x1" in best and raw:
        print(f"  the project's codec and a deadline per call (a trio cancel scope, as bus.call has), 2-process x1: {best['limit2d-x1']:,.0f}/s"
              f" {against('limit2d-x1', 'limit2-x1', 'raw', 'mb-fd-x1', 'unix-fd row')}")
    if "limit2t-x1" in best and raw:
        print(f"  raw CBOR and a deadline per call (a trio cancel scope, as bus.call has; the calls and replies known by their shape"
              f" cost no more CBOR work than cbor2's), 2-process x1: {best['limit2t-x1']:,.0f}/s"
              f" {against('limit2t-x1', 'limit2-x1', 'raw', 'mb-fd-x1', 'unix-fd row')}")
    raw = best.get("limit3-x1")
    if "limit3r-x1" in best and raw:
        print(f"  the project's codec and the reply handed to the call by a reader task (a bus connection's shape), 3-process x1: {best['limit3r-x1']:,.0f}/s"
              f" ({best['limit3r-x1'] / raw:.2f} of raw; paired {pair_text(pair('limit3r-x1', 'limit3-x1'))})")
    if "limit3p-x1" in best and raw:
        print(f"  the protocol's shape at the ends (each RPC frame in a DATA frame, cut twice; the reply handed over by a reader task"
              f" to a parked call, as RpcConnection does; no deadline, as the relay rows have none),"
              f" 3-process x1: {best['limit3p-x1']:,.0f}/s {against('limit3p-x1', 'limit3-x1', 'raw', 'mb-relay-x1', 'relayed x1 row')}")
    if "bulk-floor" in best and best.get("bulk-raw"):
        print(f"  the 1 MiB unix-fd row's floor at the receiver (minibus's 1 MiB call bodies over a raw socket, each read into one"
              f" buffer, the same for every body, and decoded by cbor2 from it): {fmt(best['bulk-floor'], 'bytes')}"
              f" {against('bulk-floor', 'bulk-raw', 'the raw socket', 'mb-fd-big-x8', 'RPC row')}")
    if "mb-relay-bulk" in best and best.get("bulk-3p"):
        print(f"  the relayed 1 MiB row's floor without RPC (1 MiB writes on a plain relayed channel, the service's end taking the bytes"
              f" as they come): {fmt(best['mb-relay-bulk'], 'bytes')}"
              f" {against('mb-relay-bulk', 'bulk-3p', 'the 3-process limit', 'mb-relay-big-x8', 'RPC row')}")
    print("Paired ratios, round by round:")
    for name, result in paired.items():
        if result:
            print(f"  {name:30} " + " ".join(f"{r:.2f}" for r in result["rounds"]))
    if peers and peers.workers:
        print("D-Bus, every pairing (best of rounds):")
        for label in peers.workers:
            cells = [f"{row} {fmt(best.get(f'{label} {row}'), 'bytes' if row == 'big-x8' else 'calls')}" for row in PEER_ROWS]
            print(f"  {label:32} " + ", ".join(cells))
    for daemon, reason in skipped.items():
        print(f"{daemon} rows skipped: {reason}")
    for key, error in errors.items():
        print(f"row {key} failed (in some round): {error}")
    print(f"{rounds} round(s) of {seconds:g} s per row in {slices} window(s) taken in turn with its limit's and floors'"
          f" (after {warmup:g} s warm-up, {warmup / 4:g} s before each later window); rates: best of rounds; a target is judged on the"
          f" median of the rounds' paired ratios; setup {setup:.1f} s, total {time.perf_counter() - started:.0f} s")
    print()
    from _report import emit_json

    emit_json(
        {
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "rounds": rounds,
            "seconds_per_row": seconds,
            "slices_per_row": slices,
            "bus_call_route": route,
            "limit_codec": "raw length-prefixed CBOR: minibus's 10-byte frame header, cbor2.dumps/loads, no profile check",
            "table": table,
            "best": best,
            "rounds_values": values,
            "by_round": by_round,
            "paired_ratios": paired,
            "judged_on": "ratio_to_limit_median: the median of the rounds' paired ratios (minibus / its limit, measured back to back)",
            "skipped": skipped,
            "errors": errors,
        },
        args.json,
    )


# ------------------------------------------------------------------------------------------
# --budget: the per-hop budget of the relayed call at 1 in flight
# ------------------------------------------------------------------------------------------


def cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def user_system(pid: int) -> tuple[int, int]:
    """The process's user and system CPU time, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def parse_strace(text: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0].replace(".", "").isdigit() or parts[-1] == "total":
            continue
        try:
            calls = int(parts[3])
        except ValueError:
            continue
        errors = int(parts[4]) if len(parts) == 6 else 0
        out[parts[-1]] = {"calls": calls, "errors": errors}
    return out


CATEGORIES = (
    ("trio", "/trio/"),
    ("cbor2", "cbor2"),
    ("bus/wire/frames.py", "bus/wire/frames.py"),
    ("bus/wire (other)", "bus/wire/"),
    ("bus/io", "bus/io/"),
    ("bus/broker.py + bus/core", ("bus/broker.py", "bus/core/")),
    ("clients/rpc.py", "clients/rpc.py"),
    ("clients/channels.py", "clients/channels.py"),
    ("clients/bus.py", "clients/bus.py"),
    ("benchmark loop", "benchmarks/"),
)


def categorise(filename: str, func: str) -> str:
    if filename == "~":  # builtins: name them by what they are
        if ("coroutine" in func or "generator" in func) and "send" in func:
            return "trio"  # stepping a task
        if "select.epoll" in func:
            return "trio"
        if "_socket" in func or "posix.read" in func or "posix.write" in func:
            return "socket calls"
        if "cbor2" in func or "_cbor2" in func:
            return "cbor2"
        return "builtins"
    for label, needle in CATEGORIES:
        needles = needle if isinstance(needle, tuple) else (needle,)
        if any(n in filename for n in needles):
            return label
    return "stdlib/other"


NOTABLE = {
    "task steps": lambda f, fn: f == "~" and ("send' of 'coroutine" in fn or "send' of 'generator" in fn),
    "epoll waits": lambda f, fn: f == "~" and "poll' of 'select.epoll" in fn,
    "check_cbor": lambda f, fn: f.endswith("frames.py") and fn == "check_cbor",
    "cbor2 loads": lambda f, fn: f == "~" and "loads" in fn and "cbor2" in fn,
    "cbor2 dumps": lambda f, fn: f == "~" and "dumps" in fn and "cbor2" in fn,
    "encode_control": lambda f, fn: f.endswith("frames.py") and fn == "encode_control",
    "FrameDecoder.next_frame": lambda f, fn: f.endswith("frames.py") and fn == "next_frame",
    "Event.set": lambda f, fn: "trio" in f and fn == "set",
    "trio checkpoints": lambda f, fn: "trio" in f and fn in ("checkpoint", "cancel_shielded_checkpoint", "checkpoint_if_cancelled"),
}


def profile_summary(path: Path, calls: int) -> dict[str, Any]:
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    by_category: dict[str, float] = {}
    notable: dict[str, float] = {}
    rows = []
    for (filename, _line, func), (_cc, nc, tt, _ct, _callers) in stats.items():
        by_category[categorise(filename, func)] = by_category.get(categorise(filename, func), 0.0) + tt
        for label, match in NOTABLE.items():
            if match(filename, func):
                notable[label] = notable.get(label, 0) + nc / calls
        short = filename.split("site-packages/")[-1].split("/work/main/")[-1] if filename != "~" else ""
        rows.append((tt, f"{short}:{func}" if short else func, nc / calls))
    rows.sort(reverse=True)
    return {
        "profiled_us_per_call": total / calls * 1e6,
        # Function calls (Python and built-in) per call: unlike time, the same in every run.
        "function_calls_per_call": sum(v[1] for v in stats.values()) / calls,
        "share_by_category": {k: v / total for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_functions": [{"function": name, "share": tt / total, "calls_per_call": per} for tt, name, per in rows[:12]],
        "counts_per_call": notable,
    }


BUDGET_ROWS: dict[str, tuple[str, dict[str, str | None]]] = {
    # minibus row: (the limit row it is held against, that limit's process for each hop)
    "mb-relay-x1": ("limit3-x1", {"caller": "limit caller", "busd": "limit forwarder", "service": "limit server"}),
    "mb-relay-x32": ("limit3-x32", {"caller": "limit caller", "busd": "limit forwarder", "service": "limit server"}),
    "mb-fd-x1": ("limit2-x1", {"caller": "limit caller", "busd": None, "service": "limit server"}),
    "mb-fd-big-x8": ("bulk-raw", {"caller": "limit caller", "busd": None, "service": "limit server"}),
    "mb-relay-big-x8": ("bulk-3p", {"caller": "limit caller", "busd": "limit forwarder", "service": "limit server"}),
    # the floor of mb-relay-big-x8 without RPC: 1 MiB writes on a plain relayed channel
    "mb-relay-bulk": ("bulk-3p", {"caller": "limit caller", "busd": "limit forwarder", "service": "limit server"}),
    # a connect: the client (open_bus entered and left) and busd, against a bare shs1 client and server
    "mb-connect": ("bare-shs", {"caller": "limit caller", "busd": "bare shs1 server", "service": None}),
}


#: The processes of the limits a --budget row may be held against with --budget-limit: the
#: 2-process ones ("limit2...") or the 3-process ones ("limit3...").
BUDGET_TOPOLOGY = {"mb-fd-x1": "2", "mb-relay-x1": "3", "mb-relay-x32": "3"}


def window(ask: Callable[[dict[str, Any]], dict[str, Any]], row: str, procs: dict[str, Proc], seconds: float) -> dict[str, Any]:
    """One measuring window: the row's rate, and each process's CPU time and context switches per call."""
    cpu0 = {k: cpu_ns(p.pid) for k, p in procs.items()}
    sw0 = {k: switches(p.pid) for k, p in procs.items()}
    us0 = {k: user_system(p.pid) for k, p in procs.items()}
    answer = ask({"row": row, "seconds": seconds, "warmup": 0.0})
    us1 = {k: user_system(p.pid) for k, p in procs.items()}
    if "error" in answer:
        raise RuntimeError(f"{row}: {answer['error']}")
    calls = answer["calls"] if "calls" in answer else answer["bytes"] / BIG  # bulk: per MiB
    return {
        "calls": calls,
        "per_s": calls / answer["elapsed"],
        "wall_us_per_call": answer["elapsed"] / calls * 1e6,
        "cpu_us_per_call": {k: (cpu_ns(p.pid) - cpu0[k]) / calls / 1000 for k, p in procs.items()},
        "context_switches_per_call": {k: (switches(p.pid) - sw0[k]) / calls for k, p in procs.items()},
        # The share of that CPU time spent in the kernel (from clock ticks: coarse, not exact).
        "system_share": {
            k: (us1[k][1] - us0[k][1]) / max(1, (us1[k][0] - us0[k][0]) + (us1[k][1] - us0[k][1])) for k in procs
        },
    }


def strace_window(ask: Callable[[dict[str, Any]], dict[str, Any]], row: str, procs: dict[str, Proc], seconds: float, tmp: Path) -> dict[str, Any]:
    """The same window with ``strace -c`` attached to every process at once."""
    strace = shutil.which("strace")
    if strace is None:
        return {"skipped": "strace is not installed (apt-get install strace)"}
    tracers = {}
    for k, p in procs.items():
        out = tmp / f"strace-{p.pid}.txt"
        tracers[k] = (subprocess.Popen([strace, "-c", "-f", "-q", "-o", str(out), "-p", str(p.pid)], stderr=subprocess.DEVNULL), out)
    try:
        time.sleep(0.5)  # attached
        answer = ask({"row": row, "seconds": seconds, "warmup": 0.0})
    finally:
        for tracer, _ in tracers.values():
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
    calls = answer["calls"] if "calls" in answer else answer["bytes"] / BIG
    per: dict[str, Any] = {}
    for k, (_, out) in tracers.items():
        counts = parse_strace(out.read_text())
        ranked = sorted(counts.items(), key=lambda kv: -kv[1]["calls"])
        per[k] = {
            "syscalls_per_call": sum(c["calls"] for c in counts.values()) / calls,
            "by_syscall": {name: round(c["calls"] / calls, 2) for name, c in ranked if c["calls"] / calls >= 0.05},
            "failed_per_call": {name: round(c["errors"] / calls, 2) for name, c in ranked if c["errors"] / calls >= 0.05},
        }
    return {"calls": calls, "per_s_traced": calls / answer["elapsed"], "per_process": per}


def run_budget(args: argparse.Namespace) -> None:
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    row = args.budget_row
    limit_row, hops = BUDGET_ROWS[row]
    limit_row = args.budget_limit or limit_row  # (a floor of the row: the limit's processes)
    tmp = Path(tempfile.mkdtemp(prefix="minibus-budget-"))
    profile_dir = tmp / "prof"
    profile_dir.mkdir()
    minibus = limits = None
    result: dict[str, Any] = {"row": row, "limit_row": limit_row, "seconds_per_window": seconds}
    try:
        minibus = Minibus(tmp, profile_dir)
        limits = Limits(tmp, minibus.owner.seed.hex())
        procs = {"caller": minibus.worker, "busd": minibus.busd, "service": minibus.service}
        by_name = {p.name: p for p in limits.procs}
        limit_procs = {hop: by_name[name] for hop, name in hops.items() if name}
        ask = lambda cmd: minibus.worker.ask(cmd, seconds * 3 + ROW_GRACE)  # noqa: E731
        ask_limit = lambda cmd: limits.worker.ask(cmd, seconds * 3 + ROW_GRACE)  # noqa: E731
        ask({"row": row, "seconds": 0.5, "warmup": 0.0})
        ask_limit({"row": limit_row, "seconds": 0.5, "warmup": 0.0})
        # clean windows, minibus and limit alternating, best (least CPU) of two each
        runs = [window(ask, row, procs, seconds), window(ask_limit, limit_row, limit_procs, seconds),
                window(ask, row, procs, seconds), window(ask_limit, limit_row, limit_procs, seconds)]
        result["clean"] = min(runs[0::2], key=lambda r: r["wall_us_per_call"])
        result["limit_clean"] = min(runs[1::2], key=lambda r: r["wall_us_per_call"])
        result["strace"] = strace_window(ask, row, procs, seconds, tmp)
        result["limit_strace"] = strace_window(ask_limit, limit_row, limit_procs, seconds, tmp)
        # cProfile in each minibus process (CPU time, not wall: waiting in epoll is not cost)
        for k in ("busd", "service"):
            os.kill(procs[k].pid, signal.SIGUSR1)
        ask({"profile": "on"})
        time.sleep(0.2)
        answer = ask({"row": row, "seconds": seconds, "warmup": 0.0})
        ask({"profile": "off", "path": str(profile_dir / "caller.prof")})
        for k in ("busd", "service"):
            os.kill(procs[k].pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not all((profile_dir / f"{k}.prof").exists() for k in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        calls = answer["calls"] if "calls" in answer else answer["bytes"] / BIG
        result["profile"] = {"calls": calls, "per_s_profiled": calls / answer["elapsed"],
                             "per_process": {k: profile_summary(profile_dir / f"{k}.prof", calls) for k in procs}}
        if args.keep_profiles:
            keep = Path(args.keep_profiles)
            keep.mkdir(parents=True, exist_ok=True)
            for k in procs:
                shutil.copy(profile_dir / f"{k}.prof", keep / f"{k}.prof")
    finally:
        for part in (limits, minibus):
            if part is not None:
                part.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    clean, lclean = result["clean"], result["limit_clean"]
    unit = "MiB" if "big" in row or "bulk" in row else "call"
    print(f"{row}: minibus {clean['per_s']:,.0f} {unit}/s ({clean['wall_us_per_call']:.0f} us per {unit}, wall); "
          f"limit {limit_row} {lclean['per_s']:,.0f} {unit}/s ({lclean['wall_us_per_call']:.0f} us)")
    st, lst = result["strace"].get("per_process", {}), result["limit_strace"].get("per_process", {})
    print(f"{'hop':8} {'CPU us/' + unit:>13} {'limit':>7} {'kernel':>7} {'limit':>6} {'ctx sw':>7} {'limit':>6} {'syscalls':>9} {'limit':>6}  minibus system calls per {unit}")
    for k in ("caller", "busd", "service"):
        lcpu = lclean["cpu_us_per_call"].get(k)
        lsw = lclean["context_switches_per_call"].get(k)
        sc = st.get(k, {}).get("syscalls_per_call")
        lsc = lst.get(k, {}).get("syscalls_per_call")
        top = ", ".join(f"{n} {v:g}" for n, v in list(st.get(k, {}).get("by_syscall", {}).items())[:6])
        lsys = lclean["system_share"].get(k)
        print(f"{k:8} {clean['cpu_us_per_call'][k]:13.1f} {lcpu if lcpu is not None else float('nan'):7.1f} "
              f"{clean['system_share'][k]:7.0%} {lsys if lsys is not None else float('nan'):6.0%} "
              f"{clean['context_switches_per_call'][k]:7.2f} {lsw if lsw is not None else float('nan'):6.2f} "
              f"{sc if sc is not None else float('nan'):9.1f} {lsc if lsc is not None else float('nan'):6.1f}  {top}")
    for what in ("strace", "limit_strace"):
        if "skipped" in result[what]:
            print(f"system calls: {result[what]['skipped']}")
    if row == "mb-connect":
        print("(a connect: the limit's caller is a bare shs1 client, its busd the bare shs1 server; the service is idle)")
    else:
        print("(busd's hop in the limit is the forwarder; on the unix-fd route busd is idle)")
    print()
    for k in ("caller", "busd", "service"):
        prof = result["profile"]["per_process"][k]
        cpu = clean["cpu_us_per_call"][k]
        print(f"{k}: {cpu:.0f} us CPU per {unit}, {prof['function_calls_per_call']:.1f} function calls per {unit};"
              " by part (profile shares of CPU time applied to it):")
        print("   " + ", ".join(f"{cat} {share * cpu:.1f}" for cat, share in prof["share_by_category"].items() if share >= 0.01))
        print(f"   per {unit}: " + ", ".join(f"{n} {v:.2f}" for n, v in prof["counts_per_call"].items() if v))
        for entry in prof["top_functions"][:10]:
            print(f"     {entry['share'] * 100:5.1f}%  {entry['calls_per_call']:6.2f}/{unit}  {entry['function']}")
    print()
    from _report import emit_json

    emit_json(result, args.json)


# ------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        role, rest = sys.argv[2], sys.argv[4:]  # (sys.argv[3] is "--")
        if role == "busd":
            role_busd(rest[0], rest[1:])
        elif role == "service":
            role_service(*rest)
        elif role == "minibus-worker":
            role_minibus_worker(*rest)
        elif role == "limit-server":
            role_limit_server(*rest)
        elif role == "limit-forward":
            role_limit_forward(*rest)
        elif role == "bare-shs":
            role_bare_shs(*rest)
        elif role == "limit-worker":
            role_limit_worker(*rest)
        elif role == "dbus-service":
            role_dbus_service(*rest)
        elif role == "dbus-worker":
            role_dbus_worker(*rest)
        else:
            raise SystemExit(f"unknown role {role}")
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run, under a minute)")
    parser.add_argument("--rounds", type=int, help="rounds, each a paired ratio per row (default 6; 1 with --quick)")
    parser.add_argument("--seconds", type=float, help="measuring time per row and round (default 0.6 s; 0.3 with --quick)")
    parser.add_argument(
        "--slices", type=int,
        help="windows each row's time in a round is cut into, taken in turn with its limit's and floors' (default 3; 1 with --quick)",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip the D-Bus rows")
    parser.add_argument(
        "--pin", action="store_true",
        help="the callers of minibus and of the limits on one CPU, their other processes on another (the D-Bus peers"
        " unpinned; the table run only, not --budget)",
    )
    parser.add_argument(
        "--only", type=lambda text: text.split(","), metavar="ROW[,ROW]",
        help=f"measure only these table rows, by their minibus row ({', '.join(row[1] for row in TABLE)}), with their limits,"
        " floors and peers (for holding two trees side by side on one row)",
    )
    parser.add_argument("--budget", action="store_true", help="the per-hop budget of one row instead (CPU, system calls, profile)")
    parser.add_argument("--budget-row", default="mb-relay-x1", choices=sorted(BUDGET_ROWS), help="the row --budget looks at")
    parser.add_argument(
        "--budget-limit", choices=LIMIT_PINGPONG_ROWS,
        help="with --budget: hold the row against this limit or floor (of the same topology) instead of its limit",
    )
    parser.add_argument("--keep-profiles", metavar="DIR", help="with --budget: keep each process's cProfile file (pstats) in DIR")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    args = parser.parse_args()
    for name in ("rounds", "slices"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.budget_limit and (
        args.budget_limit[5] != BUDGET_TOPOLOGY.get(args.budget_row)
        or args.budget_limit.rsplit("-", 1)[1] != args.budget_row.rsplit("-", 1)[1]
    ):
        parser.error(f"--budget-limit {args.budget_limit} is not a limit of {args.budget_row}'s topology and calls in flight"
                     f" (the 1- and 32-in-flight rows only: limit2*-x1 for mb-fd-x1, limit3*-x1 or limit3*-x32 for the relayed ones)")
    unknown = [row for row in args.only or [] if row not in {table_row[1] for table_row in TABLE}]
    if unknown:
        parser.error(f"--only: no table row {', '.join(unknown)} (the rows: {', '.join(row[1] for row in TABLE)})")
    if args.pin and args.budget:
        parser.error("--pin is for the table run; --budget measures unpinned")
    if args.budget:
        run_budget(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
