"""The broker: accept loops and one session per connection, wiring BrokerCore to sockets.

Theory of operation
-------------------
:class:`Broker` listens on a Unix socket and/or a TCP socket.  Each accepted connection
becomes a :class:`_Session` running two tasks in its own nursery:

* the **reader** decodes frames and hands control messages to :class:`BrokerCore`;
* the **writer** (a :class:`~bus.io.writer.FrameWriter`) sends whole frames: straight to the
  socket when nothing waits ahead of them, otherwise from the session's outbound queue.

One broker-wide **keepalive** task sweeps the sessions: it pings an idle peer and declares it
dead when it stays silent (one task for all, rather than one sleeping task per connection).

Every message :class:`BrokerCore` produces is handed to its target session's writer with
``send_nowait``.  The queue is bounded (``outbound_queue`` messages, ``outbound_bytes``
bytes); when it is full
the consumer is too slow, and it is disconnected with the reason logged and, when the
writer is between frames, sent to it: nothing is ever dropped silently and no session can
make the broker buffer without bound.

When a session ends for any reason (EOF, broken transport, framing violation, keepalive
timeout, slow consumer, shutdown), ``BrokerCore.disconnect`` runs exactly once and its
notifications go out to the watchers.  A framing violation ends only that connection,
after an error event where the stream still allows one.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .core.activation import ServiceAction
from .core.broker import BrokerCore, ChannelMessage, DropFd, FanOut, Limits, Outgoing, WithFd, bound_text
from .core.channels import CreditExceeded, Direction, RelayChannel
from .core.policy import Policy
from .core.stats import ConnectionIo
from .errors import BusError, FrameError, HandshakeError, HandshakeTimeout, IdentityRefused, QuotaExceeded
from .io.framed import FramedStream
from .io.secure import SecureStream
from .io.systemd import InheritedListener
from .io.writer import FrameWriter
from .supervisor import Supervisor, SupervisorSettings
from .wire.address import Endpoint, default_runtime_dir, format_address
from .wire.files import ensure_private_dir, replace_file
from .wire.frames import CHANNEL_CONTROL_ITEMS, DEFAULT_MAX_CONTROL, DEFAULT_MAX_FRAME, HEADER, HEADER_SIZE, ControlFrame, DataFrame, EventFrames, FrameKind, encode_data
from .wire.identity import Identity, PublicKey
from .wire.shs import DEFAULT_NETWORK_KEY

__all__ = ["BrokerConfig", "Broker", "BrokerAlreadyRunning", "check_settings", "default_runtime_dir"]

log = logging.getLogger("minibus.broker")

#: The send buffer of each end of a unix-fd channel's socketpair (the kernel caps it at
#: net.core.wmem_max): a whole 1 MiB frame fits, so that a bulk transfer takes about one
#: wake-up and one read per MiB at each end instead of five (the default is about 208 KiB).
#: Memory is the kernel's, charged to the sending end's socket; no byte passes through busd.
UNIX_FD_SEND_BUFFER = 1 << 20

#: The largest data frame the broker writes on a relayed channel (bigger ones are cut), so
#: one frame never comes near a connection's ``outbound_bytes``.
RELAY_FRAME = 64 * 1024
_DATA_HEADER = HEADER.pack
_DATA = int(FrameKind.DATA)


#: The ends of a session that the peer is told of (an error event, Disconnected), by the
#: start of the session's reason.
_TOLD_WHY = ("slow consumer", "keepalive", "broker shutting down")

#: Seconds of control requests one connection's reader handles before it lets others run.
REQUEST_SLICE = 0.002
#: The bytes of requests the reader takes (checks and decodes) in one run, between two looks
#: at its request slice (a run may end one frame past it): a read holds up to 256 KiB, whose
#: checking alone takes some 100 ms when its bodies are max_control_items tiny items each
#: (about 1.3 ms a body, here); 8 KiB is two such bodies, or a burst's sixty-odd emits.
RUN_BYTES = 8 * 1024
#: Frames on channels (relayed DATA, channel messages) the reader handles from what one read
#: brought before it yields to everyone else: a read holds up to 256 KiB, some 23,000 frames of
#: one byte, which take busd over 100 ms (tiny frames cost it CPU per frame, not per byte);
#: 128 of them take about a millisecond.  (A frame that came alone never counts: the reader
#: waits for the next read anyway.)
CHANNEL_SLICE = 128
#: Relayed frames smaller than this that come several in one read wait in their channel's
#: buffer until the read is handled, joined, and go on as one frame per channel and direction
#: (see Broker.channel_data): a frame's header and busd's and the receiver's work per frame
#: are then paid once a burst, not once a byte.
JOIN_BELOW = 4096
#: Channel notices waiting for room in one connection's queue at most (see
#: _Session.enqueue_notice): far more than the channels any connection holds at once.
NOTICES_WAITING = 16 * 1024
#: Connections torn down at the same time when many end at once.
TEARDOWNS_AT_ONCE = 32
#: Socket ends (unix-fd channel requests) queued for one connection before it counts as full.
QUEUED_FDS_PER_CONNECTION = 16


class BrokerAlreadyRunning(RuntimeError):
    """Another broker answers on the Unix socket path."""


@dataclass
class BrokerConfig:
    identity: Identity
    policy: Policy
    unix_path: Path | None = None
    tcp: tuple[str, int] | None = ("127.0.0.1", 7420)
    runtime_dir: Path = field(default_factory=default_runtime_dir)
    network_key: bytes = DEFAULT_NETWORK_KEY
    limits: Limits = field(default_factory=Limits)
    encrypt_unix: bool = False
    max_frame: int = DEFAULT_MAX_FRAME
    max_control: int = DEFAULT_MAX_CONTROL
    #: Data items (keys, values, container heads) one CONTROL frame from a peer may hold:
    #: checking them costs Python time per item, so this bounds the CPU a message can cost.
    max_control_items: int = 4096
    #: Seconds a connection has to complete shs1 (the pre-auth deadline).
    handshake_timeout: float = 3.0
    #: Connections still in the handshake, per listener (Unix, TCP) and per source (a TCP
    #: peer's IP address, a Unix peer's uid); more are closed at once.
    max_handshakes: int = 128
    max_handshakes_per_source: int = 16
    keepalive_interval: float = 15.0
    keepalive_timeout: float = 45.0
    outbound_queue: int = 1024
    outbound_bytes: int = 1 << 20
    close_timeout: float = 2.0
    channel_timeout: float = 5.0  # how long a channel's target may take to answer
    #: Where busd serves Prometheus metrics (``--metrics HOST:PORT``; None: nowhere), and the
    #: endpoint's limits: a scraper connection's lifetime in seconds, scrapers served at once,
    #: and the largest request head in bytes (see bus/metrics.py).
    metrics: tuple[str, int] | None = None
    metrics_timeout: float = 10.0
    metrics_scrapers: int = 4
    metrics_request_bytes: int = 8192
    write_address_file: bool = True
    #: Directories of service files (installed plugins), each with whether it was asked for
    #: explicitly (a missing default one is no error); see docs/activation.md.
    service_dirs: list[tuple[Path, bool]] = field(default_factory=list)
    #: The soft open-file limit plugins get (busd raises its own for its connections, and a
    #: child would inherit that; most programs expect the usual 1,024).  None: leave it.
    plugin_nofile: int | None = None
    #: Seconds an activated plugin has to take its name (held openings wait that long).
    activation_timeout: float = 8.0
    #: Restart backoff: the first delay, doubling up to the max; back to the first once a
    #: process ran ``restart_reset`` seconds.
    restart_delay: float = 0.5
    restart_delay_max: float = 30.0
    restart_reset: float = 60.0
    #: More restarts than this within ``crash_loop_window`` seconds: stopped, marked failed.
    crash_loop_restarts: int = 5
    crash_loop_window: float = 60.0
    #: Listening sockets systemd passed (socket activation): busd binds no socket of its own
    #: for a kind (unix, tcp) it received, and never removes an inherited socket's path (nor,
    #: when it received a Unix socket, the address file beside it).
    inherited: list[InheritedListener] = field(default_factory=list)

    @property
    def socket_path(self) -> Path | None:
        """The Unix socket served: the first one systemd passed, else ``unix_path``."""
        inherited = [Path(a.path) for a in self.inherited if a.path is not None]
        return inherited[0] if inherited else self.unix_path

    @property
    def address_file(self) -> Path:
        socket_path = self.socket_path
        base = socket_path.parent if socket_path is not None else self.runtime_dir
        return base / "address"


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "?"


_UCRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


def _peercred(stream: trio.SocketStream) -> tuple[int | None, int | None]:
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None, None
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


class _Session:
    def __init__(
        self, broker: Broker, conn_id: int, framed: FramedStream, key: PublicKey, transport: str, cancel_scope: trio.CancelScope
    ) -> None:
        self.broker = broker
        self.conn_id = conn_id
        self.framed = framed
        self.key = key
        self.transport = transport
        cfg = broker.config
        assert isinstance(framed.stream, SecureStream)
        self.out = FrameWriter(framed.stream, max_frames=cfg.outbound_queue, on_sent=self._on_sent)
        # The session's scope (the one its handshake ran in: see Broker._handle); ending the
        # session cancels it, a slow consumer gives it a deadline.
        self.cancel_scope = cancel_scope
        # The writer task, once one was needed (see run_when_needed).
        self._writer_scope: trio.CancelScope | None = None
        self._writer_done: trio.Event | None = None
        self.reason = "connection closed"
        # When a frame was last seen from the peer, as the keepalive sweep tells it: the sweep
        # stamps the time when ``messages_in`` moved since its last pass (``messages_seen``),
        # so the reader reads no clock per frame.  It is late by at most one sweep period
        # (a quarter of keepalive_interval and keepalive_timeout at most).
        self.last_received = trio.current_time()
        self.messages_seen = 0
        # Relayed channels waiting for room in this connection's queue to carry more data
        # (a set made when one first has to wait).
        self.blocked: set[int] | None = None
        # Channel notices (a channel's starting credit, closed, eof, reset: what others' doings
        # make busd tell this connection about its channels) waiting, in order, for the room
        # relayed data needs (see enqueue_notice; a deque made when one first has to wait).
        self.notices: collections.deque[bytes] | None = None
        self.holds_teardown = False  # one of the broker's teardown turns (see run)
        self.last_ping = -1e9  # when the keepalive sweep last pinged it
        # Events queued for this connection, by the identity that emitted them (each has a
        # fair share of the queue): bytes held per identity, and (identity, end, size) per
        # run of events not written yet, where ``end`` is ``bytes_out`` up to its end.  A run
        # is one identity's events queued in one burst (see Broker.corking), written by the
        # same uncork: one mark for the run, released once all of it is written.
        self.event_held: dict[str, int] = {}
        # (made when first needed: an idle connection keeps no deque)
        self.event_marks: collections.deque[tuple[str, int, int]] | None = None
        self.event_marks_burst = -1  # the burst the last mark was made in (Broker.bursts)
        # Traffic, for the operators' figures (bytes in are counted by ``framed``); bytes_out
        # counts every frame the writer took, ever (the event shares above use it too).
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_out = 0

    def io(self) -> ConnectionIo:
        """This connection's traffic and queue, as ``stats`` and ``/metrics`` show them."""
        out = self.out
        return ConnectionIo(
            self.framed.bytes_received, self.bytes_out, self.messages_in, self.messages_out, out.queued_bytes, len(out)
        )

    @property
    def queued_bytes(self) -> int:
        return self.out.queued_bytes

    @property
    def stop_writing(self) -> bool:
        """Being disconnected as a slow consumer: nothing more is queued or written."""
        return self.out.stopped

    def _on_sent(self) -> None:
        if self.event_marks:
            written = self.bytes_out - self.out.queued_bytes
            marks, held = self.event_marks, self.event_held
            while marks and marks[0][1] <= written:
                payer, _, size = marks.popleft()
                left = held[payer] - size
                if left > 0:
                    held[payer] = left
                else:
                    del held[payer]
        if (self.blocked or self.notices or self.conn_id in self.broker.core.pumping) and self.has_relay_room():
            self.broker.unblock(self)

    def has_relay_room(self) -> bool:
        """Whether relayed bytes may be queued for this connection now: while its queue holds
        under half its bytes and half its frames (as for events, ``_room_for_event``), so that
        a sender of many small frames cannot fill it with frames until it is cut as a slow
        consumer for a few KiB it had granted a window for; the rest waits in the channel's
        buffer, joined, charged to the channel's credit."""
        out = self.out
        return out.queued_bytes <= self.broker.relay_threshold and len(out) < out.max_frames // 2

    # -- outbound ----------------------------------------------------------------------------

    def enqueue(self, message: dict[str, Any]) -> None:
        self.enqueue_encoded(self.framed.encode_message(message))

    def enqueue_encoded(self, data: bytes) -> bool:
        """Queue a frame; a full queue disconnects this (slow) consumer, never drops.  Returns
        whether the writer took it."""
        out = self.out
        if out.stopped:
            return False  # already being disconnected; it will be told why
        size = len(data)
        broker = self.broker
        if out.queued_bytes + size > broker.config.outbound_bytes:
            self.overflow()
            return False
        if broker.corking and not out.corked:
            out.cork()
            broker.corked.append(self)
        try:
            out.send_nowait(data)
        except trio.WouldBlock:
            self.overflow()
            return False
        except trio.ClosedResourceError:
            return False  # the session is already ending
        self.messages_out += 1
        self.bytes_out += size
        return True

    def enqueue_notice(self, data: bytes) -> None:
        """Queue a channel notice (a CONTROL frame on one of this connection's channels):
        now while the queue has the room relayed data needs and no notice waits, else behind
        the notices that wait, until it has (:meth:`flush_notices`).  Others cause them (a
        peer closing or resetting the channels it holds to this connection, or leaving with
        them), so they must not be what fills the queue until this connection is cut as a
        slow consumer: like relayed data, they stop at half of it.  What waits is bounded by
        the channels: each end gets at most its starting credit, one ``closed``, one ``eof``
        and one ``reset``, and a new channel needs this connection to read (its acceptance
        for a target, an ``open_channel`` for an opener) -- past NOTICES_WAITING (a bound
        no sequence of channels reaches without that) it is cut as a slow consumer anyway."""
        if self.out.stopped:
            return  # (being cut already: nothing more is queued for it)
        notices = self.notices
        if notices is None:
            if self.has_relay_room():
                self.enqueue_encoded(data)
                return
            self.notices = notices = collections.deque()
        if len(notices) >= NOTICES_WAITING:
            self.overflow()
            return
        notices.append(data)

    def flush_notices(self) -> None:
        """Queue the notices that waited, in order, while the queue has room for them.  Each
        leaves the list before it is queued: queuing may write, and a write that empties the
        queue calls this again (``_on_sent``), which goes on with the next."""
        notices = self.notices
        if notices is None:
            return
        while notices and self.has_relay_room() and not self.out.stopped:
            self.enqueue_encoded(notices.popleft())
        if not notices and self.notices is notices:
            self.notices = None

    def enqueue_event(self, data: bytes, payer: str) -> None:
        """Queue an event ``payer`` emitted; until written, it counts against payer's share
        (:meth:`Broker.queue_event`, for this session alone)."""
        self.broker.queue_event((self,), data, payer)

    def enqueue_with_fd(self, data: bytes, end: socket.socket) -> None:
        """Queue a frame that carries a socket end (it is closed here once sent or dropped)."""
        if self.stop_writing or self.out.queued_bytes + len(data) > self.broker.config.outbound_bytes:
            end.close()
            if not self.stop_writing:
                self.overflow()
            return
        try:
            self.out.send_with_fd(data, end)  # closes ``end`` when it cannot take it
        except trio.WouldBlock:
            self.overflow()
        except trio.ClosedResourceError:
            pass
        else:
            self.messages_out += 1
            self.bytes_out += len(data)

    def overflow(self) -> None:
        """The slow-consumer policy: stop at the next frame boundary, say why, disconnect.

        The writer gets ``close_timeout`` to finish the frame it is in; then the session
        ends regardless (and the reason can only be logged).
        """
        cfg = self.broker.config
        self.reason = (
            f"slow consumer: {len(self.out)} messages "
            f"({self.out.queued_bytes} bytes) were waiting to be sent"
        )
        self.out.stop()
        self.broker.core.stats.slow_consumer_disconnects += 1
        self.cancel_scope.deadline = min(self.cancel_scope.deadline, trio.current_time() + cfg.close_timeout)
        log.warning("connection :%d (%s): %s", self.conn_id, self.key, self.reason)

    def end(self, reason: str) -> None:
        if not self.cancel_scope.cancel_called:
            self.reason = reason
            self.cancel_scope.cancel()

    def _start_writer(self) -> None:
        nursery = self.broker._nursery
        assert nursery is not None  # (sessions run while the broker serves)
        self._writer_scope = trio.CancelScope()
        self._writer_done = trio.Event()
        nursery.start_soon(self._writer_task)

    async def _writer_task(self) -> None:
        assert self._writer_scope is not None and self._writer_done is not None
        try:
            with self._writer_scope:
                await self.writer()
        except Exception:
            # A bug met by one connection ends that connection, never the broker.
            log.exception("connection :%d (%s): its writer hit an internal error", self.conn_id, self.key)
            self.end("internal error (logged)")
        finally:
            self._writer_done.set()

    async def _end_writer(self) -> None:
        """Wait for the writer task, if one was started, to end (the writer is closed: one
        inside a write is cancelled, one waiting for frames returns)."""
        done = self._writer_done
        if done is None or done.is_set():
            return
        assert self._writer_scope is not None
        if self.out.mid_frame:
            self._writer_scope.cancel()
        with trio.CancelScope(shield=True):
            await done.wait()

    async def writer(self) -> None:
        try:
            await self.out.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.end(f"transport broken while sending: {exc}")
        else:
            if not self.out.closed:  # (closed: the session is ending already, see below)
                self.cancel_scope.cancel()  # stopped at a frame boundary: run() says why

    # -- inbound -----------------------------------------------------------------------------

    async def reader(self) -> None:
        broker = self.broker
        core = broker.core
        framed = self.framed
        # Relayed bytes come as views of the reads: channel_data copies only what it keeps
        # (the buffer of a direction) and writes the rest on at once, in one copy.
        framed.data_views = True
        # A DATA frame's bytes go on as they come, read by read (a frame that straddles two
        # reads goes on as two: the channel's bytes are the same), never joined here: busd
        # holds no part of a frame waiting for the rest, and copies none to join it.
        framed.partial_data = True
        # A frame that came alone in its read is relayed from the read itself, if it can go
        # straight on (see _relay_alone); anything else comes out of read_frame as ever.
        framed.lone_data = self._relay_alone
        conn_id = self.conn_id
        take = framed.take_control_messages
        clock = time.perf_counter
        busy = 0.0  # seconds spent on control requests since this reader last yielded
        sliced = 0  # frames on channels handled from buffered bytes since it last yielded
        # Whether a whole frame may be buffered: 0 once the decoder said it holds no byte
        # after the last frame (it came alone): the next one needs a read, without asking.
        # (Only this task takes frames, and taking them leaves fewer: a 0 stays true.)
        more = 1
        try:
            while True:
                frame = framed.receive_frame_nowait() if more else None
                if frame is None:
                    # What this read's frames queued for others goes out now, one write per
                    # connection (see Broker.corking), before this task waits.
                    if broker.corking:
                        broker.uncork()
                    sliced = 0
                    frame = await framed.read_frame()
                    if frame is None:
                        self.reason = "peer closed the connection"
                        return
                self.messages_in += 1
                if broker.corking:
                    more = 1
                else:
                    more = framed.buffered
                    if more:
                        # More frames came with this one: what they send is written per burst.
                        # (A frame that came alone is written at once: nothing to join it with.)
                        broker.corking = True
                if type(frame) is DataFrame:  # (the relay's frames first: one test each)
                    broker.channel_data(self, frame.channel, frame.data)
                    if more:
                        sliced += 1
                elif frame.channel == 0:
                    assert type(frame) is ControlFrame
                    # Requests cost the broker CPU: one read full of them (a pipelining peer) is
                    # handled in slices of at most REQUEST_SLICE seconds, yielding to everyone
                    # else between them.
                    started = clock()
                    broker.dispatch(core.receive(conn_id, frame.message))
                    # The requests that came next in this read (a burst of emits), taken a part
                    # of at most RUN_BYTES at a time rather than a frame each; each is handled,
                    # in order, just as if it had come through receive_frame_nowait (one that
                    # does not check is left there, and refused by it, after those before it
                    # were handled).  All the parts of the read are taken here, in this block:
                    # an event run held back (see _EventRun) goes on from one part to the next.
                    run = take(max_bytes=RUN_BYTES) if framed.buffered else None
                    while run:
                        self.messages_in += len(run)
                        for message in run:
                            if busy + (clock() - started) >= REQUEST_SLICE:
                                busy = 0.0
                                broker.uncork()
                                await trio.lowlevel.checkpoint()
                                broker.corking = True  # (the rest of the run is still one burst)
                                started = clock()
                            broker.dispatch(core.receive(conn_id, message))
                        run = take(max_bytes=RUN_BYTES) if framed.buffered else None
                    if broker._event_run is not None:
                        broker.end_event_run()  # (before anything else this read sends)
                    busy += clock() - started
                    if busy >= REQUEST_SLICE:
                        busy = 0.0
                        broker.uncork()
                        await trio.lowlevel.checkpoint()
                else:
                    assert type(frame) is ControlFrame
                    broker.channel_control(self, frame.channel, frame.message)
                    if more:
                        sliced += 1
                if sliced >= CHANNEL_SLICE:  # (a read full of tiny frames on channels: in slices)
                    sliced = 0
                    broker.uncork()
                    await trio.lowlevel.checkpoint()
        finally:
            framed.lone_data = None  # (a bound method of this session: no cycle left behind)
            if broker.corking:
                broker.uncork()

    def _relay_alone(self, channel: int, frame: bytes) -> bool:
        """A DATA frame on ``channel`` that came alone in its read (``frame``, its header and
        body; see FramedStream.lone_data): passed on now, and True, when it can go straight
        on -- what Broker.channel_data does for it, in one step: its relay is open, nothing
        waits ahead of it in its direction or in the receiver's queue, the sender's credit
        and the receiver's window cover it.  Else False, with nothing done: the reader takes
        it the usual way (channel_data), which buffers, refuses or drops it as ever."""
        broker = self.broker
        half = (self.conn_id, channel)
        relay = broker.core.channels.by_half.get(half)
        if relay is None:
            return False
        if half == relay.a:
            direction, dst = relay.a_to_b, relay.b
        else:
            direction, dst = relay.b_to_a, relay.a
        dst_session = broker.sessions.get(dst[0])
        size = len(frame) - HEADER_SIZE
        if dst_session is None or dst_session.out.queued_bytes or size > RELAY_FRAME or not direction.forward(size):
            return False
        self.messages_in += 1
        dst_session.enqueue_encoded(_DATA_HEADER(_DATA, 0, dst[1], size) + memoryview(frame)[HEADER_SIZE:])
        if direction.credit_due >= direction.cap >> 1:  # (else _return_credit has nothing to send)
            broker._return_credit(relay, direction, self, channel)
        return True

    # -- the whole session ---------------------------------------------------------------------

    async def serve(self) -> dict[str, Any] | None:
        """The session's part within its cancel scope (the caller has entered it: the scope
        the handshake ran in, see Broker._handle): the reader, then the teardown turn.
        Returns the error event that says why, where one is owed (a framing violation).
        Then the caller leaves the scope and calls :meth:`finish`."""
        error_event: dict[str, Any] | None = None
        # The writer task starts when a frame first has to wait (most go straight to the
        # socket; a short-lived connection may never need the task).  It runs in the broker's
        # nursery, so a session opens no nursery of its own, and the session waits for it to
        # end (finish, close_writer) before it ends itself.
        self.out.run_when_needed(self._start_writer)
        try:
            await self.reader()
        except FrameError as exc:
            self.reason = f"framing violation: {exc}"
            error_event = {"event": "error", "code": exc.wire_code, "message": str(exc)}
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.reason = f"transport broken: {exc}"
        # Connections that end on their own take turns to be torn down, so a crowd closing at
        # once is spread over many scheduler passes and everyone else is served in between
        # (the turn is given back once the socket is closed: Broker._handle).  While nobody
        # holds a turn, one that ends is torn down at once, without a turn or a wait: at most
        # TEARDOWNS_AT_ONCE of those between two waits for a turn, and none while a crowd
        # takes turns (see Broker.quick_teardowns).
        broker = self.broker
        if broker.quick_teardowns < TEARDOWNS_AT_ONCE and not broker.teardown.borrowed_tokens:
            broker.quick_teardowns += 1
        else:
            await broker.teardown.acquire_on_behalf_of(self)
            self.holds_teardown = True
            broker.quick_teardowns = 0  # (a scheduler pass went by since those)
        return error_event

    @property
    def finish_waits(self) -> bool:
        """Whether :meth:`finish` may wait (else closing the writer is all it does)."""
        return self._writer_done is not None or self.reason.startswith(_TOLD_WHY)

    async def finish(self, error_event: dict[str, Any] | None) -> None:
        """After :meth:`serve`, outside the session's scope: the writer task (if one was
        needed) ends, and why the session ended is said to the peer where it can be."""
        # What is queued is dropped either way; a writer waiting for frames then returns at
        # once instead of ending by cancellation (which costs trio more per connection); one
        # inside a write is cancelled.
        self.out.close()
        await self._end_writer()
        # Say why, where the stream can still carry a whole frame, within a deadline.
        if error_event is None and self.reason.startswith(_TOLD_WHY):
            error_event = {"event": "error", "code": "minibus.Error.Disconnected", "message": self.reason}
        if error_event is not None and not self.out.mid_frame:
            with trio.move_on_after(self.broker.config.close_timeout):
                try:
                    await self.framed.send_message(error_event)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    @property
    def writer_started(self) -> bool:
        """Whether a writer task was started (see run_when_needed)."""
        return self._writer_done is not None

    async def close_writer(self) -> None:
        """However the session ended (also when the broker itself is cancelled, or an error of
        ours in the reader): socket ends still queued will never be sent and are closed, and
        a writer task still running is cancelled and waited for (it never outlives the
        connection's release).  No checkpoint when no writer task runs."""
        self.out.close()
        done = self._writer_done
        if done is not None and not done.is_set():
            assert self._writer_scope is not None
            self._writer_scope.cancel()
            with trio.CancelScope(shield=True):
                await done.wait()


def check_settings(config: BrokerConfig) -> None:
    """Refuse sizes that contradict each other (ValueError, one line naming the settings):
    every message the broker builds must fit a control frame and a queue."""
    limits = config.limits
    rules = [
        (config.max_frame >= RELAY_FRAME + 1024, f"max_frame must be at least {RELAY_FRAME + 1024} (a relayed frame and its head)"),
        (config.max_control >= limits.message_bytes + 1024, "max_control must be at least message_bytes + 1024"),
        (limits.message_bytes >= limits.reply_bytes, "message_bytes must be at least reply_bytes"),
        (limits.reply_bytes >= limits.info_bytes + 1024, "reply_bytes must be at least info_bytes + 1024 (one entry per page)"),
        (
            config.outbound_bytes >= max(2 * (RELAY_FRAME + 64), limits.message_bytes + 1024),
            "outbound_bytes must be at least 2 x 65600 (relayed data stops at half of it) and message_bytes + 1024",
        ),
        (
            config.outbound_queue >= 2,
            "outbound_queue must be at least 2 (relayed data and events stop at half of it)",
        ),
        (limits.info_depth <= 16, "info_depth must be at most 16 (events and lists nest it further, up to the CBOR limit of 32)"),
        (limits.event_bytes + 1024 <= limits.message_bytes, "event_bytes must be at most message_bytes - 1024"),
        (limits.relay_bytes_per_identity >= 2 * min(65536, limits.relay_credit), "relay_bytes_per_identity must pay for one relayed channel"),
    ]
    for ok, why in rules:
        if not ok:
            raise ValueError(why)


def _discard_arrived(transport: trio.abc.Stream, limit: int) -> None:
    """Read and drop what the peer sent that has arrived (without waiting; at most about
    ``limit`` bytes), before a connection that will not be served is closed.  A client's hello
    comes right behind msg3 (docs/protocol.md, section 2.6): closed unread, it would make the
    close a reset, which discards what was not sent yet of the error event before it (and, on
    some stacks, what the client had not read yet).  Taken in, the close is a clean end."""
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, trio.socket.SocketType) or sock.fileno() < 0:
        return
    fd = sock.fileno()
    taken = 0
    while taken <= limit:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:  # (nothing more has arrived: BlockingIOError; or the peer is gone)
            return
        if not data:
            return
        taken += len(data)


class _EventRun:
    """Events of one route from one emitter, held back while a reader handles the run of
    requests one read brought, then queued to every receiver in one piece.

    busd asks each receiver of an event whether it has room (Broker._short_of_room), then
    queues the event to each (Broker.queue_event): Python steps per receiver per event.  While
    a reader handles a read's requests, the first event of a route and emitter that every
    receiver has room for starts a run: the same loop that asked also notes the least room any
    receiver has (``headroom``: in its queue and in the emitter's share of it, as
    ``_room_for_event`` reckons them; ``spare``: below ``outbound_bytes``; ``max_count``: for
    frames), and the event is held back.  Each next event of the run is held back too, without
    asking each receiver, while ``size + needed <= headroom`` and ``count < max_count``: every
    receiver, asked with the held events queued one by one before it, would have said it has
    room (held events only add to a queue, and nothing else is queued meanwhile).  An event
    that does not pass, anything else for one of the receivers (or anything that is not for
    one connection), a question about a queue, and the end of the read queue what was held
    first, in order, to each receiver's queue (each frame an entry of it, the same bytes, charged
    to the same emitter, counted as as many messages); after that, events are asked of each receiver as
    ever."""

    __slots__ = ("route", "members", "sessions", "payer", "headroom", "spare", "max_count", "held", "size", "count")

    def __init__(self, route: list[int], sessions: list[_Session], payer: str, headroom: int, spare: int, max_count: int) -> None:
        self.route = route  # (the core's route list: its next event names it by identity)
        self.members: set[int] | None = None  # (the route as a set, made when first needed)
        self.sessions = sessions
        self.payer = payer
        self.headroom = headroom
        self.spare = spare
        self.max_count = max_count
        self.held: list[bytes] = []
        self.size = 0
        self.count = 0

    def member_set(self) -> set[int]:
        members = self.members = set(self.route)
        return members


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        check_settings(config)
        self.config = config
        self.core = BrokerCore(config.policy, config.limits)
        self.core.fd_passing = not config.encrypt_unix
        self.core.encrypt_unix = config.encrypt_unix
        self.sessions: dict[int, _Session] = {}
        #: How many ending connections are torn down at once (see _Session.run).
        self.teardown = trio.CapacityLimiter(TEARDOWNS_AT_ONCE)
        #: Connections torn down without a turn since one last waited for a turn: a lone
        #: connection that ends pays no scheduler pass for its turn, and a crowd that ends
        #: in one pass is still torn down in bounded steps: at most TEARDOWNS_AT_ONCE at once
        #: without a turn, then TEARDOWNS_AT_ONCE holding turns (so at most twice that in a
        #: pass), the rest waiting for turns.
        self.quick_teardowns = 0
        self.core.room_for = self._room_for
        self.core.io_view = self  # per-connection figures for ``stats`` and /metrics
        # Channel requests' deadlines, oldest first: (when, target, request id).
        self._open_deadlines: collections.deque[tuple[float, int, int]] = collections.deque()
        self._deadline_added = trio.Event()
        self._pumping_now = False
        # Connections in the handshake, per listener kind and per (kind, source).
        self._handshaking: dict[str, int] = {}
        self._handshaking_from: dict[tuple[str, str], int] = {}
        # The handshakes in progress per listener kind, oldest first (to drop one when full).
        self._handshake_scopes: dict[str, dict[trio.CancelScope, trio.CancelScope]] = {}
        self._refusals: dict[str, tuple[int, float]] = {}  # limit -> (unlogged count, last logged)
        self.endpoints: list[Endpoint] = []
        self._listeners: list[trio.SocketListener] = []
        self._shutting_down = False
        self._socket_inode: tuple[int, int] | None = None
        self._nursery: trio.Nursery | None = None
        # Socketpair ends waiting for the target's answer (unix-fd route), by (target, request).
        self._kept_ends: dict[tuple[int, int], socket.socket] = {}
        # Relay data is queued for a connection only while its queue holds less than this.
        self.relay_threshold = config.outbound_bytes // 2
        self.core.room_for_event = self._room_for_event
        self.core.short_of_room = self._short_of_room
        #: Set while a reader handles the frames one read brought (when it brought more than
        #: one; what a lone frame sends is written at once): the writers it sends to are
        #: corked (listed in ``corked``) and written once, by :meth:`uncork`, when the reader
        #: has handled them all or yields -- one write per receiving connection per burst
        #: rather than per message.  Readers run one at a time between checkpoints, and each
        #: uncorks before it waits, so the flag is never seen by another task.
        self.corking = False
        self.corked: list[_Session] = []
        #: Relayed directions whose small frames of this burst wait in their buffer, joined,
        #: to go on at :meth:`uncork` (see channel_data), by (channel id, direction a to b).
        self.joining: dict[tuple[int, bool], tuple[RelayChannel, Direction]] = {}
        self.bursts = 0  # bursts ended (uncork calls): tells one burst's events from the next's
        #: Event frames with bytes payloads, their fixed parts kept per emitter and kind.
        self.event_frames = EventFrames()
        #: The events of one route and emitter held back while a reader handles a run of
        #: requests, queued to every receiver at once (see _EventRun).
        self._event_run: _EventRun | None = None
        settings = SupervisorSettings(
            dirs=list(config.service_dirs),
            activation_timeout=config.activation_timeout,
            restart_delay=config.restart_delay,
            restart_delay_max=config.restart_delay_max,
            restart_reset=config.restart_reset,
            crash_loop_restarts=config.crash_loop_restarts,
            crash_loop_window=config.crash_loop_window,
            plugin_nofile=config.plugin_nofile,
        )
        self.supervisor = Supervisor(self.core, self.dispatch, self._plugin_environment, settings)

    @property
    def address(self) -> str:
        return format_address(self.endpoints)

    def _room_for(self, conn_id: int) -> int:
        """Bytes of room for traffic a connection did not ask for (the core's ``room_for``):
        what is left below half its queue, and none while descriptors it has not taken pile up."""
        if self._event_run is not None:
            self.end_event_run()  # (its events count in the queues asked about)
        session = self.sessions.get(conn_id)
        if session is None or session.stop_writing or session.out.queued_fds >= QUEUED_FDS_PER_CONNECTION:
            return 0
        if len(session.out) >= session.out.max_frames // 2:
            return 0  # many small messages: half the queue's frames count as full too
        return self.relay_threshold - session.out.queued_bytes

    def _room_for_event(self, conn_id: int, payer: str) -> int:
        """Room for one more event from identity ``payer`` (the core's ``room_for_event``):
        the connection's room, and no more than payer's fair share of it -- each identity with
        events queued there, and one newcomer, get equal parts of half the queue; so a fast
        emitter fills at most its part, and a slow subscriber misses only the fast one's events."""
        # (``_room_for``, in one step: this runs once per receiver per event)
        if self._event_run is not None:
            self.end_event_run()
        session = self.sessions.get(conn_id)
        if session is None:
            return 0
        out = session.out
        if out.stopped or out.queued_fds >= QUEUED_FDS_PER_CONNECTION or len(out) >= out.max_frames // 2:
            return 0
        room = self.relay_threshold - out.queued_bytes
        if room <= 0:
            return room
        held = session.event_held
        if not held:
            return min(room, self.relay_threshold // 2)
        mine = held.get(payer, 0)
        others = len(held) - (1 if mine else 0)
        return min(room, self.relay_threshold // (others + 2) - mine)

    def _short_of_room(self, conn_ids: list[int], payer: str, needed: int) -> list[int]:
        """Those of ``conn_ids`` with less than ``needed`` bytes of :meth:`_room_for_event`
        for ``payer`` (the core's ``short_of_room``, asked once per emit)."""
        run = self._event_run
        if run is not None:
            # The next event of a run being held back: nobody is short when the receiver with
            # the least room would still have room for it behind the run's events (see
            # _EventRun); else the run is queued and each receiver asked as below.
            if conn_ids is run.route and payer == run.payer and run.size + needed <= run.headroom and run.count < run.max_count:
                return []
            self.end_event_run()
        # (_room_for_event's steps, the same verdicts, for all receivers in one loop: a
        # receiver is short when any of them is, so the common ones -- its share, its room --
        # come first, and a receiver that passes them takes the others in one test)
        sessions = self.sessions
        threshold = self.relay_threshold
        alone = threshold // 2  # (the share of the first identity with events queued there)
        short: list[int] = []
        # With the verdicts, the least room, spare and frames left among the receivers: when
        # nobody is short and a reader is handling the requests one read brought, this event
        # starts a run (see _EventRun), held back until the run ends.
        outbound = self.config.outbound_bytes
        headroom, spare, frames = threshold, outbound, threshold  # (frames: fewer than bytes, surely)
        receivers: list[_Session] = []
        for conn_id in conn_ids:
            session = sessions.get(conn_id)
            if session is None:
                short.append(conn_id)
                continue
            held = session.event_held
            if held:
                mine = held.get(payer, 0)
                share = threshold // (len(held) + (1 if mine else 2)) - mine
            else:
                share = alone
            out = session.out
            queued = out.queued_bytes
            room = threshold - queued
            if share < room:
                room = share
            left = out.max_frames // 2 - len(out)
            if room < needed or left <= 0 or out.stopped or out.queued_fds >= QUEUED_FDS_PER_CONNECTION:
                short.append(conn_id)
                continue
            if room < headroom:
                headroom = room
            if outbound - queued < spare:
                spare = outbound - queued
            if left < frames:
                frames = left
            receivers.append(session)
        if not short and self.corking:
            self._event_run = _EventRun(conn_ids, receivers, payer, headroom, spare, frames)
        return short

    def uncork(self) -> None:
        """Write what the corked writers queued (see :attr:`corking`)."""
        if self._event_run is not None:
            self.end_event_run()
        if self.joining:
            # The small relayed frames of the burst, joined: one frame per direction (of at
            # most RELAY_FRAME bytes each), where they came as many (see channel_data).
            joining, self.joining = self.joining, {}
            by_half = self.core.channels.by_half
            for relay, direction in joining.values():
                if by_half.get(relay.a) is relay:  # (not reset or closed meanwhile)
                    self.pump(relay, direction)
        self.corking = False
        self.bursts += 1
        corked, self.corked = self.corked, []
        for session in corked:
            session.out.uncork()

    def _plugin_environment(self) -> dict[str, str]:
        """What a launched plugin needs to find this bus (see docs/activation.md)."""
        return {"MINIBUS_ADDRESS": self.address, "MINIBUS_NETWORK_KEY": self.config.network_key.hex()}

    def reload_services(self) -> list[str]:
        """Read the service files again (SIGHUP); returns one line per problem."""
        return self.supervisor.load()

    def connection_io(self, conn_id: int) -> ConnectionIo:
        """A connection's traffic and queue (the core's :class:`~bus.core.stats.IoView`)."""
        if self._event_run is not None:
            self.end_event_run()
        session = self.sessions.get(conn_id)
        return session.io() if session is not None else ConnectionIo()

    def handshakes_in_progress(self) -> dict[str, int]:
        return dict(self._handshaking)

    def _has_room(self, conn_id: int) -> bool:
        return self._room_for(conn_id) > 0

    def _pump_watches(self) -> None:
        """Send the snapshot pages, resyncs and gaps owed to the connections that came to owe
        them since the last look (the core's ``pumping_fresh``), while they have room.  One
        without room now is looked at again when its queue drains (``unblock``), not after
        every message busd handles: a crowd of stuck connections costs others nothing."""
        if self._pumping_now:
            return  # (the loop below takes what is added meanwhile)
        self._pumping_now = True
        try:
            core = self.core
            while core.pumping_fresh:
                fresh, core.pumping_fresh = core.pumping_fresh, set()
                for conn_id in fresh:
                    while conn_id in core.pumping and self._has_room(conn_id):
                        self.dispatch(core.pump_watches(conn_id))
                    if conn_id not in self.sessions:
                        core.pumping.discard(conn_id)
        finally:
            self._pumping_now = False

    def dispatch(self, out: list[Outgoing]) -> None:
        # A message object sent to many connections (a watch event) is encoded once.
        encoded: dict[int, bytes] = {}
        for item in out:
            if isinstance(item, FanOut):
                self._fan_out(item)
                continue
            run = self._event_run
            if run is not None and (type(item) is not tuple or item[0] in (run.members or run.member_set())):
                # What the run held goes first, where this goes to one of its receivers (or
                # anywhere else than one connection): each connection's order is kept.  (An
                # emit's reply to an emitter that is no receiver leaves the run be.)
                self.end_event_run()
            if isinstance(item, ChannelMessage):
                self._channel_message(item)
                continue
            if isinstance(item, (WithFd, DropFd)):
                self._fd_message(item)
                continue
            if isinstance(item, ServiceAction):
                self.supervisor.action(item)
                continue
            conn_id, message = item
            session = self.sessions.get(conn_id)
            if session is None:
                continue
            if message.get("op") == "channel_request":
                self._open_deadline(conn_id, message["id"])
            data = encoded.get(id(message))
            if data is None:
                try:
                    data = encoded[id(message)] = session.framed.encode_message(message)
                except BusError as exc:
                    # Our own message cannot be framed (a bug, or a limit set too low):
                    # that connection cannot be served correctly any more.
                    log.error("cannot encode a message for :%d: %s", conn_id, exc)
                    session.end(f"internal error: a message for this connection could not be sent ({exc})")
                    continue
            session.enqueue_encoded(data)
        if self.core.pumping_fresh and not self._pumping_now:
            if self._event_run is not None:
                self.end_event_run()
            self._pump_watches()

    def _fan_out(self, item: FanOut) -> None:
        """One event to its subscribers: encoded once, each copy charged to the emitter."""
        run = self._event_run
        if run is not None:
            if item.conns is run.route and item.payer == run.payer:
                # (the event _short_of_room just vouched for: held back with the run's)
                data = self._event_frame(item.message, run.sessions)
                if data is None:
                    return
                size = len(data)
                if run.size + size <= run.spare:
                    run.held.append(data)
                    run.size += size
                    run.count += 1
                    return
                self.end_event_run()
                self.queue_event(run.sessions, data, item.payer)  # (each receiver's overflow, as ever)
                return
            self.end_event_run()
        sessions = self.sessions
        receivers = [session for conn_id in item.conns if (session := sessions.get(conn_id)) is not None]
        if not receivers:
            return
        data = self._event_frame(item.message, receivers)
        if data is not None:
            self.queue_event(receivers, data, item.payer)

    def _event_frame(self, message: dict[str, Any], receivers: list[_Session]) -> bytes | None:
        """The frame of an event (or any message for many), encoded once for all receivers."""
        payload = message.get("payload")  # (a FanOut is any message for many: not only an event)
        try:
            if type(payload) is bytes and len(message) == 6 and message.get("event") == "event":
                # (The core's event message, as EventFrames encodes it: what does not change
                # between one emitter's events of a kind is encoded once.)
                data = self.event_frames.encode(
                    message["source"], message["member"], payload, message["sender"], message["identity"], receivers[0].framed.max_control
                )
            else:
                # An event is made of checked frames' values and the broker's own text.
                data = receivers[0].framed.encode_message(message, checked=True)
        except BusError as exc:
            log.error("cannot encode an event: %s", exc)  # the core bounds events: a bug
            return None
        return data

    def end_event_run(self) -> None:
        """Queue the events held back to each receiver, in one piece (see _EventRun)."""
        run = self._event_run
        self._event_run = None
        if run is not None and run.count:
            if run.count == 1:
                self.queue_event(run.sessions, run.held[0], run.payer)
            else:  # (each frame an entry of the queue, as event by event: frames are counted)
                self.queue_event(run.sessions, b"", run.payer, run.count, run.held, run.size)

    def queue_event(
        self, receivers: Iterable[_Session], data: bytes, payer: str, count: int = 1, frames: list[bytes] | None = None, total: int = 0
    ) -> None:
        """Queue one event ``payer`` emitted to each of ``receivers``: until written, each
        copy counts against payer's share (a fair-share mark per identity's run in a burst).
        A receiver whose writer is stopped takes nothing; one whose queue would pass
        ``outbound_bytes``, or whose writer is full, is cut as a slow consumer.  (One loop
        for every receiver: it runs once per delivery.)  With ``frames`` (``total`` bytes):
        ``count`` events at once (an event run's), each frame an entry of the queue."""
        size = len(data) if frames is None else total
        limit = self.config.outbound_bytes
        corking = self.corking  # (only a reader uncorks: the same all through this loop)
        burst = self.bursts
        for session in receivers:
            out = session.out
            if out.stopped:
                continue  # already being disconnected; it will be told why
            if out.queued_bytes + size > limit:
                session.overflow()
                continue
            if corking and not out.corked:
                out.cork()
                self.corked.append(session)
            try:
                if frames is None:
                    out.send_nowait(data)
                else:
                    out.send_frames_nowait(frames, size)
            except trio.WouldBlock:
                session.overflow()
                continue
            except trio.ClosedResourceError:
                continue  # the session is already ending
            session.messages_out += count
            bytes_out = session.bytes_out = session.bytes_out + size
            if out.queued_bytes:  # (else all written at once)
                marks = session.event_marks
                if marks is None:
                    marks = session.event_marks = collections.deque()
                if marks and corking and session.event_marks_burst == burst and marks[-1][0] == payer:
                    # The same identity's run in this burst: one mark, extended to this event.
                    marks[-1] = (payer, bytes_out, marks[-1][2] + size)
                else:
                    marks.append((payer, bytes_out, size))
                    session.event_marks_burst = burst
                held = session.event_held
                held[payer] = held.get(payer, 0) + size

    # -- listening ---------------------------------------------------------------------------

    async def _open_unix(self, path: Path) -> trio.SocketListener:
        # The socket's directory is ours alone (created 0700, or refused: LocalFileError).
        ensure_private_dir(path.parent)
        if path.exists() or path.is_symlink():
            probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await probe.connect(str(path))
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                    raise
                log.info("removing stale socket %s left by a broker that is gone", path)
                path.unlink(missing_ok=True)
            else:
                raise BrokerAlreadyRunning(f"another broker is already listening on {path}")
            finally:
                probe.close()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(socket.SOMAXCONN)
        st = path.stat()
        self._socket_inode = (st.st_dev, st.st_ino)
        return trio.SocketListener(sock)

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, announce the address through ``task_status``, and serve until cancelled."""
        cfg = self.config
        key = cfg.identity.public_key
        inherited_kinds = {adopted.kind for adopted in cfg.inherited}
        try:
            for adopted in sorted(cfg.inherited, key=lambda a: a.kind != "unix"):  # Unix first
                self._listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(adopted.sock)))
                self.endpoints.append(adopted.endpoint(key, encrypt_unix=cfg.encrypt_unix))
            if cfg.unix_path is not None and "unix" not in inherited_kinds:
                self._listeners.insert(0, await self._open_unix(cfg.unix_path))
                self.endpoints.insert(0, Endpoint("unix", key, path=str(cfg.unix_path), encrypted=cfg.encrypt_unix))
            if cfg.tcp is not None and "tcp" not in inherited_kinds:
                host, port = cfg.tcp
                tcp_listeners = await trio.open_tcp_listeners(port, host=host)
                self._listeners += tcp_listeners
                bound = tcp_listeners[0].socket.getsockname()
                self.endpoints.append(Endpoint("tcp", key, host=host, port=bound[1]))
            if not self._listeners:
                raise ValueError("the broker needs at least one of unix_path and tcp")
            if cfg.write_address_file:
                self._write_address_file()
            self.supervisor.load()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for listener in self._listeners:
                    kind = "unix" if listener.socket.family == socket.AF_UNIX else "tcp"
                    nursery.start_soon(self._accept_loop, listener, kind, nursery)
                nursery.start_soon(self._keepalive)
                nursery.start_soon(self._expire_opens)
                await nursery.start(self.supervisor.run)
                task_status.started(self.address)
                log.info("listening: %s", self.address)
        finally:
            self._cleanup_files()
            # Socket ends kept for openings nobody answered before the broker stopped.
            for end in self._kept_ends.values():
                end.close()
            self._kept_ends.clear()

    async def _accept_loop(self, listener: trio.SocketListener, kind: str, nursery: trio.Nursery) -> None:
        """Accept, admit within the handshake caps, and hand each connection its own task.

        Nothing here waits on a peer, so one listener's peers never stall another's.  Over a
        cap, the new socket is closed at once (no byte is read from it); running out of
        descriptors (EMFILE) backs off for a moment instead of spinning."""
        cfg = self.config
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    self._log_refusal("accept", f"accept failed on the {kind} listener: {exc}")
                    await trio.sleep(0.1)
                    continue
                pid, uid = _peercred(stream) if kind == "unix" else (None, None)
                # A Unix peer is its process (every one is the owner's uid: the socket is 0600).
                source = (kind, f"pid {pid}" if kind == "unix" else _peer_host(stream))
                total = self._handshaking.get(kind, 0)
                from_source = self._handshaking_from.get(source, 0)
                if from_source >= cfg.max_handshakes_per_source:
                    stream.socket.close()
                    self.core.stats.refused("max_handshakes_per_source")
                    self._log_refusal(
                        "max_handshakes_per_source",
                        f"refused a {kind} connection from {source[1]}: max_handshakes_per_source reached "
                        f"({from_source} handshakes in progress from this source)"
                    )
                    continue
                in_progress = self._handshake_scopes.setdefault(kind, {})
                if total >= cfg.max_handshakes and in_progress:
                    # Full of handshakes from many sources: the oldest makes room.  An honest
                    # peer finishes in milliseconds, so a flood has to keep replacing the
                    # whole pool that fast to keep it out, not merely hold it.
                    oldest = next(iter(in_progress))
                    in_progress.pop(oldest).cancel()
                    self.core.stats.refused("max_handshakes")
                    self._log_refusal(
                        "max_handshakes", f"dropped the oldest {kind} handshake: max_handshakes reached ({total} in progress)"
                    )
                self._handshaking[kind] = total + 1
                self._handshaking_from[source] = from_source + 1
                # The handshake's one scope: its deadline is handshake_timeout, and cancelling
                # it drops the handshake to make room (above).
                scope = trio.CancelScope(deadline=trio.current_time() + cfg.handshake_timeout)
                in_progress[scope] = scope
                nursery.start_soon(self._handle, stream, kind, pid, uid, source, scope)

    async def _keepalive(self) -> None:
        """Ping connections idle for ``keepalive_interval`` (again each interval while they
        stay idle) and end those silent for ``keepalive_timeout``; one sweep over all sessions
        at most every second, in slices so a large broker stays responsive."""
        cfg = self.config
        period = max(0.01, min(1.0, cfg.keepalive_interval / 4, cfg.keepalive_timeout / 4))
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for i, session in enumerate(list(self.sessions.values())):
                if i and not i % 1000:
                    await trio.lowlevel.checkpoint()
                if session.messages_in != session.messages_seen:  # (something came since the last pass)
                    session.messages_seen = session.messages_in
                    session.last_received = now
                idle = now - session.last_received
                if idle >= cfg.keepalive_timeout:
                    session.end(f"keepalive: nothing received for {cfg.keepalive_timeout:g} s")
                elif (
                    idle >= cfg.keepalive_interval
                    and now - session.last_ping >= cfg.keepalive_interval
                    and session.conn_id in self.core.connections
                ):
                    session.last_ping = now
                    self.dispatch(self.core.ping(session.conn_id))

    def _handshake_done(self, source: tuple[str, str], scope: trio.CancelScope) -> None:
        kind = source[0]
        self._handshake_scopes.get(kind, {}).pop(scope, None)
        self._handshaking[kind] -= 1
        left = self._handshaking_from[source] - 1
        if left:
            self._handshaking_from[source] = left
        else:
            del self._handshaking_from[source]

    def _log_refusal(self, limit: str, message: str) -> None:
        """Log refusals at most once a second per limit, with how many there were since (a
        flood of them must not cost the broker a log line each)."""
        now = trio.current_time()
        count, logged_at = self._refusals.get(limit, (0, -1e9))
        count += 1
        if now - logged_at >= 1.0:
            more = count - 1
            log.warning("%s%s", message, f" (and {more} more in the last second)" if more else "")
            self._refusals[limit] = (0, now)
        else:
            self._refusals[limit] = (count, logged_at)

    def _write_address_file(self) -> None:
        path = self.config.address_file
        ensure_private_dir(path.parent)
        replace_file(path, (self.address + "\n").encode())

    def _cleanup_files(self) -> None:
        cfg = self.config
        if cfg.unix_path is not None and self._socket_inode is not None:
            # Only our own socket: a newer broker may have replaced it already.
            try:
                st = cfg.unix_path.stat()
                if (st.st_dev, st.st_ino) == self._socket_inode:
                    cfg.unix_path.unlink()
            except OSError:
                pass
        # A Unix socket systemd holds outlives busd: the address file keeps pointing at it, so
        # a client's first connection starts busd again (socket activation).
        if cfg.write_address_file and self.endpoints and not any(a.kind == "unix" for a in cfg.inherited):
            try:
                if cfg.address_file.read_text().strip() == self.address:
                    cfg.address_file.unlink()
            except OSError:
                pass

    # -- one connection ------------------------------------------------------------------------

    def _authorize(self, key: PublicKey) -> bool:
        decision = self.config.policy.may_connect(key)
        if not decision.allowed:
            self._log_refusal("connect", f"refused in the handshake: {decision.rule}")
        return decision.allowed

    async def _start_session(
        self, stream: SecureStream, kind: str, pid: int | None, uid: int | None, scope: trio.CancelScope
    ) -> _Session | None:
        """Admit a connection whose handshake is done: its session, or None when its identity
        is over its quota (it is told why)."""
        cfg = self.config
        self.core.stats.handshakes += 1
        peer_key = stream.peer_key
        framed = FramedStream(
            stream,
            max_frame=cfg.max_frame,
            max_control=cfg.max_control,
            receive_stream=stream.plain_transport(),
            max_items=cfg.max_control_items,
            channel_items=min(CHANNEL_CONTROL_ITEMS, cfg.max_control_items),
            # (The first read does not wait for the socket: minibus's client sends its hello
            # right behind msg3, so it is there already.)
        )
        try:
            conn = self.core.connect(peer_key, kind, pid, uid)
        except QuotaExceeded as exc:
            log.info("refused %s: %s", peer_key, exc)
            with trio.move_on_after(cfg.close_timeout):
                try:
                    await framed.send_message({"event": "error", "code": exc.code, "message": exc.message})
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            _discard_arrived(stream.transport, cfg.max_frame)
            return None
        session = _Session(self, conn.id, framed, peer_key, kind, scope)
        self.sessions[conn.id] = session
        log.info("connection :%d (%s) started over %s (pid %s)", conn.id, peer_key, kind, pid)
        return session

    def _end_session(self, session: _Session) -> _Session | None:
        """Release a session however it ended, once its writer task, if one ran, has ended
        (_Session.close_writer): the connection is forgotten (its names pass on).  Returns the
        session if it holds a teardown turn (given back once the socket is closed: see
        _handle)."""
        conn_id = session.conn_id
        self.core.stats.connection_ended(session.io())
        del self.sessions[conn_id]
        try:
            self.dispatch(self.core.disconnect(conn_id))
        except Exception:
            log.exception("cleanup of connection :%d failed", conn_id)
        log.info("connection :%d (%s) ended: %s", conn_id, session.key, session.reason)
        # The writer calls back into the session: break that cycle, so the session's
        # objects are freed as soon as this task ends (by reference counting, not by a
        # full garbage collection, whose pause grows with every live connection).
        session.out.on_sent = None
        return session if session.holds_teardown else None

    async def _handle(
        self,
        transport: trio.SocketStream,
        kind: str,
        pid: int | None,
        uid: int | None,
        source: tuple[str, str],
        scope: trio.CancelScope,
    ) -> None:
        """One connection, in its own task: the handshake (within the handshake scope), the
        session, its release; the socket is closed however it ends.  (One coroutine for all
        of it: each of a connection's waits resumes one frame less.)"""
        cfg = self.config
        holds_turn: _Session | None = None  # a session holding a teardown turn (see _Session.serve)
        stream = SecureStream.server(
            transport,
            cfg.identity,
            network_key=cfg.network_key,
            authorize=self._authorize,
            encrypted=kind == "tcp" or cfg.encrypt_unix,
            handshake_timeout=math.inf,  # (the deadline is the handshake scope's: see _accept_loop)
            direct_handshake=True,
        )
        stream.close_timeout = cfg.close_timeout
        session: _Session | None = None
        error_event: dict[str, Any] | None = None
        try:
            try:
                # One scope for the handshake (its deadline is handshake_timeout, and dropping
                # a handshake for room cancels it: see _accept_loop) and then the session
                # (without a deadline, cancelled to end it): one scope per connection.
                with scope:
                    try:
                        await stream.do_handshake()
                    except HandshakeError as exc:
                        self.core.stats.handshake_error(exc)
                        # (A refused identity was logged by _authorize, rate-limited: not again here.)
                        log.log(logging.DEBUG if isinstance(exc, IdentityRefused) else logging.INFO, "%s handshake failed: %s", kind, exc)
                        return
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        self.core.stats.handshake_failed("lost")
                        log.info("%s connection lost during the handshake: %s", kind, exc)
                        return
                    finally:
                        self._handshake_done(source, scope)
                        # A failed handshake's error keeps its frames, which keep the stream: let
                        # the stream go by reference counting instead of a full garbage collection.
                        stream.forget_failure_frames()
                    if not scope.cancel_called and not self._shutting_down:
                        scope.deadline = math.inf  # (the session's scope from here on)
                        session = await self._start_session(stream, kind, pid, uid, scope)
                        if session is not None:
                            error_event = await session.serve()
                if session is not None:
                    if error_event is not None or session.finish_waits:
                        await session.finish(error_event)
                    else:
                        session.out.close()  # (all finish would do: no coroutine for it)
            except Exception:
                if session is None:
                    raise
                # A bug met by one connection ends that connection, never the broker.
                session.reason = "internal error (logged)"
                log.exception("connection :%d (%s) hit an internal error", session.conn_id, session.key)
            finally:
                if session is not None:
                    try:
                        if session.writer_started:
                            await session.close_writer()
                        else:
                            session.out.close()  # (all close_writer would do)
                    finally:
                        holds_turn = self._end_session(session)
            if session is None and scope.cancel_called:
                # Timed out, or dropped to make room for a newer handshake (not counted when
                # the broker was shutting down: nothing to count then).
                if trio.current_time() >= scope.deadline:
                    timeout = HandshakeTimeout(f"the peer did not complete the handshake within {cfg.handshake_timeout:g} s")
                    self.core.stats.handshake_error(timeout)
                    log.info("%s handshake failed: %s", kind, timeout)
                else:
                    self.core.stats.handshake_failed("dropped")
        finally:
            # Whatever happened (even a cancellation before the handshake began), the
            # socket is closed: a graceful close sends the goodbye within close_timeout.
            # A plain stream has no goodbye to send: closed at once, without a checkpoint.
            # A teardown turn is given back once the socket is closed, or before a graceful
            # close that may wait for the peer (the close_timeout of a box-stream's goodbye).
            try:
                if stream.encrypted or not stream.close_nowait():
                    if holds_turn is not None:
                        self.teardown.release_on_behalf_of(holds_turn)
                        holds_turn = None
                    with trio.CancelScope(shield=True) as closing:
                        if stream.encrypted:
                            closing.deadline = trio.current_time() + cfg.close_timeout
                        await stream.aclose()
                    if closing.cancelled_caught:
                        await trio.aclose_forcefully(stream)
                stream.forget_failure_frames()  # however the connection ended (see there)
            finally:
                if holds_turn is not None:
                    self.teardown.release_on_behalf_of(holds_turn)

    # -- relayed channels ----------------------------------------------------------------------

    def _open_deadline(self, target_id: int, request_id: int) -> None:
        """Remember when a channel request's answer is due (one small record, not a task)."""
        self._open_deadlines.append((trio.current_time() + self.config.channel_timeout, target_id, request_id))
        self._deadline_added.set()

    async def _expire_opens(self) -> None:
        """One task for every channel request's deadline: they come due in the order they
        were made (one ``channel_timeout`` for all); one answered in time is a no-op here."""
        timeout = self.config.channel_timeout
        while True:
            if not self._open_deadlines:
                self._deadline_added = trio.Event()
                await self._deadline_added.wait()
                continue
            due, target_id, request_id = self._open_deadlines[0]
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            self._open_deadlines.popleft()
            self.dispatch(self.core.expire_open(target_id, request_id, timeout))

    def _fd_message(self, item: WithFd | DropFd) -> None:
        """The unix-fd route: make a socketpair, send one end with a frame, keep the other."""
        if isinstance(item, DropFd):
            kept = self._kept_ends.pop(item.key, None)
            if kept is not None:
                kept.close()
            return
        session = self.sessions.get(item.conn)
        if item.create:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            for end in (mine, theirs):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_FD_SEND_BUFFER)
            self._kept_ends[item.key] = theirs
        else:
            maybe = self._kept_ends.pop(item.key, None)
            if maybe is None:
                return
            mine = maybe
        if session is None:
            mine.close()
            if item.create:
                self._kept_ends.pop(item.key).close()
            return
        session.enqueue_with_fd(session.framed.encode_message(item.message), mine)
        if item.create:
            self._open_deadline(item.conn, item.message["id"])

    def _channel_message(self, item: ChannelMessage) -> None:
        session = self.sessions.get(item.conn)
        if session is not None:
            session.enqueue_notice(session.framed.encode_message(item.body, item.channel))

    def channel_data(self, session: _Session, channel: int, data: bytes | memoryview) -> None:
        half = (session.conn_id, channel)
        relay = self.core.channels.by_half.get(half)
        if relay is None or not data:
            if not channel:
                raise FrameError("a DATA frame on the control channel (0)")
            return  # late bytes for a channel just reset or closed, or nothing: dropped by design
        # (relay.outgoing(half) and relay.other(half), without their calls: once per frame)
        if half == relay.a:
            direction, dst = relay.a_to_b, relay.b
        else:
            direction, dst = relay.b_to_a, relay.a
        dst_session = self.sessions.get(dst[0])
        size = len(data)
        # A small frame among others of one read joins them in the direction's buffer, and
        # they go on together at uncork (a sender of a frame a byte would otherwise have busd
        # send its receiver a frame a byte, which costs the receiver CPU per frame, and
        # whoever else it serves too).
        joining = self.corking and size < JOIN_BELOW and dst_session is not None
        if (
            not joining
            and size <= RELAY_FRAME
            and dst_session is not None
            # (dst_session.has_relay_room(), inline: once per frame; an empty queue has room)
            and (
                not (queued := dst_session.out.queued_bytes)
                or (queued <= self.relay_threshold and len(dst_session.out) < dst_session.out.max_frames // 2)
            )
            and direction.forward(size)
        ):
            # Nothing waits ahead and the receiver has room: straight on, no buffering.  (The
            # frame encode_data makes, without its checks: the channel id is the broker's
            # own, and the body came in one frame of this connection, within max_frame.)
            dst_session.enqueue_encoded(_DATA_HEADER(_DATA, 0, dst[1], size) + data)
            if direction.credit_due >= direction.cap >> 1:  # (else _return_credit has nothing to send)
                self._return_credit(relay, direction, session, channel)
            return
        try:
            direction.push(data)
        except CreditExceeded as exc:
            self.reset(relay, f"{session.key} broke the flow control: {exc}")
            return
        if joining:
            self.joining.setdefault((relay.id, direction is relay.a_to_b), (relay, direction))
            return
        self.pump(relay, direction)

    def channel_control(self, session: _Session, channel: int, body: dict[str, Any]) -> None:
        half = (session.conn_id, channel)
        relay = self.core.channels.get(half)
        if relay is None:
            return  # a late message for a channel already gone
        if "credit" in body:
            credit = body["credit"]
            if not isinstance(credit, int) or isinstance(credit, bool) or not 0 < credit <= 1 << 30:
                raise FrameError(f"channel {channel}: credit must be an integer from 1 to 2**30")
            relay.incoming(half).dst_window += credit
            self.pump(relay, relay.incoming(half))
        elif body.get("eof") is True:
            direction = relay.outgoing(half)
            direction.eof_received = True
            self.pump(relay, direction)
        elif body.get("close") is True:
            # The closer reads nothing more: the other side learns at once that its sends
            # are over ("closed"), and reads what the closer sent, then EOF.
            other = relay.other(half)
            backward = relay.incoming(half)
            if backward.discard:
                return  # closed already (a repeated close would tell the other side again)
            backward.clear()
            backward.discard = backward.eof_received = backward.eof_sent = True
            self._channel_message(ChannelMessage(other[0], other[1], {"closed": True}))
            forward = relay.outgoing(half)
            forward.eof_received = forward.close = True
            self.pump(relay, forward)
        elif "reset" in body:
            reason = bound_text(body["reset"], self.core.limits.reason_chars)
            self.reset(relay, f"reset by {session.key}: {reason}", skip=half)
        else:
            raise FrameError(f"channel {channel}: unknown channel message {sorted(body)}")

    def pump(self, relay: RelayChannel, direction: Direction) -> None:
        """Move what the receiver can take into its queue, and credit back to the sender."""
        src = relay.a if direction is relay.a_to_b else relay.b
        dst = relay.other(src)
        dst_session = self.sessions.get(dst[0])
        src_session = self.sessions.get(src[0])
        if dst_session is None:
            return
        while direction.ready():
            if not dst_session.has_relay_room():
                if dst_session.blocked is None:
                    dst_session.blocked = set()
                dst_session.blocked.add(relay.id)
                break
            chunk = direction.take(RELAY_FRAME)
            dst_session.enqueue_encoded(encode_data(dst[1], chunk, self.config.max_frame))
        if src_session is not None:
            self._return_credit(relay, direction, src_session, src[1])
        if direction.eof_received and not direction.buffer:
            # The end of this direction travels behind its data.
            if not direction.eof_sent:
                dst_session.enqueue_notice(dst_session.framed.encode_message({"eof": True}, dst[1]))
                direction.eof_sent = True
            if direction.close:
                self.core.channels.close(relay)  # the closer's data is all delivered

    def _return_credit(self, relay: RelayChannel, direction: Direction, src_session: _Session, channel: int) -> None:
        # Credit goes back in batches of half the cap: no grant per message (it would wake the
        # sender for nothing), and the sender always keeps at least half of it.  A batch
        # coming back means the receiver keeps up: the cap may grow with it.
        if direction.eof_received:
            return  # the sender sends no more
        due = direction.release_credit()
        if due:
            due += self.core.grow_relay(relay, direction)
            src_session.enqueue_encoded(src_session.framed.encode_message({"credit": due}, channel))

    def unblock(self, session: _Session) -> None:
        """The connection's queue has room again: relayed data and watch pages may go on."""
        if self._event_run is not None:
            self.end_event_run()  # (the relays pumped here queue credit to their senders)
        if session.notices:
            session.flush_notices()
        waiting, session.blocked = session.blocked, None
        if waiting:
            for relay in self.core.channels.of_connection(session.conn_id):
                if relay.id in waiting:
                    direction = relay.incoming(relay.a if relay.a[0] == session.conn_id else relay.b)
                    self.pump(relay, direction)
        if session.conn_id in self.core.pumping:
            self.core.pumping_fresh.add(session.conn_id)  # (its queue drained: look again)
            self._pump_watches()

    def reset(self, relay: RelayChannel, reason: str, skip: tuple[int, int] | None = None) -> None:
        self.core.channels.close(relay)
        for half in (relay.a, relay.b):
            if half != skip:
                self._channel_message(ChannelMessage(half[0], half[1], {"reset": reason}))

    # -- shutdown ------------------------------------------------------------------------------

    def begin_shutdown(self, reason: str = "broker shutting down") -> None:
        """Tell every client and end its session (used on SIGINT/SIGTERM)."""
        self._shutting_down = True
        for session in list(self.sessions.values()):
            session.end(reason)

    def statistics(self) -> dict[str, Any]:
        return {
            "connections": len(self.sessions),
            "names": len(self.core.names.names()),
            "queued": {s.conn_id: len(s.out) for s in self.sessions.values()},
        }

