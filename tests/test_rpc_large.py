"""RPC messages bigger than one control frame: a header, the body in DATA frames, limits, lies."""

from __future__ import annotations

import array
import ctypes
import logging
import mmap
import os
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.errors import (
    BadRequest,
    ConnectionLost,
    FrameError,
    LimitError,
    MessageTooLarge,
    QuotaExceeded,
    RequestError,
)
from bus.io.framed import FramedStream
from bus.io.writer import Gathered
from bus.wire.frames import DEFAULT_MAX_CONTROL, ControlFrame, DataFrame, Frame, FrameDecoder, encode_control, encode_data
from clients import Channel, Service, open_bus
from clients.bus import Bus
from clients.rpc import DEFAULT_MAX_MESSAGE, HELD_MESSAGES, MESSAGE_PART, POPULATE_AT_ONCE, POPULATED_BUDGET, RpcConnection, _Body, _encode_message, _flat_size, _MessageFrames

from .brokers import FRIEND, OWNER, PLUGIN, RunningBroker, one_caller_twice_and_another, running_broker

MiB = 1 << 20
NAME = "org.example.Big"

# (how both sides reach the broker, the route asked for, the route taken)
ROUTES = {
    "relay": ("unix", "relay", "relay"),  # plain: the bytes are pushed to RPC by the bus's reader
    "unix-fd": ("unix", "direct", "unix-fd"),
    "tcp": ("tcp", "direct", "tcp"),
    "tcp-relay": ("tcp", "relay", "relay"),  # box-stream end to end, read by RPC's own task
}


def make_service(**options: Any) -> Service:
    service = Service(NAME, **options)

    @service.method
    async def echo(value: object) -> object:
        return value

    @service.method
    async def reverse(data: bytes) -> bytes:
        return data[::-1]

    @service.method
    async def make(size: int, delay: float = 0) -> bytes:
        await trio.sleep(delay)
        return bytes(range(256)) * (size // 256) + b"z" * (size % 256)

    @service.method
    async def length(data: bytes, delay: float = 0) -> int:
        await trio.sleep(delay)
        return len(data)

    return service


def address_of(rb: RunningBroker, transport: str) -> str:
    return rb.unix_address if transport == "unix" else rb.tcp_address


@asynccontextmanager
async def serving(tmp_path: Path, transport: str, service: Service | None = None) -> AsyncIterator[tuple[Bus, trio.Nursery]]:
    """A broker, the service on it, and a caller's bus (with a nursery for its connections)."""
    service = service or make_service()
    async with running_broker(tmp_path) as rb:
        address = address_of(rb, transport)
        async with open_bus(address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = trio.current_time() + 60  # (a hang fails, not stalls)
                yield bus, nursery
                nursery.cancel_scope.cancel()


async def connect(bus: Bus, nursery: trio.Nursery, route: str, **options: Any) -> RpcConnection:
    transport, asked, taken = ROUTES[route]
    channel = await bus.open_channel(NAME, "rpc", asked)
    assert channel.route == taken and channel.encrypted == (transport == "tcp")
    connection = RpcConnection(channel, **options)
    await nursery.start(connection.run)
    return connection


# -- the wire format, sans-io ------------------------------------------------------------------


def frames_of(wire: bytes) -> list[Frame]:
    decoder = FrameDecoder()
    decoder.receive_data(wire)
    frames = list(decoder)
    decoder.end_of_input()
    return frames


def test_a_small_message_is_one_control_frame_as_before() -> None:
    message = {"op": "call", "id": 3, "method": "echo", "args": ["x" * 1000]}
    assert _encode_message(message, DEFAULT_MAX_MESSAGE) == encode_control(0, message)


def test_a_large_message_is_a_header_then_its_body_in_data_frames() -> None:
    # The exact bytes of a reply whose result is 70,000 zero bytes.
    wire = _encode_message({"re": 7, "result": bytes(70_000)}, DEFAULT_MAX_MESSAGE)
    body = bytes.fromhex("a1 66 726573756c74 5a 00011170") + bytes(70_000)  # {"result": h'00…'}
    header = bytes.fromhex("a2 62 7265 07 67 666f6c6c6f7773 1a 0001117d")  # {"re": 7, "follows": 70013}
    assert len(body) == 70_013
    assert wire == (
        bytes.fromhex("01 00 00000000 00000012") + header + bytes.fromhex("02 00 00000000 0001117d") + body
    )
    call = _encode_message({"op": "call", "id": 1, "method": "echo", "args": [bytes(70_000)]}, DEFAULT_MAX_MESSAGE)
    assert call.startswith(  # {"op": "call", "id": 1, "follows": 70024}, then {"method": "echo", "args": [h'00…']}
        bytes.fromhex("01 00 00000000 0000001a  a3 62 6f70 64 63616c6c 62 6964 01 67 666f6c6c6f7773 1a 00011188")
        + bytes.fromhex("02 00 00000000 00011188  a2 66 6d6574686f64 64 6563686f 64 61726773 81 5a 00011170")
    )
    # Bigger bodies are cut into DATA frames of MESSAGE_PART bytes (the last one shorter).
    value = os.urandom(3 * MESSAGE_PART)
    message = {"op": "call", "id": 9, "method": "echo", "args": [value]}
    frames = frames_of(_encode_message(message, DEFAULT_MAX_MESSAGE))
    head, parts = frames[0], frames[1:]
    assert isinstance(head, ControlFrame) and head.message == {"op": "call", "id": 9, "follows": head.message["follows"]}
    assert all(isinstance(part, DataFrame) and part.channel == 0 for part in parts)
    sizes = [len(part.data) for part in parts if isinstance(part, DataFrame)]
    assert sizes[:-1] == [MESSAGE_PART] * (len(sizes) - 1) and 0 < sizes[-1] <= MESSAGE_PART
    assert sum(sizes) == head.message["follows"]
    # And they come together again.
    cutter = _MessageFrames(lambda header, size: True)
    results = [cutter.feed(frame) for frame in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    body_in = results[-1]
    assert body_in is not None and not isinstance(body_in, dict)
    assert body_in.message(DEFAULT_MAX_MESSAGE) == message
    cutter.end_of_input()


FLAT_BIG = [
    {"op": "call", "id": 1, "method": "take", "args": [os.urandom(MiB)]},  # the benchmark's 1 MiB call
    {"re": 2, "result": os.urandom(MiB + 5)},
    {"op": "call", "id": 3, "method": "m", "args": [b"a" * 70_000, "b" * 70_000, 7, -8, 2**64 - 1, 1.5, None, True, []]},
    {"op": "call", "id": 4, "method": "m", "args": [os.urandom(MESSAGE_PART - 3), b"", b"x" * 4095, os.urandom(MESSAGE_PART)]},
    {"op": "call", "id": 5, "method": "m", "args": [os.urandom(2 * MESSAGE_PART + 1)], "more": b"y" * 5000, "n": 0},
]


@pytest.mark.parametrize("message", FLAT_BIG, ids=range(len(FLAT_BIG)))
def test_a_flat_message_is_sent_as_the_bytes_cbor2_would_write(message: dict[str, Any]) -> None:
    # A flat message (scalars, lists of scalars) puts its big bytes values into the wire by
    # reference; the bytes on the wire are exactly those of the general way (cbor2's).
    assert _encode_message(message, DEFAULT_MAX_MESSAGE, flat=True) == _encode_message(message, DEFAULT_MAX_MESSAGE)
    frames = frames_of(_encode_message(message, DEFAULT_MAX_MESSAGE, flat=True))
    sizes = [len(frame.data) for frame in frames[1:] if isinstance(frame, DataFrame)]
    assert len(sizes) == len(frames) - 1 and all(0 < size <= MESSAGE_PART for size in sizes[:-1])


def test_a_flat_message_over_the_limit_is_refused_as_before() -> None:
    message = {"op": "call", "id": 1, "method": "echo", "args": [bytes(70_000)]}
    with pytest.raises(MessageTooLarge, match=r"take 70024 bytes, over this caller's 65536-byte limit"):
        _encode_message(message, 65536, flat=True)


def test_a_message_over_the_senders_limit_is_refused_naming_it() -> None:
    too_large = r"the arguments of 'echo' take \d+ bytes, over this caller's 65536-byte limit .*max_message"
    with pytest.raises(MessageTooLarge, match=too_large):
        _encode_message({"op": "call", "id": 1, "method": "echo", "args": [bytes(70_000)]}, 65536)
    with pytest.raises(ValueError, match="at least 65536"):
        RpcConnection(None, max_message=1000)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 65536"):
        Service(NAME, max_message=65535)


def test_a_skipped_body_is_counted_and_dropped() -> None:
    announced: list[tuple[dict[str, Any], int]] = []

    def announce(header: dict[str, Any], size: int) -> bool:
        announced.append((header, size))
        return False

    cutter = _MessageFrames(announce)
    assert cutter.feed(ControlFrame(0, {"re": 4, "follows": 5})) is None
    assert announced == [({"re": 4}, 5)]
    assert cutter.feed(DataFrame(0, b"abc")) is None and cutter.body is not None and cutter.body.parts is None
    assert cutter.feed(DataFrame(0, b"de")) is None and cutter.body is None
    assert cutter.feed(ControlFrame(0, {"re": 5, "result": 1})) == {"re": 5, "result": 1}


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([ControlFrame(0, {"re": 1, "follows": 0})], "'follows' must be a positive integer"),
        ([ControlFrame(0, {"re": 1, "follows": "10"})], "'follows' must be a positive integer"),
        ([DataFrame(0, b"x")], "data frame on an rpc channel outside a message body"),
        ([ControlFrame(0, {"re": 1, "follows": 4}), DataFrame(0, b"12345")], "runs 1 bytes past the end"),
        ([ControlFrame(0, {"re": 1, "follows": 4}), ControlFrame(0, {"re": 2, "result": 0})], "4 more bytes of a 4-byte"),
    ],
    ids=["zero", "text", "stray-data", "overrun", "control-inside"],
)
def test_frames_that_break_a_message_body_are_framing_errors(frames: list[Frame], error: str) -> None:
    cutter = _MessageFrames(lambda header, size: True)
    with pytest.raises(FrameError, match=error):
        for frame in frames:
            cutter.feed(frame)


def test_a_stream_that_ends_inside_a_body_is_a_framing_error() -> None:
    cutter = _MessageFrames(lambda header, size: True)
    cutter.feed(ControlFrame(0, {"re": 1, "follows": 1000}))
    cutter.feed(DataFrame(0, bytes(500)))
    with pytest.raises(FrameError, match=r"ended inside a message body \(500 of 1000 bytes\)"):
        cutter.end_of_input()


def test_a_body_with_too_many_items_or_a_repeated_field_does_not_decode() -> None:
    for body, error in ((encode_control(0, {"result": [0] * 100})[10:], "more than 64 data items"),
                        (encode_control(0, {"re": 2, "result": 0})[10:], "repeats a field of its header")):
        cutter = _MessageFrames(lambda header, size: True)
        cutter.feed(ControlFrame(0, {"re": 1, "follows": len(body)}))
        done = cutter.feed(DataFrame(0, body))
        assert done is not None and not isinstance(done, dict)
        with pytest.raises(FrameError, match=error):
            done.message(64)


# -- real brokers, real sockets ---------------------------------------------------------------


@pytest.mark.parametrize("route", list(ROUTES))
async def test_megabyte_arguments_and_results_round_trip(tmp_path: Path, route: str) -> None:
    transport = ROUTES[route][0]
    async with serving(tmp_path, transport) as (bus, nursery):
        rpc = await connect(bus, nursery, route)
        blob = os.urandom(MiB)
        assert await rpc.call("reverse", blob) == blob[::-1]  # 1 MiB each way
        assert await rpc.call("length", blob) == MiB
        made = await rpc.call("make", MiB)
        assert len(made) == MiB and made[:3] == b"\x00\x01\x02"
        # Big and small calls at once on the one channel: each message arrives whole.
        results: dict[int, object] = {}
        blobs = [os.urandom(MiB + i) for i in range(3)]

        async def big(i: int) -> None:
            results[i] = await rpc.call("reverse", blobs[i])

        async def small(i: int) -> None:
            results[100 + i] = await rpc.call("echo", i)

        async with trio.open_nursery() as calls:
            for i in range(3):
                calls.start_soon(big, i)
            for i in range(20):
                calls.start_soon(small, i)
        assert results == {**{i: blobs[i][::-1] for i in range(3)}, **{100 + i: i for i in range(20)}}
        assert rpc.channel.bytes_out > 5 * MiB and rpc.channel.bytes_in > 5 * MiB
        await rpc.aclose()
        # The bus's own calls (its reused channel, route "auto") carry them too.
        assert await bus.call(NAME, "reverse", blob) == blob[::-1]


async def test_arguments_over_the_callers_limit_are_refused_before_sending(tmp_path: Path) -> None:
    async with serving(tmp_path, "unix") as (bus, nursery):
        rpc = await connect(bus, nursery, "relay")
        assert await rpc.call("echo", 1) == 1
        sent = rpc.channel.bytes_out
        huge = bytes(32 * MiB)
        too_large = r"the arguments of 'length' take \d+ bytes, over this caller's 16777216-byte limit"
        with pytest.raises(MessageTooLarge, match=too_large) as info:
            await rpc.call("length", huge)
        assert isinstance(info.value, LimitError) and info.value.code == "minibus.Error.MessageTooLarge"
        assert rpc.channel.bytes_out == sent  # nothing went out
        assert await rpc.call("length", bytes(MiB)) == MiB  # the channel goes on
        with pytest.raises(MessageTooLarge, match="16777216-byte limit"):
            await bus.call(NAME, "length", huge)
        assert await bus.call(NAME, "length", b"ok") == 2


@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_a_result_over_the_services_limit_is_a_typed_error(tmp_path: Path, route: str) -> None:
    async with serving(tmp_path, "unix") as (bus, nursery):
        rpc = await connect(bus, nursery, route)
        received = rpc.channel.bytes_in
        too_large = r"the results of 'make' take \d+ bytes, over the service's 16777216-byte limit"
        with pytest.raises(MessageTooLarge, match=too_large) as info:
            await rpc.call("make", 32 * MiB)
        assert isinstance(info.value, LimitError)
        assert rpc.channel.bytes_in - received < 4096  # an error reply, not the result
        assert len(await rpc.call("make", MiB)) == MiB  # the channel goes on


@pytest.mark.parametrize("route", ["relay", "unix-fd", "tcp-relay"])
async def test_a_reply_over_the_callers_limit_fails_that_call_only(tmp_path: Path, route: str) -> None:
    """The reply is refused from its header, skipped as it arrives; other calls go on."""
    service = make_service(max_message=64 * MiB)
    async with serving(tmp_path, ROUTES[route][0], service) as (bus, nursery):
        rpc = await connect(bus, nursery, route, max_message=MiB)
        outcomes: list[object] = []

        async def too_big() -> None:
            with pytest.raises(MessageTooLarge, match=r"the reply takes \d+ bytes, over this caller's 1048576-byte limit"):
                await rpc.call("make", 3 * MiB)
            outcomes.append("refused")

        async def small() -> None:
            outcomes.append(await rpc.call("echo", "small"))

        async with trio.open_nursery() as calls:
            calls.start_soon(too_big)
            await trio.sleep(0.05)
            calls.start_soon(small)
        assert sorted(map(str, outcomes)) == ["refused", "small"]
        assert len(await rpc.call("make", MiB - 64)) == MiB - 64  # just under the limit
        assert rpc.closed is None


@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_a_call_over_the_services_limit_is_answered_at_once_and_skipped(tmp_path: Path, route: str) -> None:
    """Driven by hand: the refusal comes from the header alone, before any of the body is sent;
    the body is then skipped, and calls small and large go on on the same channel."""
    service = make_service(max_message=MiB)
    async with serving(tmp_path, "unix", service) as (bus, nursery):
        rpc = await connect(bus, nursery, route)
        with pytest.raises(MessageTooLarge, match="over the service's 1048576-byte limit"):
            await rpc.call("length", bytes(2 * MiB))
        assert await rpc.call("length", bytes(MiB // 2)) == MiB // 2
        await rpc.aclose()

        channel = await bus.open_channel(NAME, "rpc", ROUTES[route][1])
        framed = FramedStream(channel)
        await framed.send_message({"op": "call", "id": 1, "follows": 2 * MiB})
        with trio.fail_after(10):
            frame = await framed.receive_frame()
        assert isinstance(frame, ControlFrame) and frame.message["re"] == 1
        assert frame.message["error"]["code"] == MessageTooLarge.wire_code
        assert "a call of 2097152 bytes is over the service's 1048576-byte limit" in frame.message["error"]["message"]
        for _ in range(2):
            await channel.send_all(encode_data(0, bytes(MiB)))  # the announced body, skipped
        await framed.send_message({"op": "call", "id": 2, "method": "echo", "args": ["after"]})
        body = cbor2.dumps({"method": "length", "args": [bytes(100_000)]})
        await framed.send_message({"op": "call", "id": 3, "follows": len(body)})
        await channel.send_all(encode_data(0, body[:50_000]) + encode_data(0, body[50_000:]))
        replies: dict[int, dict[str, Any]] = {}
        with trio.fail_after(10):
            while len(replies) < 2:
                frame = await framed.receive_frame()
                assert isinstance(frame, ControlFrame)
                replies[frame.message["re"]] = frame.message
        assert replies == {2: {"re": 2, "result": "after"}, 3: {"re": 3, "result": 100_000}}
        await channel.aclose()


async def test_the_bodies_of_running_calls_are_bounded_per_channel(tmp_path: Path) -> None:
    service = make_service(max_message=MiB)
    async with serving(tmp_path, "unix", service) as (bus, nursery):
        rpc = await connect(bus, nursery, "unix-fd")
        answered: list[int] = []
        refused: list[QuotaExceeded] = []

        async def one(i: int) -> None:
            try:
                answered.append(await rpc.call("length", bytes(MiB - 100), 1.0))
            except QuotaExceeded as exc:
                refused.append(exc)

        async with trio.open_nursery() as calls:
            for i in range(HELD_MESSAGES + 1):
                calls.start_soon(one, i)
                await trio.sleep(0.02)  # (in this order)
        assert answered == [MiB - 100] * HELD_MESSAGES and len(refused) == 1
        assert f"the {HELD_MESSAGES * MiB}-byte limit ({HELD_MESSAGES} x max_message)" in refused[0].message
        assert await rpc.call("length", bytes(MiB - 100)) == MiB - 100


async def test_the_bodies_a_caller_has_running_are_bounded_across_its_channels(tmp_path: Path) -> None:
    """HELD_MESSAGES calls of 1 MiB held by one caller (an identity) on two channels of two
    connections fill its account at the service: a fifth, on a third channel, is refused with
    QuotaExceeded naming the limit, while another caller's 1 MiB call is answered meanwhile;
    once the held calls end the caller's next one runs, and the service keeps nothing of a
    caller whose channels are gone."""

    service = make_service(max_message=MiB)
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            service.attach(sbus)
            async with one_caller_twice_and_another(rb.unix_address) as (bus, bus2, other), trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = trio.current_time() + 60
                first = await connect(bus, nursery, "relay")
                second = await connect(bus2, nursery, "unix-fd")
                third = await connect(bus, nursery, "unix-fd")
                innocent = await connect(other, nursery, "relay")
                answered: list[int] = []

                async def one(rpc: RpcConnection, delay: float) -> None:
                    answered.append(await rpc.call("length", bytes(MiB - 100), delay))

                load = service._callers
                async with trio.open_nursery() as calls:
                    for i in range(HELD_MESSAGES):
                        calls.start_soon(one, first if i % 2 else second, 3.0)
                    while FRIEND.id not in load or load[FRIEND.id].held < HELD_MESSAGES * (MiB - 100):
                        await trio.sleep(0.01)
                    with trio.fail_after(2), pytest.raises(QuotaExceeded) as refused:
                        await third.call("length", bytes(MiB - 100))
                    assert "the calls this caller has running at this service (on all its channels)" in refused.value.message
                    assert f"the {HELD_MESSAGES * MiB}-byte limit ({HELD_MESSAGES} x max_message)" in refused.value.message
                    with trio.fail_after(2):
                        assert await innocent.call("length", bytes(MiB - 100)) == MiB - 100
                assert answered == [MiB - 100] * HELD_MESSAGES
                assert load[FRIEND.id].held == 0 and load[FRIEND.id].running == 0
                assert await third.call("length", bytes(MiB - 100)) == MiB - 100
                for rpc in (first, second, third, innocent):
                    await rpc.aclose()
                with trio.fail_after(5):
                    while load:
                        await trio.sleep(0.01)


@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_a_channel_ending_inside_an_admitted_body_gives_back_what_the_call_took(tmp_path: Path, route: str) -> None:
    """A call admitted at its header takes its body's size from the caller's account at the
    service; a channel that ends inside the body (HELD_MESSAGES times, each on a channel of
    its own) gives it back, so that the caller's next large call, on the channel it kept, is
    answered rather than refused for calls that never ran."""
    service = make_service(max_message=MiB)
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = trio.current_time() + 60
                keeper = await connect(bus, nursery, "relay")  # (a channel kept open, as bus.call keeps one)
                assert await keeper.call("length", bytes(10)) == 10
                load = service._callers
                body = cbor2.dumps({"method": "length", "args": [bytes(MiB - 100)]})
                for i in range(HELD_MESSAGES):
                    channel = await bus.open_channel(NAME, "rpc", "relay" if route == "relay" else "direct")
                    header = encode_control(0, {"op": "call", "id": 1, "follows": len(body)})
                    await channel.send_all(header + encode_data(0, body[:1000]))
                    with trio.fail_after(5):
                        while load[FRIEND.id].held < len(body):
                            await trio.sleep(0.01)  # (admitted: its size taken)
                    await channel.aclose()  # the channel ends inside the admitted body
                    with trio.fail_after(5):
                        while load[FRIEND.id].channels != 1 or load[FRIEND.id].held:
                            await trio.sleep(0.01)
                assert load[FRIEND.id].running == 0
                assert await keeper.call("length", bytes(MiB - 100)) == MiB - 100
                await keeper.aclose()
                nursery.cancel_scope.cancel()


async def test_a_caller_giving_up_on_a_big_reply_leaves_the_channel_in_step(tmp_path: Path) -> None:
    async with serving(tmp_path, "unix") as (bus, nursery):
        for route in ("relay", "unix-fd"):
            rpc = await connect(bus, nursery, route)
            with trio.move_on_after(0.2) as scope:
                await rpc.call("make", 8 * MiB, 0.4)
            assert scope.cancelled_caught
            assert await rpc.call("length", b"x", 0.5) == 1  # answered after the skipped reply
            assert rpc.closed is None
            await rpc.aclose()


async def test_a_caller_giving_up_while_its_reply_arrives_keeps_none_of_the_rest(tmp_path: Path) -> None:
    async with serving(tmp_path, "unix") as (bus, nursery):
        rpc = await connect(bus, nursery, "relay")
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as waiting:
                waiting.start_soon(rpc.call, "make", 12 * MiB)
                with trio.fail_after(10):
                    while (body := rpc._frames.body) is None or not body.parts:
                        await trio.sleep(0.001)
                scope.cancel()  # the reply is on its way
        body = rpc._frames.body
        assert body is None or body.parts is None  # (None: it was all in before the cancel took)
        assert await rpc.call("echo", "after") == "after"
        assert rpc.closed is None


# -- peers that lie about a body ----------------------------------------------------------------


def lies(head: dict[str, Any], inside: dict[str, Any]) -> dict[str, tuple[bytes, bool, str]]:
    """Ways to lie about a body announced with the fields ``head``: (bytes, EOF after, reason)."""

    def header(size: int) -> bytes:
        return encode_control(0, {**head, "follows": size})

    short, ended = header(1000) + encode_data(0, bytes(500)), r"ended inside a message body \(500 of 1000 bytes\)"
    return {
        "short-then-eof": (short, True, ended),
        "control-inside": (short + encode_control(0, inside), False, "a control frame where 500 more bytes"),
        "overrun": (header(100) + encode_data(0, bytes(200)), False, "runs 100 bytes past the end"),
        "no-length": (header(-5), False, "'follows' must be a positive integer"),
    }


REPLY_LIES = lies({"re": 1}, {"re": 1, "result": 0})
CALL_LIES = lies({"op": "call", "id": 1}, {"op": "call", "id": 2, "method": "echo", "args": [0]})


@pytest.mark.parametrize("lie", list(REPLY_LIES))
@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_a_service_lying_about_a_body_fails_the_callers_calls(tmp_path: Path, route: str, lie: str) -> None:
    answer, eof, reason = REPLY_LIES[lie]
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:

            async def liar(channel: Channel) -> None:
                await FramedStream(channel).receive_frame()  # the request
                await channel.send_all(answer)
                if eof:
                    await channel.send_eof()
                await trio.sleep_forever()

            sbus.handle_channels("rpc", liar)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                rpc = await connect(bus, nursery, route)
                with trio.fail_after(10), pytest.raises(ConnectionLost, match=reason):
                    await rpc.call("anything")
                with pytest.raises(ConnectionLost):
                    await rpc.call("again")


async def test_a_reply_body_that_does_not_decode_fails_that_call_only(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:

            async def garbler(channel: Channel) -> None:
                framed = FramedStream(channel)
                while (frame := await framed.receive_frame()) is not None:
                    assert isinstance(frame, ControlFrame)
                    request_id = frame.message["id"]
                    if request_id == 1:  # announced properly, but the body is no CBOR map
                        await channel.send_all(encode_control(0, {"re": 1, "follows": 3}) + encode_data(0, b"\xff\xff\xff"))
                    else:
                        await framed.send_message({"re": request_id, "result": "fine"})

            sbus.handle_channels("rpc", garbler)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                rpc = await connect(bus, nursery, "relay")
                with trio.fail_after(10), pytest.raises(FrameError, match="the reply does not decode"):
                    await rpc.call("anything")
                assert await rpc.call("again") == "fine"
                await rpc.aclose()


@pytest.mark.parametrize("lie", list(CALL_LIES))
@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_a_caller_lying_about_a_body_loses_its_channel_and_the_service_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, route: str, lie: str
) -> None:
    caplog.set_level(logging.INFO, "minibus.rpc")
    garbage, eof, reason = CALL_LIES[lie]
    async with serving(tmp_path, "unix") as (bus, nursery):
        channel = await bus.open_channel(NAME, "rpc", ROUTES[route][1])
        await channel.send_all(garbage)
        if eof:
            await channel.send_eof()
        with trio.fail_after(10):
            try:
                while await channel.receive_some():
                    pass
            except trio.BrokenResourceError as exc:  # the relay resets the channel with the reason
                assert route == "relay" and not eof and "bad data" in str(exc)
        assert any(re.search(reason, record.getMessage()) for record in caplog.records), caplog.text
        await channel.aclose()
        rpc = await connect(bus, nursery, route)
        assert await rpc.call("length", bytes(MiB)) == MiB


async def test_a_call_body_that_does_not_decode_is_answered_with_bad_request(tmp_path: Path) -> None:
    async with serving(tmp_path, "unix") as (bus, nursery):
        channel = await bus.open_channel(NAME, "rpc", "relay")
        framed = FramedStream(channel)
        await channel.send_all(encode_control(0, {"op": "call", "id": 1, "follows": 2}) + encode_data(0, b"\xa1\xff"))
        await framed.send_message({"op": "call", "id": 2, "method": "echo", "args": [2]})
        replies: dict[int, dict[str, Any]] = {}
        with trio.fail_after(10):
            while len(replies) < 2:
                frame = await framed.receive_frame()
                assert isinstance(frame, ControlFrame)
                replies[frame.message["re"]] = frame.message
        assert replies[1]["error"]["code"] == BadRequest.wire_code and "the call's body" in replies[1]["error"]["message"]
        assert replies[2]["result"] == 2
        await channel.aclose()


def test_a_kept_body_is_one_buffer_the_decoder_fills_and_a_skipped_one_gets_none() -> None:
    decoder = FrameDecoder()
    fills: list[bytearray | mmap.mmap | None] = []

    def fill(buffer: bytearray | mmap.mmap | None) -> None:
        fills.append(buffer)
        decoder.fill_data_into(buffer)

    keep = {1: True, 2: False, 3: True}
    cutter = _MessageFrames(lambda header, size: keep[header["id"]])
    cutter.fill = fill
    body = cbor2.dumps({"method": "echo", "args": [os.urandom(200_000)]})

    def feed(*pieces: bytes) -> list[Any]:
        results: list[Any] = []
        for piece in pieces:
            decoder.receive_data(piece)
            results.extend(cutter.feed(frame) for frame in decoder)
        return results

    results = feed(encode_control(0, {"op": "call", "id": 1, "follows": len(body)}), *(encode_data(0, body[i : i + 70_000]) for i in range(0, len(body), 70_000)))
    assert len(fills) == 1 and type(fills[0]) is mmap.mmap and fills[0][:] == body  # (the body, filled in place)
    done = results[-1]
    assert isinstance(done, _Body) and done.message(DEFAULT_MAX_MESSAGE) == {"op": "call", "id": 1, **cbor2.loads(body)}
    # An announcement refused (over a limit) makes no buffer: its bytes are dropped as they come.
    assert feed(encode_control(0, {"op": "call", "id": 2, "follows": len(body)}), encode_data(0, body)) == [None, None]
    assert len(fills) == 1
    # A body given up half-way (its call cancelled): the decoder is told to stop filling.
    assert feed(encode_control(0, {"op": "call", "id": 3, "follows": len(body)}) + encode_data(0, body[:1000])) == [None, None]
    assert cutter.body is not None and cutter.body.parts is not None
    cutter.body.parts = None
    assert feed(encode_data(0, body[1000:])) == [None]
    assert fills[-1] is None and decoder.fill_room() is None and cutter.body is None


@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_a_big_call_split_across_many_reads_is_answered(tmp_path: Path, route: str) -> None:
    # A call's 1 MiB body written in uneven pieces with pauses between: read straight into its
    # buffer (unix-fd) or copied into it from the relay's frames, across many reads.
    async with serving(tmp_path, "unix") as (bus, nursery):
        channel = await bus.open_channel(NAME, "rpc", ROUTES[route][1])
        framed = FramedStream(channel)
        value = os.urandom(MiB)
        wire = _encode_message({"op": "call", "id": 1, "method": "length", "args": [value]}, DEFAULT_MAX_MESSAGE, flat=True)
        pos, step = 0, 1
        while pos < len(wire):
            await channel.send_all(wire[pos : pos + step])
            pos += step
            step = step * 7 % 300_007 + 3  # 1, 10, 73, ...: headers and bodies cut anywhere
            await trio.sleep(0.001)
        await framed.send_message({"op": "call", "id": 2, "method": "echo", "args": [2]})
        replies: dict[int, Any] = {}
        with trio.fail_after(20):
            while len(replies) < 2:
                frame = await framed.receive_frame()
                assert isinstance(frame, ControlFrame)
                replies[frame.message["re"]] = frame.message["result"]
        assert replies == {1: MiB, 2: 2}
        await channel.aclose()


# A 1 MiB bytes item spoilt three ways (value: its CBOR, a 5-byte head then the bytes), and
# what the service's answer says.
@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_a_small_body_right_behind_its_header_goes_into_its_buffer(tmp_path: Path, route: str) -> None:
    # Any message may come as a header and a body (docs/rpc.md), and both may arrive in one
    # read: the body's frame is cut only once its buffer is with the decoder.
    async with serving(tmp_path, "unix") as (bus, nursery):
        channel = await bus.open_channel(NAME, "rpc", ROUTES[route][1])
        framed = FramedStream(channel)
        body = cbor2.dumps({"method": "echo", "args": [5]})
        one = encode_control(0, {"op": "call", "id": 1, "follows": len(body)}) + encode_data(0, body)
        two = encode_control(0, {"op": "call", "id": 2, "follows": len(body)}) + encode_data(0, body[:3]) + encode_data(0, body[3:])
        await channel.send_all(one + two)
        replies: dict[int, Any] = {}
        with trio.fail_after(20):
            while len(replies) < 2:
                frame = await framed.receive_frame()
                assert isinstance(frame, ControlFrame)
                replies[frame.message["re"]] = frame.message.get("result", frame.message.get("error"))
        assert replies == {1: 5, 2: 5}
        await channel.aclose()


BIG_BAD = {
    "tags are not allowed": lambda value: b"\xc2" + value,
    "not in its shortest encoding": lambda value: bytes([0x5B]) + (len(value) - 5).to_bytes(8, "big") + value[5:],
    "a string is longer than the message": lambda value: bytes([0x5A]) + (len(value) - 4).to_bytes(4, "big") + value[5:],
}


@pytest.mark.parametrize("bad", list(BIG_BAD))
@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_bad_cbor_inside_a_big_call_body_is_answered_with_bad_request(tmp_path: Path, route: str, bad: str) -> None:
    async with serving(tmp_path, "unix") as (bus, nursery):
        channel = await bus.open_channel(NAME, "rpc", ROUTES[route][1])
        framed = FramedStream(channel)
        value = cbor2.dumps(os.urandom(MiB))
        body = b"\xa2" + cbor2.dumps("method") + cbor2.dumps("length") + cbor2.dumps("args") + b"\x81" + BIG_BAD[bad](value)
        wire = encode_control(0, {"op": "call", "id": 1, "follows": len(body)})
        wire += b"".join(encode_data(0, body[i : i + MESSAGE_PART]) for i in range(0, len(body), MESSAGE_PART))
        await channel.send_all(wire)
        await framed.send_message({"op": "call", "id": 2, "method": "echo", "args": [2]})
        replies: dict[int, dict[str, Any]] = {}
        with trio.fail_after(20):
            while len(replies) < 2:
                frame = await framed.receive_frame()
                assert isinstance(frame, ControlFrame)
                replies[frame.message["re"]] = frame.message
        assert replies[1]["error"]["code"] == BadRequest.wire_code
        assert "the call's body" in replies[1]["error"]["message"] and bad in replies[1]["error"]["message"]
        assert replies[2]["result"] == 2
        await channel.aclose()


@pytest.mark.parametrize("route", ["relay", "unix-fd"])
@pytest.mark.parametrize(
    "value",
    [[[]] * 5000, list(range(5000)), {"k": [{"a": i} for i in range(2000)]}],
    ids=["empty arrays", "integers (flat)", "nested maps"],
)
async def test_a_call_of_more_items_than_one_frame_holds_goes_as_a_large_message(tmp_path: Path, route: str, value: Any) -> None:
    """A call of a few KiB but more than ONE_FRAME_ITEMS data items is written as a large
    message (a header and its body in DATA frames), and so is its result: both are answered
    whole, where one frame of them would be refused by the receiver."""
    from clients.rpc import ONE_FRAME_ITEMS

    call = {"op": "call", "id": 1, "method": "echo", "args": [value]}
    wire = _encode_message(call, MiB, flat=_flat_size(call.values()) >= 0)
    assert len(cbor2.dumps(call)) < DEFAULT_MAX_CONTROL  # (it would fit one frame in bytes)
    header = frames_of(wire)[0]
    assert isinstance(header, ControlFrame) and "follows" in header.message, ONE_FRAME_ITEMS
    small = {"op": "call", "id": 2, "method": "echo", "args": [[[]] * 100]}
    assert "follows" not in frames_of(_encode_message(small, MiB, flat=False))[0].message  # (few items: one frame)
    async with serving(tmp_path, "unix") as (bus, nursery):
        rpc = await connect(bus, nursery, route)
        assert await rpc.call("echo", value) == value


@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_one_frame_of_more_items_than_it_may_hold_ends_only_its_channel(tmp_path: Path, route: str) -> None:
    """A peer that writes a call of 5,000 items in one CONTROL frame (our library never
    does) breaks the framing: its channel ends, and a call on another channel of the same
    caller is answered."""
    async with serving(tmp_path, "unix") as (bus, nursery):
        other = await connect(bus, nursery, "relay")
        channel = await bus.open_channel(NAME, "rpc", ROUTES[route][1])
        framed = FramedStream(channel)
        await framed.send_message({"op": "call", "id": 1, "method": "echo", "args": [[[]] * 5000]})
        with trio.fail_after(10):
            while True:
                try:
                    frame = await framed.receive_frame()
                except (FrameError, trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                if frame is None:
                    break
                assert not (isinstance(frame, ControlFrame) and "result" in frame.message), frame
        assert await other.call("echo", [[]] * 10) == [[]] * 10
        await channel.aclose()


async def test_a_result_that_cannot_be_encoded_is_an_error_reply(tmp_path: Path) -> None:
    service = make_service()

    @service.method
    async def odd() -> object:
        return {1, 2}  # a set: outside minibus's CBOR profile

    async with serving(tmp_path, "unix", service) as (bus, nursery):
        rpc = await connect(bus, nursery, "relay")
        with pytest.raises(RequestError, match="the results of 'odd' cannot be sent"):
            await rpc.call("odd")
        assert await rpc.call("echo", 5) == 5



async def test_bus_call_takes_the_callers_limit_from_open_bus(tmp_path: Path) -> None:
    service = make_service()
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND, rpc_max_message=256 * 1024) as bus:
                assert await bus.call(NAME, "length", bytes(200 * 1024)) == 200 * 1024
                with pytest.raises(MessageTooLarge, match="262144-byte limit"):
                    await bus.call(NAME, "length", bytes(MiB))
                with pytest.raises(MessageTooLarge):  # a reply over our limit fails that call only
                    await bus.call(NAME, "make", MiB)
                assert await bus.call(NAME, "echo", "still here") == "still here"


# -- found by a review: what the in-place body must not change ---------------------------------


@pytest.mark.parametrize("size", [100, MiB])
async def test_a_call_queued_before_the_service_reads_its_channel_is_answered(tmp_path: Path, size: int) -> None:
    """A service that starts on a channel late (busy, or a handler that awaits first) finds
    the call and its body already queued: they are handed over as push delivery starts, and
    the body goes into the buffer of the decoder that cuts its frames (the channel was reset
    when the buffer went to the other one)."""
    service = make_service()
    serve = service.serve_channel

    async def late(channel: Channel) -> None:
        await trio.sleep(0.3)  # the call and its body wait in the channel meanwhile
        await serve(channel)

    service.serve_channel = late  # type: ignore[method-assign]
    async with serving(tmp_path, "unix", service) as (bus, _nursery):
        channel = await bus.open_channel(NAME, "rpc", "relay")
        framed = FramedStream(channel)
        value = os.urandom(size)
        body = cbor2.dumps({"method": "length", "args": [value]})
        wire = encode_control(0, {"op": "call", "id": 1, "follows": len(body)})
        wire += b"".join(encode_data(0, body[i : i + 60_000]) for i in range(0, len(body), 60_000))
        with trio.fail_after(20):
            await channel.send_all(wire)
            frame = await framed.receive_frame()
        assert isinstance(frame, ControlFrame) and frame.message == {"re": 1, "result": size}
        await channel.aclose()


async def test_a_descriptor_on_a_body_read_in_place_breaks_the_unix_fd_channel(tmp_path: Path) -> None:
    """Bytes read straight into a body's buffer follow the unix-fd channel's rules: a
    descriptor on anything but the end mark breaks the channel (and is closed), it is not
    kept for the service to hold."""
    async with serving(tmp_path, "unix") as (bus, _nursery):
        channel = await bus.open_channel(NAME, "rpc", "direct")
        assert channel.route == "unix-fd"
        framed = FramedStream(channel)
        wire = _encode_message({"op": "call", "id": 1, "method": "length", "args": [os.urandom(MiB)]}, DEFAULT_MAX_MESSAGE)
        with trio.fail_after(20):
            await channel.send_all(wire[:5000])  # the header and the start of the body
            await trio.sleep(0.2)  # (the service is filling the body's buffer now)
            before = len(os.listdir("/proc/self/fd"))
            raw = channel.raw
            assert isinstance(raw, trio.abc.Stream) and hasattr(raw, "socket")
            with open(os.devnull, "rb") as null, socket.socket(fileno=os.dup(raw.socket.fileno())) as sock:
                for i in range(5):
                    try:
                        sock.sendmsg([wire[5000 + i * 10 : 5010 + i * 10]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [null.fileno()]))])
                    except (BrokenPipeError, ConnectionResetError):
                        break  # (the service broke the channel at the first one)
                    await trio.sleep(0.02)
            await trio.sleep(0.2)
            assert len(os.listdir("/proc/self/fd")) <= before  # none of them kept (the service is in this process)
            got: list[Frame] = []
            try:
                while (frame := await framed.receive_frame()) is not None:
                    got.append(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError):
                pass  # (the service's end broke: the channel ends, however it says so)
            assert not [f for f in got if isinstance(f, ControlFrame) and "result" in f.message]
        await trio.aclose_forcefully(channel)


@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_a_small_result_that_cannot_be_encoded_is_an_error_reply(tmp_path: Path, route: str) -> None:
    service = make_service()

    @service.method
    def surrogate() -> str:
        return "\ud800"  # (a lone surrogate: no CBOR text can carry it)

    @service.method
    def one() -> int:
        return 1

    async with serving(tmp_path, "unix", service) as (bus, nursery):
        rpc = await connect(bus, nursery, route)
        with trio.fail_after(20):
            with pytest.raises(RequestError, match="cannot be sent"):
                await rpc.call("surrogate")
            assert await rpc.call("one") == 1  # the channel goes on


def test_an_announced_body_takes_no_memory_until_its_bytes_come() -> None:
    """The buffer of a kept body is made when it is announced, at the announced size (within
    the limits), but takes memory only as the bytes come: an announcement alone, however
    large, costs a peer's victim nothing."""

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    decoder = FrameDecoder()
    cutter = _MessageFrames(lambda header, size: True)
    cutter.fill = decoder.fill_data_into
    size = 256 * MiB
    before = rss()
    decoder.receive_data(encode_control(0, {"re": 1, "follows": size}))
    assert [cutter.feed(frame) for frame in decoder] == [None]
    assert cutter.body is not None and cutter.body.parts is not None
    assert rss() - before < 16 * MiB  # (a bytearray would be 256 MiB, zeroed at once)
    decoder.receive_data(encode_data(0, b"x" * MiB))
    assert [cutter.feed(frame) for frame in decoder] == [None]


# -- a str cbor2 cannot encode inside a message too big for one frame ----------------------

_SURROGATE_NAME = "org.example.Surrogate"
_BIG_TEXT = "a" * 70000  # (the strings alone pass one CONTROL frame: the split path at once)


def _surrogate_service() -> Service:
    service = Service(_SURROGATE_NAME)

    @service.method
    def sync_bad() -> list[str]:
        return ["\ud800", _BIG_TEXT]

    @service.method
    async def async_bad() -> list[str]:
        return ["\ud800", _BIG_TEXT]

    @service.method
    def ok(x: int) -> int:
        return x

    return service


@pytest.mark.parametrize("route", ["relay", "direct"])
async def test_a_big_call_with_a_lone_surrogate_is_refused_before_sending(tmp_path: Path, route: str) -> None:
    service = _surrogate_service()
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=_SURROGATE_NAME) as service_bus:
            service.attach(service_bus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                rpc = RpcConnection(await bus.open_channel(_SURROGATE_NAME, "rpc", route))
                await nursery.start(rpc.run)
                with trio.fail_after(10):
                    with pytest.raises(BadRequest, match="arguments cannot be sent"):
                        await rpc.call("ok", "\ud800", _BIG_TEXT)
                    assert await rpc.call("ok", 5) == 5  # the channel goes on
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("method", ["sync_bad", "async_bad"])
@pytest.mark.parametrize("route", ["relay", "direct"])
async def test_a_big_result_with_a_lone_surrogate_is_answered_with_an_error(tmp_path: Path, method: str, route: str) -> None:
    service = _surrogate_service()
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=_SURROGATE_NAME) as service_bus:
            service.attach(service_bus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                rpc = RpcConnection(await bus.open_channel(_SURROGATE_NAME, "rpc", route))
                await nursery.start(rpc.run)
                with trio.fail_after(10):
                    with pytest.raises(RequestError, match="cannot be sent"):
                        await rpc.call(method)
                    assert await rpc.call("ok", 5) == 5  # the channel (and the service) go on
                nursery.cancel_scope.cancel()


def _resident(buffer: mmap.mmap) -> int:
    """Bytes of ``buffer``'s mapping that are in memory (its Rss line in /proc/self/smaps)."""
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    try:
        with open("/proc/self/smaps") as smaps:
            inside = False
            for line in smaps:
                head = line.split()[0]
                if "-" in head and not head.endswith(":"):
                    start, end = (int(part, 16) for part in head.split("-"))
                    inside = start <= address < end
                elif inside and head == "Rss:":
                    return int(line.split()[1]) * 1024
    finally:
        del address
    raise AssertionError("the body's mapping is not in /proc/self/smaps")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads the mapping's residency from /proc (Linux)")
def test_a_body_up_to_populate_at_once_takes_its_pages_at_once_a_bigger_one_as_they_come() -> None:
    """A kept body's buffer up to POPULATE_AT_ONCE is in memory from its announcement (one
    system call instead of a fault per page; the announcement was admitted for its size); a
    bigger one holds no page until its bytes come."""
    buffers: list[mmap.mmap] = []

    def fill(buffer: bytearray | mmap.mmap | None) -> None:
        if isinstance(buffer, mmap.mmap):
            buffers.append(buffer)

    for size, at_once in ((POPULATE_AT_ONCE, True), (POPULATE_AT_ONCE + 1, False)):
        cutter = _MessageFrames(lambda header, size: True)
        cutter.fill = fill
        decoder = FrameDecoder()
        decoder.receive_data(encode_control(0, {"op": "call", "id": 1, "follows": size}))
        assert cutter.feed(next(decoder)) is None
        resident = _resident(buffers[-1])
        if at_once:
            assert resident >= size
        else:
            assert resident < MiB
        cutter.body = None
        for buffer in buffers:
            buffer.close()
        buffers.clear()


@pytest.mark.parametrize("route", ["relay", "unix-fd"])
async def test_bodies_either_side_of_populate_at_once_round_trip(tmp_path: Path, route: str) -> None:
    transport = ROUTES[route][0]
    async with serving(tmp_path, transport) as (_bus, nursery):
        rpc = await connect(_bus, nursery, route)
        for size in (POPULATE_AT_ONCE - 64, POPULATE_AT_ONCE + 1):
            blob = os.urandom(size)
            assert await rpc.call("reverse", blob) == blob[::-1]
        await rpc.aclose()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads the mapping's residency from /proc (Linux)")
def test_populated_buffers_stay_within_the_budget_and_give_it_back_when_freed() -> None:
    """Buffers taken at once stay within POPULATED_BUDGET alive in the process: past it a
    body's buffer takes its pages as its bytes come; a freed one gives its share back."""
    import gc

    from clients.rpc import _body_buffer, _drop_kept_buffers, _populated

    _drop_kept_buffers()  # (buffers an earlier test's bodies left for the next body of their size)
    gc.collect()  # (a body of an earlier test still in a reference cycle gives its share back)
    assert _populated[0] == 0
    held = [_body_buffer(POPULATE_AT_ONCE) for _ in range(POPULATED_BUDGET // POPULATE_AT_ONCE)]
    assert all(_resident(buffer) >= POPULATE_AT_ONCE for buffer in held)
    assert _populated[0] == POPULATED_BUDGET
    over = _body_buffer(POPULATE_AT_ONCE)
    assert _resident(over) < MiB and _populated[0] == POPULATED_BUDGET  # (past the budget: lazy)
    del over
    first = held.pop()
    first.close()
    del first  # (freed: its share is given back)
    assert _populated[0] == POPULATED_BUDGET - POPULATE_AT_ONCE
    again = _body_buffer(POPULATE_AT_ONCE)
    assert _resident(again) >= POPULATE_AT_ONCE
    del again, held
    assert _populated[0] == 0


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the process's RSS from /proc (Linux)")
async def test_headers_alone_on_many_channels_take_at_most_the_populated_budget(tmp_path: Path) -> None:
    """64 relayed channels to a service, each sent one call header announcing a body the size
    of POPULATE_AT_ONCE and none of its bytes (about 30 bytes each): the service takes at most
    POPULATED_BUDGET ahead (it took 2 MiB a channel, 128 MiB, without the budget), and still
    answers an honest call."""
    channels_count = 64
    async with serving(tmp_path, "unix") as (bus, _nursery):
        channels = [await bus.open_channel(NAME, "rpc", "relay") for _ in range(channels_count)]
        assert {channel.route for channel in channels} == {"relay"}
        await trio.sleep(0.2)
        before = _rss()
        for channel in channels:
            await FramedStream(channel).send_message({"op": "call", "id": 1, "follows": POPULATE_AT_ONCE})
        await trio.sleep(0.5)
        grown = _rss() - before
        assert grown < 32 * MiB, f"headers alone took {grown / MiB:.1f} MiB"  # (128 MiB with no budget)
        with trio.fail_after(10):
            assert await bus.call(NAME, "reverse", b"abc") == b"cba"
        for channel in channels:
            await channel.aclose()


def test_pushed_frames_hand_on_every_message_once_in_order_however_the_bytes_are_cut() -> None:
    """A relayed RPC channel's bytes pushed by the bus's reader (_PushedFrames.feed): runs of
    one-frame messages (taken as a run, FrameDecoder.take_control_messages), a message with
    a body in DATA frames between them (filled by the decoder), and a frame out of the
    profile at the end: whatever the cuts, each message is handed on once, in order, as
    frame by frame, and the bad frame is refused after everything before it."""
    from clients.rpc import _PushedFrames

    small = [{"op": "call", "id": i, "method": "echo", "args": [bytes([i]) * i]} for i in range(1, 6)]
    big = {"op": "call", "id": 6, "method": "echo", "args": [os.urandom(MESSAGE_PART + 100)]}
    after = [{"re": i, "result": "x" * i} for i in range(7, 10)]
    body = bytes.fromhex("a1 62 6964 18 0a")  # {"id": 10}, with 10 written the long way: out of the profile
    bad = bytes.fromhex("01 00 00000000") + len(body).to_bytes(4, "big") + body
    stream = b"".join(_encode_message(m, DEFAULT_MAX_MESSAGE) for m in [*small[:3], big, *small[3:], *after]) + bad
    expected = [*small[:3], big, *small[3:], *after]

    def run(cuts: list[int]) -> tuple[list[Any], Exception | None]:
        got: list[Any] = []
        frames = _MessageFrames(lambda header, size: True)

        def handle(frame: Frame | dict[str, Any]) -> None:
            item = frame if type(frame) is dict else frames.feed(frame)  # type: ignore[arg-type]
            if isinstance(item, _Body):
                item = {**item.header, **item.message(DEFAULT_MAX_MESSAGE)}
            if item is not None:
                got.append(item)

        pushed = _PushedFrames(handle, frames)
        frames.fill = pushed.fill_data_into
        error = None
        try:
            for start, end in zip([0, *cuts], [*cuts, len(stream)]):
                pushed.feed(memoryview(stream)[start:end])
        except FrameError as exc:
            error = exc
        return got, error

    rng = __import__("random").Random(13)
    for cuts in ([], [len(stream) - 3], sorted(rng.sample(range(1, len(stream)), 40)), list(range(7, len(stream), 997))):
        got, error = run(cuts)
        assert [{k: v for k, v in m.items() if k != "follows"} for m in got] == expected
        assert error is not None and "shortest" in str(error)


def test_pushed_frames_refuse_a_message_where_a_body_was_due_within_a_run() -> None:
    """A run of one-frame messages is cut before it is handled: a message in it that comes
    where the body announced before it was due is refused, as frame by frame."""
    from clients.rpc import _PushedFrames

    header = _encode_message({"op": "call", "id": 1, "method": "echo", "args": [bytes(MESSAGE_PART + 1)]}, DEFAULT_MAX_MESSAGE)
    header = header[: 10 + int.from_bytes(header[6:10], "big")]  # (its CONTROL frame alone)
    got: list[Any] = []
    frames = _MessageFrames(lambda header, size: True)

    def handle(frame: Frame | dict[str, Any]) -> None:
        got.append(frame if type(frame) is dict else frames.feed(frame))  # type: ignore[arg-type]

    pushed = _PushedFrames(handle, frames)
    frames.fill = pushed.fill_data_into
    with pytest.raises(FrameError, match="a control frame where"):
        pushed.feed(header + encode_control(0, {"op": "call", "id": 2, "method": "echo", "args": []}))
    assert got == [None]  # (the header: its body is due)


async def test_a_decoded_body_s_buffer_serves_the_next_body_of_its_size(tmp_path: Path, monkeypatch: Any) -> None:
    """A populated buffer whose message was decoded is kept for the next body of the same
    size (no pages taken and zeroed again), within KEPT_BUFFERS: bodies of one size, each with
    other bytes, all come back whole and right through the same buffers, on both routes; a
    buffer is never kept twice, and the kept ones stay within their bound."""
    import gc

    from clients import rpc as rpc_module

    fresh: list[int] = []
    reused: list[int] = []
    original = rpc_module._body_buffer

    def counting(size: int) -> mmap.mmap:
        before = rpc_module._kept_bytes[0]
        buffer = original(size)
        (reused if rpc_module._kept_bytes[0] < before else fresh).append(size)
        return buffer

    monkeypatch.setattr(rpc_module, "_body_buffer", counting)
    rpc_module._drop_kept_buffers()
    gc.collect()
    size = MiB - 64
    for route in ("relay", "unix-fd"):
        async with serving(tmp_path / route, ROUTES[route][0]) as (_bus, nursery):
            rpc = await connect(_bus, nursery, route)
            for i in range(12):
                blob = bytes([i]) * 7 + os.urandom(size - 7)
                assert await rpc.call("reverse", blob) == blob[::-1]
                kept = [id(buffer) for buffers in rpc_module._kept.values() for buffer in buffers]
                assert len(kept) == len(set(kept))
                assert rpc_module._kept_bytes[0] == sum(len(b) for bs in rpc_module._kept.values() for b in bs)
                assert rpc_module._kept_bytes[0] <= rpc_module.KEPT_BUFFERS
            await rpc.aclose()
        # Each call's body and its reply's (both ends in this process) took a buffer: after
        # the first call's two, the kept ones served all the others.
        assert len(fresh) <= 2 and len(reused) >= 22, (fresh, reused)
        fresh.clear()
        reused.clear()


@pytest.mark.parametrize("route", ["unix-fd", "relay", "tcp"])
async def test_a_large_call_goes_out_as_its_pieces_where_the_channel_is_a_plain_socket(
    tmp_path: Path, route: str, monkeypatch: Any
) -> None:
    """A large call's frames are written from their pieces with one sendmsg (the argument
    itself, not a joined copy) on a plain socket of the channel's own (unix-fd); a relay and
    an encrypted TCP channel join them as before. Every call comes back right."""
    from bus.io.secure import SecureStream

    pieced: list[int] = []
    original = SecureStream.send_pieces_nowait

    def counting(self: SecureStream, parts: list[bytes | memoryview], size: int) -> memoryview | None:
        rest = original(self, parts, size)
        if rest is not None:
            pieced.append(size)
        return rest

    monkeypatch.setattr(SecureStream, "send_pieces_nowait", counting)
    async with serving(tmp_path, ROUTES[route][0]) as (_bus, nursery):
        rpc = await connect(_bus, nursery, route)
        for i in range(3):
            blob = bytes([i]) * 100 + os.urandom(MiB + 1000 * i)
            assert await rpc.call("reverse", blob) == blob[::-1]
        await rpc.aclose()
    if route == "unix-fd":
        assert len(pieced) >= 3 and all(size > MiB for size in pieced)
    else:
        assert pieced == []


async def test_the_kept_buffers_stay_whole_when_trio_runs_in_several_threads_share_them() -> None:
    """The kept buffers are the process's: trio runs in other threads (busctl run from a
    thread, several buses in one program) take and keep buffers too.  Taken and kept from
    several threads at once, none fails, none is lost from the count or counted twice, the
    kept ones stay within KEPT_BUFFERS, and the populated budget's count comes back whole."""
    import gc
    import sys

    from clients import rpc as rpc_module

    def work() -> None:
        for i in range(20_000):
            rpc_module._keep_buffer(rpc_module._body_buffer(4096 * (1 + i % 3)))

    rpc_module._drop_kept_buffers()
    gc.collect()
    populated = rpc_module._populated[0]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads switch often: between any two steps)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(trio.to_thread.run_sync, work)
    finally:
        sys.setswitchinterval(interval)
    kept = [buffer for buffers in rpc_module._kept.values() for buffer in buffers]
    assert len({id(buffer) for buffer in kept}) == len(kept)
    assert rpc_module._kept_bytes[0] == sum(len(buffer) for buffer in kept) <= rpc_module.KEPT_BUFFERS
    assert all(buffers for buffers in rpc_module._kept.values())
    rpc_module._drop_kept_buffers()
    del kept
    gc.collect()
    assert rpc_module._populated[0] == populated  # (the budget's count: every buffer given back)


#: Random bytes that the property below takes its big values from (slices: copies, so each
#: value is an object of its own, as a caller's would be).
_BLOB = os.urandom(3 * MESSAGE_PART + 4096)
#: A size around a multiple of MESSAGE_PART (either side of it, exactly on it), or small.
_SIZES = st.one_of(
    st.integers(0, 5000),
    st.builds(lambda k, delta: max(0, k * MESSAGE_PART + delta), st.integers(1, 2), st.integers(-80, 80)),
)
_VALUES = st.one_of(
    st.builds(lambda n: _BLOB[:n], _SIZES),
    st.builds(lambda n: "s" * n, st.integers(0, 70_000)),
    st.integers(-(2**64), 2**64 - 1),
    st.none(),
    st.booleans(),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(args=st.lists(_VALUES, min_size=1, max_size=5), nested=st.booleans(), reply=st.booleans())
def test_a_gathered_message_is_the_bytes_of_the_joined_one_and_its_size_is_theirs(
    args: list[Any], nested: bool, reply: bool
) -> None:
    """_encode_message(gather=True): a message of a header and DATA frames comes as pieces
    (bytes, or views of bytes) whose lengths add up to its size and whose bytes are those of
    the message encoded without gather (flat or not, a body an exact multiple of MESSAGE_PART
    or a byte either side of one); a message of one control frame comes as its bytes."""
    values: Any = {"k": args} if nested else args  # (a map inside: not flat)
    message: dict[str, Any] = {"re": 7, "result": values} if reply else {"op": "call", "id": 1, "method": "m", "args": values}
    strings = _flat_size(message.values())
    plain = _encode_message(dict(message), 1 << 26)
    assert _encode_message(dict(message), 1 << 26, flat=strings >= 0, strings=strings) == plain
    gathered = _encode_message(dict(message), 1 << 26, flat=strings >= 0, strings=strings, gather=True)
    if not isinstance(gathered, Gathered):
        assert gathered == plain and len(frames_of(plain)) == 1
        return
    for part in gathered.parts:
        assert type(part) is bytes or (type(part) is memoryview and part.itemsize == 1 and part.readonly)
    assert gathered.size == len(gathered) == sum(len(part) for part in gathered.parts) == len(plain)
    assert gathered.join() == plain


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "not-flat"])
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("over", [-1, 0, 1])
def test_a_gathered_body_of_whole_message_parts_or_a_byte_either_side(flat: bool, parts: int, over: int) -> None:
    """A body of exactly ``parts`` MESSAGE_PARTs (or a byte less or more): the gathered
    pieces' lengths add up to its size, their bytes are the joined message's, and the DATA
    frames cut it at MESSAGE_PART."""
    target = parts * MESSAGE_PART + over

    def message(n: int) -> dict[str, Any]:
        value: Any = _BLOB[:n]
        return {"op": "call", "id": 1, "method": "m", "args": [value] if flat else [{"k": value}]}

    n = target
    for _ in range(10):  # (the CBOR heads around the value: a few bytes, found by trying)
        size = cbor2.dumps({key: value for key, value in message(n).items() if key not in ("op", "id")}).__len__()
        if size == target:
            break
        n += target - size
    assert size == target
    wire = message(n)
    strings = _flat_size(wire.values())
    assert (strings >= 0) == flat
    gathered = _encode_message(dict(wire), 1 << 26, flat=flat, strings=strings, gather=True)
    assert isinstance(gathered, Gathered)
    plain = _encode_message(dict(wire), 1 << 26)
    assert gathered.size == sum(len(part) for part in gathered.parts) == len(plain)
    assert gathered.join() == plain
    frames = frames_of(plain)
    sizes = [len(frame.data) for frame in frames[1:] if isinstance(frame, DataFrame)]
    assert sum(sizes) == target and sizes == [MESSAGE_PART] * (target // MESSAGE_PART) + ([target % MESSAGE_PART] if target % MESSAGE_PART else [])


async def test_a_caller_sending_bodies_of_every_size_keeps_no_more_than_the_bound_and_costs_another_caller_nothing(
    tmp_path: Path,
) -> None:
    """Who pays for the kept buffers: the process that decodes the bodies, within KEPT_BUFFERS.
    One caller sends large bodies of ever new sizes on its channel (each would be kept for a
    next body of its size that never comes), while another caller, on a channel of its own,
    makes calls of one size between them: the kept buffers never pass the bound, the populated
    budget's count comes back whole, and every one of the other caller's calls comes back
    right (its bodies still served by buffers kept for its size)."""
    import gc

    from clients import rpc as rpc_module

    rpc_module._drop_kept_buffers()
    gc.collect()
    populated = rpc_module._populated[0]
    async with serving(tmp_path, "unix") as (_bus, nursery):
        greedy = await connect(_bus, nursery, "unix-fd")
        other = await connect(_bus, nursery, "unix-fd")
        for i in range(24):
            size = 200_000 + 7_919 * i  # (a new size each time: 1.6-1.9 MiB kept if unbounded)
            assert await greedy.call("length", bytes(size)) == size
            assert rpc_module._kept_bytes[0] <= rpc_module.KEPT_BUFFERS
            blob = bytes([i]) * 64 + os.urandom(MiB)
            assert await other.call("reverse", blob) == blob[::-1]
            assert rpc_module._kept_bytes[0] <= rpc_module.KEPT_BUFFERS
        assert any(len(buffer) > MiB for buffers in rpc_module._kept.values() for buffer in buffers)
        await greedy.aclose()
        await other.aclose()
    rpc_module._drop_kept_buffers()
    gc.collect()
    assert rpc_module._populated[0] == populated


@pytest.mark.parametrize("route", ["relay", "unix-fd", "tcp"])
async def test_a_large_call_goes_out_without_a_join_of_the_whole_message_where_it_can(
    tmp_path: Path, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large call is given to the channel's writer as its pieces (the caller's own bytes
    among them): on a relay its bus frames are made from views of them and on unix-fd they
    go out with sendmsg, neither joining the whole message (a copy of it and an allocation
    as big); encrypted (tcp) it is joined, as box-stream needs.  The service gets the same
    bytes, whatever is in flight beside it."""
    joins: list[int] = []
    real_join = Gathered.join

    def counted_join(self: Gathered) -> bytes:
        joins.append(self.size)
        return real_join(self)

    monkeypatch.setattr(Gathered, "join", counted_join)
    from bus.io.writer import FrameWriter

    gathered: list[int] = []
    real_put = FrameWriter.put_gathered

    async def counted_put(self: FrameWriter, frame: Gathered) -> None:
        gathered.append(frame.size)
        await real_put(self, frame)

    monkeypatch.setattr(FrameWriter, "put_gathered", counted_put)
    async with serving(tmp_path, ROUTES[route][0]) as (bus, nursery):
        rpc = await connect(bus, nursery, route)
        blobs = [os.urandom(MiB + i * 70_001) for i in range(4)]
        results: dict[int, object] = {}

        async def big(i: int) -> None:
            results[i] = await rpc.call("length", blobs[i])

        async def small(i: int) -> None:
            results[100 + i] = await rpc.call("echo", i)

        async with trio.open_nursery() as calls:
            for i in range(4):
                calls.start_soon(big, i)
                calls.start_soon(small, i)
        assert results == {**{i: len(blobs[i]) for i in range(4)}, **{100 + i: i for i in range(4)}}
        assert await rpc.call("reverse", blobs[0]) == blobs[0][::-1]
        await rpc.aclose()
    assert len(gathered) == 5  # (the four calls and the reverse: as pieces, on every route)
    assert joins == ([] if route != "tcp" else gathered)


async def test_a_caller_streaming_large_calls_as_pieces_leaves_another_callers_calls_answered(tmp_path: Path) -> None:
    """One caller keeps 8 calls of 1 MiB in flight on a relay (sent as pieces: its writer's
    queue holds its own arguments until they are written, the broker's credit bounds what
    busd holds); another caller, another identity on its own connection, calls the same
    service meanwhile: every one of its calls is answered, each within a few seconds, and the
    big calls all come back."""
    service = make_service()
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=NAME) as sbus:
            service.attach(sbus)
            async with (
                open_bus(rb.unix_address, identity=FRIEND) as bus,
                open_bus(rb.unix_address, identity=OWNER) as other,
                trio.open_nursery() as nursery,
            ):
                nursery.cancel_scope.deadline = trio.current_time() + 60
                rpc = await connect(bus, nursery, "relay")
                other_rpc = RpcConnection(await other.open_channel(NAME, "rpc", "relay"))
                await nursery.start(other_rpc.run)
                blob = os.urandom(MiB)
                done = {"big": 0, "small": 0}

                async def big() -> None:
                    for _ in range(4):
                        assert await rpc.call("length", blob) == MiB
                        done["big"] += 1

                async def small() -> None:
                    for i in range(50):
                        with trio.fail_after(5):
                            assert await other_rpc.call("echo", i) == i
                        done["small"] += 1

                async with trio.open_nursery() as calls:
                    for _ in range(8):
                        calls.start_soon(big)
                    calls.start_soon(small)
                assert done == {"big": 32, "small": 50}
                nursery.cancel_scope.cancel()
