"""FdSocketStream's sending (the client's Unix transport: it sends on its socket itself, as a
trio SocketStream would, without making one) over real Unix socket pairs."""

from __future__ import annotations

import socket

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
