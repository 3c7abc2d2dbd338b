"""Frames carried by a SecureStream over real sockets, including hostile frames inside box-stream."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from bus.errors import FrameError, FrameTooLarge
from bus.io.framed import FramedStream
from bus.io.secure import SecureStream
from bus.io.testing import secure_stream_pair, tcp_stream_pair
from bus.io.testing import unix_stream_pair as unix_socket_stream_pair
from bus.wire.frames import HEADER, ControlFrame, DataFrame, Frame, FrameDecoder, encode_control, encode_data
from bus.wire.identity import Identity


SERVER = Identity.generate()
CLIENT = Identity.generate()


async def connected(encrypted: bool, tcp: bool) -> tuple[SecureStream, SecureStream]:
    transports = await tcp_stream_pair() if tcp else unix_socket_stream_pair()
    return await secure_stream_pair(transports, CLIENT, SERVER, encrypted=encrypted)


async def read_frames(stream: SecureStream, decoder: FrameDecoder, count: int) -> list[Frame]:
    frames: list[Frame] = []
    while len(frames) < count:
        data = await stream.receive_some()
        if not data:
            decoder.end_of_input()
            break
        decoder.receive_data(data)
        frames.extend(decoder)
    return frames


@pytest.mark.parametrize(("encrypted", "tcp"), [(True, True), (False, False), (True, False)])
async def test_frames_round_trip_over_secure_stream(encrypted: bool, tcp: bool) -> None:
    client, server = await connected(encrypted, tcp)
    sent = [ControlFrame(0, {"op": "hello", "id": 1, "name": "org.example.Echo"}), DataFrame(5, b"x" * 200_000), ControlFrame(5, {"credit": 65536})]
    wire = b"".join(
        encode_control(f.channel, f.message) if isinstance(f, ControlFrame) else encode_data(f.channel, f.data)
        for f in sent
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, wire)
        assert await read_frames(server, FrameDecoder(), len(sent)) == sent
    await client.aclose()
    await server.aclose()


async def test_oversized_frame_inside_box_stream_is_refused_early() -> None:
    client, server = await connected(encrypted=True, tcp=True)
    await client.send_all(HEADER.pack(2, 0, 1, 50 * 1024 * 1024) + b"start of a huge body")
    decoder = FrameDecoder(max_body=1 << 20)
    with pytest.raises(FrameTooLarge):
        await read_frames(server, decoder, 1)
    assert decoder.buffered == 0
    await client.aclose()
    await server.aclose()


async def test_garbage_frame_inside_box_stream_is_a_frame_error() -> None:
    client, server = await connected(encrypted=True, tcp=True)
    await client.send_all(b"\x09garbage that is no frame")
    with pytest.raises(FrameError, match="unknown frame kind 9"):
        await read_frames(server, FrameDecoder(), 1)
    await client.aclose()
    await server.aclose()


# -- FramedStream reading a socket directly ---------------------------------------------------


class _Flood(trio.abc.ReceiveStream):
    """A stream that always has a full read's worth of frames ready (a flooding peer)."""

    def __init__(self) -> None:
        self.reads = 0

    def receive_nowait(self, max_bytes: int) -> bytes:
        self.reads += 1
        return encode_data(1, b"f" * (max_bytes - HEADER.size))  # exactly what was asked for

    def try_receive(self, max_bytes: int) -> bytes | None:
        return self.receive_nowait(max_bytes)

    def receive_into_nowait(self, buffer: memoryview) -> int:
        raise AssertionError("no frame body is filled in place here")

    async def wait_readable(self) -> None:  # never needed: data is always there
        raise AssertionError("a flood never waits")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("a socket-like stream is read with receive_nowait")

    async def aclose(self) -> None:
        pass


async def test_a_flooded_frame_reader_still_lets_other_tasks_run() -> None:
    flood = _Flood()
    framed = FramedStream(trio.testing.MemoryReceiveStream(), receive_stream=flood)  # type: ignore[arg-type]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()  # the ticker is running (it never blocks)
        before = ticks
        for _ in range(100):
            frame = await framed.receive_frame()
            assert isinstance(frame, DataFrame) and frame.channel == 1
        # Every read that found data without waiting is followed by a checkpoint.
        assert flood.reads == 100 and ticks - before >= 49
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("fd_stream", [False, True])
async def test_a_frame_reader_on_a_socket_reads_frames_waits_ends_and_can_be_cancelled(fd_stream: bool) -> None:
    import socket

    from bus.io.fdpass import FdSocketStream

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = FdSocketStream(right) if fd_stream else trio.SocketStream(trio.socket.from_stdlib_socket(right))
    framed = FramedStream(stream)
    with left:
        wire = encode_control(0, {"op": "ping", "id": 1}) + encode_data(3, b"abc")
        left.sendall(wire[:7])  # half a header: the reader must wait for the rest
        async with trio.open_nursery() as nursery:
            got: list[object] = []

            async def read_two() -> None:
                got.append(await framed.receive_frame())
                got.append(await framed.receive_frame())

            nursery.start_soon(read_two)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            left.sendall(wire[7:])
        assert got == [ControlFrame(0, {"op": "ping", "id": 1}), DataFrame(3, b"abc")]
        with trio.move_on_after(0.1) as scope:  # nothing comes: a waiting reader is cancellable
            await framed.receive_frame()
        assert scope.cancelled_caught
        left.sendall(encode_data(3, b"x")[:4])
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(FrameError, match="inside a frame"):
            await framed.receive_frame()
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await FramedStream(stream).receive_frame()
    # A reader whose last read emptied the socket, on a stream closed since: closed, not a crash.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = FdSocketStream(right) if fd_stream else trio.SocketStream(trio.socket.from_stdlib_socket(right))
    framed = FramedStream(stream)
    with left:
        left.sendall(encode_data(3, b"abc"))
        assert await framed.receive_frame() == DataFrame(3, b"abc")
        await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await framed.receive_frame()


async def test_stdlib_socket_is_the_same_descriptor_and_closes_with_its_trio_socket() -> None:
    from bus.io.framed import stdlib_socket

    a, b = socket.socketpair()
    try:
        trio_socket = trio.socket.from_stdlib_socket(a)
        raw = stdlib_socket(trio_socket)
        assert isinstance(raw, socket.socket) and raw.fileno() == trio_socket.fileno() >= 0
        trio_socket.close()
        assert raw.fileno() == -1  # (a read through it is refused as closed, never another file)

        class NoStdlib:  # (a socket-like object that keeps no standard library socket)
            def fileno(self) -> int:
                return 7

        other = NoStdlib()
        assert stdlib_socket(other) is other  # type: ignore[arg-type]
    finally:
        a.close()
        b.close()
@pytest.mark.parametrize("wait_first", [False, True])
async def test_a_first_read_that_waits_first_finds_its_frame_and_makes_no_empty_read(wait_first: bool) -> None:
    """``wait_first`` (busd's hello): the first read waits for the socket, so it makes no read
    that finds nothing; a frame that is already there, or comes later, is read all the same."""
    import socket

    from bus.io.fdpass import FdSocketStream

    class Counting(FdSocketStream):
        empty_reads = 0

        def try_receive(self, max_bytes: int) -> bytes | None:
            data = super().try_receive(max_bytes)
            if data is None:
                self.empty_reads += 1
            return data

    for already_there in (False, True):
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stream = Counting(left)
        try:
            framed = FramedStream(stream, receive_stream=stream, wait_first=wait_first)
            frame = encode_control(0, {"op": "hello", "id": 1})
            with trio.fail_after(10):
                if already_there:
                    right.send(frame)
                    got = await framed.receive_frame()
                else:
                    async with trio.open_nursery() as nursery:

                        async def later() -> None:
                            await trio.testing.wait_all_tasks_blocked()
                            right.send(frame)

                        nursery.start_soon(later)
                        got = await framed.receive_frame()
            assert isinstance(got, ControlFrame) and got.message == {"op": "hello", "id": 1}
            assert stream.empty_reads == (1 if not wait_first and not already_there else 0)
        finally:
            stream.close_nowait()
            right.close()


@pytest.mark.parametrize("kind", ["fd socket", "trio socket", "memory stream"])
async def test_read_messages_gives_each_reads_run_and_leaves_the_other_frames(kind: str) -> None:
    """FramedStream.read_messages (a bus connection's reader): one read each call, the run of
    control messages on channel 0 it completes, the frames after it (and the runs after those)
    left to receive_frame_nowait / take_control_messages; a body being filled is read into
    its place; None at a clean end, a FrameError for an end inside a frame."""
    from bus.io.fdpass import FdSocketStream

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream: trio.abc.Stream
    if kind == "memory stream":  # (not a socket: read with receive_some)
        right.close()
        send_stream, receive_stream = trio.testing.memory_stream_one_way_pair()
        stream = trio.StapledStream(send_stream, receive_stream)  # type: ignore[arg-type]

        async def send(data: bytes) -> None:
            await send_stream.send_all(data)

        async def end() -> None:
            await send_stream.aclose()
    else:
        stream = FdSocketStream(right) if kind == "fd socket" else trio.SocketStream(trio.socket.from_stdlib_socket(right))

        async def send(data: bytes) -> None:
            left.sendall(data)

        async def end() -> None:
            left.shutdown(socket.SHUT_WR)

    framed = FramedStream(stream, trusted=True)
    with left, trio.fail_after(10):
        one, two, three = ({"event": "event", "n": n} for n in range(3))
        wire = encode_control(0, one) + encode_control(0, two) + encode_data(4, b"abc") + encode_control(0, three)
        await send(wire + encode_control(0, {"event": "x"})[:5])
        assert await framed.read_messages() == [one, two]
        assert framed.receive_frame_nowait() == DataFrame(4, b"abc")
        assert framed.take_control_messages() == [three]
        assert framed.receive_frame_nowait() is None
        await send(encode_control(0, {"event": "x"})[5:] + encode_data(5, b"d" * 100)[:40])
        # (A frame that straddles reads is joined, and comes as a frame.)
        assert await framed.read_messages() == []
        assert framed.receive_frame_nowait() == ControlFrame(0, {"event": "x"})
        assert framed.receive_frame_nowait() is None  # (the DATA frame is not all here)
        # A body going into a buffer of its owner's: the rest of it is read straight there.
        body = bytearray(100)
        framed.fill_data_into(body)
        frame = framed.receive_frame_nowait()  # (its first bytes, from what was read)
        while frame is None:
            await send(b"d" * 60)
            assert await framed.read_messages() == []
            frame = framed.receive_frame_nowait()
        assert isinstance(frame, DataFrame) and frame.filled == 100 and body == b"d" * 100
        framed.fill_data_into(None)
        await send(encode_control(0, one)[:3])
        await end()
        assert await framed.read_messages() == []
        with pytest.raises(FrameError, match="inside a frame"):
            await framed.read_messages()
    await stream.aclose()
    # A clean end: None, and None again.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    framed = FramedStream(FdSocketStream(right))
    with left:
        left.sendall(encode_control(0, one))
        left.shutdown(socket.SHUT_WR)
        assert await framed.read_messages() == [one]
        assert await framed.read_messages() is None
        assert await framed.read_messages() is None
    await framed.aclose()


@pytest.mark.parametrize("fd_stream", [False, True])
async def test_a_reader_whose_last_read_emptied_the_socket_takes_whole_split_and_ended_streams(fd_stream: bool) -> None:
    """After a read that emptied the socket (a frame that came alone: busd's reader between
    relayed frames), the next read waits first, then gives the frame a read completes, waits
    on for a frame that came in two pieces, and gives None at a clean end -- counting one read
    per piece and no read that finds nothing."""
    from bus.io.fdpass import FdSocketStream

    reads: list[int] = []
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = FdSocketStream(right) if fd_stream else trio.SocketStream(trio.socket.from_stdlib_socket(right))
    framed = FramedStream(stream)
    socket_reads = framed._socket_reads
    assert socket_reads is not None
    try_receive = socket_reads.try_receive

    def counted(max_bytes: int) -> bytes | None:
        data = try_receive(max_bytes)
        reads.append(-1 if data is None else len(data))
        return data

    socket_reads.try_receive = counted  # type: ignore[method-assign]
    with left, trio.fail_after(10):
        first, second = encode_data(3, b"abc"), encode_control(0, {"op": "ping", "id": 2})
        left.sendall(first)
        assert await framed.receive_frame() == DataFrame(3, b"abc")  # (emptied the socket)
        async with trio.open_nursery() as nursery:
            got: list[object] = []

            async def read_one() -> None:
                got.append(await framed.receive_frame())

            nursery.start_soon(read_one)
            await trio.testing.wait_all_tasks_blocked()
            left.sendall(second[:12])  # the header and two bytes of the body
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            left.sendall(second[12:])
        assert got == [ControlFrame(0, {"op": "ping", "id": 2})]
        left.shutdown(socket.SHUT_WR)
        assert await framed.receive_frame() is None
        assert await framed.receive_frame() is None  # (and stays ended, reading nothing more)
    assert reads == [len(first), 12, len(second) - 12, 0]
    await stream.aclose()


def _writes_of_an_rpc_channel() -> list[tuple[list[bytes], int]]:
    """What one side of an RPC channel may write, with the frames each write makes (a write
    in parts is read part by part): calls of one byte-string argument (one shape, known after the first), replies
    of a byte string or an integer, other messages, frames on another channel and of another
    kind, two frames in one write, a frame in two writes."""
    calls = [encode_control(0, {"method": "echo", "args": [bytes([i]) * (i * 7)], "op": "call", "id": i + 1}) for i in range(6)]
    replies = [encode_control(0, {"re": 3, "result": b"three"}), encode_control(0, {"re": 4, "result": 2**40})]
    others = [
        encode_control(0, {"op": "introspect", "id": 9}),
        encode_control(0, {"re": 5, "result": ["a", 1]}),
        encode_control(2, {"op": "call", "id": 10, "method": "echo", "args": [b"x"]}),
        encode_data(0, b"data"),
    ]
    two = encode_control(0, {"re": 6, "result": b"a"}) + encode_control(0, {"re": 7, "result": b"b"})
    split = encode_control(0, {"method": "echo", "args": [b"split"], "op": "call", "id": 11})
    return [([data], 1) for data in [*calls, *replies, *others]] + [([two], 2), ([split[:7], split[7:]], 1)]


def _bad_frames() -> list[bytes]:
    """Whole CONTROL frames on channel 0 the profile refuses, each shaped as a known call or a
    plain reply but for one item: an argument's head longer than it need be, an id written
    long, a reply's value in chunks."""
    long_argument = b"\xa4fmethoddechodargs\x81\x58\x03abcbopdcallbid\x01"  # (3 bytes, a 1-byte length)
    long_id = b"\xa4fmethoddechodargs\x81\x43abcbopdcallbid\x18\x01"  # (id 1 in two bytes)
    chunked = b"\xa2bre\x01fresult\x5f\x41a\x41b\xff"
    return [HEADER.pack(1, 0, 0, len(body)) + body for body in (long_argument, long_id, chunked)]


@pytest.mark.parametrize("fd_stream", [False, True])
async def test_a_reader_of_whole_messages_gives_what_the_full_way_gives(fd_stream: bool) -> None:
    """``FramedStream.whole_messages`` (an RPC channel's reader: a read that is one whole
    CONTROL frame on channel 0 is known by its shape or layout) gives the same frames, in the
    same order, as the full way, whatever the writes; refuses what it refuses, with the same
    error; and takes the calls of a known shape and the plain replies without the full
    check."""
    import bus.wire.frames as frames_module
    from bus.io.fdpass import FdSocketStream

    checked: list[int] = []
    real_check = frames_module.decode_control_body

    def counting_check(body: bytes, max_items: int | None = None) -> object:
        checked.append(len(body))
        return real_check(body, max_items)

    async def frames_read(writes: list[tuple[list[bytes], int]], whole: bool) -> tuple[list[object], int]:
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stream = FdSocketStream(right) if fd_stream else trio.SocketStream(trio.socket.from_stdlib_socket(right))
        framed = FramedStream(stream)
        framed.whole_messages = whole
        got: list[object] = []
        checked.clear()
        with left, trio.fail_after(10):
            try:
                for parts, frames in writes:
                    async with trio.open_nursery() as nursery:

                        async def read() -> None:
                            for _ in range(frames):
                                got.append(await framed.receive_frame())

                        nursery.start_soon(read)
                        for part in parts:
                            await trio.testing.wait_all_tasks_blocked()  # (the reader waits)
                            left.sendall(part)
            except* FrameError as group:
                got.append(f"refused: {group.exceptions[0]}")
        await framed.aclose()
        return got, len(checked)

    writes = _writes_of_an_rpc_channel()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frames_module, "decode_control_body", counting_check)
        full, full_checks = await frames_read(writes, whole=False)
        whole, whole_checks = await frames_read(writes, whole=True)
    assert whole == full and len(full) == 15 and all(isinstance(frame, (ControlFrame, DataFrame)) for frame in full)
    assert full_checks == 14  # every CONTROL frame, checked the full way
    # The reader of whole messages: the first call (its shape learned) the full way, the
    # other five and the two plain replies without it; the rest (another map, another
    # channel, two frames in one read, a frame in two reads) the full way.
    assert whole_checks == 14 - 5 - 2

    first = encode_control(0, {"method": "echo", "args": [b"abc"], "op": "call", "id": 1})
    for bad in _bad_frames():
        # A known call's shape, then the bad frame: refused by both, alike.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(frames_module, "decode_control_body", counting_check)
            full, _ = await frames_read([([first], 1), ([first], 1), ([bad], 1)], whole=False)
            whole, _ = await frames_read([([first], 1), ([first], 1), ([bad], 1)], whole=True)
        assert whole == full and len(full) == 3 and type(full[-1]) is str and full[-1].startswith("refused: ")
