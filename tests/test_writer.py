"""FrameWriter (bus.io.writer) and SecureStream.send_nowait / send_wire, over real sockets.

Covered, plain and encrypted (box-stream), over Unix socketpairs and loopback TCP:

* an idle writer's ``send_nowait`` puts the frame in the kernel synchronously (no task
  switch, ``run()`` never started) and the peer decodes it;
* a socket that takes only part of a frame: the rest is kept (``mid_frame``,
  ``queued_bytes``, ``len``), later frames queue behind it, ``run()`` delivers every byte
  whole and in order; a producer never writes into the middle of a frame ``run()`` is
  writing;
* the bounded queue: ``WouldBlock`` past ``max_frames``, ``send()`` waiting for room (and
  cancellable before its frame is taken), counters back to 0, ``on_sent`` called;
* coalescing of many small queued frames into writes of about ``COALESCE`` bytes, in order;
* corking: queued without a write until ``uncork()`` (one write), written anyway at
  ``CORK_FRAMES``, and never ahead of a partly written frame;
* ``send_with_fd``: the descriptor travels over a plain Unix stream to an FdSocketStream,
  works on the other side, in order with the frames around it, and the writer's copy is
  closed; an encrypted or TCP stream makes ``run()`` raise BrokenResourceError;
* ``stop()`` (returns at a frame boundary, finishing a partial frame first), ``finish()``
  (returns once everything accepted is written) and ``close()`` (drops queued frames,
  closes queued descriptors, later sends raise, wakes ``send()``); ``has_room``;
* a vanished peer: ``send_nowait`` never raises to the producer, ``run()`` raises
  BrokenResourceError;
* ``run_when_needed`` (run() started lazily): not started while the socket takes every
  frame; started once by a partial write (the frame is then delivered whole, with those
  queued behind it, in order), by a transport failure (which run() then raises), by queued
  frames (``put_later``, ``send_with_fd``), ``stop()`` and ``finish()``; never after close;
* ``SecureStream.send_nowait`` itself: non-socket transports get all wire bytes back,
  before the handshake LocalProtocolError, after send_eof/aclose ClosedResourceError,
  during another send BusyResourceError, a dead socket breaks the stream.

Two tests pin bugs this file found (descriptors over plain TCP; a SecureStream over a
SecureStream).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import termios
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from bus.errors import LocalProtocolError
from bus.io.fdpass import FdSocketStream
from bus.io.secure import SecureStream
from bus.io.testing import secure_stream_pair, tcp_stream_pair, unix_stream_pair
from bus.io.writer import COALESCE, CORK_FRAMES, YIELD_AFTER, FrameWriter, Gathered
from bus.wire.boxstream import HEADER_SIZE, MAX_BODY
from bus.wire.identity import Identity

SERVER = Identity.generate()
CLIENT = Identity.generate()

#: Far more than a shrunken socket buffer (a few KiB) can take at once.
BIG = 2 * 1024 * 1024
#: Bound on every wait in this module.
TIMEOUT = 20

ENCRYPTED = pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
KINDS = pytest.mark.parametrize("kind", ["unix", "tcp"])


# -- helpers ---------------------------------------------------------------------------------


class Resources:
    """Streams and sockets a test opens; all closed at teardown, even when the test fails."""

    def __init__(self) -> None:
        self.streams: list[trio.abc.AsyncResource] = []
        self.sockets: list[socket.socket] = []

    async def pair(self, kind: str = "unix", *, encrypted: bool) -> tuple[SecureStream, SecureStream]:
        """A handshaken (sender, receiver) pair over a real socket."""
        transports = unix_stream_pair() if kind == "unix" else await tcp_stream_pair()
        self.streams.extend(transports)
        sender, receiver = await secure_stream_pair(transports, CLIENT, SERVER, encrypted=encrypted)
        self.streams += [sender, receiver]
        return sender, receiver

    async def fd_pair(self, *, encrypted: bool = False) -> tuple[SecureStream, SecureStream, FdSocketStream]:
        """A Unix pair whose receiving transport is an FdSocketStream."""
        left_sock, right_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        left = trio.SocketStream(trio.socket.from_stdlib_socket(left_sock))
        receiving = FdSocketStream(right_sock)
        self.streams += [left, receiving]
        sender, receiver = await secure_stream_pair((left, receiving), CLIENT, SERVER, encrypted=encrypted)
        self.streams += [sender, receiver]
        return sender, receiver, receiving

    def socketpair(self) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        self.sockets += [a, b]
        return a, b

    async def aclose(self) -> None:
        for sock in self.sockets:
            sock.close()
        for stream in reversed(self.streams):
            await trio.aclose_forcefully(stream)


@pytest.fixture
async def res() -> AsyncIterator[Resources]:
    resources = Resources()
    try:
        yield resources
    finally:
        await resources.aclose()


def _sock(stream: SecureStream) -> trio.socket.SocketType:
    transport = stream.transport
    assert isinstance(transport, (trio.SocketStream, FdSocketStream))
    return transport.socket


def _pending(receiver: SecureStream) -> int:
    """Bytes waiting in the receiving socket (FIONREAD), read without any checkpoint."""
    count = array.array("i", [0])
    fcntl.ioctl(_sock(receiver).fileno(), termios.FIONREAD, count)
    return count[0]


def _shrink(sender: SecureStream, receiver: SecureStream) -> None:
    """Make the kernel buffers between the two small (a few KiB; tens of KiB over TCP).

    A TCP receive buffer shrunk after the connection opened slows loopback to a crawl, so
    over TCP only the sending buffer shrinks.
    """
    _sock(sender).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    receiving = _sock(receiver)
    if receiving.family == socket.AF_UNIX:
        receiving.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


def _wire_size(size: int, encrypted: bool) -> int:
    """Bytes on the wire for ``size`` bytes of plaintext sent in one write."""
    return size + HEADER_SIZE * -(-size // MAX_BODY) if encrypted else size


async def _read_exactly(stream: SecureStream, size: int) -> bytes:
    """Exactly ``size`` bytes of plaintext (the caller bounds the time)."""
    got = bytearray()
    while len(got) < size:
        chunk = await stream.receive_some(min(size - len(got), 1 << 16))
        if not chunk:
            raise AssertionError(f"EOF after {len(got)} of {size} bytes")
        got += chunk
    return bytes(got)


async def _assert_nothing_more(sender: SecureStream, receiver: SecureStream) -> None:
    """Half-close the sender: the receiver must see EOF next, not one more byte."""
    with trio.fail_after(TIMEOUT):
        await sender.send_eof()
        assert await receiver.receive_some() == b""


class Calls:
    """An ``on_sent`` callback recording ``queued_bytes`` at each call."""

    def __init__(self) -> None:
        self.writer: FrameWriter | None = None
        self.queued: list[int] = []

    def __call__(self) -> None:
        assert self.writer is not None
        self.queued.append(self.writer.queued_bytes)


def _writer(stream: SecureStream, max_frames: int = 1000) -> tuple[FrameWriter, Calls]:
    calls = Calls()
    writer = FrameWriter(stream, max_frames=max_frames, on_sent=calls)
    calls.writer = writer
    return writer, calls


async def _drain(writer: FrameWriter, receiver: SecureStream, size: int) -> bytes:
    """Run the writer while the receiver reads ``size`` bytes, then stop it."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            got = await _read_exactly(receiver, size)
            writer.stop()
    return got


async def _drain_watching(writer: FrameWriter, receiver: SecureStream, total: int) -> tuple[bytes, list[int]]:
    """:func:`_drain`, with a task that notes ``queued_bytes`` each time it gets to run (each
    time run() yields): what the receiver read, and the distinct values noted, biggest first."""
    seen: list[int] = []

    async def watch() -> None:
        while writer.queued_bytes:
            seen.append(writer.queued_bytes)
            await trio.lowlevel.checkpoint()
        seen.append(0)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            nursery.start_soon(watch)
            got = await _read_exactly(receiver, total)
            writer.stop()
    return got, sorted(set(seen), reverse=True)


def _fill_with_partial_frame(writer: FrameWriter, sender: SecureStream, receiver: SecureStream) -> bytes:
    """Shrink the buffers and send_nowait a frame the socket can take only part of."""
    _shrink(sender, receiver)
    big = os.urandom(BIG)
    writer.send_nowait(big)
    assert writer.mid_frame, "the socket took the whole big frame: the test cannot clog it"
    assert len(writer) == 1
    assert writer.queued_bytes == len(big)
    return big


# -- 1. the fast path --------------------------------------------------------------------------


@ENCRYPTED
async def test_idle_writer_writes_straight_to_the_socket(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, calls = _writer(sender)
    frames = [os.urandom(10_000), os.urandom(5000)]
    assert _pending(receiver) == 0
    writer.send_nowait(frames[0])
    # No checkpoint since send_nowait: no other task ran, yet the kernel already holds it all.
    assert _pending(receiver) == _wire_size(len(frames[0]), encrypted)
    writer.send_nowait(frames[1])
    assert _pending(receiver) == sum(_wire_size(len(f), encrypted) for f in frames)
    assert len(writer) == 0
    assert writer.queued_bytes == 0
    assert not writer.mid_frame
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, 15_000) == b"".join(frames)  # run() never started
    assert calls.queued == []  # nothing was ever queued
    # Nobody waited on it: it made no events to wake a task (an idle connection keeps none).
    assert writer._wake is None and writer._room is None


@ENCRYPTED
async def test_idle_writer_over_tcp_needs_no_run(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("tcp", encrypted=encrypted)
    writer, _ = _writer(sender)
    frames = [os.urandom(n) for n in (1, 100, 7000, 40_000)]
    for frame in frames:
        writer.send_nowait(frame)
    assert len(writer) == 0 and writer.queued_bytes == 0 and not writer.mid_frame
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, sum(map(len, frames))) == b"".join(frames)


# -- 2. a socket that takes only part of a frame --------------------------------------------------


@KINDS
@ENCRYPTED
async def test_partial_frame_is_kept_and_later_frames_queue_behind_it(
    res: Resources, kind: str, encrypted: bool
) -> None:
    sender, receiver = await res.pair(kind, encrypted=encrypted)
    writer, calls = _writer(sender)
    big = _fill_with_partial_frame(writer, sender, receiver)
    later = [os.urandom(1000 + i) for i in range(5)] + [os.urandom(300_000)]
    for i, frame in enumerate(later, 1):
        writer.send_nowait(frame)
        assert len(writer) == 1 + i
        assert writer.queued_bytes == len(big) + sum(map(len, later[:i]))
        assert writer.mid_frame
    await trio.testing.wait_all_tasks_blocked()
    assert len(writer) == 1 + len(later)  # nothing moves without run()

    expected = big + b"".join(later)
    got = await _drain(writer, receiver, len(expected))
    assert len(got) == len(expected)
    assert got == expected
    assert len(writer) == 0
    assert writer.queued_bytes == 0
    assert not writer.mid_frame
    assert calls.queued and calls.queued[-1] == 0
    assert calls.queued[0] == sum(map(len, later))  # the partial frame completed first
    await _assert_nothing_more(sender, receiver)


@ENCRYPTED
async def test_send_nowait_never_cuts_into_a_frame_run_is_writing(res: Resources, encrypted: bool) -> None:
    """While run() is inside a write (queue empty, no kept rest), new frames still queue."""
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, _ = _writer(sender)
    first = _fill_with_partial_frame(writer, sender, receiver)
    second = os.urandom(BIG)  # over COALESCE: written on its own
    writer.send_nowait(second)
    small = os.urandom(100)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            head = await _read_exactly(receiver, len(first) + 1000)
            await trio.testing.wait_all_tasks_blocked()
            # run() is blocked half-way through ``second``: the wire is mid-frame.
            assert writer.mid_frame
            assert writer.queued_bytes == len(second)
            writer.send_nowait(small)
            assert writer.queued_bytes == len(second) + len(small)
            tail = await _read_exactly(receiver, len(first) + len(second) + len(small) - len(head))
            writer.stop()
    assert head + tail == first + second + small
    assert len(writer) == 0 and writer.queued_bytes == 0 and not writer.mid_frame
    await _assert_nothing_more(sender, receiver)


# -- 3. the bounded queue ------------------------------------------------------------------------


@ENCRYPTED
async def test_bounded_queue_send_nowait_refuses_and_send_waits(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, calls = _writer(sender, max_frames=3)
    big = _fill_with_partial_frame(writer, sender, receiver)
    queued = [os.urandom(500 + i) for i in range(3)]
    for frame in queued:
        assert writer.has_room
        writer.send_nowait(frame)
    assert not writer.has_room
    with pytest.raises(trio.WouldBlock):
        writer.send_nowait(b"one too many")
    mine, _theirs = res.socketpair()
    with pytest.raises(trio.WouldBlock):
        writer.send_with_fd(b"one too many, with a descriptor", mine)
    assert mine.fileno() == -1  # refused: its end is closed, not leaked
    assert len(writer) == 4  # the partial frame and the full queue
    assert writer.queued_bytes == len(big) + sum(map(len, queued))  # refused frames not counted

    # send() cancelled while waiting for room leaves nothing behind.
    with trio.move_on_after(0.05) as scope:
        await writer.send(b"given up before it was taken")
    assert scope.cancelled_caught
    assert len(writer) == 4
    assert writer.queued_bytes == len(big) + sum(map(len, queued))

    late = os.urandom(700)
    done = trio.Event()

    async def producer() -> None:
        await writer.send(late)
        done.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # no room and nobody writing: send() waits
            assert calls.queued == []
            nursery.start_soon(writer.run)
            expected = big + b"".join(queued) + late
            got = await _read_exactly(receiver, len(expected))
            await done.wait()
            writer.stop()
    assert got == expected
    assert len(writer) == 0
    assert writer.queued_bytes == 0
    assert writer.has_room
    assert calls.queued and calls.queued[-1] == 0
    await _assert_nothing_more(sender, receiver)


async def test_send_with_room_completes_at_once(res: Resources) -> None:
    sender, receiver = await res.pair("unix", encrypted=True)
    writer, _ = _writer(sender, max_frames=1)
    frame = os.urandom(2000)
    with trio.fail_after(TIMEOUT):
        await writer.send(frame)
        assert len(writer) == 0
        assert await _read_exactly(receiver, len(frame)) == frame


# -- 4. coalescing -------------------------------------------------------------------------------


@KINDS
@ENCRYPTED
async def test_many_small_queued_frames_are_coalesced_in_order(res: Resources, kind: str, encrypted: bool) -> None:
    sender, receiver = await res.pair(kind, encrypted=encrypted)
    writer, calls = _writer(sender, max_frames=5000)
    big = _fill_with_partial_frame(writer, sender, receiver)
    size = 100
    small = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(3000)]
    for frame in small:
        writer.send_nowait(frame)
    assert len(writer) == 1 + len(small)
    total = len(small) * size
    got = await _drain(writer, receiver, len(big) + total)
    assert got[: len(big)] == big
    assert got[len(big) :] == b"".join(small)
    # on_sent runs once per write: the partial frame, then each joined batch.
    assert calls.queued[0] == total
    batches = [a - b for a, b in zip(calls.queued, calls.queued[1:])]
    assert sum(batches) == total
    assert len(batches) <= -(-total // COALESCE)  # joined, not one write per frame
    assert all(COALESCE <= b < COALESCE + size for b in batches[:-1])  # about COALESCE each
    assert 0 < batches[-1] < COALESCE + size


async def test_large_frames_are_not_joined(res: Resources) -> None:
    sender, receiver = await res.pair("unix", encrypted=False)
    writer, calls = _writer(sender)
    big = _fill_with_partial_frame(writer, sender, receiver)
    frames = [os.urandom(COALESCE + 1) for _ in range(3)]
    for frame in frames:
        writer.send_nowait(frame)
    got = await _drain(writer, receiver, len(big) + sum(map(len, frames)))
    assert got == big + b"".join(frames)
    assert len(calls.queued) == 4  # the partial frame, then one write per large frame


@ENCRYPTED
async def test_a_corked_writer_queues_then_writes_once_and_in_order(res: Resources, encrypted: bool) -> None:
    """cork(): send_nowait only queues (nothing reaches the kernel); uncork() writes it all
    with one write; CORK_FRAMES frames write at once even while corked; order holds."""
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, calls = _writer(sender, max_frames=5000)
    writer.cork()
    frames = [i.to_bytes(4, "big") + os.urandom(60) for i in range(CORK_FRAMES - 1)]
    for frame in frames:
        writer.send_nowait(frame)
    assert _pending(receiver) == 0 and len(writer) == len(frames)
    assert writer.queued_bytes == sum(map(len, frames))
    writer.uncork()
    assert not writer.corked and len(writer) == 0 and writer.queued_bytes == 0
    assert calls.queued == [0]  # one write, all of it
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, sum(map(len, frames))) == b"".join(frames)
    # Corked, the CORK_FRAMES-th frame writes what waits (a cork never fills the queue).
    writer.cork()
    more = [os.urandom(10) for _ in range(CORK_FRAMES + 5)]
    for frame in more:
        writer.send_nowait(frame)
    assert len(writer) == 5 and len(calls.queued) == 2
    writer.uncork()
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, sum(map(len, more))) == b"".join(more)
    assert writer.queued_bytes == 0


@ENCRYPTED
async def test_send_frames_nowait_queues_each_frame_as_send_nowait_would(res: Resources, encrypted: bool) -> None:
    """send_frames_nowait (busd's event runs): corked, the frames are queued as entries of
    their own (counted as frames, bytes as given), written with the rest on uncork, in order;
    frames that would not all fit the queue raise WouldBlock and queue nothing; uncorked, each
    goes as send_nowait sends it; a closed writer refuses."""
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, calls = _writer(sender, max_frames=10)
    writer.cork()
    writer.send_nowait(b"a" * 7)
    frames = [bytes([i]) * (i + 1) for i in range(5)]
    writer.send_frames_nowait(frames, sum(map(len, frames)))
    assert len(writer) == 6 and writer.queued_bytes == 7 + 15 and _pending(receiver) == 0
    with pytest.raises(trio.WouldBlock):
        writer.send_frames_nowait([b"x"] * 5, 5)
    assert len(writer) == 6 and writer.queued_bytes == 22
    writer.uncork()
    writer.send_frames_nowait([b"yy", b"z"], 3)  # (uncorked: straight to the socket)
    assert len(writer) == 0 and writer.queued_bytes == 0
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, 25) == b"a" * 7 + b"".join(frames) + b"yyz"
    writer.close()
    with pytest.raises(trio.ClosedResourceError):
        writer.send_frames_nowait([b"q"], 1)


@ENCRYPTED
async def test_put_later_nowait_takes_what_put_later_would_without_waiting(res: Resources, encrypted: bool) -> None:
    """put_later_nowait (a publishing loop's step): with room, queues the frame for run() as
    put_later does (every ``burst`` frames written at once); with a full queue, False and
    nothing queued (the caller awaits put_later); a closed writer refuses."""
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, calls = _writer(sender, max_frames=3)
    writer.burst = 100
    frames = [os.urandom(20) for _ in range(3)]
    assert all(writer.put_later_nowait(frame) for frame in frames)
    assert len(writer) == 3 and _pending(receiver) == 0  # (left to run())
    assert writer.put_later_nowait(b"over") is False and len(writer) == 3 and writer.queued_bytes == 60
    writer.burst = 3
    writer._queue.pop()
    writer.queued_bytes -= 20
    assert writer.put_later_nowait(frames[2])  # the burst-th frame writes what waits, at once
    assert len(writer) == 0
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, 60) == b"".join(frames)
    writer.close()
    with pytest.raises(trio.ClosedResourceError):
        writer.put_later_nowait(b"x")


@ENCRYPTED
async def test_put_later_writes_each_burst_of_frames_at_once(res: Resources, encrypted: bool) -> None:
    """put_later() leaves frames to run() (nothing is written while they are made), except
    that every ``burst`` frames waiting are written at once: the far end can start on them
    while the producer makes the next; order holds and run() writes the rest."""
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, calls = _writer(sender)
    writer.burst = 4
    frames = [i.to_bytes(4, "big") + os.urandom(30) for i in range(10)]
    for frame in frames[:3]:
        await writer.put_later(frame)
    assert _pending(receiver) == 0 and len(writer) == 3
    for frame in frames[3:]:
        await writer.put_later(frame)
    assert len(calls.queued) == 2 and len(writer) == 2  # two bursts of 4 written; 2 wait
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, sum(map(len, frames[:8]))) == b"".join(frames[:8])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            assert await _read_exactly(receiver, sum(map(len, frames[8:]))) == b"".join(frames[8:])
            writer.stop()
    assert writer.queued_bytes == 0


@ENCRYPTED
async def test_run_writes_what_the_socket_takes_without_a_task_switch_per_write(res: Resources, encrypted: bool) -> None:
    """run() writes queued frames straight to a socket that takes them, one write after the
    other in one step (trio's send_all would yield after each), and still yields every
    YIELD_AFTER bytes: another task sees the queue go down in steps of that, never a frame
    at a time; the bytes arrive whole and in order."""
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    _sock(sender).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)  # takes all of it
    writer, _calls = _writer(sender)
    writer.burst = 1000  # (put_later leaves every frame to run())
    frame_size = 64 * 1024
    frames = [os.urandom(frame_size) for _ in range(4 * YIELD_AFTER // frame_size)]
    for frame in frames:
        await writer.put_later(frame)
    total = sum(map(len, frames))
    assert writer.queued_bytes == total and _pending(receiver) == 0
    got, steps = await _drain_watching(writer, receiver, total)
    assert got == b"".join(frames)
    assert steps[0] <= total and steps[-1] == 0  # (the watcher may start after the first step)
    assert all(value % YIELD_AFTER == 0 for value in steps)  # never part of a step
    assert len(steps) >= 3  # (it yielded on its way, more than once)


async def test_uncork_behind_a_partial_frame_leaves_the_queue_to_run(res: Resources) -> None:
    sender, receiver = await res.pair("unix", encrypted=False)
    writer, _ = _writer(sender)
    big = _fill_with_partial_frame(writer, sender, receiver)
    writer.cork()
    frames = [os.urandom(100) for _ in range(10)]
    for frame in frames:
        writer.send_nowait(frame)
    writer.uncork()  # the socket is full and a frame is half written: nothing jumps ahead
    assert len(writer) == 1 + len(frames)
    got = await _drain(writer, receiver, len(big) + 1000)
    assert got == big + b"".join(frames)


@ENCRYPTED
async def test_corked_frames_go_out_in_one_write_at_uncork(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, calls = _writer(sender)
    frames = [b"corked %d " % i + os.urandom(40) for i in range(5)]
    writer.cork()
    for frame in frames:
        writer.send_nowait(frame)
    assert len(writer) == 5 and writer.queued_bytes == sum(map(len, frames))
    writer.uncork()  # written now, without run(): one write, one on_sent
    assert len(writer) == 0 and writer.queued_bytes == 0
    assert calls.queued == [0]
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, sum(map(len, frames))) == b"".join(frames)
    # The writer is usable as before: the next frame goes straight to the socket.
    writer.send_nowait(b"after")
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, 5) == b"after"
    await _assert_nothing_more(sender, receiver)


async def test_uncork_writes_up_to_a_descriptor_frame_and_run_the_rest_in_order(res: Resources) -> None:
    sender, receiver, receiving = await res.fd_pair()
    writer, calls = _writer(sender)
    mine, theirs = res.socketpair()
    writer.cork()
    writer.send_nowait(b"one,")
    writer.send_nowait(b"two,")
    writer.send_with_fd(b"carrier,", mine)
    writer.send_nowait(b"three")
    writer.uncork()
    # What came before the descriptor's frame is written at once; the rest waits for run().
    assert len(writer) == 2 and calls.queued == [len(b"carrier,three")]
    assert mine.fileno() != -1
    got = await _drain(writer, receiver, len(b"one,two,carrier,three"))
    assert got == b"one,two,carrier,three"
    assert len(writer) == 0 and writer.queued_bytes == 0 and writer.queued_fds == 0
    assert mine.fileno() == -1
    fd = receiving.take_fd()
    assert fd is not None
    with socket.socket(fileno=fd) as passed:
        passed.sendall(b"ok")
        theirs.settimeout(TIMEOUT)
        assert theirs.recv(10) == b"ok"

# -- 5. frames carrying a descriptor -----------------------------------------------------------


async def test_send_with_fd_passes_a_working_descriptor(res: Resources) -> None:
    sender, receiver, receiving = await res.fd_pair()
    writer, _ = _writer(sender)
    before = os.urandom(3000)
    carriers = [b"carrier %d " % i + os.urandom(50) for i in range(3)]
    between = [os.urandom(200) for _ in range(2)]
    ends = [res.socketpair() for _ in carriers]
    writer.send_nowait(before)  # the fast path
    expected = before
    for i, (carrier, (mine, _)) in enumerate(zip(carriers, ends)):
        writer.send_with_fd(carrier, mine)
        expected += carrier
        if i < len(between):
            writer.send_nowait(between[i])  # queued behind the descriptor frame
            expected += between[i]
    assert len(writer) == 5
    assert all(mine.fileno() != -1 for mine, _ in ends)  # still the writer's until sent

    got = await _drain(writer, receiver, len(expected))
    assert got == expected
    assert len(writer) == 0 and writer.queued_bytes == 0
    # The writer closed its copies once sent.
    assert all(mine.fileno() == -1 for mine, _ in ends)
    fds = [receiving.take_fd() for _ in ends]
    assert receiving.take_fd() is None
    for i, (fd, (_, theirs)) in enumerate(zip(fds, ends)):
        assert fd is not None
        theirs.settimeout(TIMEOUT)
        with socket.socket(fileno=fd) as passed:
            # The descriptors arrive in frame order: each reaches its own peer.
            passed.sendall(b"through passed end %d" % i)
            assert theirs.recv(100) == b"through passed end %d" % i
            theirs.sendall(b"and back")
            assert passed.recv(100) == b"and back"
        # The received copy was the last one (the writer closed its own): EOF.
        assert theirs.recv(100) == b""
    await _assert_nothing_more(sender, receiver)


async def test_send_with_fd_behind_a_partial_frame(res: Resources) -> None:
    sender, receiver, receiving = await res.fd_pair()
    writer, _ = _writer(sender)
    big = _fill_with_partial_frame(writer, sender, receiver)
    mine, theirs = res.socketpair()
    writer.send_with_fd(b"carrier", mine)
    writer.send_nowait(b"after")
    got = await _drain(writer, receiver, len(big) + len(b"carrier") + len(b"after"))
    assert got == big + b"carrier" + b"after"
    assert mine.fileno() == -1
    fd = receiving.take_fd()
    assert fd is not None
    with socket.socket(fileno=fd) as passed:
        passed.sendall(b"ok")
        theirs.settimeout(TIMEOUT)
        assert theirs.recv(10) == b"ok"


async def test_send_with_fd_over_an_encrypted_stream_breaks_run(res: Resources) -> None:
    sender, receiver, receiving = await res.fd_pair(encrypted=True)
    writer, _ = _writer(sender)
    writer.send_nowait(b"before")
    mine, _ = res.socketpair()
    writer.send_with_fd(b"carrier", mine)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(trio.BrokenResourceError):
            await writer.run()
        assert await _read_exactly(receiver, 6) == b"before"
    assert mine.fileno() == -1
    assert receiving.take_fd() is None


async def test_send_with_fd_over_plain_tcp_breaks_run(res: Resources) -> None:
    """Descriptors need a plain Unix socket: over plain TCP ``sendmsg`` would accept
    SCM_RIGHTS and the kernel silently drop the descriptor.  Like an encrypted stream,
    run() raises BrokenResourceError and nothing of the frame is sent.
    """
    sender, receiver = await res.pair("tcp", encrypted=False)
    writer, _ = _writer(sender)
    mine, _ = res.socketpair()
    writer.send_with_fd(b"carrier", mine)
    outcome: list[BaseException | None] = []

    async def runner() -> None:
        try:
            await writer.run()
        except trio.BrokenResourceError as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            await trio.testing.wait_all_tasks_blocked()  # run() either failed or went idle
            writer.stop()
        arrived = b""
        with trio.move_on_after(0.2):
            arrived = await receiver.receive_some()
    assert mine.fileno() == -1
    assert len(outcome) == 1 and isinstance(outcome[0], trio.BrokenResourceError), (
        f"BUG: over plain TCP the descriptor was silently dropped; the peer got {arrived!r} "
        "with no descriptor and run() did not fail"
    )
    assert arrived == b""


# -- 6. stop() and close() ----------------------------------------------------------------------


@ENCRYPTED
async def test_stop_finishes_the_partial_frame_then_returns(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, _ = _writer(sender)
    big = _fill_with_partial_frame(writer, sender, receiver)
    queued = [os.urandom(100) for _ in range(3)]
    for frame in queued:
        writer.send_nowait(frame)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await trio.testing.wait_all_tasks_blocked()  # run() is stuck in the partial frame
            writer.stop()
            got = await _read_exactly(receiver, len(big))
        # run() returned by itself (the nursery closed) at the frame boundary.
    assert got == big
    assert not writer.mid_frame
    assert len(writer) == len(queued)  # not written after stop()
    assert writer.queued_bytes == sum(map(len, queued))
    await _assert_nothing_more(sender, receiver)


@ENCRYPTED
async def test_stop_before_run_still_finishes_the_partial_frame(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, _ = _writer(sender)
    big = _fill_with_partial_frame(writer, sender, receiver)
    writer.send_nowait(b"not after stop")
    writer.stop()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            got = await _read_exactly(receiver, len(big))
    assert got == big
    assert not writer.mid_frame and len(writer) == 1
    await _assert_nothing_more(sender, receiver)


async def test_stop_returns_from_an_idle_run(res: Resources) -> None:
    sender, _ = await res.pair("unix", encrypted=False)
    writer, _ = _writer(sender)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await trio.testing.wait_all_tasks_blocked()
            writer.stop()
    assert not writer.mid_frame


async def test_stop_ends_the_wait_of_a_send_for_room(res: Resources) -> None:
    """A full writer that is stopped (busd's slow-consumer policy) never makes room: a task
    waiting in put() for it is told the writer is stopped, it is not left waiting."""
    sender, receiver = await res.pair("unix", encrypted=False)
    writer, _ = _writer(sender, max_frames=2)
    _fill_with_partial_frame(writer, sender, receiver)
    writer.send_nowait(b"first")
    writer.send_nowait(b"second")
    assert not writer.has_room
    outcome: list[str] = []

    async def producer() -> None:
        try:
            await writer.put(b"third")
        except trio.ClosedResourceError as exc:
            outcome.append(str(exc))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            assert outcome == []  # waiting for room
            writer.stop()
    assert outcome == ["this connection's writer is stopped"]
    assert len(writer) == 3  # the partial frame and the two queued: nothing added


@ENCRYPTED
async def test_finish_returns_once_everything_accepted_is_written(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, calls = _writer(sender)
    big = _fill_with_partial_frame(writer, sender, receiver)
    queued = [os.urandom(100) for _ in range(3)] + [os.urandom(BIG)]
    for frame in queued:
        writer.send_nowait(frame)
    expected = big + b"".join(queued)
    writer.finish()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            got = await _read_exactly(receiver, len(expected))
        # run() returned by itself (no stop()), after the last frame.
    assert got == expected
    assert len(writer) == 0 and writer.queued_bytes == 0 and not writer.mid_frame
    assert calls.queued[-1] == 0
    await _assert_nothing_more(sender, receiver)


async def test_finish_returns_from_an_idle_run(res: Resources) -> None:
    sender, _ = await res.pair("unix", encrypted=True)
    writer, _ = _writer(sender)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await trio.testing.wait_all_tasks_blocked()
            writer.finish()


@ENCRYPTED
async def test_close_drops_queued_frames_and_descriptors(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, _ = _writer(sender, max_frames=4)
    big = _fill_with_partial_frame(writer, sender, receiver)
    ends = [res.socketpair() for _ in range(2)]
    writer.send_nowait(b"dropped 1")
    writer.send_with_fd(b"dropped 2", ends[0][0])
    writer.send_nowait(b"dropped 3")
    writer.send_with_fd(b"dropped 4", ends[1][0])

    refused = trio.Event()

    async def producer() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await writer.send(b"waiting for room when closed")
        refused.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            assert not refused.is_set()
            writer.close()
            await refused.wait()  # close() wakes a send() waiting for room
    assert all(mine.fileno() == -1 for mine, _ in ends)
    for _, theirs in ends:
        theirs.settimeout(TIMEOUT)
        assert theirs.recv(10) == b""  # the only copy of its peer is gone
    assert len(writer) == 1  # only the partial frame remains
    assert writer.queued_bytes == len(big)  # the dropped frames no longer count
    assert not writer.has_room
    with pytest.raises(trio.ClosedResourceError):
        writer.send_nowait(b"after close")
    late, _ = res.socketpair()
    with pytest.raises(trio.ClosedResourceError):
        writer.send_with_fd(b"after close", late)
    assert late.fileno() == -1

    # run() still completes the partial frame (the wire stays clean), then returns.
    got = await _drain(writer, receiver, len(big))
    assert got == big
    assert not writer.mid_frame and len(writer) == 0
    await _assert_nothing_more(sender, receiver)


async def test_close_ends_an_idle_run(res: Resources) -> None:
    sender, receiver = await res.pair("unix", encrypted=True)
    writer, _ = _writer(sender)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            writer.send_nowait(b"sent")
            await trio.testing.wait_all_tasks_blocked()
            writer.close()
        assert await _read_exactly(receiver, 4) == b"sent"
    with pytest.raises(trio.ClosedResourceError):
        writer.send_nowait(b"x")
    await _assert_nothing_more(sender, receiver)


# -- 7. a peer that vanished -----------------------------------------------------------------


@ENCRYPTED
async def test_vanished_peer_breaks_run_not_the_producer(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, _ = _writer(sender, max_frames=10)
    caught: list[BaseException] = []

    async def runner() -> None:
        try:
            await writer.run()
        except trio.BrokenResourceError as exc:
            caught.append(exc)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            await trio.testing.wait_all_tasks_blocked()
            await trio.aclose_forcefully(receiver)
            for _ in range(5):
                writer.send_nowait(os.urandom(1000))  # never raises here
    assert len(caught) == 1
    with pytest.raises(trio.BrokenResourceError):
        await sender.send_all(b"x")  # the failed write broke the stream too


@ENCRYPTED
async def test_vanished_peer_before_run_starts(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, _ = _writer(sender, max_frames=10)
    await trio.aclose_forcefully(receiver)
    writer.send_nowait(b"into the void")
    writer.send_nowait(b"and again")
    with trio.fail_after(TIMEOUT), pytest.raises(trio.BrokenResourceError):
        await writer.run()


@ENCRYPTED
async def test_vanished_peer_while_a_partial_frame_waits(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, _ = _writer(sender)
    _fill_with_partial_frame(writer, sender, receiver)
    writer.send_nowait(b"queued")
    await trio.aclose_forcefully(receiver)
    with trio.fail_after(TIMEOUT), pytest.raises(trio.BrokenResourceError):
        await writer.run()
    writer.send_nowait(b"still not raised to the producer")


@ENCRYPTED
async def test_vanished_tcp_peer_breaks_run(res: Resources, encrypted: bool) -> None:
    """Over TCP the first writes may still succeed; a later one meets the reset."""
    sender, receiver = await res.pair("tcp", encrypted=encrypted)
    writer, _ = _writer(sender, max_frames=10_000)
    await trio.aclose_forcefully(receiver)

    async def producer() -> None:
        while True:
            writer.send_nowait(os.urandom(1000))
            await trio.sleep(0.005)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            with pytest.raises(trio.BrokenResourceError):
                await writer.run()
            nursery.cancel_scope.cancel()


# -- 8. SecureStream.send_nowait / send_wire themselves ----------------------------------------


@ENCRYPTED
async def test_secure_send_nowait_over_a_memory_stream_returns_all_wire_bytes(encrypted: bool) -> None:
    sender, receiver = await secure_stream_pair(trio.testing.memory_stream_pair(), CLIENT, SERVER, encrypted=encrypted)
    data = os.urandom(10_000)
    rest = sender.send_nowait(data)
    assert isinstance(rest, memoryview)
    assert len(rest) == _wire_size(len(data), encrypted)
    if encrypted:
        assert data[:100] not in bytes(rest)  # ciphertext
    else:
        assert bytes(rest) == data
    assert len(sender.send_nowait(b"")) == 0
    with trio.fail_after(TIMEOUT):
        await sender.send_wire(rest)
        await sender.send_all(b"after")
        await sender.send_eof()
        got = bytearray()
        while chunk := await receiver.receive_some():
            got += chunk
    assert got == data + b"after"  # delivered once, by send_wire, in order
    await sender.aclose()
    await receiver.aclose()


@ENCRYPTED
async def test_frame_writer_over_a_memory_stream_queues_everything(encrypted: bool) -> None:
    sender, receiver = await secure_stream_pair(trio.testing.memory_stream_pair(), CLIENT, SERVER, encrypted=encrypted)
    writer, calls = _writer(sender)
    frames = [os.urandom(n) for n in (10, 5000, 70_000)]
    for frame in frames:
        writer.send_nowait(frame)
    assert writer.mid_frame  # the first frame's wire bytes are kept, nothing written
    assert len(writer) == 3
    assert writer.queued_bytes == sum(map(len, frames))
    got = await _drain(writer, receiver, sum(map(len, frames)))
    assert got == b"".join(frames)
    assert writer.queued_bytes == 0 and calls.queued[-1] == 0
    await sender.aclose()
    await receiver.aclose()


async def test_secure_send_nowait_before_the_handshake_over_memory() -> None:
    left, right = trio.testing.memory_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    with pytest.raises(LocalProtocolError):
        client.send_nowait(b"too early")
    # Nothing reached the transport: the handshake and the stream still work.
    server = SecureStream.server(right, SERVER)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        await client.send_all(b"fine")
        assert await _read_exactly(server, 4) == b"fine"
    await client.aclose()
    await server.aclose()


@ENCRYPTED
async def test_secure_send_nowait_before_the_handshake_over_a_socket(res: Resources, encrypted: bool) -> None:
    left, right = unix_stream_pair()
    res.streams += [left, right]
    client = SecureStream.client(left, CLIENT, SERVER.public_key, encrypted=encrypted)
    res.streams.append(client)
    with pytest.raises(LocalProtocolError):
        client.send_nowait(b"too early")
    count = array.array("i", [0])
    fcntl.ioctl(right.socket.fileno(), termios.FIONREAD, count)
    assert count[0] == 0  # nothing reached the wire
    writer, _ = _writer(client)
    with pytest.raises(LocalProtocolError):  # a caller bug: raised to the caller at once
        writer.send_nowait(b"too early")


@ENCRYPTED
async def test_secure_send_nowait_after_send_eof_or_aclose(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    await sender.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        sender.send_nowait(b"after eof")
    assert await receiver.receive_some() == b""
    writer, _ = _writer(sender)
    writer.send_nowait(b"after eof")  # a writer reports it from run(), not to the producer
    with trio.fail_after(TIMEOUT), pytest.raises(trio.BrokenResourceError):
        await writer.run()
    await receiver.aclose()
    await sender.aclose()
    with pytest.raises(trio.ClosedResourceError):
        sender.send_nowait(b"after aclose")


async def test_secure_send_nowait_while_another_task_sends(res: Resources) -> None:
    sender, receiver = await res.pair("unix", encrypted=True)
    _shrink(sender, receiver)
    data = os.urandom(BIG)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_all, data)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                sender.send_nowait(b"cut in")
            assert await _read_exactly(receiver, len(data)) == data


@KINDS
@ENCRYPTED
async def test_secure_send_nowait_partial_write_then_send_wire(res: Resources, kind: str, encrypted: bool) -> None:
    sender, receiver = await res.pair(kind, encrypted=encrypted)
    _shrink(sender, receiver)
    data = os.urandom(BIG)
    rest = sender.send_nowait(data)
    wire = _wire_size(len(data), encrypted)
    assert 0 < len(rest) < wire
    if not encrypted:
        assert bytes(rest) == data[len(data) - len(rest) :]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def finish() -> None:
                await sender.send_wire(rest)
                await sender.send_all(b"next")

            nursery.start_soon(finish)
            got = await _read_exactly(receiver, len(data) + 4)
    assert got == data + b"next"


async def test_secure_send_nowait_over_another_secure_stream() -> None:
    """A SecureStream over another SecureStream: the inner one has no synchronous
    ``send_some_nowait`` (its ``send_nowait`` returns the unsent rest, not a count), so
    all wire bytes come back and ``send_wire`` delivers them, exactly once, in order.
    """
    inner_sender, inner_receiver = await secure_stream_pair(unix_stream_pair(), CLIENT, SERVER, encrypted=True)
    sender, receiver = await secure_stream_pair((inner_sender, inner_receiver), CLIENT, SERVER, encrypted=True)
    data = os.urandom(1000)
    try:
        with trio.fail_after(TIMEOUT):
            rest = sender.send_nowait(data)
            assert len(rest) > len(data)  # every wire byte came back (box headers included)
            await sender.send_wire(rest)
            await sender.send_all(b"next")
            assert await _read_exactly(receiver, len(data) + 4) == data + b"next"
    finally:
        for stream in (sender, receiver, inner_sender, inner_receiver):
            await trio.aclose_forcefully(stream)


@ENCRYPTED
async def test_secure_send_nowait_on_a_dead_socket_breaks_the_stream(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    await trio.aclose_forcefully(receiver)
    with pytest.raises(trio.BrokenResourceError):
        sender.send_nowait(b"x")
    # The stream itself is broken now, for calls that would not touch the socket too.
    with pytest.raises(trio.BrokenResourceError):
        sender.send_nowait(b"")
    with pytest.raises(trio.BrokenResourceError):
        await sender.receive_some()  # not a clean EOF
    with pytest.raises(trio.BrokenResourceError):
        await sender.send_all(b"z")


async def test_nothing_is_taken_after_stop(res: Resources) -> None:
    """After stop() the writer takes no frame, not even on the fast path of an idle socket."""
    sender, receiver = await res.pair("unix", encrypted=False)
    writer, _ = _writer(sender)
    writer.send_nowait(b"before")
    writer.stop()
    with pytest.raises(trio.ClosedResourceError, match="stopped"):
        writer.send_nowait(b"after")
    with trio.fail_after(TIMEOUT):
        await writer.run()  # returns at once: nothing half-written
        assert await _read_exactly(receiver, 6) == b"before"
    await _assert_nothing_more(sender, receiver)


# -- 9. run() started lazily (run_when_needed) ------------------------------------------------


class LazyRun:
    """Starts ``writer.run()`` in ``nursery`` when the writer asks for it, and records how
    many times it was asked and what ``run()`` raised."""

    def __init__(self, writer: FrameWriter, nursery: trio.Nursery) -> None:
        self.writer = writer
        self.nursery = nursery
        self.starts = 0
        self.errors: list[BaseException] = []
        self.returned = 0
        writer.run_when_needed(self.start)

    def start(self) -> None:
        self.starts += 1
        self.nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            await self.writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.errors.append(exc)
        else:
            self.returned += 1


@ENCRYPTED
async def test_lazy_run_is_not_started_while_the_socket_takes_every_frame(res: Resources, encrypted: bool) -> None:
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, _ = _writer(sender)
    frames = [os.urandom(n) for n in (10, 5000, 20_000)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            lazy = LazyRun(writer, nursery)
            for frame in frames:
                writer.send_nowait(frame)
            writer.cork()
            writer.send_nowait(b"corked")
            writer.uncork()  # written at once, by uncork itself
            assert await _read_exactly(receiver, sum(map(len, frames)) + 6) == b"".join(frames) + b"corked"
            writer.close()  # closing a writer that never ran starts nothing
    assert lazy.starts == 0 and not lazy.errors


@KINDS
@ENCRYPTED
async def test_lazy_run_delivers_a_frame_the_socket_took_only_in_part(res: Resources, kind: str, encrypted: bool) -> None:
    """The partial write starts run() (once), which finishes that frame and then the frames
    queued behind it, whole and in order."""
    sender, receiver = await res.pair(kind, encrypted=encrypted)
    writer, calls = _writer(sender)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            lazy = LazyRun(writer, nursery)
            big = _fill_with_partial_frame(writer, sender, receiver)
            assert lazy.starts == 1
            later = [os.urandom(1000 + i) for i in range(5)]
            for frame in later:
                writer.send_nowait(frame)
            assert lazy.starts == 1  # asked once, however much waits
            expected = big + b"".join(later)
            assert await _read_exactly(receiver, len(expected)) == expected
            await trio.testing.wait_all_tasks_blocked()  # (run() back from its last write)
            assert writer.queued_bytes == 0 and not writer.mid_frame and len(writer) == 0
            writer.stop()
    assert lazy.starts == 1 and lazy.returned == 1 and not lazy.errors
    assert calls.queued[-1] == 0
    await _assert_nothing_more(sender, receiver)


@ENCRYPTED
async def test_lazy_run_reports_a_broken_transport(res: Resources, encrypted: bool) -> None:
    """A write that fails in send_nowait never raises to the producer: it starts run(),
    which raises BrokenResourceError."""
    sender, receiver = await res.pair("unix", encrypted=encrypted)
    writer, _ = _writer(sender, max_frames=10)
    await trio.aclose_forcefully(receiver)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            lazy = LazyRun(writer, nursery)
            writer.send_nowait(b"into the void")  # does not raise here
            writer.send_nowait(b"and again")
    assert lazy.starts == 1
    assert len(lazy.errors) == 1 and isinstance(lazy.errors[0], trio.BrokenResourceError)


async def test_lazy_run_reports_a_peer_gone_during_a_partial_frame(res: Resources) -> None:
    sender, receiver = await res.pair("unix", encrypted=True)
    writer, _ = _writer(sender)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            lazy = LazyRun(writer, nursery)
            _fill_with_partial_frame(writer, sender, receiver)
            await trio.aclose_forcefully(receiver)
    assert lazy.starts == 1
    assert len(lazy.errors) == 1 and isinstance(lazy.errors[0], trio.BrokenResourceError)


async def test_lazy_run_starts_for_queued_frames_stop_and_finish(res: Resources) -> None:
    """put_later and send_with_fd queue for run(): it starts and writes them; stop() and
    finish() on a writer that never ran start it so that it returns (its owner learns)."""
    sender, receiver, receiving = await res.fd_pair()
    writer, _ = _writer(sender)
    a, b = res.socketpair()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            lazy = LazyRun(writer, nursery)
            await writer.put_later(b"later")
            assert lazy.starts == 1
            writer.send_with_fd(b"fd", a)
            assert await _read_exactly(receiver, 7) == b"laterfd"
            writer.finish()
    assert lazy.starts == 1 and lazy.returned == 1
    fd = receiving.take_fd()
    assert fd is not None
    os.close(fd)
    for method in ("stop", "finish"):
        other, _ = _writer(sender)
        async with trio.open_nursery() as nursery:
            lazy = LazyRun(other, nursery)
            getattr(other, method)()
        assert lazy.starts == 1 and lazy.returned == 1


async def test_lazy_run_already_needed_starts_at_once(res: Resources) -> None:
    """run_when_needed on a writer that already holds work starts run() right away; on a
    closed writer it never does."""
    sender, receiver = await res.pair("unix", encrypted=False)
    writer, _ = _writer(sender)
    with trio.fail_after(TIMEOUT):
        big = _fill_with_partial_frame(writer, sender, receiver)
        async with trio.open_nursery() as nursery:
            lazy = LazyRun(writer, nursery)
            assert lazy.starts == 1
            assert await _read_exactly(receiver, len(big)) == big
            writer.stop()
        closed, _ = _writer(sender)
        closed.close()
        async with trio.open_nursery() as nursery:
            lazy = LazyRun(closed, nursery)
        assert lazy.starts == 0


# -- frames given as pieces (put_gathered) ------------------------------------------------------


def _gathered(parts: list[bytes]) -> Gathered:
    views: list[bytes | memoryview] = [memoryview(part)[1:] if i % 2 else part for i, part in enumerate(parts)]
    return Gathered(views, sum(map(len, views)))


@ENCRYPTED
async def test_gathered_frames_go_out_whole_and_in_order_whatever_waits_ahead(res: Resources, encrypted: bool) -> None:
    """put_gathered: an idle writer over a plain socket writes the pieces with one sendmsg,
    no join (SecureStream.send_pieces_nowait, counted); behind a partial frame or a cork they
    are one entry of the queue, which run() writes so too; an encrypted stream joins them;
    every byte arrives whole, in order, with the counters back to 0."""
    sender, receiver = await res.pair(encrypted=encrypted)
    writer, calls = _writer(sender)
    pieced: list[int] = []
    original = sender.send_pieces_nowait

    def counting(parts: list[bytes | memoryview], size: int) -> memoryview | None:
        rest = original(parts, size)
        if rest is not None:
            pieced.append(size)
        return rest

    sender.send_pieces_nowait = counting  # type: ignore[method-assign]
    first = _gathered([os.urandom(30), os.urandom(5000), os.urandom(7)])
    writer.send_gathered_nowait(first)  # idle: straight to the socket
    assert pieced == ([] if encrypted else [first.size]) and writer.queued_bytes == 0
    expected = first.join()
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, len(expected)) == expected

    big = _fill_with_partial_frame(writer, sender, receiver)  # (shrinks the buffers)
    behind = _gathered([os.urandom(100), os.urandom(200_000), os.urandom(3)])
    await writer.put_gathered(behind)  # behind the partial frame: queued as it is
    writer.cork()
    corked = _gathered([os.urandom(10), os.urandom(10)])
    writer.send_gathered_nowait(corked)
    writer.uncork()  # (leaves both to run(): a partial frame is ahead of them)
    assert len(pieced) == (0 if encrypted else 1) and len(writer) == 3
    expected = big + behind.join() + corked.join()
    assert writer.queued_bytes == len(expected)
    got = await _drain(writer, receiver, len(expected))
    assert got == expected and writer.queued_bytes == 0 and calls.queued[-1] == 0
    assert pieced == ([] if encrypted else [first.size, behind.size, corked.size])
    await _assert_nothing_more(sender, receiver)


async def test_gathered_frames_the_socket_takes_part_of_are_finished_by_run(res: Resources) -> None:
    """An idle writer whose socket takes only part of the pieces keeps the rest (a copy of
    it alone) as a partial frame: later frames queue behind it, run() writes it all, whole
    and in order."""
    sender, receiver = await res.pair(encrypted=False)
    writer, _calls = _writer(sender)
    _shrink(sender, receiver)
    frame = _gathered([os.urandom(11), os.urandom(BIG), os.urandom(5), os.urandom(BIG // 3)])
    writer.send_gathered_nowait(frame)
    assert writer.mid_frame and writer.queued_bytes == frame.size
    later = os.urandom(999)
    writer.send_nowait(later)
    expected = frame.join() + later
    got = await _drain(writer, receiver, len(expected))
    assert got == expected and writer.queued_bytes == 0 and not writer.mid_frame
    await _assert_nothing_more(sender, receiver)


async def test_send_pieces_nowait_writes_only_to_a_plain_socket(res: Resources) -> None:
    """SecureStream.send_pieces_nowait: None (nothing done) for an encrypted stream, too many
    pieces, or nothing at all; the rest of what a plain socket did not take, else."""
    encrypted, _ = await res.pair(encrypted=True)
    assert encrypted.send_pieces_nowait([b"ab", b"c"], 3) is None
    plain, receiver = await res.pair(encrypted=False)
    assert plain.send_pieces_nowait([b"x"] * 1000, 1000) is None
    assert plain.send_pieces_nowait([], 0) is None
    assert len(plain.send_pieces_nowait([b"ab", memoryview(b"cde")[1:]], 4)) == 0
    with trio.fail_after(TIMEOUT):
        assert await _read_exactly(receiver, 4) == b"abde"


async def test_a_gathered_frame_between_queued_frames_keeps_its_place(res: Resources) -> None:
    """Frames queued around a gathered one (put_later) are joined up to it, it is written
    from its pieces, then the rest: the bytes in the order they were given; close() drops a
    queued gathered frame and its bytes from the count."""
    sender, receiver = await res.pair(encrypted=False)
    writer, _calls = _writer(sender)
    small = [os.urandom(50 + i) for i in range(6)]
    frame = _gathered([os.urandom(20), os.urandom(70_000)])
    for item in small[:3]:
        writer.put_later_nowait(item)
    await writer.put_gathered(frame)  # (frames wait ahead of it: queued)
    for item in small[3:]:
        writer.put_later_nowait(item)
    assert len(writer) == 7
    expected = b"".join(small[:3]) + frame.join() + b"".join(small[3:])
    assert await _drain(writer, receiver, len(expected)) == expected
    writer, _calls = _writer(sender)
    writer.put_later_nowait(small[0])
    await writer.put_gathered(frame)
    assert len(writer) == 2 and writer.queued_bytes == len(small[0]) + frame.size
    writer.close()
    assert writer.queued_bytes == 0 and len(writer) == 0


async def test_run_yields_every_yield_after_bytes_of_gathered_frames_too(res: Resources) -> None:
    """Gathered frames the socket takes whole count towards YIELD_AFTER as joined ones do:
    run() writing a queue of them still yields on its way (another task sees the queue go
    down in steps of YIELD_AFTER), and every byte arrives in order."""
    sender, receiver = await res.pair("unix", encrypted=False)
    _sock(sender).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)  # takes all of it
    writer, _calls = _writer(sender)
    frame_size = 64 * 1024
    first = os.urandom(frame_size)
    writer.put_later_nowait(first)  # (queued: the gathered frames wait behind it, for run())
    frames = [_gathered([os.urandom(16), os.urandom(frame_size - 15)]) for _ in range(4 * YIELD_AFTER // frame_size - 1)]
    for frame in frames:
        await writer.put_gathered(frame)
    assert all(frame.size == frame_size for frame in frames)
    total = frame_size * (1 + len(frames))  # (4 * YIELD_AFTER)
    assert writer.queued_bytes == total and _pending(receiver) == 0
    got, steps = await _drain_watching(writer, receiver, total)
    assert got == first + b"".join(frame.join() for frame in frames)
    assert steps[-1] == 0 and all(value % YIELD_AFTER == 0 for value in steps)
    assert len(steps) >= 3, steps  # (it yielded on its way, more than once)


async def test_put_gathered_on_a_corked_writer_never_waits_for_the_uncork(res: Resources) -> None:
    """A corked writer writes anyway once ``burst`` frames wait, gathered ones too: put_gathered
    on a full corked queue waits for run() to make room, as put would, not for an uncork
    that the waiting producer itself would have to make."""
    sender, receiver = await res.pair("unix", encrypted=False)
    writer, _calls = _writer(sender, max_frames=4)
    writer.burst = 2
    frames = [_gathered([os.urandom(10 + i), os.urandom(100)]) for i in range(12)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            writer.cork()
            for frame in frames:
                await writer.put_gathered(frame)
            writer.uncork()
            expected = b"".join(frame.join() for frame in frames)
            assert await _read_exactly(receiver, len(expected)) == expected
            writer.stop()
    assert writer.queued_bytes == 0


async def test_send_pieces_nowait_partial_write_with_views_and_empty_pieces(res: Resources) -> None:
    """A plain socket that takes part of the pieces (empty ones and views among them): the
    rest send_pieces_nowait returns, sent with send_wire, completes exactly the joined bytes;
    bytes_sent counts them all at once, as send_nowait does."""
    sender, receiver = await res.pair("unix", encrypted=False)
    _shrink(sender, receiver)
    big = os.urandom(BIG)
    parts: list[bytes | memoryview] = [b"", b"head", memoryview(b""), memoryview(big)[7:], b"", memoryview(big)[:5], b"t"]
    whole = b"".join(parts)
    before = sender.bytes_sent
    rest = sender.send_pieces_nowait(parts, len(whole))
    assert rest is not None and 0 < len(rest) < len(whole)
    assert sender.bytes_sent == before + len(whole)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_wire, rest)
            assert await _read_exactly(receiver, len(whole)) == whole
    await _assert_nothing_more(sender, receiver)
