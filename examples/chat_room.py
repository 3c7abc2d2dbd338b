#!/usr/bin/env python3
"""A chat room: the service org.example.Chat relays lines among nameless clients.

    python examples/chat_room.py serve &
    python examples/chat_room.py join alice      # type lines; Ctrl-D to leave
    python examples/chat_room.py join bob        # in another terminal

Each member opens a ``chat`` channel; the room knows who they are from the channel (the
identity proven by the channel's handshake, and the unique id the broker vouched for).
The first line a member sends is the nickname it chose (empty: none); the room shows its
lines as ``<alice> hi``, and its arrival with the unique id (``* alice (:42) joined``), since
anyone may pick any nickname.
"""

from __future__ import annotations

import logging
import os
import sys

import trio

from clients import Channel, Service, open_bus

NAME = "org.example.Chat"
service = Service(NAME, description="a chat room for nameless clients", version="1.0")
MEMBERS: dict[str, trio.MemorySendChannel[bytes]] = {}
BACKLOG = 100  # lines a slow member may fall behind before it is dropped
MAX_NICK = 32


def _nickname(line: bytes) -> str:
    """What a member asked to be called, made printable and short (may be empty)."""
    text = line.decode("utf-8", errors="replace").strip()
    return "".join(c for c in text if c.isprintable() and c not in "<>")[:MAX_NICK]


@service.method
async def members() -> list[str]:
    """The unique ids of everyone in the room."""
    return sorted(MEMBERS)


@service.channel("chat")
async def chat(channel: Channel) -> None:
    member_id = channel.peer.unique_id
    buffer = b""
    while b"\n" not in buffer:  # the first line: the nickname
        data = await channel.receive_some()
        if not data or len(buffer) > 4096:
            return  # gone before saying who it is (or no nickname is that long)
        buffer += data
    first, buffer = buffer.split(b"\n", 1)
    nick = _nickname(first)
    who = nick or member_id
    outbox, inbox = trio.open_memory_channel[bytes](BACKLOG)

    def broadcast(line: bytes) -> None:
        for member, queue in list(MEMBERS.items()):
            try:
                queue.send_nowait(line)
            except trio.WouldBlock:  # bounded: a member that cannot keep up is dropped, and told
                queue.close()
                MEMBERS.pop(member, None)

    MEMBERS[member_id] = outbox
    broadcast(f"* {f'{nick} ({member_id})' if nick else member_id} joined\n".encode())
    try:
        async with trio.open_nursery() as nursery:

            async def deliver() -> None:
                async for line in inbox:
                    await channel.send_all(line)
                await channel.send_all(b"* you were too slow and left the room\n")
                nursery.cancel_scope.cancel()

            nursery.start_soon(deliver)
            while True:
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    broadcast(f"<{who}> ".encode() + line[:1000] + b"\n")
                if len(buffer) > 4096:
                    buffer = b""  # no line that long; drop the fragment
                data = await channel.receive_some()
                if not data:
                    break
                buffer += data
            nursery.cancel_scope.cancel()
    finally:
        MEMBERS.pop(member_id, None)
        broadcast(f"* {who} left\n".encode())


async def serve() -> None:
    async with open_bus(name=NAME, info=service.info) as bus:
        print(f"{NAME} ready as {bus.unique_id}", flush=True)
        await service.serve(bus)


async def join(nick: str) -> None:
    async with open_bus() as bus:
        channel = await bus.open_channel(NAME, "chat")
        await channel.send_all(nick.encode() + b"\n")
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
    # The client library logs at WARNING when it loses the broker and when it is back.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        if sys.argv[1:2] == ["serve"]:
            trio.run(serve)
        else:
            trio.run(join, " ".join(sys.argv[2:]))
    except KeyboardInterrupt:
        pass
