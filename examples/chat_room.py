#!/usr/bin/env python3
"""A chat room: the service org.example.Chat relays lines among nameless clients.

    python examples/chat_room.py serve &
    python examples/chat_room.py join alice      # type lines; Ctrl-D to leave
    python examples/chat_room.py join bob        # in another terminal

Each member opens a ``chat`` channel; the room knows who they are from the channel (the
identity proven by the channel's handshake, and the unique id the broker vouched for).
"""

from __future__ import annotations

import os
import sys

import trio

from clients import Channel, Service, open_bus

NAME = "org.example.Chat"
service = Service(NAME, description="a chat room for nameless clients", version="1.0")
MEMBERS: dict[str, trio.MemorySendChannel[bytes]] = {}
BACKLOG = 100  # lines a slow member may fall behind before it is dropped


@service.method
async def members() -> list[str]:
    """The unique ids of everyone in the room."""
    return sorted(MEMBERS)


@service.channel("chat")
async def chat(channel: Channel) -> None:
    who = channel.peer.unique_id
    outbox, inbox = trio.open_memory_channel[bytes](BACKLOG)

    def broadcast(line: bytes) -> None:
        for member, queue in list(MEMBERS.items()):
            try:
                queue.send_nowait(line)
            except trio.WouldBlock:  # bounded: a member that cannot keep up is dropped, and told
                queue.close()
                MEMBERS.pop(member, None)

    MEMBERS[who] = outbox
    broadcast(f"* {who} joined\n".encode())
    try:
        async with trio.open_nursery() as nursery:

            async def deliver() -> None:
                async for line in inbox:
                    await channel.send_all(line)
                await channel.send_all(b"* you were too slow and left the room\n")
                nursery.cancel_scope.cancel()

            nursery.start_soon(deliver)
            buffer = b""
            while data := await channel.receive_some():
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    broadcast(f"<{who}> ".encode() + line[:1000] + b"\n")
                if len(buffer) > 4096:
                    buffer = b""  # no line that long; drop the fragment
            nursery.cancel_scope.cancel()
    finally:
        MEMBERS.pop(who, None)
        broadcast(f"* {who} left\n".encode())


async def serve() -> None:
    async with open_bus(name=NAME, info=service.info) as bus:
        print(f"{NAME} ready as {bus.unique_id}", flush=True)
        await service.serve(bus)


async def join() -> None:
    async with open_bus() as bus:
        channel = await bus.open_channel(NAME, "chat")
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with channel, stdin, trio.open_nursery() as nursery:

            async def typed() -> None:
                while data := await stdin.receive_some():
                    await channel.send_all(data)
                nursery.cancel_scope.cancel()

            nursery.start_soon(typed)
            while data := await channel.receive_some():
                sys.stdout.write(data.decode(errors="replace"))
                sys.stdout.flush()


if __name__ == "__main__":
    try:
        trio.run(serve if sys.argv[1:2] == ["serve"] else join)
    except KeyboardInterrupt:
        pass
