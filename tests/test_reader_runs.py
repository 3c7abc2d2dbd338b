"""The client link's reader against one fixed sequence of frames cut into reads every which
way: events of several kinds, replies whose handlers open a channel, add a subscription or
drop one, a gap, malformed events, an event-looking request and reply, channel DATA and
CONTROL frames, the broker's error event, and frames the hello left buffered.  Whatever the
cuts, every frame is handled exactly once, in order, by the handler it is for (a channel's
DATA frame in pieces where it straddles reads, its bytes once, in order)."""

from __future__ import annotations

import collections
import random
import socket
from typing import Any

import pytest
import trio
import trio.testing

from bus.io.fdpass import FdSocketStream
from bus.io.framed import FramedStream
from bus.io.secure import SecureStream
from bus.wire.address import Endpoint, format_address
from bus.wire.frames import encode_control, encode_data
from bus.wire.identity import Identity
from clients.events import Event, Events, Gap
from clients.link import BusConnection, Link, _Pending

BROKER = Identity.generate()
CLIENT = Identity.generate()
SOURCE = "org.example.Ticker"


def event(member: Any, n: int, **extra: Any) -> dict[str, Any]:
    return {"event": "event", "source": SOURCE, "member": member, "payload": {"n": n}, "sender": ":7", "identity": "@k", **extra}


def script() -> list[bytes]:
    """The frames, in the order the broker sends them."""
    messages: list[bytes] = []

    def control(message: dict[str, Any], channel: int = 0) -> None:
        messages.append(encode_control(channel, message))

    control(event("Tick", 0))
    messages.append(encode_data(9, b"early"))  # before the channel is open: dropped
    control(event("Tock", 1))
    control({"re": 100, "result": {"opens": 9}})  # its handler opens channel 9
    messages.append(encode_data(9, b"a"))
    control(event("Tick", 2))
    control({"event": "gap", "subscription": 1, "missed": 3, "reason": "overflow"})
    control(event(5, 3))  # a member that is not text: dropped
    control({k: v for k, v in event("Tick", 4).items() if k != "source"})  # no source: dropped
    control({**event("Tick", 98), "re": 555, "result": None})  # a reply (to nothing), not an event
    control({**event("Tick", 99), "op": "frobnicate", "id": 7})  # a request, not an event
    control({"re": 101, "result": {"subscription": 4}})  # its handler adds a Tick subscription
    control(event("Tick", 5))
    control(event("Tick", 6, extra=True))
    control({"re": 102, "result": {}})  # its handler drops the Tock subscription
    control(event("Tock", 7))
    messages.append(encode_data(9, b"b" * 300))
    control({"credit": 5}, channel=9)
    control(event("Tick", 8, payload={"n": 8, "big": "x" * 3000}))
    control({"event": "name_changed", "name": "org.example.A"})
    control({"event": "error", "code": "minibus.Error.Bye", "message": "bye"})
    control(event("Tock", 9))  # (after the error event: handled, as ever)
    control(event("Tick", 10))
    return messages


EXPECTED = [
    ("tick", 0), ("every", 0),
    ("tock", 1), ("every", 1),
    ("reply", 100),
    ("data", b"a"),
    ("tick", 2), ("every", 2),
    ("tick", "gap 3"),
    ("reply", 555),
    ("reply", 101),
    ("tick", 5), ("every", 5), ("late", 5),
    ("tick", 6), ("every", 6), ("late", 6),
    ("reply", 102),
    ("every", 7),
    ("data", b"b" * 300),
    ("control", {"credit": 5}),
    ("tick", 8), ("every", 8), ("late", 8),
    ("name_changed", "org.example.A"),
    ("every", 9),
    ("tick", 10), ("every", 10), ("late", 10),
]


class LoggedBuffer(collections.deque):  # type: ignore[type-arg]
    def __init__(self, log: list[Any], name: str) -> None:
        super().__init__()
        self.log, self.name = log, name

    def append(self, item: Any) -> None:
        assert type(item) in (Event, Gap)
        self.log.append((self.name, item.payload["n"] if type(item) is Event else f"gap {item.missed}"))
        super().append(item)


class Channel:
    def __init__(self, log: list[Any]) -> None:
        self.log = log

    def on_data(self, data: bytes | memoryview) -> None:
        # A channel's bytes come as they are read: a frame that straddles reads comes in
        # pieces (never an empty one), joined here into its entry (no two frames of channel
        # data are next to each other in the script).
        assert data
        if self.log and self.log[-1][0] == "data":
            self.log[-1] = ("data", self.log[-1][1] + bytes(data))
        else:
            self.log.append(("data", bytes(data)))

    def on_control(self, body: dict[str, Any]) -> None:
        self.log.append(("control", body))

    def on_link_lost(self, reason: str) -> None:
        pass


async def connected(kind: str) -> tuple[SecureStream, trio.abc.HalfCloseableStream | None, SecureStream]:
    """A client stream whose handshake is done, its plain transport, and the broker's end."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server_transport = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    client_transport: trio.abc.HalfCloseableStream
    if kind == "fd socket":
        client_transport = FdSocketStream(right)
    else:
        client_transport = trio.SocketStream(trio.socket.from_stdlib_socket(right))
    encrypted = kind == "box-stream"
    client = SecureStream.client(client_transport, CLIENT, BROKER.public_key, encrypted=encrypted)
    server = SecureStream.server(server_transport, BROKER, encrypted=encrypted)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    return client, client.plain_transport(), server


async def run_once(kind: str, cuts: list[int], left_by_hello: int) -> tuple[list[Any], str]:
    wire = b"".join(script())
    client, transport, server = await connected(kind)
    assert (transport is None) == (kind == "box-stream")
    framed = FramedStream(client, receive_stream=transport, trusted=True)
    link = Link(framed, ":1")
    connection = BusConnection(
        format_address([Endpoint("unix", BROKER.public_key, path="/nonexistent")]),
        CLIENT, b"\0" * 32, name=None, info=None, flags=(), reconnect=False, request_timeout=5,
    )
    log: list[Any] = []
    events = Events(connection)
    connection.event_handlers["name_changed"] = lambda link, message: log.append(("name_changed", message.fields["name"]))
    subs = {}
    for sub_id, (name, member) in enumerate((("tick", "Tick"), ("tock", "Tock"), ("every", "*")), 1):
        sub = subs[name] = events.subscribe("org.example.*", member)
        sub._buffer = LoggedBuffer(log, name)
        events.live.add(sub)
        sub._registered(link, {"subscription": sub_id})
    late = events.subscribe("org.example.*", "Tick")
    late._buffer = LoggedBuffer(log, "late")
    events.live.add(late)

    def replied(request_id: int, then: Any = None) -> None:
        def on_result(result: Any) -> None:
            log.append(("reply", request_id))
            if then is not None:
                then(result)

        link.pending[request_id] = _Pending(on_result, None)

    replied(100, lambda result: link.channels.__setitem__(9, Channel(log)))
    replied(555)
    replied(101, lambda result: late._registered(link, result))
    replied(102, lambda result: subs["tock"]._forget())

    # What the hello's reader left in the decoder (it read past the reply).
    framed._decoder.receive_data(wire[:left_by_hello])
    pieces = [wire[a:b] for a, b in zip([left_by_hello, *cuts], [*cuts, len(wire)]) if b > a]

    async def broker_side() -> None:
        for piece in pieces:
            await server.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()  # (the reader takes it: one read each)
        await server.send_eof()

    async def drain() -> None:  # (what the client answers)
        while await server.receive_some(65536):
            pass

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(broker_side)
            nursery.start_soon(drain)
            await connection._reader(link)
            nursery.cancel_scope.cancel()
    await trio.aclose_forcefully(server)
    await trio.aclose_forcefully(client)
    return log, link.reason


KINDS = ["fd socket", "trio socket", "box-stream"]


@pytest.mark.parametrize("kind", KINDS)
async def test_every_frame_once_in_order_whatever_the_reads(kind: str) -> None:
    wire_size = len(b"".join(script()))
    rng = random.Random(f"reads {kind}")
    cases: list[tuple[list[int], int]] = [([], 0), ([], wire_size)]
    # Each frame boundary and the bytes either side of it, as the one cut.
    bounds, at = [], 0
    for frame in script():
        at += len(frame)
        bounds.append(at)
    for b in bounds[:-1]:
        for cut in (b - 1, b, b + 1, b - 7):
            cases.append(([cut], 0))
    # Many cuts at random, with a random part left by the hello.
    for _ in range(40):
        left = rng.choice([0, 0, rng.randrange(wire_size)])
        cuts = sorted(rng.sample(range(left + 1, wire_size), rng.randrange(1, 40)))
        cases.append((cuts, left))
    for cuts, left in cases:
        log, reason = await run_once(kind, cuts, left)
        assert log == EXPECTED, (cuts, left)
        assert reason == "minibus.Error.Bye: bye", (cuts, left)
