"""Start real brokers in process for tests (real Unix and TCP sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bus.broker import Broker, BrokerConfig
from bus.core.policy import Policy
from bus.wire.identity import Identity

OWNER = Identity.from_seed(b"o" * 32)  # the broker's own identity: every right
FRIEND = Identity.from_seed(b"f" * 32)  # in authorized_keys: every right
PLUGIN = Identity.from_seed(b"p" * 32)  # limited by rules
STRANGER = Identity.from_seed(b"s" * 32)  # unknown: refused

RULES = {
    "rule": [
        {
            "name": "plugins",
            "identities": [PLUGIN.id],
            "connect": True,
            "own": ["org.example.*"],
            "see": ["org.example.*"],
        }
    ]
}


@dataclass
class RunningBroker:
    broker: Broker
    address: str
    config: BrokerConfig
    nursery: trio.Nursery
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def unix_address(self) -> str:
        return self.address.split(";")[0]

    @property
    def tcp_address(self) -> str:
        return self.address.split(";")[1]

    async def stop(self) -> None:
        self.broker.begin_shutdown()
        with trio.move_on_after(5):
            while self.broker.sessions:
                await trio.sleep(0.01)
        self.scope.cancel()
        await self.done.wait()  # sockets closed and files removed


def make_config(tmp: Path, **overrides: Any) -> BrokerConfig:
    policy = Policy.from_mapping(OWNER.public_key, RULES, frozenset({FRIEND.id}))
    settings: dict[str, Any] = dict(
        identity=OWNER,
        policy=policy,
        unix_path=tmp / "run" / "bus.sock",
        tcp=("127.0.0.1", 0),
        runtime_dir=tmp / "run",
    )
    settings.update(overrides)
    return BrokerConfig(**settings)


async def start_broker(nursery: trio.Nursery, tmp: Path, **overrides: Any) -> RunningBroker:
    """Start a broker in ``nursery``; stop it with ``await running.stop()``."""
    config = make_config(tmp, **overrides)
    broker = Broker(config)
    running = RunningBroker(broker, "", config, nursery)

    async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with running.scope:
                await broker.serve(task_status=task_status)
        finally:
            running.done.set()

    running.address = await nursery.start(serve)
    return running


@asynccontextmanager
async def running_broker(tmp: Path, **overrides: Any) -> AsyncIterator[RunningBroker]:
    async with trio.open_nursery() as nursery:
        running = await start_broker(nursery, tmp, **overrides)
        try:
            yield running
        finally:
            running.scope.cancel()


@asynccontextmanager
async def one_caller_twice_and_another(address: str) -> AsyncIterator[tuple[Any, Any, Any]]:
    """Two bus connections of one caller (FRIEND) and one of another caller (OWNER)."""
    from clients import open_bus

    async with (
        open_bus(address, identity=FRIEND) as first,
        open_bus(address, identity=FRIEND) as second,
        open_bus(address, identity=OWNER) as other,
    ):
        yield first, second, other
