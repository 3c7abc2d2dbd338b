"""FdSocketStream's sending (the client's Unix transport: it sends on its socket itself, as a
trio SocketStream would, without making one) over real Unix socket pairs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from bus.io.fdpass import FdSocketStream


def pair() -> tuple[FdSocketStream, socket.socket]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    right.setblocking(False)
    return FdSocketStream(left), right


def drain(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


async def test_send_all_sends_every_byte_waiting_while_the_socket_is_full() -> None:
    stream, peer = pair()
    try:
        data = bytes(range(256)) * 8192  # 2 MiB: far more than the socket holds
        received = bytearray()

        async def read() -> None:
            while len(received) < len(data):
                await trio.lowlevel.wait_readable(peer)
                received.extend(drain(peer))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await stream.send_all(data)
                await stream.send_all(memoryview(b"tail")[1:])
                data += b"ail"
        assert bytes(received) == data
    finally:
        stream.close_nowait()
        peer.close()


async def test_send_all_is_a_checkpoint() -> None:
    stream, peer = pair()
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await stream.send_all(b"x")
        assert drain(peer) == b""  # (cancelled before anything was sent)
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await stream.send_all(b"")
    finally:
        stream.close_nowait()
        peer.close()


async def test_one_sender_at_a_time() -> None:
    stream, peer = pair()
    try:
        big = b"x" * (8 << 20)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, big)  # (fills the socket, then waits)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await stream.send_all(b"y")
                nursery.cancel_scope.cancel()
        # The first sender was cancelled: the stream takes another one.
        drain(peer)
        with trio.fail_after(10):
            await stream.send_all(b"z")
    finally:
        stream.close_nowait()
        peer.close()


async def test_closed_eof_and_broken() -> None:
    stream, peer = pair()
    try:
        await stream.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"after eof")
    finally:
        stream.close_nowait()
        peer.close()

    stream, peer = pair()
    stream.close_nowait()
    peer.close()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"after close")
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"")

    stream, peer = pair()
    try:
        peer.close()  # the peer is gone: the send fails as broken (EPIPE), not closed
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"to nobody")
    finally:
        stream.close_nowait()


async def test_send_eof_and_wait_send_all_might_not_block_are_refused_during_a_send() -> None:
    """As trio's SocketStream: while a send_all waits (the socket full), send_eof and
    wait_send_all_might_not_block raise BusyResourceError (an end of file would cut the send
    short, the peer reading a clean end); the send is left as it was."""
    left, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.setblocking(False)
    stream = FdSocketStream(left)
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, b"x" * (8 << 20))
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await stream.send_eof()
                with pytest.raises(trio.BusyResourceError):
                    await stream.wait_send_all_might_not_block()
                nursery.cancel_scope.cancel()
        assert not stream.socket.did_shutdown_SHUT_WR
    finally:
        stream.close_nowait()
        peer.close()
# -- send_then_receive: a message and its answer in one step (the client's handshake) ---------


async def test_send_then_receive_sends_every_byte_then_returns_the_answer_read_once_readable() -> None:
    stream, peer = pair()
    try:
        data = bytes(range(256)) * 8192  # 2 MiB: the socket fills, the sender waits for room
        received = bytearray()

        async def answer() -> None:
            while len(received) < len(data):
                await trio.lowlevel.wait_readable(peer)
                received.extend(drain(peer))
            await trio.sleep(0.05)  # (the exchange is waiting for the answer by now)
            peer.send(b"the answer")

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer)
                assert await stream.send_then_receive(data, 100) == b"the answer"
        assert bytes(received) == data
        # No read was made before the answer came: the socket was read once, when readable.
        peer.send(b"more")
        with trio.fail_after(10):
            assert await stream.receive_some(100) == b"more"
    finally:
        stream.close_nowait()
        peer.close()


async def test_send_then_receive_is_a_checkpoint_and_one_user_at_a_time() -> None:
    stream, peer = pair()
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await stream.send_then_receive(b"x", 10)
        assert drain(peer) == b""  # (cancelled before anything was sent)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.receive_some, 10)  # (waits: nothing comes)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await stream.send_then_receive(b"y", 10)
                nursery.cancel_scope.cancel()
        assert drain(peer) == b""
        # Cancelled while waiting for the answer: what was sent stays sent, the stream is usable.
        with trio.move_on_after(0.05):
            await stream.send_then_receive(b"z", 10)
        assert drain(peer) == b"z"
        peer.send(b"late")
        with trio.fail_after(10):
            assert await stream.send_then_receive(b"w", 10) == b"late"
    finally:
        stream.close_nowait()
        peer.close()


async def test_send_then_receive_runs_after_send_once_between_the_send_and_the_wait() -> None:
    """``after_send`` runs once, when the message has gone (the peer can read all of it) and
    before the answer is waited for; the next exchange runs nothing."""
    stream, peer = pair()
    try:
        seen: list[bytes] = []
        stream.after_send = lambda: seen.append(drain(peer))
        peer.send(b"early")  # (already there: the hook still runs before the answer is read)
        with trio.fail_after(10):
            assert await stream.send_then_receive(b"msg1", 10) == b"early"
        assert seen == [b"msg1"] and stream.after_send is None
        peer.send(b"again")
        with trio.fail_after(10):
            assert await stream.send_then_receive(b"msg3", 10) == b"again"
        assert seen == [b"msg1"] and drain(peer) == b"msg3"
    finally:
        stream.close_nowait()
        peer.close()


async def test_send_then_receive_closed_eof_and_broken() -> None:
    stream, peer = pair()
    try:
        await stream.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_then_receive(b"after eof", 10)
    finally:
        stream.close_nowait()
        peer.close()

    stream, peer = pair()
    stream.close_nowait()
    peer.close()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_then_receive(b"after close", 10)

    stream, peer = pair()
    try:
        peer.close()
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_then_receive(b"to nobody", 10)
    finally:
        stream.close_nowait()

    stream, peer = pair()
    try:
        peer.shutdown(socket.SHUT_WR)  # it reads us but says nothing more: the answer is the end
        with trio.fail_after(10):
            assert await stream.send_then_receive(b"hello?", 10) == b""
        assert drain(peer) == b"hello?"
    finally:
        stream.close_nowait()
        peer.close()


async def test_a_unix_channel_stream_exchanges_by_its_own_rules() -> None:
    """A unix-fd channel's end keeps its explicit end: its send_then_receive is its send_all then
    its receive_some (no send after send_eof; the peer's end mark reads as the end)."""
    from bus.io.fdpass import UnixChannelStream

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a, b = UnixChannelStream(left), UnixChannelStream(right)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def answer() -> None:
                    assert await b.receive_some(10) == b"ping"
                    await b.send_all(b"pong")
                    await b.send_eof()

                nursery.start_soon(answer)
                assert await a.send_then_receive(b"ping", 10) == b"pong"
            assert await a.receive_some(10) == b""  # the mark: a clean end
            await a.send_eof()
            with pytest.raises(trio.ClosedResourceError):
                await a.send_then_receive(b"after eof", 10)
    finally:
        a.close_nowait()
        b.close_nowait()


async def test_connect_nowait_connects_at_once_or_says_it_would_wait(tmp_path: Path) -> None:
    """A listener with room takes the connection at once (no checkpoint); one whose backlog is
    full gives None (connect() would wait); no listener at all is an OSError, as connect's."""
    path = str(tmp_path / "l.sock")
    with pytest.raises(OSError):
        FdSocketStream.connect_nowait(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    made: list[FdSocketStream] = []
    try:
        first = FdSocketStream.connect_nowait(path)
        assert first is not None
        made.append(first)
        accepted, _ = listener.accept()
        with accepted:
            first.raw_socket.send(b"hi")
            assert accepted.recv(10) == b"hi"
        for _ in range(64):  # (nobody accepts now: the backlog fills)
            stream = FdSocketStream.connect_nowait(path)
            if stream is None:
                break
            made.append(stream)
        else:
            raise AssertionError("the backlog never filled")
    finally:
        for stream in made:
            stream.close_nowait()
        listener.close()


@pytest.mark.parametrize("unix_channel", [False, True])
async def test_readable_now_says_whether_a_read_would_find_anything_without_reading(unix_channel: bool) -> None:
    """``readable_now`` (an RPC caller's look at its idle channel) is False while a read would
    find nothing, and True, reading nothing, once bytes, the peer's end or an error are there,
    and once the stream is closed (the read then says how)."""
    from bus.io.fdpass import UnixChannelStream

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = UnixChannelStream(left) if unix_channel else FdSocketStream(left)
    peer = UnixChannelStream(right) if unix_channel else None
    try:
        assert not stream.readable_now()
        assert not stream.readable_now()  # (the poller, made once, asked again)
        right.send(b"abc")
        assert stream.readable_now() and stream.readable_now()  # (nothing was read)
        assert stream.try_receive(10) == b"abc"
        assert not stream.readable_now()
        if peer is not None:
            await peer.send_eof()  # the end mark
        else:
            right.shutdown(socket.SHUT_WR)
        assert stream.readable_now()
        assert stream.try_receive(10) == b""
        assert stream.readable_now()  # (ended: a read says so again, at once)
    finally:
        stream.close_nowait()
        if peer is not None:
            peer.close_nowait()
        right.close()
    assert stream.readable_now()  # closed: the read raises, as it should
    with pytest.raises(trio.ClosedResourceError):
        stream.try_receive(10)

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = FdSocketStream(left)
    try:
        right.send(b"unread")
        right.close()  # the peer wrote and went: readable for the bytes, then for the end
        assert stream.readable_now()
        assert stream.try_receive(100) == b"unread"
        assert stream.readable_now()
        assert stream.try_receive(100) == b""
    finally:
        stream.close_nowait()
