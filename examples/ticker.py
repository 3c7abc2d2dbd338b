#!/usr/bin/env python3
"""A service plugin that emits events: org.example.Ticker says Tick once a second.

    busd &                                  # the broker, with its defaults
    python examples/watch_events.py &       # a listener (or: busctl subscribe 'org.example.*')
    python examples/ticker.py               # this plugin; Ctrl-C to stop
    busctl introspect org.example.Ticker    # shows the Tick event with its doc text

``--count N`` stops after N ticks.
"""

from __future__ import annotations

import argparse
import logging
import time

import trio

from clients import Service, open_bus

service = Service("org.example.Ticker", description="says Tick once a second", version="0.1.0")


@service.event("Tick")
def tick() -> None:
    """Once a second: {"n": counter, "time": seconds since the epoch}."""


async def main(count: int | None, interval: float) -> None:
    async with open_bus(name=service.name, info=service.info) as bus:
        service.attach(bus)
        print(f"{service.name} registered as {bus.unique_id}; Ctrl-C to stop", flush=True)
        n = 0
        while count is None or n < count:
            delivered = await service.emit("Tick", {"n": n, "time": time.time()})
            print(f"Tick {n}: delivered to {delivered}", flush=True)
            n += 1
            await trio.sleep(interval)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=None, help="stop after N ticks")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between ticks (default 1)")
    options = parser.parse_args()
    try:
        trio.run(main, options.count, options.interval)
    except KeyboardInterrupt:
        pass
