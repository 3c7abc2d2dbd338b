#!/usr/bin/env python3
"""A nameless client that prints named plugins as they connect and disconnect.

    python examples/watch.py                # everything
    python examples/watch.py 'org.example.*'

It is hidden from other clients' queries (it owns no name).  The first lines are the
snapshot (``present``), then every change, with no gap in between.
"""

from __future__ import annotations

import logging
import sys

import trio

from clients import open_bus


async def main(patterns: list[str]) -> None:
    async with open_bus() as bus, bus.watch(patterns or ["*"]) as watch:
        async for event in watch:
            owner = f"{event.owner.unique_id} {event.owner.identity}" if event.owner else f"(was {event.old_owner})"
            print(f"{event.kind:13} {event.name} {owner}", flush=True)


if __name__ == "__main__":
    # The client library logs at WARNING when it loses the broker and when it is back.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        trio.run(main, sys.argv[1:])
    except KeyboardInterrupt:
        pass
