#!/usr/bin/env python3
"""Two identities meet over TCP on the loopback, prove who they are, and talk encrypted.

    python examples/secure_echo.py

The server authorizes only the client it expects; a stranger is refused after msg3,
before the server reveals its own identity.  Everything on the wire after the handshake
is box-stream ciphertext.
"""

from __future__ import annotations

import trio

from bus.errors import HandshakeError
from bus.io.secure import SecureStream
from bus.wire.identity import Identity, PublicKey

SERVER = Identity.generate()
FRIEND = Identity.generate()
STRANGER = Identity.generate()


def authorize(key: PublicKey) -> bool:
    return key == FRIEND.public_key


async def serve(listeners: list[trio.SocketListener], task_status: trio.TaskStatus[int]) -> None:
    async def handle(transport: trio.SocketStream) -> None:
        stream = SecureStream.server(transport, SERVER, authorize=authorize)
        try:
            await stream.do_handshake()
        except HandshakeError as exc:
            print(f"server: refused a connection: {exc}")
            return
        print(f"server: {stream.peer_key} connected")
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data.upper())

    async with trio.open_nursery() as nursery:
        port = listeners[0].socket.getsockname()[1]
        task_status.started(port)
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)


async def dial(port: int, identity: Identity) -> None:
    transport = await trio.open_tcp_stream("127.0.0.1", port)
    stream = SecureStream.client(transport, identity, SERVER.public_key)
    try:
        await stream.do_handshake()
    except HandshakeError as exc:
        print(f"client {identity.id[:12]}…: {exc}")
        return
    async with stream:
        await stream.send_all(b"hello over box-stream")
        await stream.send_eof()
        reply = b""
        while chunk := await stream.receive_some():
            reply += chunk
        print(f"client {identity.id[:12]}…: got {reply!r} from {stream.peer_key}")


async def main() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, listeners)
        await dial(port, FRIEND)
        await dial(port, STRANGER)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
