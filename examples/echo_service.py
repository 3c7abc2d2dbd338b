#!/usr/bin/env python3
"""A service plugin: org.example.Echo, with an RPC method and a raw echo channel.

    busd &                                              # the broker, with its defaults
    python examples/echo_service.py &                   # this plugin
    busctl call org.example.Echo echo '"hello"'         # -> "hello"
    busctl introspect org.example.Echo
    busctl open org.example.Echo < some_file            # prints some_file back
"""

from __future__ import annotations

import logging

import trio

from clients import Channel, Service, open_bus

service = Service("org.example.Echo", description="echoes what it is sent", version="0.2.0")


@service.method
async def echo(value: object) -> object:
    """Return the value unchanged."""
    return value


@service.channel("raw")
async def raw(channel: Channel) -> None:
    """Send every byte back; half-close when the opener does."""
    while data := await channel.receive_some():
        await channel.send_all(data)
    await channel.send_eof()


async def main() -> None:
    async with open_bus(name=service.name, info=service.info) as bus:
        print(f"{service.name} registered as {bus.unique_id}; Ctrl-C to stop", flush=True)
        await service.serve(bus)


if __name__ == "__main__":
    # The client library logs at WARNING when it loses the broker and when it is back.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
