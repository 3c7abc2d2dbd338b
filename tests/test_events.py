"""Events between plugins, at the broker: emit, subscribe, stamping, policy, gaps (issue 11).

The sans-io core first, then a real broker over real sockets with hand-driven peers (the
client library's side comes with its own tests)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import trio

from bus.core.broker import BrokerCore, flatten
from bus.core.policy import Policy
from bus.errors import AccessDenied, BadRequest, ConnectionLost, NameNotFound, QuotaExceeded
from bus.wire.frames import DEFAULT_MAX_CONTROL, ControlFrame, encode_control
from bus.wire.identity import Identity

from .brokers import FRIEND, OWNER, running_broker
from .test_broker import raw_connect
from .test_isolation import reply_to

ADMIN = Identity.from_seed(b"A" * 32).public_key
EMITTER = Identity.from_seed(b"E" * 32).public_key
MUTE = Identity.from_seed(b"M" * 32).public_key
LISTENER = Identity.from_seed(b"L" * 32).public_key

RULES = f"""
[[rule]]
name = "emitters"
identities = ["{EMITTER.id}"]
connect = true
own = ["org.example.*"]
see = ["*"]
emit = ["org.example.*"]

[[rule]]
name = "owners-without-emit"
identities = ["{MUTE.id}"]
connect = true
own = ["org.mute.*"]
see = ["*"]

[[rule]]
name = "listeners"
identities = ["{LISTENER.id}"]
connect = true
see = ["org.example.Public*"]
"""


class Core:
    def __init__(self) -> None:
        self.core = BrokerCore(Policy.from_mapping(ADMIN, tomllib.loads(RULES)), clock=lambda: 1.0)
        self.got: dict[int, list[dict[str, Any]]] = {}
        self.ids = 100

    def connect(self, key: Any, name: str | None = None) -> int:
        conn = self.core.connect(key, "unix").id
        self.got[conn] = []
        self.ok(conn, "hello", **({"name": name} if name else {}))
        return conn

    def send(self, conn: int, op: str, **args: Any) -> dict[str, Any]:
        self.ids += 1
        reply: dict[str, Any] = {}
        for target, message in flatten(self.core.receive(conn, {"op": op, "id": self.ids, **args})):  # type: ignore[misc]
            encode_control(0, message, DEFAULT_MAX_CONTROL)  # every message is sendable
            if target == conn and message.get("re") == self.ids:
                reply = message
            else:
                self.got[target].append(message)
        return reply

    def ok(self, conn: int, op: str, **args: Any) -> Any:
        reply = self.send(conn, op, **args)
        assert "result" in reply, reply
        return reply["result"]

    def error(self, conn: int, op: str, **args: Any) -> str:
        reply = self.send(conn, op, **args)
        assert "error" in reply, reply
        return str(reply["error"]["code"]) + ": " + str(reply["error"]["message"])

    def events(self, conn: int) -> list[dict[str, Any]]:
        got, self.got[conn] = self.got[conn], []
        return got


def test_events_reach_matching_subscriptions_in_emission_order_stamped_by_the_broker() -> None:
    c = Core()
    emitter = c.connect(EMITTER, "org.example.Ticker")
    listener = c.connect(ADMIN)
    other = c.connect(ADMIN)
    c.ok(listener, "subscribe", source="org.example.*", member="Tick*")
    c.ok(other, "subscribe", member="Other")
    for i in range(5):
        assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tick", payload={"n": i}) == {"delivered": 1}
    c.ok(emitter, "emit", source="org.example.Ticker", member="Tock", payload=None)
    got = c.events(listener)
    assert [e["payload"]["n"] for e in got] == [0, 1, 2, 3, 4]
    first = got[0]
    assert first["event"] == "event" and first["source"] == "org.example.Ticker" and first["member"] == "Tick"
    assert first["sender"] == f":{emitter}" and first["identity"] == EMITTER.id
    assert c.events(other) == []
    # As its unique id, nameless or not; nobody listening costs nothing and says so.
    assert c.ok(emitter, "emit", member="Tick") == {"delivered": 0}


def test_nobody_can_emit_as_a_name_it_does_not_own_or_may_not_emit_as() -> None:
    c = Core()
    owner = c.connect(EMITTER, "org.example.Real")
    impostor = c.connect(EMITTER)
    mute = c.connect(MUTE, "org.mute.Quiet")
    listener = c.connect(ADMIN)
    c.ok(listener, "subscribe")
    assert "does not own 'org.example.Real'" in c.error(impostor, "emit", source="org.example.Real", member="Fake")
    assert "own unique id only" in c.error(impostor, "emit", source=f":{owner}", member="Fake")
    assert c.error(mute, "emit", source="org.mute.Quiet", member="Hello").startswith(AccessDenied.wire_code)
    assert c.error(impostor, "emit", member="bad-member").startswith(BadRequest.wire_code)
    assert c.events(listener) == []
    c.ok(mute, "emit", member="Hello")  # its own unique id needs no right
    assert [e["sender"] for e in c.events(listener)] == [f":{mute}"]


def test_subscribers_see_only_sources_they_may_see_and_unicast_goes_to_one() -> None:
    c = Core()
    emitter = c.connect(EMITTER, "org.example.Secret")
    c.ok(emitter, "request_name", name="org.example.Public")
    listener = c.connect(LISTENER)
    admin = c.connect(ADMIN)
    for conn in (listener, admin):
        c.ok(conn, "subscribe")
    c.ok(emitter, "emit", source="org.example.Secret", member="Hush")
    c.ok(emitter, "emit", source="org.example.Public", member="Hello")
    assert [e["member"] for e in c.events(listener)] == ["Hello"]
    assert [e["member"] for e in c.events(admin)] == ["Hush", "Hello"]
    assert c.ok(emitter, "emit", source="org.example.Public", member="Direct", destination=f":{admin}") == {"delivered": 1}
    assert c.events(listener) == [] and [e["member"] for e in c.events(admin)] == ["Direct"]
    assert c.error(emitter, "emit", member="X", destination=":999").startswith(NameNotFound.wire_code)


def test_subscriptions_are_budgeted_and_payloads_bounded() -> None:
    c = Core()
    conn = c.connect(EMITTER, "org.example.Big")
    for _ in range(32):
        c.ok(conn, "subscribe")
    assert "subscriptions_per_connection" in c.error(conn, "subscribe")
    assert c.error(conn, "subscribe", source="bad[").startswith(BadRequest.wire_code)
    assert "event_bytes" in c.error(conn, "emit", member="Big", payload="x" * 40000)
    assert c.error(conn, "emit", member="Deep", payload=[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]).startswith(QuotaExceeded.wire_code)
    assert c.ok(conn, "unsubscribe", subscription=1) == {}
    assert c.error(conn, "unsubscribe", subscription=1).startswith(BadRequest.wire_code)
    account = c.core.accounts[EMITTER.id]
    assert account.subscriptions.used == 31
    c.core.disconnect(conn)
    assert account.subscriptions.used == 0 and EMITTER.id not in c.core.accounts


def test_a_subscriber_without_room_gets_a_gap_then_the_rest() -> None:
    c = Core()
    room = {"ok": True}
    c.core.room_for = lambda conn_id: 1 << 30 if room["ok"] else 0
    emitter = c.connect(EMITTER, "org.example.Fast")
    listener = c.connect(ADMIN)
    first = c.ok(listener, "subscribe")["subscription"]
    second = c.ok(listener, "subscribe", member="Tick")["subscription"]
    c.ok(emitter, "emit", source="org.example.Fast", member="Tick", payload=1)
    room["ok"] = False
    for i in range(7):
        assert c.ok(emitter, "emit", source="org.example.Fast", member="Tick", payload=i) == {"delivered": 0}
    assert listener in c.core.pumping
    room["ok"] = True
    c.ok(emitter, "emit", source="org.example.Fast", member="Tick", payload="after")
    got = c.events(listener)
    assert [e["event"] for e in got] == ["event", "gap", "gap", "event"]
    gaps = {g["subscription"]: g for g in got[1:3]}
    assert set(gaps) == {first, second} and all(g["missed"] == 7 and g["reason"] == "overflow" for g in gaps.values())
    # Missed events with nothing after them are announced as soon as there is room.
    room["ok"] = False
    c.ok(emitter, "emit", source="org.example.Fast", member="Tick")
    room["ok"] = True
    pumped = [m for _, m in c.core.pump_watches(listener)]  # type: ignore[misc]
    assert [(m["event"], m["missed"]) for m in pumped] == [("gap", 1), ("gap", 1)] and listener not in c.core.pumping


def test_a_quiet_emit_has_no_reply_and_a_refused_one_is_told_by_an_event() -> None:
    c = Core()
    emitter = c.connect(EMITTER, "org.example.Quiet")
    listener = c.connect(ADMIN)
    c.ok(listener, "subscribe")
    assert c.send(emitter, "emit", source="org.example.Quiet", member="Tick", payload=1, quiet=True) == {}
    assert c.events(emitter) == []  # done: nothing comes back
    assert [e["payload"] for e in c.events(listener)] == [1]
    # Refused (not its name): no reply either, an emit_refused event with the request's id.
    assert c.send(emitter, "emit", source="org.example.Other", member="Tick", quiet=True) == {}
    refused = c.events(emitter)
    assert len(refused) == 1 and refused[0]["event"] == "emit_refused" and refused[0]["id"] == c.ids
    assert refused[0]["code"] == AccessDenied.wire_code and "does not own" in refused[0]["message"]
    assert c.events(listener) == []
    # ``quiet`` must be a bool; a bad one is refused like any bad argument (with a reply).
    assert c.error(emitter, "emit", member="Tick", quiet=1).startswith(BadRequest.wire_code)


def test_each_emitter_is_held_to_its_share_of_a_subscribers_room() -> None:
    """The core asks ``room_for_event`` per emitting identity: an emitter out of its share
    makes the subscriber miss its events only; another emitter's still go through."""
    c = Core()
    fast = c.connect(EMITTER, "org.example.Fast")
    slow_emitter = c.connect(ADMIN)
    listener = c.connect(ADMIN)
    sub = c.ok(listener, "subscribe")["subscription"]
    asked: list[str] = []

    def room(conn_id: int, payer: str) -> int:
        asked.append(payer)
        return 0 if payer == EMITTER.id else 1 << 20

    c.core.room_for_event = room
    for i in range(5):
        assert c.ok(fast, "emit", source="org.example.Fast", member="Tick", payload=i) == {"delivered": 0}
    assert c.ok(slow_emitter, "emit", member="Tock", payload="still here") == {"delivered": 1}
    got = c.events(listener)
    assert [(e["event"], e.get("missed"), e.get("payload")) for e in got] == [("gap", 5, None), ("event", None, "still here")]
    assert got[0]["subscription"] == sub and set(asked) == {EMITTER.id, ADMIN.id}


def test_room_is_asked_once_per_emit_and_only_the_short_miss_with_their_gaps_first() -> None:
    """The core asks ``short_of_room`` once per emit, for exactly the receivers the event
    would go to (only the destination, for a unicast one); those it names miss the event,
    each is owed a gap that comes right before the next event it gets, and the others get
    every event and no gap (also while one is owed a gap)."""
    c = Core()
    emitter = c.connect(EMITTER, "org.example.Ticker")
    a, b, idle = c.connect(ADMIN), c.connect(ADMIN), c.connect(ADMIN)
    sub_a = c.ok(a, "subscribe", member="Tick")["subscription"]
    c.ok(a, "subscribe", member="T*")  # a second matching subscription: one event, both counted
    c.ok(b, "subscribe", member="Tick")
    c.ok(idle, "subscribe", member="Other")
    asked: list[tuple[list[int], str, int]] = []
    short: set[int] = set()

    def short_of_room(conn_ids: list[int], payer: str, needed: int) -> list[int]:
        asked.append((sorted(conn_ids), payer, needed))
        return [conn_id for conn_id in conn_ids if conn_id in short]

    c.core.short_of_room = short_of_room
    assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tick", payload=0) == {"delivered": 2}
    assert len(asked) == 1 and asked[0][0] == sorted([a, b]) and asked[0][1] == EMITTER.id and asked[0][2] > 0
    short.add(a)
    for i in (1, 2):
        assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tick", payload=i) == {"delivered": 1}
    short.clear()
    # While a is owed a gap, a unicast to b asks about b alone and gives b no gap.
    assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tick", payload=3, destination=f":{b}") == {"delivered": 1}
    assert asked[-1][0] == [b]
    assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tick", payload=4) == {"delivered": 2}
    got_a = c.events(a)
    assert [(e["event"], e.get("payload"), e.get("missed")) for e in got_a] == [
        ("event", 0, None), ("gap", None, 2), ("gap", None, 2), ("event", 4, None)
    ]
    assert got_a[1]["subscription"] == sub_a and got_a[2]["subscription"] != sub_a
    assert [(e["event"], e.get("payload")) for e in c.events(b)] == [("event", i) for i in range(5)]
    assert c.events(idle) == [] and len(asked) == 5
    # Nobody owes a gap any more: the next event is plain for both.
    assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tick", payload=5) == {"delivered": 2}
    assert [e["event"] for e in c.events(a)] == ["event"] and [e["event"] for e in c.events(b)] == ["event"]


def test_a_subscriber_owed_a_gap_costs_only_the_emits_it_receives() -> None:
    """A subscriber short of room (it never reads) misses events of the kind it subscribed
    to and is owed a gap; an emit of another kind, none of whose receivers is owed one,
    takes its route as it is -- no receiver looked up, no gap, the same verdict -- while
    an emit that reaches the stuck one still counts what it misses."""
    c = Core()
    emitter = c.connect(EMITTER, "org.example.Ticker")
    stuck, others = c.connect(ADMIN), [c.connect(ADMIN) for _ in range(5)]
    c.ok(stuck, "subscribe", member="Tick")
    for conn in others:
        c.ok(conn, "subscribe", member="Tock")
    c.core.short_of_room = lambda conn_ids, payer, needed: [i for i in conn_ids if i == stuck]
    for i in range(3):
        assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tick", payload=i) == {"delivered": 0}
    assert c.core.connections[stuck].gaps_owed
    assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tock", payload=0) == {"delivered": 5}  # (the route is made)

    class Looked(dict):  # type: ignore[type-arg]
        """The core's connections, noting each one looked up."""

        looked: list[int] = []

        def __getitem__(self, key: int) -> Any:
            self.looked.append(key)
            return super().__getitem__(key)

    c.core.connections = Looked(c.core.connections)
    for i in range(1, 4):
        assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tock", payload=i) == {"delivered": 5}
    subscribers = {stuck, *others}
    assert not subscribers & set(Looked.looked)  # no receiver took a step of its own
    assert c.ok(emitter, "emit", source="org.example.Ticker", member="Tick", payload=3) == {"delivered": 0}
    assert subscribers & set(Looked.looked) == {stuck}  # the stuck one's own emit: it alone
    for conn in others:
        assert [(e["event"], e["payload"]) for e in c.events(conn)] == [("event", i) for i in range(4)]
    assert c.events(stuck) == [] and sum(s.missed for s in c.core.connections[stuck].subscriptions.values()) == 4


async def test_a_slow_subscriber_misses_events_with_a_gap_and_slows_nobody(tmp_path: Path) -> None:
    """Over real sockets: an emitter floods 24 KiB events; a subscriber that does not read
    is never cut and learns how many it missed; one that reads gets every event, in order."""
    async with running_broker(tmp_path) as rb:
        emitter = await raw_connect(rb.unix_address, OWNER)
        await emitter.send_message({"op": "hello", "id": 1, "name": "org.example.Flood"})
        await reply_to(emitter, 1)
        slow = await raw_connect(rb.unix_address, FRIEND)
        await slow.send_message({"op": "hello", "id": 1})
        await slow.send_message({"op": "subscribe", "id": 2, "source": "org.example.Flood"})
        await reply_to(slow, 2)
        fast = await raw_connect(rb.unix_address, FRIEND)
        await fast.send_message({"op": "hello", "id": 1})
        await fast.send_message({"op": "subscribe", "id": 2, "member": "Chunk"})
        await reply_to(fast, 2)
        total = 200
        received: list[int] = []

        async def read_fast() -> None:
            while len(received) < total:
                frame = await fast.receive_frame()
                assert frame is not None, "the reading subscriber was cut"
                if isinstance(frame, ControlFrame) and frame.message.get("event") == "event":
                    received.append(frame.message["payload"]["n"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_fast)
            for n in range(total):  # ~4.8 MiB: far more than the slow one's queue takes
                await emitter.send_message(
                    {"op": "emit", "id": 10 + n, "source": "org.example.Flood", "member": "Chunk", "payload": {"n": n, "b": "x" * 24000}}
                )
                assert "result" in await reply_to(emitter, 10 + n)
        assert received == list(range(total))
        # The slow subscriber reads now: events, a gap with the count it missed, never an error.
        seen = missed = 0
        with trio.fail_after(30):
            while seen + missed < total:
                frame = await slow.receive_frame()
                assert frame is not None, "the slow subscriber was cut"
                assert isinstance(frame, ControlFrame) and frame.message.get("event") != "error", frame
                if frame.message.get("event") == "event":
                    seen += 1
                elif frame.message.get("event") == "gap":
                    missed += frame.message["missed"]
        assert missed > 0 and seen + missed == total
        for framed in (emitter, slow, fast):
            await framed.aclose()


async def test_a_fast_emitter_fills_only_its_share_of_a_slow_subscribers_queue(tmp_path: Path) -> None:
    """Over real sockets: one emitter floods a subscriber that does not read; the flood takes
    its share of that subscriber's queue and then misses; another emitter's events are still
    queued for it (``delivered: 1``) and arrive, every one, in order, with no gap of their own."""
    async with running_broker(tmp_path) as rb:
        flood = await raw_connect(rb.unix_address, OWNER)
        await flood.send_message({"op": "hello", "id": 1, "name": "org.example.Flood"})
        await reply_to(flood, 1)
        other = await raw_connect(rb.unix_address, FRIEND)
        await other.send_message({"op": "hello", "id": 1, "name": "org.example.Other"})
        await reply_to(other, 1)
        slow = await raw_connect(rb.unix_address, FRIEND)
        await slow.send_message({"op": "hello", "id": 1})
        await slow.send_message({"op": "subscribe", "id": 2, "source": "org.example.Flood"})
        flood_sub = (await reply_to(slow, 2))["result"]["subscription"]
        await slow.send_message({"op": "subscribe", "id": 3, "source": "org.example.Other"})
        other_sub = (await reply_to(slow, 3))["result"]["subscription"]
        total = 120
        delivered = []
        for n in range(total):  # ~2.9 MiB: far more than the slow subscriber's queue takes
            await flood.send_message(
                {"op": "emit", "id": 10 + n, "source": "org.example.Flood", "member": "Chunk", "payload": {"n": n, "b": "x" * 24000}}
            )
            delivered.append((await reply_to(flood, 10 + n))["result"]["delivered"])
        assert delivered[-1] == 0  # the flood's share is full: it misses from here on
        for n in range(5):
            # (bigger than the flood's: under one shared room, what the flood left would not take them)
            note = {"n": n, "b": "y" * 30000}
            await other.send_message({"op": "emit", "id": 10 + n, "source": "org.example.Other", "member": "Note", "payload": note})
            assert (await reply_to(other, 10 + n))["result"] == {"delivered": 1}
        # The slow subscriber reads now: the flood's events and gaps, and all of the others'.
        notes: list[int] = []
        seen = missed = 0
        with trio.fail_after(30):
            while len(notes) < 5 or seen + missed < total:
                frame = await slow.receive_frame()
                assert frame is not None, "the slow subscriber was cut"
                assert isinstance(frame, ControlFrame) and frame.message.get("event") != "error", frame
                message = frame.message
                if message.get("event") == "event":
                    if message["source"] == "org.example.Other":
                        notes.append(message["payload"]["n"])
                    else:
                        seen += 1
                elif message.get("event") == "gap":
                    assert message["subscription"] == flood_sub != other_sub
                    missed += message["missed"]
        assert notes == [0, 1, 2, 3, 4] and missed > 0 and seen + missed == total
        for framed in (flood, other, slow):
            await framed.aclose()


# -- the client library ------------------------------------------------------------------------


async def test_the_library_subscribes_emits_and_hands_each_event_to_every_matching_subscription(tmp_path: Path) -> None:
    from clients.bus import open_bus
    from clients.events import Event

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER, name="org.example.Ticker") as ticker:
            async with open_bus(rb.unix_address, identity=FRIEND) as listener:
                async with listener.subscribe("org.example.*", "Tick") as ticks, listener.subscribe() as everything:
                    for n in range(3):
                        assert await ticker.emit("Tick", {"n": n}, source="org.example.Ticker") == 1
                    assert await ticker.emit("Tock") == 1  # as its unique id: only "everything" matches
                    with trio.fail_after(10):
                        got_ticks = [await ticks.__anext__() for _ in range(3)]
                        got_all = [await everything.__anext__() for _ in range(4)]
                    assert all(isinstance(e, Event) for e in got_ticks + got_all)
                    assert [e.payload["n"] for e in got_ticks] == [0, 1, 2]  # type: ignore[union-attr]
                    assert [e.member for e in got_all] == ["Tick", "Tick", "Tick", "Tock"]  # type: ignore[union-attr]
                    last = got_all[-1]
                    assert isinstance(last, Event) and last.source == ticker.unique_id == last.sender
                    assert last.identity == OWNER.id


async def test_publish_is_one_way_in_order_and_a_refusal_is_raised_by_the_next_publish(tmp_path: Path) -> None:
    from clients.bus import open_bus
    from clients.events import Event
    from clients.rpc import Service

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER, name="org.example.Ticker") as ticker:
            async with open_bus(rb.unix_address, identity=FRIEND) as listener:
                async with listener.subscribe("org.example.Ticker") as ticks:
                    total = 500  # a burst: sent in few writes, fanned out in few more
                    for n in range(total):
                        await ticker.publish("Tick", n, source="org.example.Ticker")
                    with trio.fail_after(10):
                        got = [await ticks.__anext__() for _ in range(total)]
                    assert all(isinstance(e, Event) for e in got)
                    assert [e.payload for e in got] == list(range(total))  # type: ignore[union-attr]
                    # Not its name: nothing comes back at once; the refusal is raised next time.
                    await ticker.publish("Tick", "spoofed", source="org.example.NotMine")
                    with trio.fail_after(10):
                        while ticker._events._refused is None:
                            await trio.sleep(0.01)
                    with pytest.raises(AccessDenied, match="does not own"):
                        await ticker.publish("Tick", "next", source="org.example.Ticker")
                    await ticker.publish("Tick", "after", source="org.example.Ticker")  # raised once
                    with trio.fail_after(10):
                        after = await ticks.__anext__()
                    assert isinstance(after, Event) and after.payload == "after"
                    # A service publishes its declared events as its name.
                    service = Service("org.example.Ticker")
                    service.event("Tock", "a declared event")
                    service.attach(ticker)
                    await service.publish("Tock", {"ok": True})
                    with trio.fail_after(10):
                        tock = await ticks.__anext__()
                    assert isinstance(tock, Event) and tock.member == "Tock" and tock.source == "org.example.Ticker"
                    with pytest.raises(ValueError, match="not declared"):
                        await service.publish("Undeclared")
        with pytest.raises(ConnectionLost):
            await ticker.publish("Tick")


async def test_subscriptions_are_restored_after_a_broker_restart_with_the_gap_announced(tmp_path: Path) -> None:
    from clients.bus import open_bus
    from clients.events import Event, Gap

    from .brokers import start_broker

    async with trio.open_nursery() as nursery:
        first = await start_broker(nursery, tmp_path)
        unix = first.unix_address
        async with (
            open_bus(unix, identity=OWNER, name="org.example.Ticker") as ticker,
            open_bus(unix, identity=FRIEND) as listener,
            listener.subscribe("org.example.Ticker") as events,
        ):
            await ticker.emit("Tick", 1, source="org.example.Ticker")
            with trio.fail_after(10):
                assert isinstance(await events.__anext__(), Event)
            await first.stop()
            second = await start_broker(nursery, tmp_path)
            with trio.fail_after(15):
                while not (ticker.reconnects and listener.reconnects and ticker.connected and listener.connected):
                    await trio.sleep(0.05)
                while await ticker.emit("Tick", 2, source="org.example.Ticker") == 0:
                    await trio.sleep(0.05)  # until the subscription is back (and the name)
                items = [await events.__anext__()]
                while not isinstance(items[-1], Event):
                    items.append(await events.__anext__())
            assert items[0] == Gap(None, "link down")
            assert isinstance(items[-1], Event) and items[-1].payload == 2
            await second.stop()


async def test_busctl_emit_and_subscribe_with_count_as_subprocesses(tmp_path: Path) -> None:
    """busctl subscribe --count N prints N events (JSON with --json) and exits; busctl emit
    owns the name for the moment, or says who does."""
    import json
    import os
    import sys

    from bus.wire.identity import save_identity
    from clients.bus import open_bus

    async with running_broker(tmp_path) as rb:
        env = dict(os.environ, MINIBUS_ADDRESS=rb.unix_address)
        key = tmp_path / "owner.key"
        save_identity(key, OWNER)
        busctl = [sys.executable, "-m", "clients.busctl", "--identity", str(key)]
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(_run_subscriber, busctl, env)
            with trio.fail_after(20):
                while not rb.broker.core._subscribers:  # until busctl subscribe has subscribed
                    await trio.sleep(0.05)
            for n in range(2):
                done = await trio.run_process([*busctl, "emit", "org.example.Shout", "Said", json.dumps({"n": n})], env=env, capture_stdout=True)
                assert done.stdout.decode().strip() == "delivered to 1 connection"
            with trio.fail_after(20):
                lines = await listening.receive()
        assert [json.loads(line)["payload"] for line in lines] == [{"n": 0}, {"n": 1}]
        assert all(json.loads(line)["source"] == "org.example.Shout" for line in lines)
        # Someone else owns the name: busctl says who, and emits nothing.
        async with open_bus(rb.unix_address, identity=FRIEND, name="org.example.Taken") as holder:
            refused = await trio.run_process(
                [*busctl, "emit", "org.example.Taken", "Said"], env=env, capture_stdout=True, capture_stderr=True, check=False
            )
            err = refused.stderr.decode().strip().splitlines()
            assert refused.returncode == 4 and len(err) == 1 and holder.unique_id in err[0]
        bad = await trio.run_process([*busctl, "subscribe", "bad["], env=env, capture_stderr=True, check=False)
        assert bad.returncode == 2 and b"never closed" in bad.stderr


async def _run_subscriber(busctl: list[str], env: dict[str, str], task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    send, receive = trio.open_memory_channel[list[str]](1)
    task_status.started(receive)
    done = await trio.run_process([*busctl, "--json", "subscribe", "org.example.*", "--count", "2"], env=env, capture_stdout=True)
    await send.send(done.stdout.decode().strip().splitlines())


async def test_a_service_declares_its_events_and_emits_them_as_its_name(tmp_path: Path) -> None:
    import pytest

    from clients.bus import open_bus
    from clients.rpc import Service

    service = Service("org.example.Pool")

    @service.event("NewOtx")
    def new_otx() -> None:
        """A transaction entered the pool: {"hash": text}."""

    with pytest.raises(ValueError, match="not an event member"):
        service.event("no-dashes")
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER, name=service.name) as bus:
            service.attach(bus)
            async with open_bus(rb.unix_address, identity=FRIEND) as listener, listener.subscribe(member_pattern="NewOtx") as events:
                assert await service.emit("NewOtx", {"hash": "ab"}) == 1
                with pytest.raises(ValueError, match="not declared"):
                    await service.emit("Undeclared")
                with trio.fail_after(10):
                    item = await events.__anext__()
                assert getattr(item, "source", None) == "org.example.Pool" and getattr(item, "payload", None) == {"hash": "ab"}
                described = await listener.introspect(service.name)
                assert described["events"] == [{"member": "NewOtx", "doc": 'A transaction entered the pool: {"hash": text}.'}]


async def test_subscriptions_that_come_and_go_between_events_get_exactly_theirs(tmp_path: Path) -> None:
    """The client remembers which subscriptions a kind of event goes to: one made, or ended,
    between two events of the same kind changes who gets the next."""
    from clients.bus import open_bus
    from clients.events import Event

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER, name="org.example.Ticker") as ticker:
            async with open_bus(rb.unix_address, identity=FRIEND) as listener:
                first = listener.subscribe("org.example.Ticker", "Tick")
                await first.__aenter__()
                assert await ticker.emit("Tick", 1, source="org.example.Ticker") == 1
                async with listener.subscribe("org.example.*") as second:
                    assert await ticker.emit("Tick", 2, source="org.example.Ticker") == 1
                    with trio.fail_after(10):
                        got_second = [await second.__anext__()]  # (the reader handed 2 to both)
                    await first.aclose()
                    assert await ticker.emit("Tick", 3, source="org.example.Ticker") == 1
                    with trio.fail_after(10):
                        got_second.append(await second.__anext__())
                    assert [e.payload for e in got_second if isinstance(e, Event)] == [2, 3]
                got_first = [item async for item in first]
                assert [e.payload for e in got_first if isinstance(e, Event)] == [1, 2]


_SOURCE_PATTERNS = ["*", "org.example.*", "org.example.Public*", "org.example.Secret", ":*"]
_MEMBER_PATTERNS = ["*", "Tick", "T*", "Tock"]
_OPS = st.one_of(
    st.tuples(st.just("subscribe"), st.integers(0, 3), st.sampled_from(_SOURCE_PATTERNS), st.sampled_from(_MEMBER_PATTERNS)),
    st.tuples(st.just("unsubscribe"), st.integers(0, 3), st.integers(0, 5), st.just("")),
    st.tuples(st.just("emit"), st.sampled_from(["org.example.Public", "org.example.Secret", ""]), st.sampled_from(["Tick", "Tock", "Tack"]), st.just("")),
    st.tuples(st.just("leave"), st.integers(0, 3), st.just(""), st.just("")),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_OPS, max_size=40))
def test_kept_routes_follow_subscriptions_as_they_come_and_go(ops: list[tuple[Any, Any, Any, Any]]) -> None:
    """A subscription that comes or goes changes the kept routes of the kinds it matches (it
    no longer makes busd forget them all): after any sequence of subscribes, unsubscribes,
    subscribers leaving and emits, each kept route is exactly what a fresh pass over the subscriptions gives (who, with
    which subscriptions, as policy lets them see), and every event reaches exactly those."""
    c = Core()
    emitter = c.connect(EMITTER, "org.example.Secret")
    c.ok(emitter, "request_name", name="org.example.Public")
    keys = (ADMIN, LISTENER, MUTE, LISTENER)
    subscribers = [c.connect(key) for key in keys]
    held: dict[int, list[int]] = {conn: [] for conn in subscribers}
    core = c.core

    def fresh(key: tuple[str, str], named: bool) -> dict[int, list[int]]:
        route = core._work_out_route(key[0], key[1], named)
        return {conn: [s.id for s in subs] for conn, subs in zip(route.conns, route.matching)}

    for op, a, b, d in ops:
        if op == "subscribe":
            conn = subscribers[a]
            reply = c.send(conn, "subscribe", source=b, member=d)
            if "result" in reply:
                held[conn].append(reply["result"]["subscription"])
        elif op == "leave":  # (and comes back, a new connection with no subscription)
            flatten(core.disconnect(subscribers[a]))
            subscribers[a] = c.connect(keys[a])
            held[subscribers[a]] = []
        elif op == "unsubscribe":
            conn = subscribers[a]
            if held[conn]:
                c.ok(conn, "unsubscribe", subscription=held[conn].pop(b % len(held[conn])))
        else:
            for conn in subscribers:
                c.got[conn].clear()
            source = a or f":{emitter}"
            delivered = c.ok(emitter, "emit", source=source, member=b)["delivered"]
            expected = fresh((source, b), source != f":{emitter}")
            assert delivered == len(expected)
            assert {conn for conn in subscribers if c.events(conn)} == set(expected)
        assert core._route_entries == sum(len(route.conns) for route in core._routes.values())
        for key, route in core._routes.items():
            kept = {conn: [s.id for s in subs] for conn, subs in zip(route.conns, route.matching)}
            assert kept == fresh(key, route.named), (key, op)
