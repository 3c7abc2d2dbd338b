#!/usr/bin/env python3
"""A service plugin: registers org.example.Echo and stays until interrupted.

    busd &                                  # the broker, with its defaults
    python examples/echo_service.py         # this plugin
    busctl list                             # shows org.example.Echo

Channels (the echo itself) arrive with the next version of minibus; for now the plugin
shows registration, plugin info, and how a service keeps its name across broker restarts
(the client library reconnects and requests the name again).
"""

from __future__ import annotations

import trio

from clients import open_bus

NAME = "org.example.Echo"


async def main() -> None:
    info = {"description": "echoes what it is sent", "version": "0.1.0", "metadata": {"example": True}}
    async with open_bus(name=NAME, info=info) as bus:
        print(f"{NAME} registered as {bus.unique_id}; Ctrl-C to stop", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
