"""RPC over relayed channels: services, concurrent calls, typed errors, introspection."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from bus.errors import BadRequest, ConnectionLost, RemoteError, RequestError, UnknownOperation
from bus.io.framed import FramedStream
from bus.wire.frames import ControlFrame, encode_control, encode_data
from clients import Channel, Service, open_bus
from clients.bus import Bus
from clients.channels import DEFAULT_WINDOW, RelayStream
from clients.rpc import RpcConnection

from .brokers import FRIEND, PLUGIN, one_caller_twice_and_another, running_broker


def make_service() -> Service:
    service = Service("org.example.Calc", description="a calculator", version="2.0")

    @service.method
    async def add(a: int, b: int = 0) -> int:
        """Add two numbers."""
        return a + b

    @service.method
    async def slow_echo(value: object, delay: float) -> object:
        """Answer after a delay (to show calls overlap)."""
        await trio.sleep(delay)
        return value

    @service.method
    async def fail(kind: str) -> None:
        """Raise an error of the kind asked for."""
        if kind == "typed":
            raise RequestError("no such account", code="org.example.Error.NoAccount")
        raise ZeroDivisionError("boom")

    @service.channel("raw")
    async def raw(channel: Channel) -> None:
        while data := await channel.receive_some():
            await channel.send_all(data)

    return service


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_calls_errors_and_introspection(tmp_path: Path, transport: str) -> None:
    async with running_broker(tmp_path) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        service = make_service()
        async with open_bus(address, identity=PLUGIN, name=service.name, info=service.info) as sbus:
            service.attach(sbus)
            async with open_bus(address, identity=FRIEND) as bus:
                assert await bus.call(service.name, "add", 2, 3) == 5
                assert await bus.call(service.name, "add", 7) == 7
                with pytest.raises(RemoteError) as info:
                    await bus.call(service.name, "fail", "typed")
                assert info.value.code == "org.example.Error.NoAccount" and "no such account" in info.value.message
                with pytest.raises(RequestError, match="ZeroDivisionError: boom") as failed:
                    await bus.call(service.name, "fail", "bug")
                assert failed.value.code == "minibus.Error.Failed"
                with pytest.raises(UnknownOperation, match="no method 'nope'"):
                    await bus.call(service.name, "nope")
                with pytest.raises(BadRequest, match="add"):
                    await bus.call(service.name, "add")
                with pytest.raises(BadRequest, match="cannot be sent"):
                    await bus.call(service.name, "add", {1, 2})
                assert await bus.call(service.name, "add", 1, 1) == 2  # the channel survived all that
                described = await bus.introspect(service.name)
                assert described["name"] == service.name and described["info"]["version"] == "2.0"
                add = next(m for m in described["methods"] if m["name"] == "add")
                assert add["doc"] == "Add two numbers." and [p["name"] for p in add["params"]] == ["a", "b"]
                assert add["params"][1]["default"] == "0"
                assert described["protocols"] == ["raw", "rpc"]
                # One channel per peer, reused: a passed socket over Unix, a direct TCP connection over TCP.
                assert list(bus._rpc_calls.connections) == [service.name]
                assert bus._rpc_calls.connections[service.name].channel.route == ("unix-fd" if transport == "unix" else "tcp")


async def test_many_concurrent_calls_on_one_channel(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        service = make_service()
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus:
                results: dict[int, object] = {}

                async def one(i: int) -> None:
                    results[i] = await bus.call(service.name, "slow_echo", i, 0.2)

                start = trio.current_time()
                async with trio.open_nursery() as nursery:
                    for i in range(50):
                        nursery.start_soon(one, i)
                assert results == {i: i for i in range(50)}
                assert trio.current_time() - start < 5  # they overlapped (50 x 0.2 s in sequence would be 10 s)


@pytest.mark.parametrize("route_transport", ["unix", "tcp"])
async def test_service_going_away_fails_calls_and_a_new_one_is_reached(tmp_path: Path, route_transport: str) -> None:
    """The service's process ends mid-call (its tasks cancelled, its sockets closed)."""
    async with running_broker(tmp_path) as rb:
        address = rb.unix_address if route_transport == "unix" else rb.tcp_address
        async with open_bus(address, identity=FRIEND) as bus:
            failures: list[BaseException] = []
            async with trio.open_nursery() as nursery:
                stop = trio.CancelScope()
                ready = trio.Event()

                async def run_service() -> None:
                    with stop:
                        service = make_service()
                        async with open_bus(address, identity=PLUGIN, name=service.name) as sbus:
                            service.attach(sbus)
                            ready.set()
                            await trio.sleep_forever()

                nursery.start_soon(run_service)
                await ready.wait()
                assert await bus.call("org.example.Calc", "add", 1, 2) == 3

                async def doomed_call() -> None:
                    try:
                        await bus.call("org.example.Calc", "slow_echo", "x", 30)
                    except ConnectionLost as exc:
                        failures.append(exc)

                nursery.start_soon(doomed_call)
                await trio.sleep(0.2)
                stop.cancel()
            assert failures
            again = make_service()
            async with open_bus(address, identity=PLUGIN, name=again.name) as sbus2:
                again.attach(sbus2)
                with trio.fail_after(10):
                    assert await bus.call(again.name, "add", 40, 2) == 42


# -- RPC over relayed channels (the bytes are pushed to RPC from the bus's reader) -----------


async def _relay_rpc(bus: Bus, name: str, nursery: trio.Nursery) -> RpcConnection:
    channel = await bus.open_channel(name, "rpc", "relay")
    assert channel.route == "relay" and not channel.encrypted
    connection = RpcConnection(channel)
    await nursery.start(connection.run)
    return connection


async def test_a_service_method_that_is_another_connections_call_is_awaited(tmp_path: Path) -> None:
    """``RpcConnection.call`` is a plain function returning the exchange to await (one
    coroutine fewer per call); marked so, a service that exposes another connection's bound
    ``call`` as a method serves it as an async method: a call through it is forwarded and
    answered (found in review: it was taken as synchronous and answered with a coroutine)."""
    async with running_broker(tmp_path) as rb:
        upstream = make_service()
        forwarder = Service("org.example.Fwd")
        async with open_bus(rb.unix_address, identity=PLUGIN, name=upstream.name) as ubus:
            upstream.attach(ubus)
            async with open_bus(rb.unix_address, identity=FRIEND, name=forwarder.name) as fbus, trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = trio.current_time() + 60
                to_upstream = await _relay_rpc(fbus, upstream.name, nursery)
                forwarder.method(to_upstream.call)
                assert "call" in forwarder.methods and "call" not in forwarder.sync_methods
                forwarder.attach(fbus)
                async with open_bus(rb.unix_address, identity=FRIEND) as bus:
                    assert await bus.call(forwarder.name, "call", "add", 2, 3) == 5
                nursery.cancel_scope.cancel()


async def test_rpc_over_a_relayed_channel(tmp_path: Path) -> None:
    """Calls, errors, overlapping calls and several windows' worth of bytes, all relayed."""
    async with running_broker(tmp_path) as rb:
        service = make_service()
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = trio.current_time() + 60  # (a hang fails, not stalls)
                rpc = await _relay_rpc(bus, service.name, nursery)
                relay = rpc.channel.raw
                assert isinstance(relay, RelayStream)
                # (the handshake's bytes: the relay carried them, the channel did not count them)
                handshake = (relay.bytes_in - rpc.channel.bytes_in, relay.bytes_out - rpc.channel.bytes_out)
                assert await rpc.call("add", 2, 3) == 5
                with pytest.raises(trio.BusyResourceError):  # replies are pushed to the connection
                    await rpc.channel.receive_some()
                with pytest.raises(RemoteError, match="no such account"):
                    await rpc.call("fail", "typed")
                with pytest.raises(BadRequest, match="add"):
                    await rpc.call("add")
                results: dict[int, object] = {}

                async def one(i: int) -> None:
                    results[i] = await rpc.call("slow_echo", i, 0.2)

                start = trio.current_time()
                async with trio.open_nursery() as calls:
                    for i in range(30):
                        calls.start_soon(one, i)
                assert results == {i: i for i in range(30)}
                assert trio.current_time() - start < 3  # they overlapped
                # Three windows' worth each way: the credit goes back as RPC consumes.
                blob = os.urandom(60_000)
                for _ in range(3 * DEFAULT_WINDOW // len(blob)):
                    assert await rpc.call("slow_echo", blob, 0) == blob
                # Every byte the calls sent and got is counted once by the channel, whichever
                # way it went (a small message straight to the relay, a big one through shs1).
                assert rpc.channel.bytes_out > 2 * DEFAULT_WINDOW and rpc.channel.bytes_in > 2 * DEFAULT_WINDOW
                assert (relay.bytes_in - rpc.channel.bytes_in, relay.bytes_out - rpc.channel.bytes_out) == handshake
                described = await rpc.introspect()
                assert {m["name"] for m in described["methods"]} >= {"add", "slow_echo", "fail"}
                await rpc.aclose()  # run() ends with it, and so does the nursery
            assert not nursery.cancel_scope.cancelled_caught


@pytest.mark.parametrize("route", ["relay", "direct"])
async def test_garbage_on_an_rpc_channel_ends_it_and_the_service_goes_on(tmp_path: Path, route: str) -> None:
    """Relayed, the channel is reset with the reason; direct (unix-fd), the service closes it."""
    async with running_broker(tmp_path) as rb:
        service = make_service()
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus:
                for garbage in (
                    b"\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01x",  # frame kind 9
                    encode_data(0, b"bytes where a request belongs"),
                    encode_control(0, {"op": "call", "id": 1, "method": "add", "args": [1]})[:-1] + b"\xff",  # bad CBOR
                ):
                    channel = await bus.open_channel(service.name, "rpc", route)
                    await channel.send_all(garbage)
                    with trio.fail_after(10):
                        if route == "relay":
                            with pytest.raises(trio.BrokenResourceError, match="bad data"):
                                while await channel.receive_some():
                                    pass
                        else:
                            assert channel.route == "unix-fd"
                            assert await channel.receive_some() == b""
                    await channel.aclose()
                # A malformed request with a usable id is answered with an error; the channel stays.
                channel = await bus.open_channel(service.name, "rpc", route)
                framed = FramedStream(channel)
                await framed.send_message({"op": "call", "id": 7, "method": 5})
                await framed.send_message({"op": "call", "id": 8, "method": "add", "args": [1, 2]})
                with trio.fail_after(10):
                    replies = {}
                    while len(replies) < 2:
                        frame = await framed.receive_frame()
                        assert isinstance(frame, ControlFrame)
                        replies[frame.message["re"]] = frame.message
                assert replies[7]["error"]["code"] == BadRequest.wire_code
                assert replies[8]["result"] == 3
                await channel.aclose()
                async with trio.open_nursery() as nursery:
                    rpc = await _relay_rpc(bus, service.name, nursery)
                    assert await rpc.call("add", 40, 2) == 42
                    await rpc.aclose()


@pytest.mark.parametrize(
    ("answer", "eof", "reason"),
    [
        (encode_data(0, b"not a reply"), False, "data frame on an rpc channel"),
        (encode_control(0, {"re": 1, "result": "x" * 100})[:50], True, "inside a frame"),
    ],
    ids=["garbage", "cut-off"],
)
async def test_a_service_answering_nonsense_fails_the_callers_calls(tmp_path: Path, answer: bytes, eof: bool, reason: str) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Liar") as sbus:

            async def liar(channel: Channel) -> None:
                await channel.receive_some()  # the request
                await channel.send_all(answer)
                if eof:
                    await channel.send_eof()
                await trio.sleep_forever()

            sbus.handle_channels("rpc", liar)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                rpc = await _relay_rpc(bus, "org.example.Liar", nursery)
                with trio.fail_after(10), pytest.raises(ConnectionLost, match=reason):
                    await rpc.call("anything")
                with pytest.raises(ConnectionLost):
                    await rpc.call("again")


@pytest.mark.parametrize("route", ["relay", "direct"])
async def test_calls_beyond_the_per_channel_limit_are_refused_at_once(tmp_path: Path, route: str) -> None:
    """A caller with more calls running than a channel serves gets QuotaExceeded for the
    extra ones, straight away (no task or memory held for them); the rest are answered."""
    from bus.errors import QuotaExceeded
    from clients.rpc import MAX_IN_FLIGHT

    async with running_broker(tmp_path) as rb:
        service = make_service()
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                channel = await bus.open_channel(service.name, "rpc", route)
                connection = RpcConnection(channel)
                await nursery.start(connection.run)
                answered: list[object] = []
                refused: list[float] = []
                start = trio.current_time()

                async def one(i: int) -> None:
                    try:
                        answered.append(await connection.call("slow_echo", i, 2.0))
                    except QuotaExceeded:
                        refused.append(trio.current_time() - start)

                with trio.fail_after(30):
                    async with trio.open_nursery() as calls:
                        for i in range(MAX_IN_FLIGHT + 40):
                            calls.start_soon(one, i)
                assert len(answered) == MAX_IN_FLIGHT and len(refused) == 40
                assert max(refused) < 1.5  # refused at once, not after the running calls
                assert await connection.call("add", 1, 2) == 3  # the channel goes on
                await connection.aclose()


async def test_a_caller_cannot_buy_more_running_calls_with_more_channels(tmp_path: Path) -> None:
    """The calls one caller (an identity) has running at a service are counted across all its
    channels and connections: with CALLER_IN_FLIGHT of them held (four channels full, two on a
    second connection of the same key), a call on a fifth channel is refused at once with
    QuotaExceeded, while another caller's calls are answered; once they end, the caller's
    next call runs, and when its channels are gone the service keeps nothing of it."""
    from bus.errors import QuotaExceeded
    from clients.rpc import CALLER_IN_FLIGHT, MAX_IN_FLIGHT

    from .brokers import OWNER

    service = Service("org.example.Hold")
    release = trio.Event()

    @service.method
    async def hold(i: int) -> int:
        await release.wait()
        return i

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with one_caller_twice_and_another(rb.unix_address) as (bus, bus2, other), trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = trio.current_time() + 60
                connections = []
                for i in range(CALLER_IN_FLIGHT // MAX_IN_FLIGHT + 1):
                    on = bus if i % 2 else bus2
                    connection = RpcConnection(await on.open_channel(service.name, "rpc", "relay" if i < 3 else "direct"))
                    await nursery.start(connection.run)
                    connections.append(connection)
                innocent = RpcConnection(await other.open_channel(service.name, "rpc", "relay"))
                await nursery.start(innocent.run)
                answered: list[int] = []

                async def one(connection: RpcConnection, i: int) -> None:
                    answered.append(await connection.call("hold", i))

                async with trio.open_nursery() as calls:
                    for c, connection in enumerate(connections[:-1]):
                        for i in range(MAX_IN_FLIGHT):
                            calls.start_soon(one, connection, c * MAX_IN_FLIGHT + i)
                    load = service._callers
                    while FRIEND.id not in load or load[FRIEND.id].running < CALLER_IN_FLIGHT:
                        await trio.sleep(0.01)
                    with trio.fail_after(2), pytest.raises(QuotaExceeded) as refused:
                        await connections[-1].call("hold", -1)
                    assert f"{CALLER_IN_FLIGHT} calls of this caller are already running at this service" in refused.value.message
                    # The other caller is not held back by it: its calls run (and wait like any).
                    calls.start_soon(one, innocent, -2)
                    while OWNER.id not in load or load[OWNER.id].running < 1:
                        await trio.sleep(0.01)
                    release.set()
                assert sorted(answered) == [-2, *range(CALLER_IN_FLIGHT)]
                assert load[FRIEND.id].running == 0 and load[FRIEND.id].held == 0
                assert await connections[-1].call("hold", 7) == 7  # its account has room again
                for connection in [*connections, innocent]:
                    await connection.aclose()
                with trio.fail_after(5):
                    while load:
                        await trio.sleep(0.01)


async def test_a_caller_that_never_reads_its_answers_gets_its_channel_reset(tmp_path: Path) -> None:
    """Refusals are answered at once; when even they cannot be sent (the caller reads
    nothing, so the relay's credit and then the service's queue run out), the service resets
    the channel instead of holding more."""
    async with running_broker(tmp_path) as rb:
        service = make_service()
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus:
                channel = await bus.open_channel(service.name, "rpc", "relay")
                framed = FramedStream(channel)
                with trio.fail_after(60), pytest.raises(trio.BrokenResourceError, match="faster than it reads"):
                    for i in range(1, 100_000):
                        await framed.send_message({"op": "call", "id": i, "method": "slow_echo", "args": [i, 30]})
                with pytest.raises(trio.BrokenResourceError, match="faster than it reads"):
                    while await channel.receive_some():  # (the refusals that did arrive come first)
                        pass
                # The service goes on for everyone else.
                async with trio.open_nursery() as nursery:
                    rpc = await _relay_rpc(bus, service.name, nursery)
                    assert await rpc.call("add", 2, 2) == 4
                    await rpc.aclose()


def make_sync_service() -> Service:
    """Methods declared synchronous (plain functions), beside an async one."""
    service = Service("org.example.Sync")
    log: list[int] = []

    @service.method
    def note(i: int) -> int:
        """Record i; answered inline by the reader."""
        log.append(i)
        return len(log)

    @service.method
    def join(*parts: str, sep: str = "-") -> str:
        return sep.join(parts)

    @service.method
    def needs_keyword(*, key: str) -> str:
        return key

    @service.method
    def broken(kind: str) -> None:
        if kind == "typed":
            raise RequestError("no such thing", code="org.example.Error.NoThing")
        raise KeyError(kind)

    @service.method
    async def slow(delay: float) -> str:
        await trio.sleep(delay)
        return "slow"

    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def bump(self, by: int = 1) -> int:
            self.n += by
            return self.n

    service.method(Counter().bump)
    return service


@pytest.mark.parametrize("route", ["relay", "direct"])
async def test_methods_declared_synchronous_are_answered_inline(tmp_path: Path, route: str) -> None:
    """Plain-function methods: results, errors, argument checks as for async ones; they are
    answered at once while an async call on the same channel is still running; more of them
    than the per-channel limit of running calls may be in flight (none is held)."""
    async with running_broker(tmp_path) as rb:
        service = make_sync_service()
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = trio.current_time() + 60
                channel = await bus.open_channel(service.name, "rpc", route)
                assert channel.route == ("relay" if route == "relay" else "unix-fd")
                rpc = RpcConnection(channel)
                await nursery.start(rpc.run)
                assert await rpc.call("note", 7) == 1
                assert await rpc.call("join", "a", "b", "c") == "a-b-c"
                assert await rpc.call("join") == ""
                assert await rpc.call("bump") == 1 and await rpc.call("bump", 5) == 6
                with pytest.raises(BadRequest, match="note: missing a required argument: 'i'"):
                    await rpc.call("note")
                with pytest.raises(BadRequest, match="note: too many positional arguments"):
                    await rpc.call("note", 1, 2)
                with pytest.raises(BadRequest, match="needs_keyword: missing a required argument: 'key'"):
                    await rpc.call("needs_keyword")
                with pytest.raises(BadRequest, match="bump: too many positional arguments"):
                    await rpc.call("bump", 1, 2)
                with pytest.raises(RemoteError, match="no such thing") as typed:
                    await rpc.call("broken", "typed")
                assert typed.value.code == "org.example.Error.NoThing"
                with pytest.raises(RequestError, match="KeyError: 'bug'") as failed:
                    await rpc.call("broken", "bug")
                assert failed.value.code == "minibus.Error.Failed"
                with pytest.raises(BadRequest, match="cannot be sent"):
                    await rpc.call("note", {1})

                # A synchronous call is not queued behind a running async one.
                slow_done: list[float] = []

                async def slow_call() -> None:
                    assert await rpc.call("slow", 1.0) == "slow"
                    slow_done.append(trio.current_time())

                async with trio.open_nursery() as calls:
                    calls.start_soon(slow_call)
                    await trio.sleep(0.05)
                    assert await rpc.call("note", 8) == 2
                    assert not slow_done  # answered while the async call still ran

                # More in flight than MAX_IN_FLIGHT: all answered, none refused.
                from clients.rpc import MAX_IN_FLIGHT

                answers: list[int] = []

                async def one(i: int) -> None:
                    answers.append(await rpc.call("note", i))

                async with trio.open_nursery() as calls:
                    for i in range(MAX_IN_FLIGHT + 100):
                        calls.start_soon(one, i)
                assert sorted(answers) == list(range(3, MAX_IN_FLIGHT + 103))
                described = await rpc.introspect()
                names = {m["name"] for m in described["methods"]}
                assert names == {"note", "join", "needs_keyword", "broken", "slow", "bump"}
                note = next(m for m in described["methods"] if m["name"] == "note")
                assert note["doc"] == "Record i; answered inline by the reader." and note["params"][0]["name"] == "i"
                await rpc.aclose()


async def test_a_caller_flooding_synchronous_methods_without_reading_is_reset(tmp_path: Path) -> None:
    """Inline answers need room in the channel's writer: once it is full, calls wait in
    tasks (at most MAX_IN_FLIGHT), then are refused, and then the channel is reset."""
    async with running_broker(tmp_path) as rb:
        service = make_sync_service()
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus:
                channel = await bus.open_channel(service.name, "rpc", "relay")
                framed = FramedStream(channel)
                blob = "x" * 4000
                with trio.fail_after(60), pytest.raises(trio.BrokenResourceError, match="faster than it reads"):
                    for i in range(1, 100_000):
                        await framed.send_message({"op": "call", "id": i, "method": "join", "args": [blob]})
                async with trio.open_nursery() as nursery:
                    rpc = await _relay_rpc(bus, service.name, nursery)
                    assert await rpc.call("join", "a", "b") == "a-b"
                    await rpc.aclose()


def test_method_declarations() -> None:
    service = Service("org.example.Decl")
    with pytest.raises(TypeError, match="RPC methods are functions"):
        service.method(len)  # type: ignore[arg-type]

    @service.method
    async def twice(x: int) -> int:
        return 2 * x

    assert "twice" in service.methods and "twice" not in service.sync_methods

    @service.method  # type: ignore[no-redef]
    def twice(x: int) -> int:  # re-declared synchronous: replaces the async one
        return 2 * x

    assert "twice" in service.sync_methods and "twice" not in service.methods


def test_call_burst_is_half_of_the_calls_in_flight_and_at_least_the_minimum() -> None:
    from clients.rpc import CALL_BURST_MIN, call_burst

    assert [call_burst(n) for n in (1, 2, 8, 16)] == [CALL_BURST_MIN] * 4
    assert [call_burst(n) for n in (17, 32, 33, 64, 256)] == [9, 16, 17, 32, 128]


@pytest.mark.parametrize("in_flight", [2, 9, 33, 100])
async def test_calls_in_flight_in_bursts_all_come_back_right(tmp_path: Path, in_flight: int) -> None:
    """Calls made while others are in flight go out in bursts of call_burst(in flight): every
    caller gets its own result, round after round, whatever the burst."""
    from clients.rpc import CALL_BURST_MIN, call_burst

    async with running_broker(tmp_path) as rb:
        service = Service("org.example.Echo", description="echo")

        @service.method
        def echo(value: object) -> object:  # synchronous: answered in the channel's reader
            return value

        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus:
                rpc = RpcConnection(await bus.open_channel(service.name, "rpc", "relay"))
                async with trio.open_nursery() as nursery:
                    await nursery.start(rpc.run)
                    wrong: list[tuple[int, int, object]] = []

                    async def caller(i: int) -> None:
                        for round_no in range(5):
                            got = await rpc.call("echo", [i, round_no])
                            if got != [i, round_no]:
                                wrong.append((i, round_no, got))

                    with trio.fail_after(30):
                        async with trio.open_nursery() as calls:
                            for i in range(in_flight):
                                calls.start_soon(caller, i)
                    assert wrong == []
                    assert CALL_BURST_MIN <= rpc.writer.burst <= call_burst(in_flight)
                    await rpc.aclose()
                    nursery.cancel_scope.cancel()
