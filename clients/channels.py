"""Channels between plugins: the relayed byte stream and the channel objects users hold.

Theory of operation
-------------------
A relayed channel is multiplexed over each side's broker connection.  :class:`RelayStream`
is one end of it as a :class:`trio.abc.HalfCloseableStream`:

* sending cuts data into DATA frames of at most 64 KiB and never sends more than the credit
  the broker granted (``{"credit": n}`` on the channel); with no credit, ``send_all`` waits;
* receiving buffers at most ``window`` bytes: the stream grants the broker that much credit
  and grants more only as the application consumes, so a slow reader slows its writer all
  the way back, and a peer that sends beyond its credit breaks the channel;
* a consumer that never blocks (the RPC layer) may take the data as it arrives instead:
  :meth:`RelayStream.deliver_to` hands each data frame to a callback inside the bus's reader,
  one task switch fewer per message, with the credit granted back as it is consumed;
* ``send_eof`` sends ``{"eof": true}``; ``aclose`` sends ``{"close": true}``: the broker tells
  the other side at once (``{"closed": true}``: its sends now fail) and delivers what was
  sent, then EOF; ``{"reset": reason}`` from the broker (peer gone, flow-control breach)
  breaks the stream with that reason.

Every channel then runs an shs1 handshake between the two plugins over this stream (the
opener as client, knowing the target's key from the broker; the target accepts only the
opener's key), with box-stream when any hop crosses TCP: see :class:`Channel`.
"""

from __future__ import annotations

import collections
import logging
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import trio

from bus.errors import FrameError
from bus.io.fdpass import FdSocketStream
from bus.io.secure import SecureStream
from bus.wire.frames import HEADER, FrameKind, encode_control
from bus.wire.identity import PublicKey

if TYPE_CHECKING:
    from .link import Link

__all__ = ["RelayStream", "Channel", "ChannelRequest", "PeerInfo", "DEFAULT_WINDOW", "EndCallback"]

log = logging.getLogger("minibus.client")

#: Told how a pushed channel ended: ``None`` after the peer's EOF, else the error a read
#: would have raised (:class:`trio.BrokenResourceError` with the reason, or
#: :class:`trio.ClosedResourceError` when this end was closed).
EndCallback = Callable[[Exception | None], None]

DEFAULT_WINDOW = 512 * 1024
MAX_DATA_FRAME = 64 * 1024
JOIN_BELOW = 16 * 1024  # received chunks smaller than this are joined into one read
MIN_DATA_FRAME = 16 * 1024  # wait for this much credit before sending a frame (unless less is left)
#: Data frames of a big write that the credit allows at once go to the bus connection in one
#: write of up to this many bytes (frames of MAX_DATA_FRAME each, made with the one copy each
#: frame took anyway): the broker then reads them at once (its reads are this big) instead of
#: waking once per frame.
SEND_BATCH = 192 * 1024
_DATA_HEADER = HEADER.pack
_DATA = int(FrameKind.DATA)  # (a plain int: struct packs an IntEnum member more slowly)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The other end of a channel, as the broker vouches for it."""

    unique_id: str
    identity: str
    names: tuple[str, ...]

    @classmethod
    def from_wire(cls, peer: dict[str, Any]) -> PeerInfo:
        return cls(peer["unique_id"], peer["identity"], tuple(peer.get("names", ())))

    @property
    def key(self) -> PublicKey:
        return PublicKey.from_id(self.identity)


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """What a target sees of a channel someone wants to open to it."""

    protocol: str
    name: str
    opener: PeerInfo
    route: str
    encrypted: bool
    channel: int = 0  # the channel's id on our bus connection


class RelayStream(trio.abc.HalfCloseableStream):
    """One end of a relayed channel (bytes only; the shs1 layer goes on top)."""

    def __init__(self, link: Link, channel: int, *, window: int = DEFAULT_WINDOW) -> None:
        self._link = link
        self.channel = channel
        self.window = window
        self._credit = 0
        self._credit_held_max = 0  # the most credit ever held (the broker's cap, in practice)
        self._credit_changed = trio.Event()
        # Received data frames, kept as they came (handed out without copying when they fit).
        self._incoming: collections.deque[bytes] = collections.deque()
        self._incoming_changed = trio.Event()
        self._granted = 0  # credit given to the broker not yet used by it
        self._started = False  # the first window was granted (start)
        self._consumed = 0  # bytes read since the last grant
        self._eof_received = False
        self._eof_sent = False
        self._closed = False
        self._peer_closed = False
        self._broken: str | None = None
        self._send_busy = False
        self._receive_busy = False
        # Push delivery (deliver_to): who takes each data frame, and who hears of the end.
        self._consumer: Callable[[bytes | memoryview], None] | None = None
        self._consumer_views = False  # the consumer takes views (deliver_to(views=True))
        self._on_end: EndCallback | None = None
        #: The Channel above this stream, if pushed bytes count into its ``_received`` (see
        #: Channel.deliver_to: counted here, without a wrapper call per frame).
        self.count_into: Channel | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    # -- fed by the bus's reader ----------------------------------------------------------

    def start(self) -> None:
        """Grant the initial window (once the broker knows the channel)."""
        self._started = True
        self._grant(self.window)

    def _grant(self, n: int) -> None:
        self._granted += n
        self._enqueue(encode_control(self.channel, {"credit": n}))

    def _enqueue(self, data: bytes) -> None:
        try:
            self._link.send.send_nowait(data)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._break("the bus connection cannot carry the channel's control messages")

    def on_data(self, data: bytes | memoryview) -> None:
        if self._closed or self._broken or not data:
            return  # (an empty frame carries nothing; queued, it would read as an end of file)
        n = len(data)
        if n > self._granted:
            self._break(f"the peer sent {n} bytes with {self._granted} bytes of credit")
            self._enqueue(encode_control(self.channel, {"reset": "flow control broken"}))
            return
        self._granted -= n
        self.bytes_in += n
        consumer = self._consumer
        if consumer is not None:
            # (What _push and _count_consumed do, without their calls: once per frame.)  A
            # view of the link's read goes only to a consumer that takes views (it copies
            # what it keeps); any other gets bytes of its own.
            count_into = self.count_into
            if count_into is not None:
                count_into._received += n
            try:
                consumer(data if self._consumer_views or type(data) is bytes else bytes(data))
            except Exception as exc:  # the consumer's verdict on the peer's bytes (a bad frame)
                self._break(f"{type(exc).__name__}: {exc}")
                self._enqueue(encode_control(self.channel, {"reset": f"bad data: {exc}"}))
                return
            consumed = self._consumed = self._consumed + n
            if consumed >= self.window // 2 and not (self._eof_received or self._broken or self._closed):
                self._grant(consumed)
                self._consumed = 0
            return
        self._incoming.append(data if type(data) is bytes else bytes(data))
        self._wake_receiver()

    def deliver_to(
        self, consumer: Callable[[bytes], None], on_end: EndCallback, *, views: bool = False, window: int | None = None
    ) -> None:
        """Hand every data frame to ``consumer`` as it arrives, instead of ``receive_some``.

        ``consumer`` runs inside the bus connection's reader, so it must not block; what it
        takes counts as read at once (credit goes back to the sender as for ``receive_some``).
        If it raises, the channel is reset with that reason.  ``on_end`` is called once, also
        in the reader: with ``None`` after the peer's EOF, else with the error a read would
        have raised (see :data:`EndCallback`); it must not block either, and what it raises
        is logged, never passed on to the bus connection.  Data already received is handed
        over first, before this returns.

        ``views``: ``consumer`` may be given a ``memoryview`` of the bus connection's read
        instead of ``bytes`` (no copy per frame), valid only during the call: it copies what
        it keeps.  ``window``: a bigger window from now on (the difference is granted at once;
        credit then goes back per half of it): a push consumer leaves nothing unread here, so
        it costs this end no memory, and the broker fewer buffered frames and credit messages.
        """
        if self._receive_busy or self._consumer is not None:
            raise trio.BusyResourceError("another task is receiving on this channel")
        if self._closed:
            raise trio.ClosedResourceError("this channel was closed")
        self._receive_busy = True  # for good: receive_some now says another reader has it
        self._consumer = cast("Callable[[bytes | memoryview], None]", consumer)  # (views: see above)
        self._on_end = on_end
        self._consumer_views = views
        if window is not None and window > self.window:
            if self._started and not (self._broken or self._closed or self._eof_received):
                self._grant(window - self.window)  # (before start: start grants all of it)
            self.window = window
        while self._incoming and self._consumer is not None:
            self._push(self._incoming.popleft())
        if self._broken is not None or self._eof_received:
            self._end(self._broken_error())

    def _push(self, data: bytes | memoryview) -> None:
        assert self._consumer is not None
        n = len(data)
        count_into = self.count_into
        if count_into is not None:
            count_into._received += n
        try:
            self._consumer(data)
        except Exception as exc:  # the consumer's verdict on the peer's bytes (a bad frame)
            self._break(f"{type(exc).__name__}: {exc}")
            self._enqueue(encode_control(self.channel, {"reset": f"bad data: {exc}"}))
            return
        self._count_consumed(n)

    def _count_consumed(self, n: int) -> None:
        """Bytes the application took: the credit goes back in batches of half the window."""
        self._consumed += n
        if self._consumed >= self.window // 2 and not (self._eof_received or self._broken or self._closed):
            self._grant(self._consumed)
            self._consumed = 0

    def _broken_error(self) -> Exception | None:
        return None if self._broken is None else trio.BrokenResourceError(f"channel broken: {self._broken}")

    def _end(self, error: Exception | None) -> None:
        """Tell a push consumer the stream ended (once): ``None`` for the peer's EOF."""
        on_end, self._on_end = self._on_end, None
        self._consumer = None
        if on_end is not None:
            try:
                on_end(error)
            except Exception:  # the bus connection's reader must go on whatever it does
                log.exception("channel %d: the end callback failed", self.channel)

    def on_control(self, body: dict[str, Any]) -> None:
        if "credit" in body:
            credit = body["credit"]
            if isinstance(credit, int) and not isinstance(credit, bool) and credit > 0:
                self._credit += credit
                self._credit_held_max = max(self._credit_held_max, self._credit)
                self._credit_changed.set()
                self._credit_changed = trio.Event()
        elif body.get("eof") is True:
            self._eof_received = True
            self._wake_receiver()
            if self._on_end is not None:
                self._end(None)
        elif body.get("closed") is True:
            # The peer closed its end: nothing we send will be read (its data and EOF follow).
            self._peer_closed = True
            self._credit_changed.set()
        elif "reset" in body:
            self._break(str(body["reset"]))
        else:
            raise FrameError(f"channel {self.channel}: unknown channel message {sorted(body)}")

    def on_link_lost(self, reason: str) -> None:
        self._break(f"the bus connection was lost: {reason}")

    def _break(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason
        self._link.channels.pop(self.channel, None)
        self._wake_receiver()
        self._credit_changed.set()
        if self._on_end is not None:
            self._end(self._broken_error())

    def _wake_receiver(self) -> None:
        self._incoming_changed.set()
        self._incoming_changed = trio.Event()

    # -- HalfCloseableStream ----------------------------------------------------------------

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this channel was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"channel broken: {self._broken}")
        if self._eof_sent:
            raise trio.ClosedResourceError("cannot send after send_eof()")
        if self._peer_closed:
            raise trio.BrokenResourceError("the peer closed the channel")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        await self.send_pieces([view], len(view))

    async def send_pieces(self, pieces: list[bytes | memoryview], size: int) -> None:
        """:meth:`send_all` of the bytes of ``pieces`` (``size`` in all) as if joined, without
        joining them first: each write's frames are made from views of the pieces, one join
        per write, as :meth:`send_all` makes them from a view of its argument.  For a large
        message given as pieces (:class:`~bus.io.writer.Gathered`: a message's big values are
        the caller's own ``bytes``, which must not change until this returns)."""
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this channel")
        self._send_busy = True
        try:
            self._check_send()
            await trio.lowlevel.checkpoint_if_cancelled()
            if not size:
                await trio.lowlevel.checkpoint()
                return
            left, at = size, [0, 0]  # (at: the piece, and the offset in it, the next frame starts at)
            while left:
                # Avoid the silly-window syndrome: no tiny frames while more credit is coming.
                while self._credit < self._worth_a_frame(left):
                    self._check_send()
                    await self._credit_changed.wait()
                await self._link.send.wait_room()
                self._check_send()
                # From here on nothing waits: the frames go out whole (written now, or queued
                # for the link's writer), so a cancellation never leaves half a frame behind.
                left -= self._send_frames(pieces, at, left)
            await trio.lowlevel.cancel_shielded_checkpoint()
        except trio.ClosedResourceError:
            if self._closed or self._eof_sent:
                raise
            raise trio.BrokenResourceError("the bus connection is gone") from None
        finally:
            self._send_busy = False

    def send_some_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the credit and the link's queue allow now, in whole frames (no waiting).

        Returns how many bytes were taken (0 while a ``send_all`` is in progress).  Lets a
        :class:`~bus.io.writer.FrameWriter` above this stream skip a task switch.
        """
        if self._send_busy:
            return 0
        self._check_send()
        writer = self._link.send
        size = len(data)
        if type(data) is bytes and 0 < size <= self._credit and size <= MAX_DATA_FRAME and writer.has_room:
            # The common case, a message that fits the credit: one frame of all of it.
            try:
                writer.send_nowait(HEADER.pack(FrameKind.DATA, 0, self.channel, size) + data)
            except trio.ClosedResourceError:
                raise trio.BrokenResourceError("the bus connection is gone") from None
            self._credit -= size
            self.bytes_out += size
            return size
        view = memoryview(data).cast("B")
        pieces: list[bytes | memoryview] = [view]
        at, taken = [0, 0], 0
        try:
            while taken < len(view) and self._credit >= self._worth_a_frame(len(view) - taken) and writer.has_room:
                taken += self._send_frames(pieces, at, len(view) - taken)
        except trio.ClosedResourceError:
            raise trio.BrokenResourceError("the bus connection is gone") from None
        return taken

    def send_whole_nowait(self, data: bytes) -> bool:
        """Send ``data`` as one DATA frame now if it fits the credit and the link's queue has
        room (a message of the layer above, written through no other layer); else take
        nothing and return False -- also where a send would fail: the usual path then says
        how.  What it sends counts into :attr:`count_into` (the Channel above)."""
        if self._send_busy or self._closed or self._broken is not None or self._eof_sent or self._peer_closed:
            return False
        size = len(data)
        writer = self._link.send
        if not (0 < size <= self._credit and size <= MAX_DATA_FRAME and writer.has_room):
            return False
        try:
            writer.send_nowait(_DATA_HEADER(_DATA, 0, self.channel, size) + data)
        except trio.ClosedResourceError:
            return False
        self._credit -= size
        self.bytes_out += size
        count_into = self.count_into
        if count_into is not None:
            count_into._sent += size
        return True

    def _send_frames(self, pieces: list[bytes | memoryview], at: list[int], left: int) -> int:
        """Data frames of the next bytes of ``pieces`` -- from ``at`` (the piece, and the offset
        in it), which moves on past them -- as many as the credit allows up to SEND_BATCH
        bytes and ``left``, each at most MAX_DATA_FRAME, in one write (no waiting: the caller
        made sure of credit and of room on the link); returns how many bytes they carry.  The
        pieces are cut as views: the write's join is their one copy."""
        n = min(left, self._credit, SEND_BATCH)
        index, offset = at
        parts: list[bytes | memoryview] = []
        head = HEADER.pack
        for start in range(0, n, MAX_DATA_FRAME):
            need = min(MAX_DATA_FRAME, n - start)
            parts.append(head(FrameKind.DATA, 0, self.channel, need))
            while need:
                piece = pieces[index]
                take = min(len(piece) - offset, need)
                parts.append(piece if take == len(piece) else memoryview(piece)[offset : offset + take])
                need -= take
                offset += take
                if offset == len(piece):
                    index, offset = index + 1, 0
        at[0], at[1] = index, offset
        self._link.send.send_nowait(b"".join(parts))
        self._credit -= n
        self.bytes_out += n
        return n

    def _worth_a_frame(self, pending: int) -> int:
        """The credit worth sending a frame for: no tiny frames while more credit is coming.

        Never more than a quarter of what the broker gave at most: it returns credit in
        batches of half its cap, so waiting for more than that could wait forever."""
        return min(pending, MIN_DATA_FRAME, max(1, self._credit_held_max // 4))

    async def wait_send_all_might_not_block(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this channel")
        self._send_busy = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("this channel was closed")
            while self._credit == 0 and self._broken is None and not self._peer_closed and not self._closed:
                await self._credit_changed.wait()
            if self._closed:
                raise trio.ClosedResourceError("this channel was closed")
            await trio.lowlevel.checkpoint()
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this channel")
        if self._closed:
            raise trio.ClosedResourceError("this channel was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"channel broken: {self._broken}")
        if not self._eof_sent:
            self._eof_sent = True
            self._enqueue(encode_control(self.channel, {"eof": True}))
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receive_busy:
            raise trio.BusyResourceError("another task is receiving on this channel")
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        self._receive_busy = True
        waited = False  # a wait is a checkpoint already: no second yield after it
        try:
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this channel was closed")
                if self._incoming:
                    break
                if self._broken is not None:
                    raise trio.BrokenResourceError(f"channel broken: {self._broken}")
                if self._eof_received:
                    await trio.lowlevel.checkpoint()
                    return b""
                await self._incoming_changed.wait()
                waited = True
            out = self._take_incoming(max_bytes)
            self._count_consumed(len(out))
            if not waited:
                await trio.lowlevel.checkpoint()
            return out
        finally:
            self._receive_busy = False

    def close_nowait(self) -> None:
        """Close this end without waiting (what :meth:`aclose` does before its checkpoint)."""
        if not self._closed:
            self._closed = True
            if self._broken is None and not self._peer_closed:
                self._enqueue(encode_control(self.channel, {"close": True}))
            self._link.channels.pop(self.channel, None)
            self._wake_receiver()
            self._credit_changed.set()
            if self._on_end is not None:
                self._end(trio.ClosedResourceError("this channel was closed"))

    def _take_incoming(self, max_bytes: int | None) -> bytes:
        incoming = self._incoming
        first = incoming.popleft()
        limit = max(len(first), DEFAULT_WINDOW) if max_bytes is None else max_bytes
        if len(first) > limit:
            incoming.appendleft(first[limit:])
            return first[:limit]
        if not incoming or len(first) + len(incoming[0]) > limit or len(first) >= JOIN_BELOW:
            return first  # big chunks go out as they came: joining them would only copy
        parts = [first]
        size = len(first)
        while incoming and size + len(incoming[0]) <= limit:
            part = incoming.popleft()
            parts.append(part)
            size += len(part)
        return b"".join(parts)

    async def aclose(self) -> None:
        self.close_nowait()
        await trio.lowlevel.checkpoint()


class Channel(trio.abc.HalfCloseableStream):
    """A channel to another plugin: a byte stream whose other end proved its identity.

    ``peer`` is who is at the other end (its key was verified by the channel's own shs1
    handshake), ``route`` how the bytes travel, ``protocol`` the label it was opened with.
    Every route ends explicitly (the relay's ``{"eof": true}``, box-stream's goodbye on tcp,
    :class:`~bus.io.fdpass.UnixChannelStream`'s end mark on unix-fd): ``receive_some`` returns
    ``b""`` only after the peer's :meth:`send_eof` or :meth:`aclose`, and a peer that vanished
    raises :class:`trio.BrokenResourceError`.
    """

    def __init__(
        self, stream: SecureStream, raw: trio.abc.Stream, peer: PeerInfo, protocol: str, route: str
    ) -> None:
        self._stream = stream
        # A plain channel needs nothing from the shs1 layer after its handshake: bytes go
        # straight to the transport (a socket, or the relay stream), one layer fewer.
        self._io: trio.abc.HalfCloseableStream = stream.plain_transport() or stream
        self._fast = self._io is not stream
        self._sent = self._received = 0  # counted here only on the fast path (else by the stream)
        # What the stream carried before it became this channel (the tcp route's token).
        self._before = (stream.bytes_received, stream.bytes_sent)
        #: Called once when this end is closed (the bus reports a direct channel's end).
        self.on_close: Callable[[], None] | None = None
        self.raw = raw
        self.peer = peer
        self.protocol = protocol
        self.route = route

    @property
    def encrypted(self) -> bool:
        return self._stream.encrypted

    @property
    def secure(self) -> SecureStream:
        """The shs1 layer of this channel (for a :class:`~bus.io.writer.FrameWriter`)."""
        return self._stream

    @property
    def bytes_in(self) -> int:
        """Bytes received on this channel (after decryption)."""
        return self._received + self._stream.bytes_received - self._before[0]

    @property
    def bytes_out(self) -> int:
        """Bytes sent on this channel (before encryption)."""
        return self._sent + self._stream.bytes_sent - self._before[1]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._io.send_all(data)
        if self._fast:
            self._sent += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._io.wait_send_all_might_not_block()

    def deliver_to(
        self, consumer: Callable[[bytes], None], on_end: EndCallback, *, views: bool = False, window: int | None = None
    ) -> bool:
        """Push delivery where the route allows it (a plain relayed channel): see
        :meth:`RelayStream.deliver_to` (also for ``views`` and ``window``).  Returns False, changing
        nothing, where it does not; read with :meth:`receive_some` then."""
        relay = self._io
        if not isinstance(relay, RelayStream):
            return False

        relay.count_into = self  # (what it pushes counts as received here)
        relay.deliver_to(consumer, on_end, views=views, window=window)
        return True

    def whole_frame_sender(self) -> Callable[[bytes], bool] | None:
        """For a :class:`~bus.io.writer.FrameWriter` on :attr:`secure` (its ``direct``): where
        the route is a plain relay, :meth:`RelayStream.send_whole_nowait`, which sends a
        message that fits the credit as one frame of the bus connection without the shs1
        layer's call (it has nothing to do on a plain channel) and counts it as sent here;
        else ``None``."""
        relay = self._io
        if not self._fast or not isinstance(relay, RelayStream):
            return None
        relay.count_into = self
        return relay.send_whole_nowait

    def socket_reads(self) -> _SocketReads | None:
        """Reads straight from this channel's socket, for a frame reader that reads without
        waiting (see :class:`~bus.io.framed.FramedStream`): where the route is a plain socket
        (unix-fd), else ``None``.  What they read counts as received by this channel."""
        io = self._io
        if not self._fast or not isinstance(io, FdSocketStream):
            return None
        return _SocketReads(self, io)

    async def send_eof(self) -> None:
        await self._io.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self._io.receive_some(max_bytes)
        if self._fast:
            self._received += len(data)
        return data if type(data) is bytes else bytes(data)

    async def aclose(self) -> None:
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        await self._stream.aclose()

    def __repr__(self) -> str:
        return f"<Channel {self.protocol!r} to {self.peer.unique_id} ({self.peer.identity}) via {self.route}>"


class _SocketReads(trio.abc.ReceiveStream):
    """A channel's socket read directly (:meth:`Channel.socket_reads`), bytes counted."""

    __slots__ = ("_channel", "_io", "wait_readable", "readable_now")

    def __init__(self, channel: Channel, io: FdSocketStream) -> None:
        self._channel = channel
        self._io = io
        #: Wait until a read may find something (the socket's own: no call in between).
        self.wait_readable: Callable[[], Awaitable[None]] = io.wait_readable
        #: Whether a read would find something now, without reading (the socket's own).
        self.readable_now: Callable[[], bool] = io.readable_now

    def receive_nowait(self, max_bytes: int) -> bytes:
        """What the socket holds now (no checkpoint); :class:`trio.WouldBlock` if nothing."""
        data = self._io.receive_nowait(max_bytes)
        self._channel._received += len(data)
        return data

    def try_receive(self, max_bytes: int) -> bytes | None:
        """:meth:`receive_nowait`, with ``None`` for nothing there."""
        data = self._io.try_receive(max_bytes)
        if data is not None:
            self._channel._received += len(data)
        return data

    def receive_into_nowait(self, buffer: memoryview) -> int:
        """:meth:`receive_nowait` into ``buffer``: how many bytes came (0 at the end)."""
        taken = self._io.receive_into_nowait(buffer)
        self._channel._received += taken
        return taken

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._channel.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._channel.aclose()


ChannelHandler = Callable[[Channel], Any]
