"""The sending side of one connection: whole frames, in order, at once when possible.

Theory of operation
-------------------
Several tasks produce frames for one connection (the broker routing messages to it, a
client's requests and channels), and a frame must never be cut by another or by a
cancellation.  :class:`FrameWriter` owns the connection's sending direction:

* :meth:`FrameWriter.send_nowait` (synchronous) writes the frame straight to the socket when
  nothing is waiting ahead of it -- the common case, with no task switch at all -- and queues
  whatever the socket did not take;
* the :meth:`FrameWriter.run` task writes queued frames, joining small ones into one write,
  and finishes any frame the socket took only part of, so a cancelled producer never leaves
  half a frame behind.  It writes as far as the socket takes each write at once, and waits
  (yields) only for the socket, or every :data:`YIELD_AFTER` bytes written without a wait;
  (trio's ``send_all`` would yield after every write: a task switch per 64 KiB relayed);
* that task is only needed once a frame has to wait: an owner may start it lazily with
  :meth:`FrameWriter.run_when_needed`, whose callback runs (once) the first time a frame is
  queued, a write is left partial, a transport failure is seen, or :meth:`stop` or
  :meth:`finish` is called.  A short-lived connection whose every frame the socket took at
  once never pays for the task;
* the queue is bounded (``max_frames``): ``send_nowait`` raises :class:`trio.WouldBlock` when
  it is full, and :meth:`FrameWriter.send` waits for room instead; what a full queue means
  is the owner's policy (the broker disconnects a slow consumer, a client waits or fails);
* frames that carry a file descriptor (SCM_RIGHTS) always go through the queue, one
  ``sendmsg`` each, and their descriptors are closed once sent or dropped;
* while *corked* (:meth:`FrameWriter.cork`), ``send_nowait`` only queues; :meth:`uncork`
  then writes what was queued with one system call.  The broker corks the writers a burst of
  requests writes to (one read of an emitter's events fanned out to its subscribers) so that
  each subscriber gets one write per burst, not one per event.  A corked writer still writes
  once :attr:`FrameWriter.burst` frames (:data:`CORK_FRAMES` unless its owner says less) or
  :data:`COALESCE` bytes wait, so corking never fills it; so does :meth:`FrameWriter.put_later`.

A writer whose stream has nothing to do for a frame (a plain relayed channel's shs1 layer) may
be given :attr:`FrameWriter.direct`, which sends a frame below that layer or takes nothing.

Frames may also be given as pieces (:class:`Gathered`, :meth:`FrameWriter.put_gathered`: a
large RPC message whose big values are the caller's own objects): written with one
``sendmsg`` of the pieces where the stream is plain over a socket, with no join (a copy of the
message and a fresh allocation as big, each); handed to a plain relayed channel as pieces by
``run()`` (:meth:`SecureStream.send_pieces`: the bus connection's frames are made from views
of them); else joined.  Behind other frames they are one entry of the queue, which ``run()``
writes so in its turn (a cork's write stops before it, as before a descriptor's frame).

A transport failure seen by ``send_nowait`` is not raised to the producer (who may be busy
serving another connection): it ends :meth:`run` with :class:`trio.BrokenResourceError`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, cast

import trio

from .fdpass import send_with_fds
from .secure import SecureStream

__all__ = ["FrameWriter", "Gathered", "COALESCE", "CORK_FRAMES", "YIELD_AFTER"]

#: Queued frames are joined into writes of about this size.
COALESCE = 64 * 1024
#: A corked writer writes anyway once this many frames wait.
CORK_FRAMES = 128
#: The writer task yields after writing this many bytes without waiting for the socket.
YIELD_AFTER = 256 * 1024
_NOTHING = memoryview(b"")


class Gathered:
    """Whole frames given as pieces (``size`` bytes in all), for :meth:`FrameWriter.put_gathered`:
    a large message whose big values are the caller's own objects, written without being
    joined into one ``bytes`` first where they go straight to a plain socket."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes | memoryview], size: int) -> None:
        self.parts = parts
        self.size = size

    def __len__(self) -> int:
        return self.size

    def join(self) -> bytes:
        return b"".join(self.parts)


class FrameWriter:
    def __init__(
        self, stream: SecureStream, *, max_frames: int, on_sent: Callable[[], None] | None = None
    ) -> None:
        self.stream = stream
        self.max_frames = max_frames
        self.on_sent = on_sent
        #: Bytes of frames accepted but not completely written yet.
        self.queued_bytes = 0
        #: Descriptors queued with their frames, not sent yet (each is open in this process).
        self.queued_fds = 0
        self.closed = False
        # A list, not a deque: an empty deque holds a 64-slot block (760 bytes), and a broker
        # has a writer per connection, mostly idle.  Frames leave it in batches (one slice).
        self._queue: list[bytes | tuple[bytes, socket.socket] | Gathered] = []
        self._gathered = 0  # Gathered entries in the queue
        self._rest: memoryview | None = None  # wire bytes of a frame the socket took only part of
        self._rest_size = 0
        self._busy = False  # run() is inside a write (stays set if that write failed half-way)
        #: :meth:`stop` was called: no frame is taken any more.  (Read only, as ``corked``:
        #: plain attributes, read once per frame on busd's fan-out.)
        self.stopped = False
        #: Between :meth:`cork` and :meth:`uncork`.
        self.corked = False
        self._corked_bytes = 0  # bytes queued while corked (so not handed to run() yet)
        self._finishing = False
        self._failure: BaseException | None = None
        #: While corked or fed by :meth:`put_later`, write once this many frames wait.
        self.burst = CORK_FRAMES
        # Made when a task first waits on them (run(), wait_room()): a writer whose frames all
        # go straight to the socket, as most connections' do, makes neither.
        self._wake: trio.Event | None = None
        self._room: trio.Event | None = None
        self._start: Callable[[], None] | None = None  # see run_when_needed
        #: Where the stream allows it (a plain relayed channel: see
        #: ``clients.channels.Channel.whole_frame_sender``), sends one whole frame at once
        #: below the stream's layers, or takes nothing and returns False (then the stream's
        #: ``send_nowait`` decides, as ever).  Tried for a frame that waits behind nothing.
        self.direct: Callable[[bytes], bool] | None = None

    def run_when_needed(self, start: Callable[[], None]) -> None:
        """Have ``start`` (which starts a task running :meth:`run`) called once, the first
        time :meth:`run` has something to do: a frame waits, part of a frame is owed, the
        transport failed, or :meth:`stop` or :meth:`finish` was called.  At once if it has
        already.  Never after :meth:`close`."""
        if self.closed:
            return
        if self._queue or self._rest is not None or self._failure is not None or self.stopped or self._finishing:
            start()
        else:
            self._start = start

    def _signal(self) -> None:
        """Wake :meth:`run`, starting it first if its owner asked to start it lazily."""
        wake = self._wake
        if wake is not None:
            self._wake = None  # (set once: run() makes another when it waits again)
            wake.set()
        start = self._start
        if start is not None and not self.closed:
            self._start = None
            start()

    def __len__(self) -> int:
        """Frames waiting in the queue, plus one that ``send_nowait`` wrote only part of.

        (Not counted: frames ``run()`` already took and is writing.  ``max_frames`` bounds
        the queue; the partly written frame is one more.)"""
        return len(self._queue) + (self._rest is not None)

    @property
    def has_room(self) -> bool:
        """Whether :meth:`send_nowait` would take a frame now (without WouldBlock)."""
        return not self.closed and len(self._queue) < self.max_frames

    @property
    def mid_frame(self) -> bool:
        """Whether the wire may hold part of a frame (nothing else can be sent cleanly now)."""
        return self._rest is not None or self._busy

    def send_nowait(self, frame: bytes) -> None:
        """Write ``frame`` now if the socket takes it, else queue it.

        Raises :class:`trio.WouldBlock` when ``max_frames`` frames already wait and
        :class:`trio.ClosedResourceError` after :meth:`close`.
        """
        if self.closed or self.stopped:
            raise trio.ClosedResourceError(f"this connection's writer is {'closed' if self.closed else 'stopped'}")
        if self.corked:
            queue = self._queue
            if len(queue) >= self.max_frames:
                raise trio.WouldBlock
            queue.append(frame)
            size = len(frame)
            self.queued_bytes += size
            self._corked_bytes += size
            if self._corked_bytes >= COALESCE or len(queue) >= self.burst:
                self._write_queued()
            return
        if self._queue or self._rest is not None or self._busy or self._failure is not None:
            if len(self._queue) >= self.max_frames:
                raise trio.WouldBlock
            self._queue.append(frame)
            self.queued_bytes += len(frame)
            self._signal()
            return
        direct = self.direct
        if direct is not None and direct(frame):
            return  # (all of it went: nothing to count)
        # As far as the socket takes it now; the rest is left to run() (and counted queued).
        try:
            rest = self.stream.send_nowait(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            self._failure = exc
            self._signal()
            return
        if rest:
            size = len(frame)
            self._rest = rest
            self._rest_size = size
            self.queued_bytes += size
            self._signal()

    def send_gathered_nowait(self, frame: Gathered) -> None:
        """:meth:`send_nowait` for frames given as pieces: written with one ``sendmsg`` of the
        pieces (:meth:`SecureStream.send_pieces_nowait`, a plain stream over a socket), what
        the socket did not take left to :meth:`run` as ever; queued as one entry behind what
        waits ahead of them (then :meth:`run` writes them so, and a relayed channel's always:
        it takes pieces only with waiting); joined where the stream does not write pieces
        (encrypted, not a socket)."""
        if self.closed or self.stopped:
            self.send_nowait(frame.join())  # (which raises for a closed or stopped writer)
            return
        if self.corked or self._queue or self._rest is not None or self._busy or self._failure is not None or self.stream.sends_pieces:
            queue = self._queue
            if len(queue) >= self.max_frames:
                raise trio.WouldBlock
            queue.append(frame)
            self._gathered += 1
            self.queued_bytes += frame.size
            if not self.corked:
                self._signal()
            else:  # (written anyway, as send_nowait's are: _write_queued leaves it to run())
                self._corked_bytes += frame.size
                if self._corked_bytes >= COALESCE or len(queue) >= self.burst:
                    self._write_queued()
            return
        try:
            rest = self.stream.send_pieces_nowait(frame.parts, frame.size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            self._failure = exc
            self._signal()
            return
        if rest is None:  # (the stream does not write pieces)
            self.send_nowait(frame.join())
        elif rest:
            self._rest = rest
            self._rest_size = frame.size
            self.queued_bytes += frame.size
            self._signal()

    async def put_gathered(self, frame: Gathered) -> None:
        """:meth:`put` for frames given as pieces (see :meth:`send_gathered_nowait`)."""
        if len(self._queue) >= self.max_frames:
            await self.wait_room()
        self.send_gathered_nowait(frame)

    def send_frames_nowait(self, frames: list[bytes], size: int) -> None:
        """:meth:`send_nowait` for several frames (``size`` bytes in all), each an entry of the
        queue: on a corked writer in one step; :class:`trio.WouldBlock` if they do not all fit."""
        if self.closed or self.stopped:
            raise trio.ClosedResourceError("this connection's writer is closed or stopped")
        if not self.corked:
            for frame in frames:
                self.send_nowait(frame)
            return
        queue = self._queue
        if len(queue) + len(frames) > self.max_frames:
            raise trio.WouldBlock
        queue.extend(frames)
        self.queued_bytes += size
        self._corked_bytes += size
        if self._corked_bytes >= COALESCE or len(queue) >= self.burst:
            self._write_queued()

    def cork(self) -> None:
        """Queue what :meth:`send_nowait` gets, without writing, until :meth:`uncork`."""
        self.corked = True

    def uncork(self) -> None:
        """Write what was queued while corked, joined into as few system calls as it takes."""
        self.corked = False
        if self._corked_bytes:
            self._write_queued()

    def _write_queued(self) -> None:
        """Write the frames queued while corked now, if nothing else is being written (else
        the ``run`` task writes them, in order, with whatever was ahead of them)."""
        self._corked_bytes = 0
        if self._rest is not None or self._busy or self._failure is not None or self.closed:
            self._signal()
            return
        queue = self._queue
        if not queue:
            return
        if self.queued_fds or self._gathered:  # frames up to the first one that carries a
            count = 0  # descriptor or is given as pieces (run() writes those)
            for item in queue:
                if isinstance(item, (tuple, Gathered)):
                    break
                count += 1
            if not count:
                self._signal()
                return
            batch: list[Any] = queue[:count]  # (frames as bytes)
            del queue[:count]
        else:
            batch = queue  # (no descriptor among them: all bytes)
            self._queue = queue = []
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        size = len(data)
        # As far as the socket takes it now; the rest is left to run().  (The frames are in
        # queued_bytes already, taken from the queue: reported sent once all of it went.)
        try:
            rest = self.stream.send_nowait(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            self._failure = exc
            self._signal()
            return
        if rest:
            self._rest = rest
            self._rest_size = size
            self._signal()
        else:
            self._sent(size)
            if self._queue:
                self._signal()

    async def wait_room(self) -> None:
        """Wait until the queue can take a frame (or the writer is closed or stopped: then
        the send that follows raises ClosedResourceError)."""
        while len(self._queue) >= self.max_frames and not self.closed and not self.stopped:
            room = self._room
            if room is None or room.is_set():
                room = self._room = trio.Event()
            await room.wait()

    async def put(self, frame: bytes) -> None:
        """:meth:`send_nowait`, waiting for room first; yields only if it had to wait.

        For callers that wait for something right after (a reply, the end of their task):
        their wait is the checkpoint, and a second one would cost a scheduler round."""
        if len(self._queue) >= self.max_frames:
            await self.wait_room()
        self.send_nowait(frame)

    async def put_later(self, frame: bytes) -> None:
        """Queue ``frame`` for the :meth:`run` task, waiting for room first (yields only if it
        had to wait).  Frames put this way by a task that does not yield in between go out in
        one write when it does: for a burst of one-way messages (a publishing loop)."""
        while not self.put_later_nowait(frame):
            await self.wait_room()

    def put_later_nowait(self, frame: bytes) -> bool:
        """:meth:`put_later` when the queue has room (no coroutine to step through): whether it
        took ``frame``; False, with nothing done, when the caller must await :meth:`put_later`."""
        if self.closed or self.stopped:
            raise trio.ClosedResourceError(f"this connection's writer is {'closed' if self.closed else 'stopped'}")
        queue = self._queue
        if len(queue) >= self.max_frames:
            return False
        queue.append(frame)
        self.queued_bytes += len(frame)
        if len(queue) >= self.burst:
            self._write_queued()
        else:
            self._signal()
        return True

    async def send(self, frame: bytes) -> None:
        """:meth:`send_nowait`, waiting for room first.

        Cancellation can only strike before the frame is taken: once taken it is sent whole.
        """
        await self.wait_room()
        self.send_nowait(frame)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def send_with_fd(self, frame: bytes, end: socket.socket) -> None:
        """Queue a frame that carries a socket end; ``end`` is closed once sent or dropped."""
        if self.closed or len(self._queue) >= self.max_frames:
            end.close()
            if self.closed:
                raise trio.ClosedResourceError("this connection's writer is closed")
            raise trio.WouldBlock
        self._queue.append((frame, end))
        self.queued_bytes += len(frame)
        self.queued_fds += 1
        self._signal()

    def stop(self) -> None:
        """Make :meth:`run` return at the next frame boundary (nothing more is written); a
        task waiting for room stops waiting (its send raises ClosedResourceError)."""
        self.stopped = True
        self._signal()
        self._open_room()

    def finish(self) -> None:
        """Make :meth:`run` return once everything accepted so far is written."""
        self._finishing = True
        self._signal()

    def close(self) -> None:
        """Drop what is queued (closing queued descriptors); later sends raise."""
        self.closed = True
        self._start = None  # (it may hold the writer's owner: no cycle left behind)
        queue, self._queue = self._queue, []
        self._gathered = 0
        for item in queue:
            if isinstance(item, tuple):
                item[1].close()
                self.queued_fds -= 1
                self.queued_bytes -= len(item[0])
            else:
                self.queued_bytes -= len(item)
        if self._wake is not None:
            self._wake.set()
        if self._room is not None:
            self._room.set()

    async def run(self) -> None:
        """Write queued frames until stopped or closed.

        Raises :class:`trio.BrokenResourceError` (or ClosedResourceError) when the transport
        fails.
        """
        unyielded = 0  # bytes written since this task last yielded
        while True:
            if self._failure is not None:
                raise trio.BrokenResourceError(f"sending failed: {self._failure}") from self._failure
            if self._rest is not None:
                self._busy = True
                await self.stream.send_wire(self._rest)
                self._busy = False
                self._rest = None
                self._sent(self._rest_size)
                continue
            if self.stopped or self.closed:
                return
            if not self._queue:
                if self._finishing:
                    return
                wake = self._wake = trio.Event()
                await wake.wait()
                unyielded = 0
                continue
            queue = self._queue
            item = queue[0]
            self._busy = True
            if isinstance(item, tuple):
                del queue[0]
                frame, end = item
                try:
                    await send_with_fds(self._socket(), frame, [end.fileno()])
                except OSError as exc:
                    raise trio.BrokenResourceError(f"sending a descriptor failed: {exc}") from exc
                finally:
                    end.close()  # the peer has its own copy now
                    self.queued_fds -= 1
                size = len(frame)
                self._busy = False
                self._sent(size)
                continue
            if type(item) is Gathered:
                del queue[0]
                self._gathered -= 1
                size = item.size
                if self.stream.sends_pieces:
                    # A relayed channel: its frames made from views of the pieces, one join
                    # per write of the bus connection (the join of the whole message spared).
                    await self.stream.send_pieces(item.parts, size)
                    rest = _NOTHING
                else:
                    pieces_rest = self.stream.send_pieces_nowait(item.parts, size)
                    # (None: the stream does not write pieces)
                    rest = self.stream.send_nowait(item.join()) if pieces_rest is None else pieces_rest
            else:
                # This frame and the ones after it, up to about COALESCE bytes, in one write.
                size = len(item)
                count, queued = 1, len(queue)
                while count < queued and size < COALESCE:
                    more = queue[count]
                    if isinstance(more, (tuple, Gathered)):
                        break
                    size += len(more)
                    count += 1
                if count > 1:
                    item = b"".join(cast("list[bytes]", queue[:count]))
                del queue[:count]
                rest = self.stream.send_nowait(cast(bytes, item))
            # As far as the socket took it at once (no task switch: trio's send_all yields
            # after every write); only what is left waits for the socket.  A writer that
            # never had to wait still yields every YIELD_AFTER bytes (gathered frames too).
            if rest:
                await self.stream.send_wire(rest)
                unyielded = 0
            else:
                unyielded += size
                if unyielded >= YIELD_AFTER:
                    unyielded = 0
                    self._busy = False
                    self._sent(size)
                    await trio.lowlevel.checkpoint()
                    continue
            self._busy = False
            self._sent(size)

    def _sent(self, size: int) -> None:
        self.queued_bytes -= size
        if self._room is not None and len(self._queue) < self.max_frames:
            self._open_room()
        if self.on_sent is not None:
            self.on_sent()

    def _open_room(self) -> None:
        """Wake the tasks waiting for room (set once: wait_room() makes another event when
        one waits again)."""
        room, self._room = self._room, None
        if room is not None:
            room.set()

    def _socket(self) -> trio.socket.SocketType:
        sock = getattr(self.stream.transport, "socket", None)
        if not isinstance(sock, trio.socket.SocketType) or self.stream.encrypted or sock.family != socket.AF_UNIX:
            # (Over TCP, sendmsg would take SCM_RIGHTS and the kernel drop the descriptor.)
            raise trio.BrokenResourceError("descriptors can only be passed over a plain Unix socket")
        return sock
