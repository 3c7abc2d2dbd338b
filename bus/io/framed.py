"""Frames over a byte stream (trio): receive decoded frames, send encoded ones.

A :class:`FramedStream` owns a :class:`~bus.wire.frames.FrameDecoder` and reads from the
stream only when the decoder needs more bytes.

Reading a socket directly (a plain Unix connection once its handshake is done), it handles
what a wake-up brought before yielding: trio's ``receive_some`` yields once more after every
successful read, which puts a whole scheduler pass between a message arriving and its
handling (the relay's latency is made of such passes).  After a read that took less than it
asked for, the socket is empty: the next read waits for it to be readable first rather than
make a system call that would find nothing.  Fairness is kept: a read that found data
without waiting is followed by a checkpoint before the next read, so a peer that floods the
socket cannot keep its reader from yielding.  Sending is not locked here: each user keeps
exactly one task that sends (the broker's and the client's writer tasks), which also means a
cancelled caller can never leave half a frame on the wire.
"""

from __future__ import annotations

import os
import mmap
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

import trio

from ..wire.frames import DEFAULT_MAX_CONTROL, DEFAULT_MAX_FRAME, ControlFrame, Frame, FrameDecoder, encode_control
from .fdpass import FdSocketStream

__all__ = ["FramedStream"]


class _SocketReads(Protocol):
    def receive_nowait(self, max_bytes: int) -> bytes: ...

    def try_receive(self, max_bytes: int) -> bytes | None: ...

    def receive_into_nowait(self, buffer: memoryview) -> int: ...

    def wait_readable(self) -> Coroutine[Any, Any, None]: ...


def stdlib_socket(sock: trio.socket.SocketType) -> Any:
    """The standard library socket a trio socket wraps (trio keeps it as ``_sock``): the same
    descriptor, its ``fileno`` a C call where trio's is a Python one (busd asked it four
    times a relayed frame).  The trio socket itself, should trio ever keep none."""
    raw = getattr(sock, "_sock", None)
    return raw if isinstance(raw, socket.socket) else sock


class _PlainSocketReads:
    """Reads without waiting from a trio socket stream (the broker's side of a Unix connection)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._socket = stdlib_socket(stream.socket)  # (closed with the stream: fileno -1)

    def receive_nowait(self, max_bytes: int) -> bytes:
        data = self.try_receive(max_bytes)
        if data is None:
            raise trio.WouldBlock
        return data

    def try_receive(self, max_bytes: int) -> bytes | None:
        """What the socket holds now (no checkpoint), ``None`` for nothing there."""
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc

    def receive_into_nowait(self, buffer: memoryview) -> int:
        fd = self._socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket was closed")
        try:
            return os.readv(fd, (buffer,))
        except BlockingIOError:
            raise trio.WouldBlock from None
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc

    def wait_readable(self) -> Coroutine[Any, Any, None]:
        """``await reads.wait_readable()``: trio's wait itself (see FdSocketStream.wait_readable)."""
        if self._socket.fileno() < 0:
            raise trio.ClosedResourceError("the socket was closed")
        return trio.lowlevel.wait_readable(self._socket)


def _socket_reads(stream: trio.abc.ReceiveStream) -> _SocketReads | None:
    """How to read ``stream`` without waiting, if it can (it has ``receive_nowait``,
    ``try_receive``, ``receive_into_nowait`` and ``wait_readable``, as
    :class:`~bus.io.fdpass.FdSocketStream` has, or is a socket)."""
    if type(stream) is trio.SocketStream:  # (always SOCK_STREAM: trio refuses any other)
        return _PlainSocketReads(stream)
    if type(stream) is FdSocketStream:  # (a client's Unix socket: no need to ask)
        return stream
    if all(hasattr(stream, name) for name in ("receive_nowait", "try_receive", "receive_into_nowait", "wait_readable")):
        return cast("_SocketReads", stream)
    return None

_RECEIVE_SIZE = 1 << 18  # a whole 64 KiB data frame and more in one read
#: After a read that did not fill its buffer (messages, not a bulk stream), the next read asks
#: for this much: a buffer of 128 KiB or more is its own mmap in the C allocator, which costs
#: about 9 us a read against 1 us for 64 KiB (measured here), whatever arrives.
_SMALL_RECEIVE = 1 << 16


class FramedStream:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_control: int = DEFAULT_MAX_CONTROL,
        receive_stream: trio.abc.ReceiveStream | None = None,
        max_items: int | None = None,
        trusted: bool = False,
        wait_first: bool = False,
        channel_items: int | None = None,
    ) -> None:
        """``wait_first``: the first read of a socket waits for it to be readable (its owner
        knows nothing can have come yet: a read would find nothing)."""
        self.stream = stream
        # Where frames are read from: ``stream`` unless a layer below it may be read directly
        # (a plain SecureStream's transport, see SecureStream.plain_transport).
        self._receive_stream = receive_stream or stream
        self.max_frame = max_frame
        self.max_control = max_control
        # ``trusted``: CONTROL frames come from a party that checked their content already
        # (a client's broker, see FrameDecoder.trusted).
        self._decoder = FrameDecoder(max_frame, max_control, max_items, trusted=trusted, channel_items=channel_items)
        #: The next frame if the bytes already read hold one, else ``None`` (no I/O); raises
        #: :class:`~bus.errors.FrameError` as :meth:`receive_frame` does.  (The decoder's own
        #: method: a reader taking a burst of frames calls it once per frame, so no wrapper.)
        self.receive_frame_nowait: Callable[[], Frame | None] = self._decoder.next_frame
        #: The run of whole control messages on channel 0 that come next in the bytes already
        #: read (no I/O; see FrameDecoder.take_control_messages): a burst's events in one call.
        self.take_control_messages = self._decoder.take_control_messages
        self._socket_reads = _socket_reads(self._receive_stream)
        self._owe_checkpoint = False  # the last read did not wait: yield before the next one
        self._drained = wait_first  # the last read took less than it asked for
        self._read_size = _SMALL_RECEIVE  # bulk reads once a read comes back full
        self._may_fill = False  # DATA bodies were ever given a buffer (see fill_data_into)
        #: Takes a read that is exactly one DATA frame, in :meth:`read_frame` and
        #: :meth:`read_messages` when the last read emptied the socket: called with the
        #: frame's channel and the read (the frame, its body from HEADER_SIZE on), it says
        #: whether it took the frame; one it did not take is returned as ever.  (busd's
        #: reader: a relayed frame that came alone goes on without a frame object, the
        #: decoder or the reader's loop; a client's: to its channel, the same way.)
        self.lone_data: Callable[[int, bytes], bool] | None = None
        #: Bytes of frames read so far (one addition per read, not per frame).
        self.bytes_received = 0
        #: The stream's end was read.
        self.at_end = False
        #: A socket read that is exactly one whole CONTROL frame on channel 0, with nothing
        #: buffered, is decoded by :meth:`FrameDecoder.whole_message_from`: an RPC channel's
        #: reader, whose calls and replies come one to a read at one call in flight and are
        #: then known by their shape or layout (the same map the full way gives).
        self.whole_messages = False

    @property
    def buffered(self) -> int:
        """Bytes read and not yet returned in a frame (0: the next frame needs a read)."""
        return self._decoder.buffered

    @property
    def data_views(self) -> bool:
        """DATA frames come out as views of the reads (see :attr:`FrameDecoder.data_views`)."""
        return self._decoder.data_views

    @data_views.setter
    def data_views(self, on: bool) -> None:
        self._decoder.data_views = on

    @property
    def partial_data(self) -> bool:
        """A DATA frame on a channel other than 0 comes out in pieces as its bytes arrive
        (see :attr:`FrameDecoder.partial_data`)."""
        return self._decoder.partial_data

    @partial_data.setter
    def partial_data(self, on: bool) -> None:
        self._decoder.partial_data = on

    def read_nowait(self) -> bool:
        """Read what the stream holds now into the decoder, without waiting (no checkpoint).

        For a stream read directly (a socket: see the module's notes); any other reads
        nothing.  Returns whether anything came: bytes (take the frames with
        :meth:`receive_frame_nowait`) or the end of the stream (then :attr:`at_end` is set,
        after which :meth:`receive_frame` returns what is buffered, then ``None`` without
        reading).  Raises trio's stream errors for a broken transport, as
        :meth:`receive_frame` does."""
        reads = self._socket_reads
        if reads is None or self.at_end:
            return False
        data = reads.try_receive(_SMALL_RECEIVE)
        if data is None:
            self._drained = True  # the next read waits for the socket first
            return False
        self._drained = len(data) < _SMALL_RECEIVE
        if not data:
            self.at_end = True  # (receive_frame returns the frames still buffered, then the end)
            return True
        self.bytes_received += len(data)
        self._decoder.receive_data(data)
        return True

    async def receive_frame(self) -> Frame | None:
        """The next frame, or ``None`` at a clean end of stream.

        Raises :class:`~bus.errors.FrameError` for a framing violation (the stream is then
        out of sync) and trio's stream errors for a broken transport.
        """
        frame = self._decoder.next_frame()
        if frame is None:
            frame = await self.read_frame()
        return frame

    async def read_frame(self) -> Frame | None:
        """:meth:`receive_frame` for a reader that knows no whole frame is buffered
        (:meth:`receive_frame_nowait` just returned ``None``, or the last frame came alone):
        it reads first, without asking the decoder again."""
        decoder = self._decoder
        reads = self._socket_reads
        if self._drained and reads is not None and not self._may_fill and not self.at_end:
            # _receive_socket's steps when the last read emptied the socket (busd's reader
            # after every frame that came alone), here, as read_messages has them: a
            # coroutine less to start and to resume when the socket wakes us.
            await reads.wait_readable()  # (a checkpoint, which pays any owed)
            self._owe_checkpoint = False
            size = self._read_size
            got = reads.try_receive(size)
            lone = self.lone_data
            while got:
                self._drained = drained = len(got) < size
                self._read_size = _SMALL_RECEIVE if drained else _RECEIVE_SIZE
                self.bytes_received += len(got)
                if lone is None or not drained or (channel := decoder.lone_data(got)) < 0 or not lone(channel, got):
                    break
                # A read of exactly one DATA frame, nothing else buffered, taken by the owner as
                # it is (busd relays it on): the next read, still here (a checkpoint each).
                got = None  # (not kept alive while this task waits)
                await reads.wait_readable()
                size = self._read_size
                got = reads.try_receive(size)
            if got:
                if self.whole_messages:
                    message = decoder.whole_message_from(got)
                    if message is not None:
                        return ControlFrame(0, message)
                frame = decoder.next_frame_from(got)
                if frame is not None:
                    return frame
            elif got is not None:  # the end of the stream
                self.at_end = True
                decoder.end_of_input()
                return None
            # (else woken with nothing there, or a frame not yet whole: the usual way on)
        frame = None
        while frame is None:
            if self.at_end:
                decoder.end_of_input()
                return None
            data: bytes | bytearray
            if self._socket_reads is not None:
                room = decoder.fill_room()
                if room is not None:  # a big body being filled: read straight into its place
                    if not await self._fill(self._socket_reads, room):
                        return None  # pragma: no cover - (the end there raised)
                    frame = decoder.next_frame()
                    continue
                data = await self._receive_socket(self._socket_reads)
            else:
                data = await self._receive_stream.receive_some(_RECEIVE_SIZE)
            if not data:
                self.at_end = True
                decoder.end_of_input()
                return None
            self.bytes_received += len(data)
            if self.whole_messages:
                message = decoder.whole_message_from(data)
                if message is not None:
                    return ControlFrame(0, message)
            frame = decoder.next_frame_from(data)  # (bytearray: fed, then cut)
        return frame

    async def read_messages(self) -> list[dict[Any, Any]] | None:
        """One read, for a reader that took every whole frame buffered (its last
        :meth:`receive_frame_nowait` returned ``None``): waits for the stream, then returns
        the run of control messages on channel 0 that the bytes read complete (see
        :meth:`take_control_messages`; perhaps none), after which the reader takes the other
        frames with :meth:`receive_frame_nowait` (and the runs after them), as after
        :meth:`read_frame`.  ``None`` at a clean end of stream; the errors of
        :meth:`receive_frame`.  (A burst of events is one list, with no frame object made.)"""
        decoder = self._decoder
        if self.at_end:
            decoder.end_of_input()
            return None
        reads = self._socket_reads
        data: bytes | bytearray | None
        if reads is None:
            data = await self._receive_stream.receive_some(_RECEIVE_SIZE)
        else:
            room = decoder.fill_room() if self._may_fill else None
            if room is not None:  # a big body being filled: read straight into its place
                if not await self._fill(reads, room):
                    return None  # pragma: no cover - (the end there raised)
                return []
            if self._drained:
                # _receive_socket's steps when the last read emptied the socket, here (a
                # coroutine less to start, and to resume when the socket wakes us): wait for
                # it (a checkpoint, which pays any owed), then read.
                await reads.wait_readable()
                self._owe_checkpoint = False
                size = self._read_size
                data = reads.try_receive(size)
                lone = self.lone_data
                while data:
                    self._drained = drained = len(data) < size
                    self._read_size = _SMALL_RECEIVE if drained else _RECEIVE_SIZE
                    if lone is None or not drained or (channel := decoder.lone_data(data)) < 0 or not lone(channel, data):
                        break
                    # A read of exactly one DATA frame, taken by the owner (see read_frame):
                    # the next read, still here.
                    self.bytes_received += len(data)
                    data = None  # (not kept alive while this task waits)
                    await reads.wait_readable()
                    size = self._read_size
                    data = reads.try_receive(size)
                if data is None:  # (woken with nothing there: wait again)
                    data = await self._receive_socket(reads)
            else:
                data = await self._receive_socket(reads)
        if not data:
            self.at_end = True
            decoder.end_of_input()
            return None
        self.bytes_received += len(data)
        return decoder.take_control_messages(data)

    async def _fill(self, reads: _SocketReads, room: memoryview) -> bool:
        """One read straight into ``room``, the rest of a big body the decoder is filling;
        False at the end of the stream (which raises first: it ended inside a frame)."""
        taken = await self._receive_socket_into(reads, room)
        if not taken:
            self.at_end = True
            self._decoder.end_of_input()  # (raises: the stream ended inside a frame)
            return False  # pragma: no cover
        self.bytes_received += taken
        self._decoder.filled(taken)
        return True

    async def _receive_socket(self, reads: _SocketReads) -> bytes:
        waited = False
        if self._drained:  # the last read emptied the socket: reading now would find nothing
            await reads.wait_readable()  # (a checkpoint, which pays any owed)
            waited = True
        elif self._owe_checkpoint:
            await trio.lowlevel.checkpoint()
        self._owe_checkpoint = False
        while True:
            size = self._read_size
            data = reads.try_receive(size)
            if data is None:
                await reads.wait_readable()  # a checkpoint
                waited = True
            else:
                self._owe_checkpoint = not waited
                self._drained = len(data) < size
                self._read_size = _SMALL_RECEIVE if self._drained else _RECEIVE_SIZE
                return data

    async def _receive_socket_into(self, reads: _SocketReads, room: memoryview) -> int:
        """:meth:`_receive_socket`, reading into ``room`` (the rest of a body being filled)."""
        waited = False
        if self._drained:
            await reads.wait_readable()
            waited = True
        elif self._owe_checkpoint:
            await trio.lowlevel.checkpoint()
        self._owe_checkpoint = False
        while True:
            try:
                taken = reads.receive_into_nowait(room)
            except trio.WouldBlock:
                await reads.wait_readable()
                waited = True
            else:
                self._owe_checkpoint = not waited
                self._drained = taken < len(room)
                return taken

    def fill_data_into(self, buffer: bytearray | mmap.mmap | None) -> None:
        """See :meth:`FrameDecoder.fill_data_into`: where a socket is read directly, the rest
        of each such body is read straight into ``buffer``."""
        self._decoder.fill_data_into(buffer)
        if buffer is not None:
            self._may_fill = True  # (from now on a read asks the decoder for room first)

    def encode_message(self, message: dict[str, Any], channel: int = 0, *, checked: bool = False) -> bytes:
        return encode_control(channel, message, self.max_control, checked=checked)

    async def send_message(self, message: dict[str, Any], channel: int = 0) -> None:
        await self.stream.send_all(self.encode_message(message, channel))

    async def aclose(self) -> None:
        await self.stream.aclose()
