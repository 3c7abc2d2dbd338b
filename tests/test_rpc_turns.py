"""RPC over a unix-fd channel: the calls read their own replies, taking turns.

No reader task sits between the socket and the calls (see ``RpcConnection``): these tests
hold the turn-taking to its promises with a real broker and real sockets: replies out of
order, a reader cancelled between two halves of a frame, the service's end seen while no
call waits, the service's call limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from bus.errors import BadRequest, ConnectionLost, QuotaExceeded, RequestError
from bus.io.framed import FramedStream
from bus.wire.frames import ControlFrame, encode_control
from clients import Channel, Service, open_bus
from clients.rpc import MAX_IN_FLIGHT, RpcConnection

from .brokers import FRIEND, PLUGIN, running_broker

NAME = "org.example.Turns"


async def _unix_fd_rpc(bus: Any, nursery: trio.Nursery) -> RpcConnection:
    channel = await bus.open_channel(NAME, "rpc")
    assert channel.route == "unix-fd"
    connection = RpcConnection(channel)
    await nursery.start(connection.run)
    assert connection._turns  # the calls read (no reader task)
    return connection


async def test_concurrent_calls_get_their_own_replies_out_of_order(tmp_path: Path) -> None:
    service = Service(NAME)

    @service.method
    async def later(value: int, delay: float) -> int:
        await trio.sleep(delay)
        return value

    @service.method
    def now(value: int) -> int:
        return value

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                connection = await _unix_fd_rpc(bus, nursery)
                results: dict[int, int] = {}

                async def one(i: int) -> None:
                    # The first calls answer last: whoever reads hands the others their replies.
                    if i % 3:
                        results[i] = await connection.call("later", i, (40 - i) * 0.01)
                    else:
                        results[i] = await connection.call("now", i)

                with trio.fail_after(20):
                    async with trio.open_nursery() as calls:
                        for i in range(40):
                            calls.start_soon(one, i)
                assert results == {i: i for i in range(40)}
                assert connection._reader is None and not connection._pending
                assert await connection.call("now", 7) == 7  # and the channel goes on
                nursery.cancel_scope.cancel()


async def test_a_reader_cancelled_between_two_halves_of_a_frame_loses_nothing(tmp_path: Path) -> None:
    """The reading call is cancelled after reading half of another call's reply: the waiting
    call takes the turn and reads the rest from where it stopped."""
    requests: list[int] = []
    got_requests = trio.Event()
    go_on = trio.Event()

    async def handler(channel: Channel) -> None:
        framed = FramedStream(channel)
        while len(requests) < 2:
            frame = await framed.receive_frame()
            assert isinstance(frame, ControlFrame)
            requests.append(frame.message["id"])
        got_requests.set()
        first, second = requests
        reply_second = encode_control(0, {"re": second, "result": "second"})
        await channel.send_all(reply_second[:7])  # half a frame: the reader takes it in, then waits
        await go_on.wait()
        await channel.send_all(reply_second[7:] + encode_control(0, {"re": first, "result": "first"}))
        while (frame := await framed.receive_frame()) is not None:  # later calls: echo the id
            assert isinstance(frame, ControlFrame)
            await channel.send_all(encode_control(0, {"re": frame.message["id"], "result": frame.message["id"]}))

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            sbus.handle_channels("rpc", handler)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                connection = await _unix_fd_rpc(bus, nursery)
                outcome: dict[str, Any] = {}
                first_scope = trio.CancelScope()

                async def first_call() -> None:
                    with first_scope:
                        outcome["first"] = await connection.call("any")
                    outcome["first cancelled"] = first_scope.cancelled_caught

                async def second_call() -> None:
                    outcome["second"] = await connection.call("any")

                with trio.fail_after(20):
                    async with trio.open_nursery() as calls:
                        calls.start_soon(first_call)
                        await trio.testing.wait_all_tasks_blocked()
                        assert connection._reader is not None  # the first call reads
                        calls.start_soon(second_call)
                        await got_requests.wait()
                        await trio.testing.wait_all_tasks_blocked()
                        assert connection.framed.bytes_received >= 7  # the half frame is read
                        first_scope.cancel()
                        await trio.testing.wait_all_tasks_blocked()
                        go_on.set()
                    assert outcome == {"first cancelled": True, "second": "second"}
                    assert await connection.call("any") == 3  # the stream is still in step
                nursery.cancel_scope.cancel()


async def test_the_service_ending_the_channel_while_no_call_waits_is_seen(tmp_path: Path) -> None:
    """Nobody reads an idle channel; the next bus.call polls it, sees its end, and opens a new one."""
    served = 0

    async def handler(channel: Channel) -> None:
        nonlocal served
        served += 1
        framed = FramedStream(channel)
        frame = await framed.receive_frame()
        assert isinstance(frame, ControlFrame)
        await channel.send_all(encode_control(0, {"re": frame.message["id"], "result": served}))
        # returning closes the channel (gracefully: the end mark)

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            sbus.handle_channels("rpc", handler)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus:
                with trio.fail_after(20):
                    assert await bus.call(NAME, "any") == 1
                    first = bus._rpc_calls.connections[NAME]
                    await trio.testing.wait_all_tasks_blocked()  # the service's end has come
                    assert await bus.call(NAME, "any") == 2  # a new channel, not a failed call
                    assert bus._rpc_calls.connections[NAME] is not first
                    assert isinstance(first.closed, ConnectionLost)


async def test_the_service_call_limit_holds_with_callers_reading(tmp_path: Path) -> None:
    """More calls than a channel may run at once: the service refuses the surplus, every other
    call is answered, and each caller gets its own outcome."""
    release = trio.Event()
    service = Service(NAME)

    @service.method
    async def hold() -> str:
        await release.wait()
        return "held"

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                connection = await _unix_fd_rpc(bus, nursery)
                outcomes: list[object] = []

                async def one() -> None:
                    try:
                        outcomes.append(await connection.call("hold"))
                    except QuotaExceeded as exc:
                        outcomes.append(type(exc))

                with trio.fail_after(30):
                    async with trio.open_nursery() as calls:
                        for _ in range(MAX_IN_FLIGHT + 10):
                            calls.start_soon(one)
                        while len(outcomes) < 10:  # the refusals come while the others are held
                            await trio.sleep(0.01)
                        assert outcomes == [QuotaExceeded] * 10
                        release.set()
                assert outcomes.count("held") == MAX_IN_FLIGHT and len(outcomes) == MAX_IN_FLIGHT + 10
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("closer", ["caller", "service"])
async def test_waiting_calls_fail_when_the_channel_ends(tmp_path: Path, closer: str) -> None:
    """Every call still waiting fails with ConnectionLost, the reading one and the others."""
    stop_service = trio.Event()

    async def handler(channel: Channel) -> None:
        await stop_service.wait()  # reads nothing, answers nothing; returning closes the channel

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            sbus.handle_channels("rpc", handler)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                connection = await _unix_fd_rpc(bus, nursery)
                failures: list[BaseException] = []

                async def one() -> None:
                    with pytest.raises(ConnectionLost) as info:
                        await connection.call("any")
                    failures.append(info.value)

                with trio.fail_after(20):
                    async with trio.open_nursery() as calls:
                        for _ in range(5):
                            calls.start_soon(one)
                        await trio.testing.wait_all_tasks_blocked()
                        if closer == "caller":
                            await connection.aclose()
                        else:
                            stop_service.set()
                assert len(failures) == 5
                with pytest.raises(ConnectionLost):
                    await connection.call("any")
                stop_service.set()
                nursery.cancel_scope.cancel()


async def test_values_outside_the_profile_are_still_refused_on_the_quick_paths(tmp_path: Path) -> None:
    """Flat arguments and results skip the profile walk; anything else is still walked."""
    service = Service(NAME)

    @service.method
    def give(kind: str) -> Any:
        return {"huge": 2**70, "nested huge": [[2**70]], "set": {1}, "ok": [1, "a", b"b", None, 1.5]}[kind]

    @service.method
    def echo(*values: Any) -> Any:
        return list(values)

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus:
                with trio.fail_after(20):
                    for bad in (2**70, [2**70], [[2**70]], {1}, [object()]):
                        with pytest.raises(BadRequest, match="cannot be sent"):
                            await bus.call(NAME, "echo", bad)
                    for kind in ("huge", "nested huge", "set"):
                        with pytest.raises(RequestError, match="cannot be sent"):
                            await bus.call(NAME, "give", kind)
                    assert await bus.call(NAME, "give", "ok") == [1, "a", b"b", None, 1.5]
                    assert await bus.call(NAME, "echo", -(2**64), 2**64 - 1, True) == [-(2**64), 2**64 - 1, True]


async def test_a_reply_whose_id_is_not_an_integer_answers_no_call(tmp_path: Path) -> None:
    """``{"re": true, "result": ...}`` is not a reply to call 1 (True == 1 in Python): the
    channel breaks as for any malformed reply, and the call fails instead of taking it."""

    async def handler(channel: Channel) -> None:
        framed = FramedStream(channel)
        await framed.receive_frame()
        await channel.send_all(encode_control(0, {"re": True, "result": "forged"}))
        await trio.sleep_forever()

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            sbus.handle_channels("rpc", handler)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                connection = await _unix_fd_rpc(bus, nursery)
                with trio.fail_after(20), pytest.raises(ConnectionLost, match="re"):
                    await connection.call("any")
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_calls_sent_in_bursts_are_answered_in_order_and_cancelled_ones_cost_nobody(
    tmp_path: Path, route: str
) -> None:
    """Calls made while others are in flight are queued for the writer task and go out
    together; the service's reader answers a burst of synchronous calls in the order sent,
    in one write.  Calls cancelled after queuing still go out whole; the others are answered."""
    order: list[int] = []
    service = Service(NAME)

    @service.method
    def seq(i: int) -> int:
        order.append(i)
        return len(order)

    @service.method
    async def later(i: int) -> int:
        await trio.sleep(0.05)
        return i

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                channel = await bus.open_channel(NAME, "rpc", "relay" if route == "relay" else "auto")
                assert channel.route == route
                connection = RpcConnection(channel)
                await nursery.start(connection.run)
                sent: list[int] = []
                answers: dict[int, int] = {}

                async def one(i: int) -> None:
                    for round_ in range(3):
                        sent.append(i * 10 + round_)  # (the call's id is taken before its first await)
                        answers[i * 10 + round_] = await connection.call("seq", i * 10 + round_)

                with trio.fail_after(20):
                    async with trio.open_nursery() as calls:
                        for i in range(40):
                            calls.start_soon(one, i)
                    assert order == sent  # answered in the order sent
                    assert sorted(answers.values()) == list(range(1, 121))
                    assert all(order[answers[key] - 1] == key for key in answers)

                    done: list[int] = []

                    async def maybe_cancelled(i: int, scope: trio.CancelScope) -> None:
                        with scope:
                            done.append(await connection.call("later", i))

                    async with trio.open_nursery() as calls:
                        scopes = [trio.CancelScope() for _ in range(20)]
                        for i, scope in enumerate(scopes):
                            calls.start_soon(maybe_cancelled, i, scope)
                        await trio.testing.wait_all_tasks_blocked()
                        for scope in scopes[::2]:
                            scope.cancel()
                    assert sorted(done) == list(range(1, 20, 2))
                    assert await connection.call("later", 99) == 99  # the channel is still in step
                nursery.cancel_scope.cancel()


async def test_synchronous_calls_on_the_quick_path_are_checked_as_any_other(tmp_path: Path) -> None:
    """A plain {"op", "id", "method", "args"} call to a synchronous method is answered without
    parse_message: its arguments are still counted, and anything unusual takes the long way."""
    service = Service(NAME)

    @service.method
    def pair(a: int, b: int = 2) -> list[int]:
        return [a, b]

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus:
                with trio.fail_after(20):
                    assert await bus.call(NAME, "pair", 1) == [1, 2]
                    with pytest.raises(BadRequest, match="pair"):
                        await bus.call(NAME, "pair", 1, 2, 3)
                    with pytest.raises(BadRequest, match="pair"):
                        await bus.call(NAME, "pair")
                    channel = await bus.open_channel(NAME, "rpc")
                    framed = FramedStream(channel)
                    odd_calls = [
                        {"op": "call", "id": 5, "method": "pair", "args": "12"},  # args not a list
                        {"op": "call", "id": 6, "method": "pair", "args": [1], "extra": True},  # a fifth field
                        {"op": "call", "id": 7, "method": "nope", "args": []},  # no such method
                    ]
                    for message in odd_calls:
                        await channel.send_all(encode_control(0, message))
                    replies = {}
                    for _ in odd_calls:
                        frame = await framed.receive_frame()
                        assert isinstance(frame, ControlFrame)
                        replies[frame.message["re"]] = frame.message
                    assert replies[5]["error"]["code"] == BadRequest.wire_code
                    assert replies[6] == {"re": 6, "result": [1, 2]}
                    assert replies[7]["error"]["code"] == "minibus.Error.UnknownOperation"
                    await channel.aclose()
