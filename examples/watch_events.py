#!/usr/bin/env python3
"""Print the events on the bus as they come, and say when some were missed.

    python examples/watch_events.py                      # every event
    python examples/watch_events.py 'org.example.*' Tick # these sources and members only

``--count N`` stops after N events.
"""

from __future__ import annotations

import argparse
import logging

import trio

from clients import Event, open_bus


async def main(source: str, member: str, count: int | None) -> None:
    seen = 0
    async with open_bus() as bus, bus.subscribe(source, member) as events:
        print(f"listening for {member} from {source}", flush=True)
        async for item in events:
            if isinstance(item, Event):
                print(f"{item.source} {item.member} {item.payload!r}", flush=True)
                seen += 1
                if count is not None and seen >= count:
                    return
            else:
                missed = item.missed if item.missed is not None else "some"
                print(f"-- missed {missed} events ({item.reason})", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default="*", help="source pattern (default: *)")
    parser.add_argument("member", nargs="?", default="*", help="member pattern (default: *)")
    parser.add_argument("--count", type=int, default=None, help="stop after N events")
    options = parser.parse_args()
    try:
        trio.run(main, options.source, options.member, options.count)
    except KeyboardInterrupt:
        pass
