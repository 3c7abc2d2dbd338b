"""Helpers for tests and benchmarks: connected socket pairs and handshaken SecureStream pairs.

Like :mod:`trio.testing`, these are public so that plugin authors can test against real
sockets the same way minibus does.
"""

from __future__ import annotations

import socket

import trio

from ..wire.identity import Identity
from .secure import SecureStream

__all__ = ["unix_stream_pair", "tcp_stream_pair", "secure_stream_pair"]


def unix_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of trio streams over a real Unix socketpair."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (
        trio.SocketStream(trio.socket.from_stdlib_socket(left)),
        trio.SocketStream(trio.socket.from_stdlib_socket(right)),
    )


async def tcp_stream_pair(host: str = "127.0.0.1") -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of trio streams over real TCP on the loopback."""
    listener = (await trio.open_tcp_listeners(0, host=host))[0]
    port = listener.socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream(host, port)
    await listener.aclose()
    return client, accepted[0]


async def secure_stream_pair(
    transports: tuple[trio.abc.Stream, trio.abc.Stream],
    client_identity: Identity,
    server_identity: Identity,
    *,
    encrypted: bool = True,
) -> tuple[SecureStream, SecureStream]:
    """Wrap a connected transport pair as client and server and run both handshakes."""
    left, right = transports
    client = SecureStream.client(left, client_identity, server_identity.public_key, encrypted=encrypted)
    server = SecureStream.server(right, server_identity, encrypted=encrypted)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    return client, server
