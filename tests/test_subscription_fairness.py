"""Subscription.__anext__'s fairness, measured per task step (a trio Instrument): whatever
the consumer awaits between its calls, however many subscriptions it takes from, and however
the buffers grow while it waits, it takes at most 16 items from one subscription between
two of its scheduling points; and a cancelled call takes nothing."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from bus.wire.address import Endpoint, format_address
from bus.wire.identity import Identity
from clients.events import Event, Events, Subscription
from clients.link import BusConnection

KEY = Identity.generate()


def subscriptions(count: int) -> list[Subscription]:
    connection = BusConnection(
        format_address([Endpoint("unix", KEY.public_key, path="/nonexistent")]),
        KEY, b"\0" * 32, name=None, info=None, flags=(), reconnect=False, request_timeout=5,
    )
    events = Events(connection)
    return [events.subscribe() for _ in range(count)]


class Steps(trio.abc.Instrument):
    """Items taken from each subscription during each step of one task."""

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.taking: Counter[int] = Counter()
        self.worst = 0

    def took(self, index: int) -> None:
        self.taking[index] += 1

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            if self.taking:
                self.worst = max(self.worst, max(self.taking.values()))
            self.taking.clear()


@pytest.mark.parametrize("seed", range(6))
async def test_at_most_16_items_per_subscription_between_scheduling_points(seed: int) -> None:
    rng = random.Random(seed)
    subs = subscriptions(rng.choice([1, 2, 3]))
    steps = Steps()
    trio.lowlevel.add_instrument(steps)
    n = 0
    done = False

    async def producer() -> None:
        nonlocal n
        while not done:
            for _ in range(rng.choice([0, 1, 5, 15, 16, 17, 40, 300])):
                n += 1
                rng.choice(subs)._put(Event("s", "m", n, ":1", "@k"))
            await trio.lowlevel.checkpoint()

    async def something_else() -> None:
        await rng.choice([trio.lowlevel.checkpoint_if_cancelled, trio.lowlevel.checkpoint, trio.lowlevel.cancel_shielded_checkpoint])()

    async def consumer() -> None:
        steps.task = trio.lowlevel.current_task()
        for _ in range(3000):
            index = rng.randrange(len(subs))
            if subs[index]._buffer or rng.random() < 0.05:
                await subs[index].__anext__()
                steps.took(index)
            if rng.random() < 0.3:
                await something_else()  # (the buffers may grow here, when it yields)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(producer)
                await consumer()
                done = True
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert 0 < steps.worst <= 16, steps.worst


async def test_a_cancelled_call_takes_nothing() -> None:
    (sub,) = subscriptions(1)
    for n in range(40):
        sub._put(Event("s", "m", n, ":1", "@k"))
    taken: list[Any] = []
    for _ in range(40):
        with trio.CancelScope() as scope:
            scope.cancel()
            taken.append(await sub.__anext__())  # (never: it is cancelled first)
        assert scope.cancelled_caught
        taken.append(await sub.__anext__())
    assert [item.payload for item in taken] == list(range(40))


class FakeLink:
    """What Events keys its tables by (a link object, weakly)."""


@pytest.mark.parametrize("seed", range(20))
async def test_a_run_reaches_exactly_the_matching_subscriptions_whatever_the_cache(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events._on_events against a plain model, over runs of random kinds (text or not,
    repeated or not) with non-events among them, a route cache of a few kinds, and
    subscriptions that come and go between the calls."""
    from clients import events as events_module

    rng = random.Random(seed)
    monkeypatch.setattr(events_module, "ROUTE_CACHE", rng.choice([1, 2, 3, 256]))
    subs = subscriptions(5)
    events = subs[0]._events
    link = FakeLink()
    patterns = ["*", "a*", "b", "?", "a"]
    for sub_id, sub in enumerate(subs, 1):
        sub._source = type(sub._source)((events_module.compile_glob(rng.choice(patterns)),))
        sub._member = type(sub._member)((events_module.compile_glob(rng.choice(patterns)),))
        events.live.add(sub)
        sub._registered(link, {"subscription": sub_id})  # type: ignore[arg-type]
    kinds: list[Any] = ["a", "b", "ab", "c", b"a", 1, None, 1.0]
    expected: dict[int, list[Any]] = {id(sub): [] for sub in subs}
    for round_ in range(30):
        run: list[dict[Any, Any]] = []
        for n in range(rng.randrange(1, 30)):
            if rng.random() < 0.1:
                run.append({"event": "gap", "n": n})
                continue
            message: dict[Any, Any] = {"event": "event", "source": rng.choice(kinds), "member": rng.choice(kinds), "payload": (round_, n), "sender": ":1", "identity": "@k"}
            if rng.random() < 0.05:
                del message["member"]
            if rng.random() < 0.05:
                message["re"] = 3
            run.append(message)
        start = 0
        while start < len(run):
            message = run[start]
            if message.get("event") != "event" or "re" in message:
                start += 1  # (the link's dispatch would take it)
                continue
            stop = events._on_events(link, run, start)  # type: ignore[arg-type]
            assert stop > start
            for taken in run[start:stop]:
                assert taken.get("event") == "event" and "re" not in taken
                source, member = taken.get("source"), taken.get("member")
                if type(source) is str and type(member) is str:
                    for sub in events.on_link(link).values():  # type: ignore[arg-type]
                        if sub.matches(source, member):
                            expected[id(sub)].append(taken["payload"])
            assert stop == len(run) or run[stop].get("event") != "event" or "re" in run[stop]
            start = stop
        # Between runs, a subscription may go or come back.
        if rng.random() < 0.3:
            sub = rng.choice(subs)
            if sub.subscription_id in events.on_link(link):  # type: ignore[arg-type]
                events.on_link(link).pop(sub.subscription_id)  # type: ignore[arg-type,call-overload]
            else:
                sub._registered(link, {"subscription": sub.subscription_id})  # type: ignore[arg-type]
            events.routes_changed()
    for sub in subs:
        got = [item.payload for item in sub._buffer]
        assert got == expected[id(sub)]
        assert all(type(item) is Event for item in sub._buffer)
