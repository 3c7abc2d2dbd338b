"""The client's event path against a scripted broker: what a burst of control frames turns
into (events straight to their subscriptions, requests and other messages as ever), and the
consumer's side of a subscription (waiting, cancellation, several consumers)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from bus.io.framed import FramedStream
from bus.wire.frames import ControlFrame, encode_control
from clients.bus import open_bus
from clients.events import SUBSCRIPTION_BUFFER, Event, Gap

from .brokers import FRIEND, OWNER, running_broker
from .test_client_faults import CLIENT, scripted_broker

EMITTER_ID = OWNER.id


def event(member: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"source": "org.example.Ticker", "member": member, "payload": {"n": n}, "sender": ":7", "identity": EMITTER_ID, "event": "event", **extra}


async def subscribed(framed: FramedStream) -> int:
    """Answer the client's subscribe request; returns the subscription id."""
    frame = await framed.receive_frame()
    assert isinstance(frame, ControlFrame) and frame.message["op"] == "subscribe", frame
    await framed.send_message({"re": frame.message["id"], "result": {"subscription": 5}})
    return 5


async def test_a_burst_of_control_frames_is_sorted_out_frame_by_frame(tmp_path: Path) -> None:
    """One write holding events, an event-looking request, events that match nothing or lack
    a source, a gap and a reply: each is what parse_message says it is, in order."""
    answers: list[dict[str, Any]] = []

    async def script(framed: FramedStream) -> None:
        sub_id = await subscribed(framed)
        burst = [
            event("Tick", 0),
            # A map with "op" is a request, whatever else it holds: answered, not delivered --
            # after an event (in the run the events' handler takes) as anywhere else, and with
            # six keys, as many as an event has.
            {k: v for k, v in {**event("Tick", 96), "op": "frobnicate", "id": 41}.items() if k not in ("sender", "identity")},
            {**event("Tick", 99), "op": "frobnicate", "id": 42},
            event("Other", 98),  # matches no subscription of this client
            {k: v for k, v in event("Tick", 97).items() if k != "source"},  # no source: dropped
            {"event": "gap", "subscription": sub_id, "missed": 3, "reason": "overflow"},
            event("Tick", 1, extra_field=True),  # fields it does not know are ignored
            event("Tick", 2, sender=7),  # a sender that is not text is kept as text
        ]
        await framed.stream.send_all(b"".join(encode_control(0, message) for message in burst))
        for _ in range(2):
            frame = await framed.receive_frame()
            assert isinstance(frame, ControlFrame)
            answers.append(frame.message)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        address = await scripted_broker(nursery, tmp_path, script)
        async with open_bus(address, identity=CLIENT, reconnect=False) as bus:
            async with bus.subscribe("org.example.*", "Tick") as ticks:
                with trio.fail_after(10):
                    got = [await ticks.__anext__() for _ in range(4)]
                    while len(answers) < 2:
                        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert got == [
        Event("org.example.Ticker", "Tick", {"n": 0}, ":7", EMITTER_ID),
        Gap(3, "overflow"),
        Event("org.example.Ticker", "Tick", {"n": 1}, ":7", EMITTER_ID),
        Event("org.example.Ticker", "Tick", {"n": 2}, "7", EMITTER_ID),
    ]
    assert answers == [
        {"re": n, "error": {"code": "minibus.Error.UnknownOperation", "message": "unknown operation 'frobnicate'"}} for n in (41, 42)
    ]
    # What the reader builds (see events._EventDraft) is an Event as its constructor makes it:
    # the same type, fields, hash and JSON, and frozen.
    first, made = got[0], Event("org.example.Ticker", "Tick", {"n": 0}, ":7", EMITTER_ID)
    assert type(first) is Event and hash(dataclasses.replace(first, payload=0)) == hash(dataclasses.replace(made, payload=0))
    assert first.to_json() == made.to_json() and repr(first) == repr(made)
    assert dataclasses.fields(first) == dataclasses.fields(made) and dataclasses.replace(first, payload=1).payload == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.payload = 1  # type: ignore[misc]


async def test_a_burst_of_mixed_kinds_reaches_each_subscription_in_order(tmp_path: Path) -> None:
    """Events of several kinds interleaved in one write (the reader remembers the last kind's
    route): each subscription gets exactly the events it matches, in order."""
    ready = trio.Event()

    async def script(framed: FramedStream) -> None:
        for sub_id in (1, 2, 3):
            frame = await framed.receive_frame()
            assert isinstance(frame, ControlFrame) and frame.message["op"] == "subscribe", frame
            await framed.send_message({"re": frame.message["id"], "result": {"subscription": sub_id}})
        await ready.wait()
        kinds = ["Tick", "Tick", "Tock", "Tick", "Tock", "Tock", "Other", "Tick"]
        burst = [event(member, n) for n, member in enumerate(kinds)]
        burst.insert(5, {**event("Tock", 99), "member": 5})  # a member that is not text: dropped
        burst.insert(2, {**event("Tick", 98), "source": None})  # no source: dropped
        await framed.stream.send_all(b"".join(encode_control(0, message) for message in burst))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        address = await scripted_broker(nursery, tmp_path, script)
        async with open_bus(address, identity=CLIENT, reconnect=False) as bus:
            async with bus.subscribe("org.example.*", "Tick") as ticks, bus.subscribe("org.example.*", "Tock") as tocks:
                async with bus.subscribe("org.example.*", "*") as every:
                    ready.set()
                    with trio.fail_after(10):
                        got_ticks = [(await ticks.__anext__()).payload["n"] for _ in range(4)]  # type: ignore[union-attr]
                        got_tocks = [(await tocks.__anext__()).payload["n"] for _ in range(3)]  # type: ignore[union-attr]
                        got_every = [(await every.__anext__()).payload["n"] for _ in range(8)]  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
    assert got_ticks == [0, 1, 3, 7]
    assert got_tocks == [2, 4, 5]
    assert got_every == [0, 1, 2, 3, 4, 5, 6, 7]


async def test_a_full_subscription_buffer_drops_the_newest_and_says_how_many_with_a_gap(tmp_path: Path) -> None:
    """Consumers that do not read: a subscription's buffer takes SUBSCRIPTION_BUFFER items,
    then drops the newest, counted (whether the events' kind goes to it alone or to others
    too); once its consumer has made room, the next event comes after a slow-consumer gap
    with the count, and a subscription with room meanwhile missed nothing."""
    answered = trio.Event()
    drained = trio.Event()

    async def ping(framed: FramedStream, n: int) -> None:
        # The client answers in order: once it has, it has handled every frame before.
        await framed.send_message({"op": "ping", "id": n})
        while (frame := await framed.receive_frame()) is not None:
            if isinstance(frame, ControlFrame) and frame.message.get("re") == n:
                return

    async def script(framed: FramedStream) -> None:
        for sub_id in (1, 2):
            frame = await framed.receive_frame()
            assert isinstance(frame, ControlFrame) and frame.message["op"] == "subscribe", frame
            await framed.send_message({"re": frame.message["id"], "result": {"subscription": sub_id}})
        tocks = [event("Tock", n) for n in range(SUBSCRIPTION_BUFFER + 100)]  # for `every` alone
        await framed.stream.send_all(b"".join(encode_control(0, message) for message in tocks))
        await framed.stream.send_all(b"".join(encode_control(0, event("Tick", n)) for n in range(20)))  # both
        await ping(framed, 900)
        answered.set()
        await drained.wait()
        later = [event("Tock", 1), event("Tock", 2), event("Tick", 20), event("Tock", 3)]
        await framed.stream.send_all(b"".join(encode_control(0, message) for message in later))
        await trio.sleep_forever()

    def kinds(items: list[Event | Gap]) -> list[Any]:
        return [(item.member, item.payload["n"]) if isinstance(item, Event) else item for item in items]

    async with trio.open_nursery() as nursery:
        address = await scripted_broker(nursery, tmp_path, script)
        async with open_bus(address, identity=CLIENT, reconnect=False) as bus:
            async with bus.subscribe("org.example.*", "Tick") as ticks, bus.subscribe("org.example.*", "*") as every:
                with trio.fail_after(10):
                    await answered.wait()
                    assert len(every._buffer) == SUBSCRIPTION_BUFFER and len(ticks._buffer) == 20
                    first = [await every.__anext__() for _ in range(SUBSCRIPTION_BUFFER)]
                    first_ticks = [await ticks.__anext__() for _ in range(20)]
                    drained.set()
                    rest = [await every.__anext__() for _ in range(5)]
                    last_tick = await ticks.__anext__()
        nursery.cancel_scope.cancel()
    assert kinds(first) == [("Tock", n) for n in range(SUBSCRIPTION_BUFFER)]
    assert kinds(first_ticks) == [("Tick", n) for n in range(20)]
    # `every` missed 100 Tocks and 20 Ticks; the gap comes before the next event it takes.
    assert kinds(rest) == [Gap(120, "slow consumer"), ("Tock", 1), ("Tock", 2), ("Tick", 20), ("Tock", 3)]
    assert kinds([last_tick]) == [("Tick", 20)]


async def test_a_consumer_of_a_full_buffer_lets_other_tasks_run(tmp_path: Path) -> None:
    """Taking buffered items does not wait, but at most 16 are taken between two scheduling
    points, where the other tasks run (and every call can still be cancelled: see the test
    below)."""
    ready = trio.Event()

    async def script(framed: FramedStream) -> None:
        await subscribed(framed)
        await ready.wait()
        await framed.stream.send_all(b"".join(encode_control(0, event("Tick", n)) for n in range(100)))
        await trio.sleep_forever()

    taken = 0
    progress: list[int] = []  # how many the consumer had taken, at each turn of another task

    async def other_task() -> None:
        while True:
            progress.append(taken)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        address = await scripted_broker(nursery, tmp_path, script)
        async with open_bus(address, identity=CLIENT, reconnect=False) as bus:
            async with bus.subscribe("org.example.*", "Tick") as ticks:
                ready.set()
                with trio.fail_after(10):
                    while len(ticks._buffer) < 100:
                        await trio.sleep(0.01)
                nursery.start_soon(other_task)
                while not progress:
                    await trio.lowlevel.checkpoint()
                for _ in range(100):
                    assert isinstance(await ticks.__anext__(), Event)
                    taken += 1
                await trio.lowlevel.checkpoint()
                await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()
    # The other task ran while the 100 were taken, again and again.  (How often it saw the
    # consumer's turns depends on the order trio runs the tasks of each scheduler pass in, which
    # is random: at most a few turns of 16 between two of its own.)
    steps = [after - before for before, after in zip(progress, progress[1:])]
    assert progress[-1] == 100 and len({n for n in progress if 0 < n < 100}) >= 3 and max(steps) <= 48, progress


async def test_an_event_whose_name_is_not_text_ends_the_link(tmp_path: Path) -> None:
    subscribed_now = trio.Event()

    async def script(framed: FramedStream) -> None:
        await subscribed(framed)
        await subscribed_now.wait()
        await framed.stream.send_all(encode_control(0, event("Tick", 0)) + encode_control(0, {**event("Tick", 1), "event": 3}))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        address = await scripted_broker(nursery, tmp_path, script)
        async with open_bus(address, identity=CLIENT, reconnect=False) as bus:
            async with bus.subscribe("org.example.*", "Tick") as ticks:
                subscribed_now.set()
                with trio.fail_after(10):
                    first = await ticks.__anext__()
                    assert isinstance(first, Event) and first.payload == {"n": 0}
                    while bus.failure is None:
                        await trio.sleep(0.01)
                assert "an event's name must be a string" in str(bus.failure)
        nursery.cancel_scope.cancel()


async def test_a_waiting_consumer_can_be_cancelled_and_loses_nothing(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER, name="org.example.Ticker") as ticker:
            async with open_bus(rb.unix_address, identity=FRIEND) as listener:
                async with listener.subscribe("org.example.*", "Tick") as ticks:
                    # Waiting with nothing buffered: cancelled, and it took nothing.
                    with trio.move_on_after(0.2) as scope:
                        await ticks.__anext__()
                    assert scope.cancelled_caught
                    assert await ticker.emit("Tick", 0, source="org.example.Ticker") == 1
                    assert await ticker.emit("Tick", 1, source="org.example.Ticker") == 1
                    with trio.fail_after(10):
                        while len(ticks._buffer) < 2:
                            await trio.sleep(0.01)
                    # With items buffered, a cancelled call still takes none of them.
                    with trio.CancelScope() as cancelled:
                        cancelled.cancel()
                        with pytest.raises(trio.Cancelled):
                            await ticks.__anext__()
                    with trio.fail_after(10):
                        got = [await ticks.__anext__() for _ in range(2)]
                    assert [e.payload for e in got if isinstance(e, Event)] == [0, 1]


async def test_several_consumers_of_one_subscription_share_its_events_and_all_see_the_end(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER, name="org.example.Ticker") as ticker:
            async with open_bus(rb.unix_address, identity=FRIEND) as listener:
                ticks = listener.subscribe("org.example.*", "Tick")
                await ticks.__aenter__()
                taken: list[list[int]] = [[], [], []]

                async def consume(mine: list[int]) -> None:
                    async for item in ticks:
                        assert isinstance(item, Event)
                        mine.append(item.payload)
                        await trio.sleep(0)  # (let the others take some too)

                with trio.fail_after(20):
                    async with trio.open_nursery() as nursery:
                        for mine in taken:
                            nursery.start_soon(consume, mine)
                        await trio.testing.wait_all_tasks_blocked()
                        for n in range(60):
                            await ticker.publish("Tick", n, source="org.example.Ticker")
                        assert await ticker.emit("Tick", 60, source="org.example.Ticker") == 1
                        while sum(map(len, taken)) < 61:
                            await trio.sleep(0.01)
                        await ticks.aclose()  # every consumer's loop ends
                every = sorted(n for mine in taken for n in mine)
                assert every == list(range(61))  # each event to exactly one consumer
                assert sum(1 for mine in taken if mine) >= 2


async def test_publish_refuses_locally_what_peers_would_refuse_and_sends_plain_scalars(tmp_path: Path) -> None:
    from datetime import datetime

    from bus.errors import LocalProtocolError

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER, name="org.example.Ticker") as ticker:
            async with open_bus(rb.unix_address, identity=FRIEND) as listener:
                async with listener.subscribe("org.example.*", "Tick") as ticks:
                    # Tagged CBOR (a set, a big integer, a datetime), as payload or as a name:
                    # refused before anything is sent.
                    for payload in ({1, 2}, 1 << 64, -(1 << 64) - 1, datetime(2020, 1, 1), [datetime(2020, 1, 1)]):
                        with pytest.raises(LocalProtocolError):
                            await ticker.publish("Tick", payload, source="org.example.Ticker")
                    with pytest.raises(LocalProtocolError):
                        await ticker.publish(datetime(2020, 1, 1), 1, source="org.example.Ticker")  # type: ignore[arg-type]
                    with pytest.raises(LocalProtocolError):
                        await ticker.publish("Tick", 1, source=datetime(2020, 1, 1))  # type: ignore[arg-type]
                    sent: list[Any] = [b"\x00raw", "text", (1 << 64) - 1, -(1 << 64), 2.5, True, None, {"n": [1, "two"]}]
                    for value in sent:
                        await ticker.publish("Tick", value, source="org.example.Ticker")
                    with trio.fail_after(10):
                        got = [await ticks.__anext__() for _ in sent]
                    assert [e.payload for e in got if isinstance(e, Event)] == sent


async def _full_buffer_then_two(
    tmp_path: Path, script: Any, drained: trio.Event, *, reconnect: bool
) -> tuple[list[Event | Gap], list[Event | Gap]]:
    """Subscribe through the scripted broker until the subscription owes a gap (its buffer
    full), take the full buffer, set ``drained``, then take two more items."""
    async with trio.open_nursery() as nursery:
        address = await scripted_broker(nursery, tmp_path, script)
        async with open_bus(address, identity=CLIENT, reconnect=reconnect) as bus:
            async with bus.subscribe("org.example.*", "Tick") as ticks:
                with trio.fail_after(20):
                    while ticks._owed is None:
                        await trio.sleep(0.01)
                    items = [await ticks.__anext__() for _ in range(SUBSCRIPTION_BUFFER)]
                    drained.set()
                    rest = [await ticks.__anext__(), await ticks.__anext__()]
        nursery.cancel_scope.cancel()
    return items, rest


async def test_an_uncounted_gap_into_a_full_buffer_is_said_uncounted(tmp_path: Path) -> None:
    """A broker gap that counts nothing (``missed`` None) arriving while the subscription's
    buffer is full is not lost: once the consumer has room, ``Gap(None, "overflow")`` comes
    before the next event (it was folded into a count of 0, so nothing came).  (From a review.)"""
    drained = trio.Event()

    async def script(framed: FramedStream) -> None:
        sub_id = await subscribed(framed)
        burst = [event("Tick", n) for n in range(SUBSCRIPTION_BUFFER)]  # exactly fills the buffer
        burst.append({"event": "gap", "subscription": sub_id, "missed": None, "reason": "overflow"})
        burst.append(event("Tick", SUBSCRIPTION_BUFFER))  # dropped too, counted with it
        await framed.stream.send_all(b"".join(encode_control(0, m) for m in burst))
        await drained.wait()
        await framed.stream.send_all(encode_control(0, event("Tick", 5000)))
        await trio.sleep_forever()

    items, rest = await _full_buffer_then_two(tmp_path, script, drained, reconnect=False)
    assert [i.payload["n"] for i in items] == list(range(SUBSCRIPTION_BUFFER))  # type: ignore[union-attr]
    assert rest[0] == Gap(None, "overflow")
    assert isinstance(rest[1], Event) and rest[1].payload["n"] == 5000


async def test_a_link_down_gap_into_a_full_buffer_comes_before_the_next_event(tmp_path: Path) -> None:
    """The link goes down while the subscription's buffer is full: the ``Gap(None, "link
    down")`` restoring it adds is owed, not lost (events emitted meanwhile were not counted),
    and comes before the first event after the reconnect.  (From a review.)"""
    connections = 0
    drained = trio.Event()

    async def script(framed: FramedStream) -> None:
        nonlocal connections
        connections += 1
        await subscribed(framed)
        if connections == 1:
            burst = [event("Tick", n) for n in range(SUBSCRIPTION_BUFFER)]  # exactly fills it
            await framed.stream.send_all(b"".join(encode_control(0, m) for m in burst))
            return  # the link goes down
        await drained.wait()
        await framed.stream.send_all(encode_control(0, event("Tick", 9999)))
        await trio.sleep_forever()

    items, rest = await _full_buffer_then_two(tmp_path, script, drained, reconnect=True)
    assert all(isinstance(i, Event) for i in items)
    assert rest[0] == Gap(None, "link down")
    assert isinstance(rest[1], Event) and rest[1].payload["n"] == 9999


def test_nothing_cbor2_decodes_but_text_is_equal_to_text() -> None:
    """Events._on_events tests an event's names for text only when they differ from the last
    kind's (which are text): that holds while nothing the client's decoder (plain
    ``cbor2.loads``) makes of other data compares equal to a ``str``.  Pinned here for the
    tags cbor2 knows and the other simple values, each with a text, bytes and int payload."""
    import cbor2

    values: list[bytes] = []
    for tag in [*range(0, 300), 1004, 1040, 55799]:
        for payload in ("Tick", b"Tick", 1, ["Tick"], {"Tick": 1}):
            values.append(cbor2.dumps(cbor2.CBORTag(tag, payload)))
    values += [bytes([0xF7]), bytes([0xF0]), bytes([0xF8, 0x20]), cbor2.dumps(float("nan")), cbor2.dumps(b"Tick")]
    decoded = 0
    for data in values:
        try:
            value = cbor2.loads(data)
        except Exception:
            continue  # (refused: never reaches the client's handlers)
        decoded += 1
        if type(value) is not str:
            assert not isinstance(value, str) and value != "Tick" and not (value == "Tick"), (data.hex(), value)
    assert decoded > 1000
