"""File-descriptor passing over Unix sockets (SCM_RIGHTS), for the unix-fd channel route.

Theory of operation
-------------------
The broker hands each end of a fresh socketpair to one of the two plugins, attached to the
frame that announces the channel (the reply to ``open_channel`` for the opener, the
``channel_request`` for the target).  Sending: :func:`send_with_fds` puts the descriptors on
the first ``sendmsg`` of that frame's bytes.  Receiving: :class:`FdSocketStream` reads with
``recvmsg`` and queues every descriptor that arrives, in order; a frame that announces a
descriptor takes the next one from the queue (descriptors and frames travel in the same
order, so the queue lines them up).  Descriptors nobody claims are closed with the stream,
and at most :data:`MAX_QUEUED_FDS` may wait, so a peer cannot make us hold descriptors.

Each plugin then holds one end of a unix-fd channel as a :class:`UnixChannelStream`, whose
end of stream is explicit: a socket end of file alone is also what a killed peer leaves, and
must not pass for a complete transfer.  The bytes stay untouched (no header per write, so
bulk data costs what a raw socket costs); the clean end is one more byte, :data:`END_MARK`,
sent with a descriptor attached (SCM_RIGHTS, one for ``/dev/null``), then ``shutdown(SHUT_WR)``.
A descriptor splits a Unix stream: the kernel ends any read at the byte that carries one, so
a read that brings descriptors ends with the mark and nothing is mistaken for it.  The reader
closes what it was passed at once; a socket end of file without the mark is
:class:`trio.BrokenResourceError` (the peer vanished: the transfer was truncated).
"""

from __future__ import annotations

import array
import collections
import errno
import operator
import os
import select
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import trio

__all__ = ["FdSocketStream", "UnixChannelStream", "send_with_fds", "MAX_QUEUED_FDS", "END_MARK"]

MAX_QUEUED_FDS = 64
_FD_SPACE = socket.CMSG_SPACE(4 * 4)  # up to 4 descriptors per message
#: The byte that ends a unix-fd channel cleanly; it always travels with a descriptor attached.
END_MARK = b"\x00"
#: How long a graceful close may wait to deliver the end mark to a peer that does not read.
DEFAULT_CLOSE_TIMEOUT = 2.0
TRUNCATED = "the peer vanished without ending the stream (truncated)"
#: What a send on a closed socket fails with (as trio's SocketStream tells them).
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})
_CMSG_CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
_MSG_CTRUNC = int(socket.MSG_CTRUNC)  # (a plain int: the enum's ``&`` costs a microsecond a read)


async def send_with_fds(sock: trio.socket.SocketType, data: bytes, fds: list[int]) -> None:
    """Send ``data`` with ``fds`` attached to its first byte, then the rest of ``data``."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    sent = await sock.sendmsg([data], ancillary)
    view = memoryview(data)[sent:]
    while view:
        n = await sock.send(view)
        view = view[n:]


class FdSocketStream(trio.abc.HalfCloseableStream):
    """A Unix socket stream that also receives file descriptors.

    Built from a standard library socket (:meth:`connect` makes one), which it keeps to read
    without waiting: :meth:`receive_nowait` is what a frame reader uses (see
    :class:`~bus.io.framed.FramedStream`); :meth:`receive_some` is the usual trio stream read.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._raw = sock
        self.socket = trio.socket.from_stdlib_socket(sock)  # (sets it non-blocking)
        # A trio SocketStream over the same socket, made when first needed (send_eof, waiting
        # for room): making one tries two TCP options, which a Unix socket refuses (two
        # failed system calls and two exceptions per connection).
        self._stream: trio.SocketStream | None = None
        self.fds: collections.deque[int] = collections.deque()
        self._closed = False
        self._receiving = False
        self._send_busy = False
        self._poller: select.poll | None = None  # (readable_now's, made when first needed)
        #: Run once by the next :meth:`send_then_receive`, after its message was sent and
        #: before its answer is waited for: its owner's work that does not need the answer,
        #: done while the peer works on it (the two sides of an exchange take turns).
        self.after_send: Callable[[], None] | None = None

    @property
    def stream(self) -> trio.SocketStream:
        stream = self._stream
        if stream is None:
            stream = self._stream = trio.SocketStream(self.socket)
        return stream

    @classmethod
    def connect_nowait(cls, path: str) -> FdSocketStream | None:
        """Connect now, without a checkpoint, if the listener takes the connection at once (a
        Unix listener with room in its backlog does); None when it cannot (its backlog is
        full: :meth:`connect` waits for it, under the caller's deadline).  Other failures
        raise OSError, as :meth:`connect`'s do."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)  # (no ioctl)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return None
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @classmethod
    async def connect(cls, path: str) -> FdSocketStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream = cls(sock)
        try:
            await stream.socket.connect(path)
        except BaseException:
            sock.close()
            raise
        return stream

    @property
    def raw_socket(self) -> socket.socket:
        """The standard library socket under the stream (for a writer that writes to it
        directly: its ``fileno`` is C's)."""
        return self._raw

    def take_fd(self) -> int | None:
        """The next descriptor received (the caller owns it), or None."""
        return self.fds.popleft() if self.fds else None

    def receive_nowait(self, max_bytes: int) -> bytes:
        """Read what is there without waiting (no checkpoint); :class:`trio.WouldBlock` if nothing is."""
        data = self._try_receive(max_bytes)
        if data is None:
            raise trio.WouldBlock
        return data

    def receive_into_nowait(self, buffer: memoryview) -> int:
        """:meth:`receive_nowait` into ``buffer``: how many bytes were read into it (0 at the end)."""
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        try:
            taken, ancdata, _flags, _addr = self._raw.recvmsg_into((buffer,), _FD_SPACE, _CMSG_CLOEXEC)
        except BlockingIOError:
            raise trio.WouldBlock from None
        except OSError as exc:
            if self._closed or self._raw.fileno() < 0:
                raise trio.ClosedResourceError("the stream was closed") from exc
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
        self._keep_fds(ancdata)
        return taken

    def _try_receive(self, max_bytes: int) -> bytes | None:
        """What is there (no checkpoint), or None if nothing is: the one read of
        :meth:`receive_nowait`, :meth:`receive_some` and :meth:`try_receive`."""
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        try:
            data, ancdata, _flags, _addr = self._raw.recvmsg(max_bytes, _FD_SPACE)
        except BlockingIOError:
            return None
        except OSError as exc:
            if self._closed or self._raw.fileno() < 0:
                raise trio.ClosedResourceError("the stream was closed") from exc
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
        if ancdata:  # (most reads bring none)
            self._keep_fds(ancdata)
        return data

    #: :meth:`receive_nowait` with ``None`` for nothing there (no exception to catch).
    try_receive = _try_receive

    def readable_now(self) -> bool:
        """Whether a read would find something now (bytes, the end of the stream, an
        error), without reading: one ``poll(2)`` that does not wait, about a third of a read
        that finds nothing (which raises inside the socket module).  For an owner that looks
        for what came while it was not reading and most often finds nothing (an RPC
        caller's idle channel).  True once closed: a read says how."""
        if self._closed:
            return True
        fd = self._raw.fileno()
        if fd < 0:
            return True
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(fd, select.POLLIN | select.POLLPRI)  # (errors and hang-ups: always)
        return bool(poller.poll(0))

    def _keep_fds(self, ancdata: list[tuple[int, int, bytes]]) -> None:
        """Queue the descriptors that came with a read (closing those over the limit)."""
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    if len(self.fds) >= MAX_QUEUED_FDS:
                        os.close(fd)  # nobody asked for this many: refuse to hold them
                    else:
                        self.fds.append(fd)

    def wait_readable(self) -> Coroutine[Any, Any, None]:
        """Wait until a read may find something (a checkpoint): ``await
        stream.wait_readable()``.  (Not a coroutine of its own: it checks the stream now and
        returns trio's wait, so a reader waiting for its socket read after read resumes one
        coroutine less each time.)"""
        raw = self._raw
        if self._closed or raw.fileno() < 0:
            raise trio.ClosedResourceError("the stream was closed")
        return trio.lowlevel.wait_readable(raw)  # (the stdlib socket: its fileno is C's)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        size = 65536 if max_bytes is None else operator.index(max_bytes)
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            data = self._try_receive(size)
            if data is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
            while True:  # a wait is a checkpoint already: no second yield after it
                await self.wait_readable()
                data = self._try_receive(size)
                if data is not None:
                    return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """What :meth:`trio.SocketStream.send_all` does, on the socket itself: a checkpoint;
        every byte is sent, waiting while the socket is full; one sender at a time."""
        self._claim_send()
        try:
            sock = self.socket
            if sock.did_shutdown_SHUT_WR:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            with memoryview(data) as view:
                if not view:
                    if sock.fileno() == -1:
                        raise trio.ClosedResourceError("the stream was closed")
                    await trio.lowlevel.checkpoint()
                    return
                sent = 0
                while sent < len(view):
                    with view[sent:] as rest:
                        sent += await sock.send(rest)
        except OSError as exc:
            if exc.errno in _CLOSED_ERRNOS:
                raise trio.ClosedResourceError("the stream was closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        finally:
            self._send_busy = False

    async def send_then_receive(self, data: bytes | bytearray | memoryview, max_bytes: int) -> bytes:
        """:meth:`send_all` of ``data``, then :meth:`receive_some`, for an exchange whose answer
        cannot be there before ``data`` was read (a handshake's next message): the wait for the
        answer is the one checkpoint.  No scheduler pass after the write (trio's ``send_all``
        yields after every write) and no read before the socket is readable (it would find
        nothing).  Errors are those of :meth:`send_all` and :meth:`receive_some`."""
        if self._send_busy or self._receiving:
            raise trio.BusyResourceError("another task is using this stream")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._send_busy = self._receiving = True
        try:
            raw = self._raw
            if self._closed or raw.fileno() < 0:
                raise trio.ClosedResourceError("the stream was closed")
            if self.socket.did_shutdown_SHUT_WR:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            with memoryview(data) as view:
                sent = 0
                while sent < len(view):
                    try:
                        with view[sent:] as rest:
                            sent += raw.send(rest)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(raw)  # (the socket is full: wait for room)
                    except OSError as exc:
                        if exc.errno in _CLOSED_ERRNOS or self._closed:
                            raise trio.ClosedResourceError("the stream was closed") from None
                        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
            after_send = self.after_send
            if after_send is not None:
                self.after_send = None
                after_send()
            while True:
                await self.wait_readable()
                answer = self._try_receive(max_bytes)
                if answer is not None:
                    return answer
        finally:
            self._send_busy = self._receiving = False

    def _claim_send(self) -> None:
        """One sender at a time, whichever of this stream's sends it uses (the trio stream
        below, for send_eof and the wait for room, cannot see this stream's own sends)."""
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True

    async def wait_send_all_might_not_block(self) -> None:
        self._claim_send()
        try:
            await self.stream.wait_send_all_might_not_block()
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        self._claim_send()  # (an end of file in the middle of a send would cut it short)
        try:
            await self.stream.send_eof()
        finally:
            self._send_busy = False

    async def aclose(self) -> None:
        self.close_nowait()
        await trio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        """Close at once, without a checkpoint (received descriptors nobody took too)."""
        self._closed = True
        while self.fds:
            os.close(self.fds.popleft())
        self.socket.close()


def _close_passed(ancdata: list[tuple[int, int, bytes]]) -> None:
    """Close every descriptor that came with a read (the end mark's, or a peer's junk)."""
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            for fd in fds:
                os.close(fd)


def _mark_descriptor() -> int:
    """A descriptor to carry the end mark (it means nothing; the reader closes it)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end


class UnixChannelStream(FdSocketStream):
    """One end of a unix-fd channel: a Unix socket whose clean end is explicit.

    Data goes through untouched.  :meth:`send_eof` and a graceful :meth:`aclose` send the
    end mark (see the module's notes); the reader returns ``b""`` only after it.  A socket
    end of file without it, or a descriptor on anything but the mark, raises
    :class:`trio.BrokenResourceError`.  :meth:`aclose` waits at most :attr:`close_timeout`
    for room to send the mark, and not at all when cancelled (:func:`trio.aclose_forcefully`):
    a forced close is an abort, which the peer reads as broken, as with box-stream.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.close_timeout = DEFAULT_CLOSE_TIMEOUT
        self._ended = False  # the peer's end mark arrived
        self._broken: str | None = None  # why reading failed for good
        self._eof_sent = False
        self._sending = False

    # -- receiving -------------------------------------------------------------------------

    def _try_receive(self, max_bytes: int) -> bytes | None:
        if self._closed or self._broken is not None:
            self._check_readable()  # (raises)
        if self._ended:
            return b""
        try:
            data, ancdata, flags, _addr = self._raw.recvmsg(max_bytes, _FD_SPACE, _CMSG_CLOEXEC)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise self._read_failed(exc) from exc
        if data and not ancdata and not flags & _MSG_CTRUNC:
            return data  # (the common read: data alone, nothing for _data_size to decide)
        size = self._data_size(len(data), data[-1] if data else -1, ancdata, flags)
        return data if size == len(data) else data[:size]

    try_receive = _try_receive

    def readable_now(self) -> bool:
        return self._ended or self._broken is not None or super().readable_now()

    def receive_into_nowait(self, buffer: memoryview) -> int:
        """:meth:`_try_receive`'s rules, reading into ``buffer``: how many bytes of data were
        read into it (0 at the end mark)."""
        self._check_readable()
        if self._ended:
            return 0
        try:
            taken, ancdata, flags, _addr = self._raw.recvmsg_into((buffer,), _FD_SPACE, _CMSG_CLOEXEC)
        except BlockingIOError:
            raise trio.WouldBlock from None
        except OSError as exc:
            raise self._read_failed(exc) from exc
        return self._data_size(taken, buffer[taken - 1] if taken else -1, ancdata, flags)

    def _check_readable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)

    def _read_failed(self, exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
        if self._closed or self._raw.fileno() < 0:
            return trio.ClosedResourceError("the stream was closed")
        self._broken = f"socket error: {exc}"
        return trio.BrokenResourceError(self._broken)

    def _data_size(self, size: int, last: int, ancdata: list[tuple[int, int, bytes]], flags: int) -> int:
        """How many of the ``size`` bytes one read returned (``last``: the last of them, -1
        for none) are data: all of them, or all but the end mark's byte.  A descriptor on
        anything but the mark, or a socket end of file without it, breaks the stream."""
        if ancdata or flags & _MSG_CTRUNC:  # (CTRUNC: the kernel had to drop them)
            _close_passed(ancdata)
            if last != END_MARK[0]:
                self._broken = "the peer passed a descriptor that does not end the stream"
                raise trio.BrokenResourceError(self._broken)
            self._ended = True
            return size - 1
        if not size:
            self._broken = TRUNCATED
            raise trio.BrokenResourceError(TRUNCATED)
        return size

    # -- sending ---------------------------------------------------------------------------

    async def send_then_receive(self, data: bytes | bytearray | memoryview, max_bytes: int) -> bytes:
        """:meth:`send_all`, then :meth:`receive_some` (this stream's own rules for both)."""
        await self.send_all(data)
        return await self.receive_some(max_bytes)

    def _begin_send(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._begin_send()
        try:
            if self._eof_sent:
                raise trio.ClosedResourceError("cannot send after send_eof()")
            await self.stream.send_all(data)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._begin_send()
        try:
            await self.stream.wait_send_all_might_not_block()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        self._begin_send()
        try:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            await self._send_end_mark()
        finally:
            self._sending = False

    async def _send_end_mark(self) -> None:
        """The mark, then the half-close (a cancelled caller sends nothing)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = _mark_descriptor()
        try:
            await self.socket.sendmsg([END_MARK], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        except OSError as exc:
            if self._closed or self._raw.fileno() < 0:
                raise trio.ClosedResourceError("the stream was closed") from exc
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
        finally:
            os.close(fd)
        self._eof_sent = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone: it had everything it will ever read

    async def aclose(self) -> None:
        try:
            if not (self._closed or self._eof_sent or self._sending or self._broken is not None):
                self._sending = True
                try:
                    with trio.move_on_after(self.close_timeout):
                        await self._send_end_mark()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # nobody left to tell
                finally:
                    self._sending = False
        finally:
            await super().aclose()
