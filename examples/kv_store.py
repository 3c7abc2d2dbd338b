#!/usr/bin/env python3
"""A key-value store service, org.example.KV, and a small client for it.

    python examples/kv_store.py serve &
    python examples/kv_store.py set colour blue
    python examples/kv_store.py get colour          # -> blue
    python examples/kv_store.py keys
    busctl call org.example.KV get '"colour"'       # the same from busctl
"""

from __future__ import annotations

import logging
import sys

import trio

from clients import NameNotFound, RequestError, Service, open_bus

NAME = "org.example.KV"
service = Service(NAME, description="a small key-value store", version="1.0")
store: dict[str, object] = {}


@service.method
async def set(key: str, value: object) -> None:  # noqa: A001 - the method's public name
    """Store a value under a key."""
    store[key] = value


@service.method
async def get(key: str) -> object:
    """The value stored under a key (error org.example.KV.Error.NoKey if there is none)."""
    if key not in store:
        raise RequestError(f"no key {key!r}", code="org.example.KV.Error.NoKey")
    return store[key]


@service.method
async def keys() -> list[str]:
    """Every key, sorted."""
    return sorted(store)


async def serve() -> None:
    async with open_bus(name=NAME, info=service.info) as bus:
        print(f"{NAME} ready as {bus.unique_id}", flush=True)
        await service.serve(bus)


async def client(args: list[str]) -> int:
    async with open_bus() as bus:
        try:
            if args[0] == "set" and len(args) == 3:
                await bus.call(NAME, "set", args[1], args[2])
            elif args[0] == "get" and len(args) == 2:
                print(await bus.call(NAME, "get", args[1]))
            elif args[0] == "keys":
                print("\n".join(await bus.call(NAME, "keys")))
            else:
                print(__doc__, file=sys.stderr)
                return 2
        except NameNotFound:
            print(f"{NAME} is not running (python examples/kv_store.py serve)", file=sys.stderr)
            return 1
        except RequestError as exc:
            print(exc.message, file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    # The client library logs at WARNING when it loses the broker and when it is back.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if sys.argv[1:2] == ["serve"]:
        try:
            trio.run(serve)
        except KeyboardInterrupt:
            pass
    else:
        sys.exit(trio.run(client, sys.argv[1:] or ["keys"]))
