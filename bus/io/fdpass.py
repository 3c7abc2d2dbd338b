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
"""

from __future__ import annotations

import array
import collections
import operator
import os
import socket

import trio

__all__ = ["FdSocketStream", "send_with_fds", "MAX_QUEUED_FDS"]

MAX_QUEUED_FDS = 64
_FD_SPACE = socket.CMSG_SPACE(4 * 4)  # up to 4 descriptors per message


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
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))  # sets it non-blocking
        self.socket = self.stream.socket
        self.fds: collections.deque[int] = collections.deque()
        self._closed = False
        self._receiving = False

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

    def take_fd(self) -> int | None:
        """The next descriptor received (the caller owns it), or None."""
        return self.fds.popleft() if self.fds else None

    def receive_nowait(self, max_bytes: int) -> bytes:
        """Read what is there without waiting (no checkpoint); :class:`trio.WouldBlock` if nothing is."""
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        try:
            data, ancdata, _flags, _addr = self._raw.recvmsg(max_bytes, _FD_SPACE)
        except BlockingIOError:
            raise trio.WouldBlock from None
        except OSError as exc:
            if self._closed or self._raw.fileno() < 0:
                raise trio.ClosedResourceError("the stream was closed") from exc
            raise trio.BrokenResourceError(f"socket error: {exc}") from exc
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    if len(self.fds) >= MAX_QUEUED_FDS:
                        os.close(fd)  # nobody asked for this many: refuse to hold them
                    else:
                        self.fds.append(fd)
        return data

    async def wait_readable(self) -> None:
        """Wait until a read may find something (a checkpoint)."""
        if self._closed or self._raw.fileno() < 0:
            raise trio.ClosedResourceError("the stream was closed")
        await trio.lowlevel.wait_readable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        size = 65536 if max_bytes is None else operator.index(max_bytes)
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    data = self.receive_nowait(size)
                except trio.WouldBlock:
                    await self.wait_readable()
                else:
                    break
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        while self.fds:
            os.close(self.fds.popleft())
        await self.stream.aclose()
