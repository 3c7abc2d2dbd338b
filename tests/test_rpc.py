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
from clients.channels import DEFAULT_WINDOW
from clients.rpc import RpcConnection

from .brokers import FRIEND, PLUGIN, running_broker


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


async def test_rpc_over_a_relayed_channel(tmp_path: Path) -> None:
    """Calls, errors, overlapping calls and several windows' worth of bytes, all relayed."""
    async with running_broker(tmp_path) as rb:
        service = make_service()
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = trio.current_time() + 60  # (a hang fails, not stalls)
                rpc = await _relay_rpc(bus, service.name, nursery)
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
