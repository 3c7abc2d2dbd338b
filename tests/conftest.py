"""Shared fixtures: identities, and connected pairs of real sockets."""

from __future__ import annotations

import socket

import pytest
import trio

from bus.wire.identity import Identity


@pytest.fixture(scope="session")
def server_identity() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def client_identity() -> Identity:
    return Identity.generate()


def unix_socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of trio streams over a real Unix socketpair."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(left)),
        trio.SocketStream(trio.socket.from_stdlib_socket(right)),
    )


async def tcp_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of trio streams over real TCP on the loopback."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
    await listener.aclose()
    return client, accepted[0]
