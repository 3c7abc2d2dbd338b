"""Relayed channels between plugins, through a real broker over real sockets."""

from __future__ import annotations

import gc
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from bus.errors import AccessDenied, BadRequest, ChannelRejected, NameNotFound
from bus.io.framed import FramedStream
from bus.io.writer import FrameWriter
from bus.wire.frames import ControlFrame, DataFrame, encode_control, encode_data
from clients.bus import Bus, open_bus
from clients.rpc import Service
from clients.channels import Channel, ChannelRequest, RelayStream

from .brokers import FRIEND, OWNER, PLUGIN, RunningBroker, running_broker
from .test_broker import raw_connect


async def echo(ch: Channel) -> None:
    while data := await ch.receive_some():
        await ch.send_all(data)
    await ch.send_eof()


async def round_trip(ch: Channel, blob: bytes) -> bytes:
    """Send ``blob`` and EOF while reading everything the echo sends back."""
    got = bytearray()
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await ch.send_all(blob)
            await ch.send_eof()

        nursery.start_soon(send)
        while data := await ch.receive_some():
            got += data
    return bytes(got)


def hand_over_channels(service: Bus, window: int | None = None) -> trio.MemoryReceiveChannel[Channel]:
    """Serve 'raw' channels by handing each to the test (and keeping it open)."""
    served, accepted = trio.open_memory_channel[Channel](10)

    async def hand_over(ch: Channel) -> None:
        await served.send(ch)
        await trio.sleep_forever()

    if window is None:
        service.handle_channels("raw", hand_over)
    else:
        service.handle_channels("raw", hand_over, window=window)
    return accepted


@asynccontextmanager
async def pair(tmp: Path, transport: str = "unix", **broker: Any) -> AsyncIterator[tuple[RunningBroker, Bus, Bus]]:
    async with running_broker(tmp, **broker) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        async with open_bus(address, identity=PLUGIN, name="org.example.Echo") as service, open_bus(address, identity=FRIEND) as client:
            yield rb, service, client


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_open_echo_and_identities(tmp_path: Path, transport: str) -> None:
    async with pair(tmp_path, transport) as (rb, service, client):
        seen: list[ChannelRequest] = []

        def accept(req: ChannelRequest) -> str | None:
            seen.append(req)
            return None

        service.handle_channels("raw", echo, accept=accept)
        ch = await client.open_channel("org.example.Echo", route="relay")
        assert ch.route == "relay" and ch.protocol == "raw"
        assert ch.peer.identity == PLUGIN.id and ch.peer.unique_id == service.unique_id
        assert ch.encrypted == (transport == "tcp")
        assert seen[0].opener.identity == FRIEND.id and seen[0].opener.unique_id == client.unique_id
        blob = os.urandom(3 * 1024 * 1024 + 5)
        got = await round_trip(ch, blob)
        assert got == blob
        await ch.aclose()
        with trio.fail_after(10):
            while len(rb.broker.core.channels):
                await trio.sleep(0.01)


async def test_target_rejects_with_a_reason(tmp_path: Path) -> None:
    async with pair(tmp_path) as (_, service, client):
        service.handle_channels("raw", echo, accept=lambda req: "not today")
        with pytest.raises(ChannelRejected, match="not today"):
            await client.open_channel("org.example.Echo")
        with pytest.raises(ChannelRejected, match="no handler for protocol 'rpc'"):
            await client.open_channel("org.example.Echo", protocol="rpc")


async def test_missing_name_nameless_target_and_policy(tmp_path: Path) -> None:
    async with pair(tmp_path) as (rb, service, client):
        with pytest.raises(NameNotFound):
            await client.open_channel("org.example.Nobody")
        async with open_bus(rb.unix_address, identity=PLUGIN) as plugin:
            with pytest.raises(AccessDenied, match="may not open"):
                await plugin.open_channel("org.example.Echo")


async def test_target_that_never_answers(tmp_path: Path) -> None:
    async with running_broker(tmp_path, channel_timeout=0.3) as rb:
        silent = await raw_connect(rb.unix_address, PLUGIN)
        await silent.send_message({"op": "hello", "id": 1, "name": "org.example.Silent"})
        async with open_bus(rb.unix_address, identity=FRIEND) as client:
            with pytest.raises(ChannelRejected, match="did not answer"):
                await client.open_channel("org.example.Silent", route="relay")
            # A late "yes" gets the channel reset, not a dangling relay.
            request = None
            with trio.fail_after(10):
                while request is None:
                    frame = await silent.receive_frame()
                    if isinstance(frame, ControlFrame) and frame.message.get("op") == "channel_request":
                        request = frame.message
            await silent.send_message({"re": request["id"], "result": {}})
            with trio.fail_after(10):
                while True:
                    frame = await silent.receive_frame()
                    if isinstance(frame, ControlFrame) and frame.channel == request["channel"]:
                        assert "reset" in frame.message
                        break
            assert len(rb.broker.core.channels) == 0
        await silent.aclose()


async def _open_held(client: Bus, target: Bus, route: str) -> Channel:
    """A 'raw' channel to ``target`` (named org.example.Doomed), whose end is held open."""
    holding = trio.Event()

    async def hold(ch: Channel) -> None:
        holding.set()
        await trio.sleep_forever()

    target.handle_channels("raw", hold)
    ch = await client.open_channel("org.example.Doomed", route=route)
    await holding.wait()
    return ch


async def test_peer_vanishing_breaks_the_other_end(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND) as client:
            async with open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Doomed") as doomed:
                ch = await _open_held(client, doomed, "relay")
                await ch.send_all(b"x" * 1000)
                # The target's connection disappears without a word (as with SIGKILL).
                assert doomed._link is not None
                doomed._link.framed.stream.transport.socket.close()  # type: ignore[attr-defined]
                with trio.fail_after(5):
                    with pytest.raises(trio.BrokenResourceError, match="disconnected"):
                        while True:
                            await ch.receive_some()
            with trio.fail_after(10):
                while len(rb.broker.core.channels):
                    await trio.sleep(0.01)


async def _raw_relay(rb: RunningBroker) -> tuple[FramedStream, int, FramedStream, int]:
    """A relayed channel between two hand-driven connections: (opener, its id, target, its id)."""
    target = await raw_connect(rb.unix_address, PLUGIN)
    await target.send_message({"op": "hello", "id": 1, "name": "org.example.Sink"})
    opener = await raw_connect(rb.unix_address, FRIEND)
    await opener.send_message({"op": "hello", "id": 1})
    await opener.send_message({"op": "open_channel", "id": 2, "name": "org.example.Sink", "protocol": "raw", "route": "relay"})
    with trio.fail_after(10):
        while True:
            frame = await target.receive_frame()
            if isinstance(frame, ControlFrame) and frame.message.get("op") == "channel_request":
                await target.send_message({"re": frame.message["id"], "result": {}})
                target_channel = frame.message["channel"]
                break
        while True:
            frame = await opener.receive_frame()
            if isinstance(frame, ControlFrame) and frame.message.get("re") == 2:
                opener_channel = frame.message["result"]["channel"]
                break
    return opener, opener_channel, target, target_channel


async def test_sender_beyond_its_credit_gets_the_channel_reset(tmp_path: Path) -> None:
    """Both ends are driven by hand: the target accepts and reads nothing, the opener floods."""
    from bus.wire.frames import encode_data

    async with running_broker(tmp_path) as rb:
        cheat, channel, target, target_channel = await _raw_relay(rb)
        # The broker granted relay_credit bytes; send more than that without waiting for credit.
        for _ in range(rb.broker.config.limits.relay_credit // 60000 + 2):
            await cheat.stream.send_all(encode_data(channel, b"z" * 60000))
        resets = {}
        with trio.fail_after(10):
            for who, framed, ch in (("opener", cheat, channel), ("target", target, target_channel)):
                while who not in resets:
                    frame = await framed.receive_frame()
                    if isinstance(frame, ControlFrame) and frame.channel == ch and "reset" in frame.message:
                        resets[who] = frame.message["reset"]
        assert "flow control" in resets["opener"] and "flow control" in resets["target"]
        assert len(rb.broker.core.channels) == 0
        for framed in (cheat, target):
            await framed.aclose()


async def test_a_frame_that_comes_alone_is_relayed_from_its_read_as_the_usual_way_would(tmp_path: Path) -> None:
    """busd passes a DATA frame that came alone in its read straight on (FramedStream.lone_data,
    _Session._relay_alone); one it cannot pass on so goes the usual way (channel_data)."""
    async with running_broker(tmp_path) as rb:
        opener, channel, target, target_channel = await _raw_relay(rb)
        await target.send_message({"credit": 1 << 20}, target_channel)  # (the target's window)
        broker = rb.broker
        usual: list[bytes] = []
        channel_data = broker.channel_data

        def the_usual_way(session: Any, ch: int, data: bytes | memoryview) -> None:
            usual.append(bytes(data))
            channel_data(session, ch, data)

        broker.channel_data = the_usual_way  # type: ignore[method-assign]
        session = next(s for s in broker.sessions.values() if s.key == FRIEND.public_key)

        async def next_data() -> DataFrame:
            while True:  # (past the credit busd gives the target for its own direction)
                frame = await target.receive_frame()
                if isinstance(frame, DataFrame):
                    return frame

        with trio.fail_after(10):
            (relay,) = broker.core.channels.of_connection(session.conn_id)
            forward = relay.a_to_b if relay.a[0] == session.conn_id else relay.b_to_a
            while not forward.dst_window:
                await trio.sleep(0.01)
            for i in range(3):
                body = bytes([i]) * (100 + i)
                before = session.messages_in
                await opener.stream.send_all(encode_data(channel, body))
                frame = await next_data()
                # As the usual way sends it: the receiver's channel id, the same bytes.
                assert (frame.channel, frame.data) == (target_channel, body)
                assert session.messages_in == before + 1
            assert usual == []  # (all three came alone: the quick way)
            # A frame on a channel the sender does not hold: the usual way, which drops it; the
            # connection goes on.
            await opener.stream.send_all(encode_data(channel + 1000, b"nobody's"))
            while usual != [b"nobody's"]:
                await trio.sleep(0.01)
            await opener.stream.send_all(encode_data(channel, b"still here"))
            frame = await next_data()
            assert (frame.channel, frame.data) == (target_channel, b"still here")
            # A frame over the sender's credit, alone: the usual way, which refuses it -- the
            # channel is reset at both ends.
            over = b"z" * (forward.src_credit + 1)
            await opener.stream.send_all(encode_data(channel, over))
            for framed, ch in ((opener, channel), (target, target_channel)):
                while True:
                    frame = await framed.receive_frame()
                    if isinstance(frame, ControlFrame) and frame.channel == ch and "reset" in frame.message:
                        assert "flow control" in frame.message["reset"]
                        break
            assert usual[-1] == over and len(broker.core.channels) == 0
        for framed in (opener, target):
            await framed.aclose()


async def test_a_frame_that_comes_alone_behind_buffered_bytes_keeps_its_place(tmp_path: Path) -> None:
    """Over the receiver's window busd buffers; a frame that then comes alone, even one the
    window would cover, goes behind what waits (the usual way), and a frame after a close is
    dropped without using credit."""

    async def next_data(framed: FramedStream) -> DataFrame:
        while True:
            frame = await framed.receive_frame()
            if isinstance(frame, DataFrame):
                return frame

    async def data_within(framed: FramedStream, seconds: float) -> list[bytes]:
        got = []
        with trio.move_on_after(seconds):
            while True:
                got.append(bytes((await next_data(framed)).data))
        return got

    async with running_broker(tmp_path) as rb:
        opener, channel, target, target_channel = await _raw_relay(rb)
        session = next(s for s in rb.broker.sessions.values() if s.key == FRIEND.public_key)
        (relay,) = rb.broker.core.channels.of_connection(session.conn_id)
        forward = relay.a_to_b if relay.a[0] == session.conn_id else relay.b_to_a
        await target.send_message({"credit": 100}, target_channel)
        with trio.fail_after(10):
            while forward.dst_window != 100:
                await trio.sleep(0.01)
            await opener.stream.send_all(encode_data(channel, b"a" * 60))  # within the window
            assert bytes((await next_data(target)).data) == b"a" * 60
            await opener.stream.send_all(encode_data(channel, b"b" * 60))  # 40 go, 20 wait
            assert await data_within(target, 0.3) == [b"b" * 40]
            assert forward.buffered == 20 and forward.dst_window == 0
            await opener.stream.send_all(encode_data(channel, b"c" * 5))  # alone, behind them
            while forward.buffered != 25:
                await trio.sleep(0.01)
            await target.send_message({"credit": 1000}, target_channel)
            rest = b""
            while len(rest) < 25:
                rest += bytes((await next_data(target)).data)
            assert rest == b"b" * 20 + b"c" * 5
            # The target closes: what the opener sends after it hears so is dropped.
            await target.send_message({"close": True}, target_channel)
            while True:
                frame = await opener.receive_frame()
                if isinstance(frame, ControlFrame) and frame.channel == channel and frame.message.get("closed"):
                    break
            credit = forward.src_credit
            await opener.stream.send_all(encode_data(channel, b"d" * 7))
            await trio.sleep(0.1)
            assert forward.src_credit == credit
        for framed in (opener, target):
            await framed.aclose()


async def test_a_client_hands_a_frame_that_comes_alone_to_its_channel_from_the_read(tmp_path: Path) -> None:
    """A client's reader gives a channel's DATA frame that came alone in its read to the
    channel straight from the read (Link._lone_data), the same bytes in the same order as the
    usual way (the reader's dispatch) would."""
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND) as opener, open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Sink") as target:
            ends: list[Channel] = []
            accepted = trio.Event()

            async def keep(ch: Channel) -> None:
                ends.append(ch)
                accepted.set()
                await trio.sleep_forever()

            assert target._link is not None
            framed = target._link.framed
            took: list[bytes] = []
            lone = framed.lone_data
            assert lone is not None

            def counting(channel: int, frame: bytes) -> bool:
                taken = lone(channel, frame)
                if taken:
                    took.append(frame[10:])
                return taken

            # (Before the channel is opened: the reader takes it up with its next read of
            # control messages, the channel's request.)
            framed.lone_data = counting
            target.handle_channels("raw", keep)
            ch = await opener.open_channel("org.example.Sink", route="relay")
            await accepted.wait()
            received = bytearray()
            with trio.fail_after(10):
                for i in range(3):
                    piece = bytes([65 + i]) * (10 + i)
                    await ch.send_all(piece)  # (one frame, alone in its write and in busd's)
                    while len(received) < sum(10 + j for j in range(i + 1)):
                        received += await ends[0].receive_some()
                # (after the channel's own handshake, whose messages came alone too)
                assert took[-3:] == [b"A" * 10, b"B" * 11, b"C" * 12]
                assert bytes(received) == b"A" * 10 + b"B" * 11 + b"C" * 12
            await ch.aclose()


async def test_slow_reader_keeps_broker_memory_bounded(tmp_path: Path) -> None:
    """1 GiB through a relay to a reader that reads slowly: the broker never holds more than its cap."""
    total = 1024 * 1024 * 1024
    async with running_broker(tmp_path) as rb:
        cap = rb.broker.core.limits.relay_credit
        async with open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Slow") as slow:
            done = trio.Event()
            received = [0]

            async def dawdle(ch: Channel) -> None:
                while data := await ch.receive_some(32 * 1024):
                    received[0] += len(data)
                    if received[0] % (64 * 1024 * 1024) < 32 * 1024:
                        await trio.sleep(0.05)  # now and then the reader dawdles
                done.set()

            slow.handle_channels("raw", dawdle)
            async with open_bus(rb.unix_address, identity=FRIEND) as fast:
                ch = await fast.open_channel("org.example.Slow", route="relay")
                peak = [0]

                async def watch_broker() -> None:
                    # Sample what the broker holds for the channel while the transfer runs.
                    while True:
                        for session in list(rb.broker.sessions):
                            for relay in rb.broker.core.channels.of_connection(session):
                                peak[0] = max(peak[0], relay.a_to_b.buffered, relay.b_to_a.buffered)
                        await trio.sleep(0.001)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch_broker)
                    chunk = b"q" * 65536
                    for _ in range(total // len(chunk)):
                        await ch.send_all(chunk)
                    await ch.send_eof()
                    with trio.fail_after(300):
                        await done.wait()
                    nursery.cancel_scope.cancel()
                assert received[0] == total
                assert 0 < peak[0] <= cap
                queued = [s.queued_bytes for s in rb.broker.sessions.values()]
                assert all(q <= rb.broker.config.outbound_bytes for q in queued)
                await ch.aclose()


async def test_channels_left_open_when_a_plugin_exits_are_freed(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Echo") as service:
            service.handle_channels("raw", echo)
            async with open_bus(rb.unix_address, identity=FRIEND) as client:
                for _ in range(5):
                    await client.open_channel("org.example.Echo", route="relay")  # never closed
                assert len(rb.broker.core.channels) == 5
            with trio.fail_after(10):
                while len(rb.broker.core.channels):
                    await trio.sleep(0.01)


# -- trio's stream conformance, on a channel ---------------------------------------------------


def _next_write(credit: int, encrypted: bool) -> int:
    """Plaintext to send so that the credit can be used up exactly (box-stream adds 34 bytes
    per piece of up to 4096, so some remainders cannot be hit in one write)."""
    if not encrypted:
        return min(credit, 32 * 1024)
    if credit > 8 * 4130 + 4165:
        return 8 * 4096
    if credit > 4130 + 35:
        return 4096
    if credit > 4130:
        return credit - 35 - 34  # leaves exactly 35: one more 1-byte box
    return credit - 34


async def _fill(ch: Channel) -> None:
    """Send until the channel's credit is used up and nothing moves: a clogged sender."""
    relay = ch.raw
    while True:
        await trio.sleep(0.01)  # let the broker move what it can and return credit
        if relay._credit == 0:
            await trio.sleep(0.05)
            if relay._credit == 0:
                return
            continue
        assert not ch.encrypted or relay._credit >= 35
        await ch.send_all(b"f" * _next_write(relay._credit, ch.encrypted))


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_channel_conformance(tmp_path: Path, transport: str) -> None:
    async with pair(tmp_path, transport) as (_, service, client):
        accepted = hand_over_channels(service, window=64 * 1024)

        async def stream_maker() -> tuple[Channel, Channel]:
            ch = await client.open_channel("org.example.Echo", route="relay", window=64 * 1024)
            return ch, await accepted.receive()

        async def clogged_stream_maker() -> tuple[Channel, Channel]:
            left, right = await stream_maker()
            await _fill(left)
            await _fill(right)
            return left, right

        await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker)


# -- the unix-fd route ---------------------------------------------------------------------------


async def test_unix_fd_route_passes_a_socket_and_the_broker_touches_no_data(tmp_path: Path) -> None:
    async with pair(tmp_path, "unix") as (rb, service, client):
        service.handle_channels("raw", echo)
        for route in ("auto", "direct"):
            ch = await client.open_channel("org.example.Echo", route=route)
            assert ch.route == "unix-fd" and not ch.encrypted
            assert ch.peer.identity == PLUGIN.id
            assert len(rb.broker.core.channels) == 0  # no relay: the broker holds nothing
            blob = os.urandom(2 * 1024 * 1024)
            got = await round_trip(ch, blob)
            assert got == blob
            await ch.aclose()
        assert rb.broker._kept_ends == {}


async def test_direct_tcp_route_and_auto(tmp_path: Path) -> None:
    async with pair(tmp_path, "tcp") as (rb, service, client):
        service.handle_channels("raw", echo)
        for route in ("direct", "auto"):
            ch = await client.open_channel("org.example.Echo", route=route)
            assert ch.route == "tcp" and ch.encrypted and ch.peer.identity == PLUGIN.id
            assert len(rb.broker.core.channels) == 0  # the broker carries nothing
            blob = os.urandom(1024 * 1024)
            got = await round_trip(ch, blob)
            assert got == blob
            await ch.aclose()


async def test_direct_tcp_refuses_wrong_key_replayed_token_and_third_parties(tmp_path: Path) -> None:
    from bus.io.secure import SecureStream

    async with pair(tmp_path, "tcp") as (rb, service, client):
        reached: list[Channel] = []

        async def keep(ch: Channel) -> None:
            reached.append(ch)
            while await ch.receive_some():
                pass

        service.handle_channels("raw", keep)
        # Capture the offer the broker gives the opener by asking by hand.
        raw = await raw_connect(rb.tcp_address, FRIEND)
        await raw.send_message({"op": "hello", "id": 1})
        await raw.send_message({"op": "open_channel", "id": 2, "name": "org.example.Echo", "route": "direct"})
        with trio.fail_after(10):
            while True:
                frame = await raw.receive_frame()
                if isinstance(frame, ControlFrame) and frame.message.get("re") == 2:
                    offer = frame.message["result"]
                    break
        assert offer["route"] == "tcp" and len(offer["token"]) == 32

        async def dial(identity: Any, token: bytes, server_key: Any = PLUGIN.public_key) -> bool:
            """True if the target kept the connection open after the token."""
            transport = await trio.open_tcp_stream(offer["host"], offer["port"])
            stream = SecureStream.client(transport, identity, server_key)
            try:
                with trio.fail_after(5):
                    await stream.do_handshake()
                    await stream.send_all(token)
                    with trio.move_on_after(0.3):
                        return await stream.receive_some() != b""
                    return True  # still open, nothing to read: accepted
            except (trio.BrokenResourceError, HandshakeError):
                return False
            finally:
                await trio.aclose_forcefully(stream)

        from bus.errors import HandshakeError

        assert not await dial(OWNER, offer["token"])  # a third party: not the announced opener
        assert not await dial(FRIEND, b"x" * 32)  # the right key, a wrong token
        assert not reached
        assert await dial(FRIEND, offer["token"])  # the opener itself
        with trio.fail_after(5):
            while not reached:
                await trio.sleep(0.01)
        with pytest.raises(OSError):  # the token worked once: the listener is gone
            await dial(FRIEND, offer["token"])
        assert len(reached) == 1
        await raw.aclose()


async def test_auto_falls_back_to_the_relay_when_the_direct_route_fails(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        # A target that offers an address nobody listens on.
        target = await raw_connect(rb.tcp_address, PLUGIN)
        await target.send_message({"op": "hello", "id": 1, "name": "org.example.Liar"})
        async with open_bus(rb.tcp_address, identity=FRIEND) as client:

            async def answer() -> None:
                while True:
                    frame = await target.receive_frame()
                    if isinstance(frame, ControlFrame) and frame.message.get("op") == "channel_request":
                        req = frame.message
                        if req["route"] == "tcp":
                            await target.send_message({"re": req["id"], "result": {"host": "127.0.0.1", "port": 9}})
                        else:
                            await target.send_message({"re": req["id"], "result": {}})
                            return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer)
                with pytest.raises(ChannelRejected, match="direct connection"):
                    await client.open_channel("org.example.Liar", route="direct")
                relayed = trio.Event()

                async def open_auto() -> None:
                    ch = await client.open_channel("org.example.Liar", route="auto")
                    assert ch.route == "relay"
                    relayed.set()
                    await trio.aclose_forcefully(ch)

                # auto tries the direct route, then asks again for a relay (the target accepts;
                # its handshake never comes, so we only check the route the broker granted).
                with trio.move_on_after(10):
                    await open_auto()
                nursery.cancel_scope.cancel()
        await target.aclose()


async def test_unix_fd_rejection_and_leftovers_close_the_passed_sockets(tmp_path: Path) -> None:
    async with pair(tmp_path, "unix", channel_timeout=0.5) as (rb, service, client):
        service.handle_channels("raw", echo, accept=lambda req: "busy")
        with pytest.raises(ChannelRejected, match="busy"):
            await client.open_channel("org.example.Echo")
        assert rb.broker._kept_ends == {}


async def test_unix_fd_peer_killed_breaks_the_other_end(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND) as client:
            async with open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Doomed") as doomed:
                ch = await _open_held(client, doomed, "auto")
                assert ch.route == "unix-fd"
            # The plugin is gone (its tasks cancelled, its sockets closed) without ending the
            # stream: the channel breaks, it does not read as a clean end of file.
            with trio.fail_after(5):
                with pytest.raises(trio.BrokenResourceError, match="truncated"):
                    await ch.receive_some()
            await ch.aclose()


@pytest.mark.parametrize("clogged", [False, True])
async def test_unix_fd_channel_conformance(tmp_path: Path, clogged: bool) -> None:
    async with pair(tmp_path, "unix") as (_, service, client):
        accepted = hand_over_channels(service)

        async def stream_maker() -> tuple[Channel, Channel]:
            ch = await client.open_channel("org.example.Echo", route="direct")
            return ch, await accepted.receive()

        async def clogged_stream_maker() -> tuple[Channel, Channel]:
            left, right = await stream_maker()
            for ch in (left, right):  # fill the socket both ways with plain bytes
                sock = ch.raw.socket  # type: ignore[attr-defined]
                while True:
                    try:
                        os.write(sock.fileno(), b"x" * 4096)
                    except BlockingIOError:
                        break
            return left, right

        await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker if clogged else None)


async def _clog_tcp(ch: Channel) -> None:
    """Fill a direct TCP channel with valid box-stream data until every send blocks.

    Loopback TCP appends a small write to the last unsent segment without checking for room,
    so a socket whose peer stopped reading still takes small writes.  Here every filling
    write is marked MSG_EOR (nothing may be appended to its segment) and TCP_NOTSENT_LOWAT
    is 1 (a new segment needs everything before it sent): once the peer's small receive
    buffer is full, nothing is sent, and every later write -- the suite's own -- blocks
    until the peer reads.  Each write is one box of 1 KiB, made only while poll() reports
    room, so it goes out whole (the boxes come from the channel's own encoder: the peer
    decodes them as ordinary data)."""
    import select
    import socket

    encoder = ch.secure._encoder
    assert encoder is not None
    # A plain socket object on the same connection, for send() with flags.
    with socket.socket(fileno=os.dup(ch.raw.socket.fileno())) as sock:  # type: ignore[attr-defined]
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 1)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        quiet = 0
        for _ in range(100_000):
            if poller.poll(0):
                quiet = 0
                box = encoder.encode(b"c" * 1024)
                assert sock.send(box, socket.MSG_EOR) == len(box)
            else:
                quiet += 1
                if quiet >= 10:  # nothing could be sent for 100 ms: the peer's window is shut
                    return
                await trio.sleep(0.01)
    raise AssertionError("the socket never filled up")


@pytest.mark.parametrize("clogged", [False, True])
async def test_direct_tcp_channel_conformance(tmp_path: Path, clogged: bool) -> None:
    import socket

    async with pair(tmp_path, "tcp") as (_, service, client):
        accepted = hand_over_channels(service)

        async def stream_maker() -> tuple[Channel, Channel]:
            ch = await client.open_channel("org.example.Echo", route="direct")
            return ch, await accepted.receive()

        async def clogged_stream_maker() -> tuple[Channel, Channel]:
            left, right = await stream_maker()
            for ch in (left, right):  # small fixed receive buffers: the window shuts soon
                ch.raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # type: ignore[attr-defined]
            await _clog_tcp(left)
            await _clog_tcp(right)
            return left, right

        await trio.testing.check_half_closeable_stream(stream_maker, clogged_stream_maker if clogged else None)


async def test_opener_vanishing_breaks_the_target_end(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Sink") as service:
            outcome: list[str] = []

            async def read(ch: Channel) -> None:
                try:
                    while await ch.receive_some():
                        pass
                    outcome.append("eof")
                except trio.BrokenResourceError as exc:
                    outcome.append(str(exc))

            service.handle_channels("raw", read)
            async with open_bus(rb.unix_address, identity=FRIEND) as opener:
                ch = await opener.open_channel("org.example.Sink", route="relay")
                await ch.send_all(b"y" * 100_000)
                assert opener._link is not None
                opener._link.framed.stream.transport.socket.close()  # type: ignore[attr-defined]
            with trio.fail_after(5):
                while not outcome:
                    await trio.sleep(0.01)
            assert "disconnected" in outcome[0]
            with trio.fail_after(10):
                while len(rb.broker.core.channels):
                    await trio.sleep(0.01)


# -- direct channels as the broker lists them ----------------------------------------------------


async def _listed(rb: RunningBroker, unique_id: str) -> list[dict[str, Any]]:
    conn = rb.broker.core.connections[int(unique_id[1:])]
    return rb.broker.core._channels_of(conn)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_direct_channels_are_listed_with_the_byte_counts_their_ends_report(
    tmp_path: Path, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clients.channel_routes

    monkeypatch.setattr(clients.channel_routes, "CHANNEL_REPORT_INTERVAL", 0.05)
    async with pair(tmp_path, transport) as (rb, service, client):
        accepted = hand_over_channels(service)
        ch = await client.open_channel("org.example.Echo", route="direct")
        route = "unix-fd" if transport == "unix" else "tcp"
        assert ch.route == route
        theirs = await accepted.receive()
        # Before any report the broker knows the channel, not its bytes.
        (mine,) = await _listed(rb, client.unique_id)
        assert (mine["route"], mine["opened_by"], mine["peer"], mine["reported"]) == (route, "self", service.unique_id, False)
        await ch.send_all(b"x" * 5000)
        got = 0
        while got < 5000:
            got += len(await theirs.receive_some())
        await theirs.send_all(b"y" * 300)
        assert len(await ch.receive_some()) == 300
        with trio.fail_after(10):
            while True:
                (mine,) = await _listed(rb, client.unique_id)
                (other,) = await _listed(rb, service.unique_id)
                if mine.get("bytes_out") == 5000 and other.get("bytes_in") == 5000 and other.get("bytes_out") == 300:
                    break
                await trio.sleep(0.02)
        assert mine["bytes_in"] == 300 and other["opened_by"] == "peer" and other["peer"] == client.unique_id
        # The status an admin sees over the bus carries the same entry.
        entry = await client.info(client.unique_id)
        assert [c["route"] for c in entry.channels] == [route]
        await ch.aclose()
        # One end's word does not free the other's budget: the record stays while the target
        # holds its end, and goes once both ends said they closed.
        my_half = (int(client.unique_id[1:]), mine["channel"])
        with trio.fail_after(10):
            while my_half not in rb.broker.core.direct[my_half].closed:
                await trio.sleep(0.02)
        assert await _listed(rb, service.unique_id)
        await theirs.aclose()
        with trio.fail_after(10):
            while await _listed(rb, client.unique_id) or await _listed(rb, service.unique_id):
                await trio.sleep(0.02)
        assert rb.broker.core.direct == {}


async def test_direct_channel_records_go_when_an_end_leaves_the_bus(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Echo") as service:
            accepted = hand_over_channels(service)
            async with open_bus(rb.unix_address, identity=FRIEND) as client:
                ch = await client.open_channel("org.example.Echo", route="direct")
                await accepted.receive()
                assert len(rb.broker.core.direct) == 2  # one record, under both halves
            # The opener left the bus (its channel may even live on): the broker forgets it.
            with trio.fail_after(10):
                while rb.broker.core.direct:
                    await trio.sleep(0.02)
            await trio.aclose_forcefully(ch)


async def test_channel_reports_that_do_not_fit_are_refused_and_the_connection_kept(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        conn = await raw_connect(rb.unix_address, FRIEND)
        await conn.send_message({"op": "hello", "id": 1})
        await conn.receive_frame()
        for rid, report in enumerate(
            [
                {"channel": 7, "bytes_in": 1, "bytes_out": 2},  # no such direct channel here
                {"channel": 7, "bytes_in": -1, "bytes_out": 2},
                {"channel": "7", "bytes_in": 1, "bytes_out": 2},
            ],
            start=2,
        ):
            await conn.send_message({"op": "channel_report", "id": rid, **report})
            frame = await conn.receive_frame()
            assert isinstance(frame, ControlFrame)
            assert frame.message["re"] == rid and frame.message["error"]["code"] == BadRequest.wire_code
        await conn.send_message({"op": "ping", "id": 9})
        frame = await conn.receive_frame()
        assert isinstance(frame, ControlFrame) and frame.message == {"re": 9, "result": {}}
        await conn.aclose()


# -- relay edge cases: tiny credit, empty frames, one big frame -----------------------------------


async def test_empty_data_frames_are_dropped_not_passed_on_as_an_end(tmp_path: Path) -> None:
    from bus.wire.frames import DataFrame, encode_data

    async with running_broker(tmp_path) as rb:
        opener, och, target, tch = await _raw_relay(rb)
        await target.send_message({"credit": 1000}, tch)
        await opener.stream.send_all(encode_data(och, b"") + encode_data(och, b"x") + encode_data(och, b""))
        await opener.send_message({"eof": True}, och)
        seen: list[Any] = []
        with trio.fail_after(10):
            while not (seen and seen[-1] == {"eof": True}):
                frame = await target.receive_frame()
                if isinstance(frame, DataFrame):
                    seen.append(frame.data)
                elif isinstance(frame, ControlFrame) and frame.channel == tch and "credit" not in frame.message:
                    seen.append(frame.message)
        assert seen == [b"x", {"eof": True}]  # no empty frame: a reader would take it for EOF
        for framed in (opener, target):
            await framed.aclose()


async def test_one_big_frame_within_credit_reaches_the_receiver_in_pieces(tmp_path: Path) -> None:
    """A frame as big as the credit allows must not make the receiver a 'slow consumer'."""
    from bus.core.broker import Limits
    from bus.wire.frames import DataFrame, encode_data

    async with running_broker(tmp_path, outbound_bytes=160 * 1024, limits=Limits(relay_credit=256 * 1024)) as rb:
        opener, och, target, tch = await _raw_relay(rb)
        await target.send_message({"credit": 256 * 1024}, tch)
        with trio.fail_after(10):  # the broker's grant: the channel's starting credit
            while not (isinstance(frame := await opener.receive_frame(), ControlFrame) and "credit" in frame.message):
                pass
        blob = os.urandom(frame.message["credit"])
        assert len(blob) == 64 * 1024  # a channel's starting credit: one whole relayed frame
        await opener.stream.send_all(encode_data(och, blob))
        got = bytearray()
        sizes = []
        with trio.fail_after(10):
            while len(got) < len(blob):
                frame = await target.receive_frame()
                assert frame is not None, "the broker disconnected the receiver"
                if isinstance(frame, DataFrame):
                    got += frame.data
                    sizes.append(len(frame.data))
        assert bytes(got) == blob and max(sizes) <= 64 * 1024
        for framed in (opener, target):
            await framed.aclose()


async def test_a_frame_that_comes_in_parts_is_passed_on_as_its_bytes_come(tmp_path: Path) -> None:
    """The broker holds no part of a DATA frame waiting for the rest: what came of it goes on
    at once (as a frame of its own; the channel's bytes are the same), so a sender that
    stalls inside a frame costs the broker nothing, and the rest follows when it comes."""
    from bus.wire.frames import DataFrame, encode_data

    async with running_broker(tmp_path) as rb:
        opener, och, target, tch = await _raw_relay(rb)
        await target.send_message({"credit": 64 * 1024}, tch)
        blob = os.urandom(40_000)
        wire = encode_data(och, blob)
        await opener.stream.send_all(wire[:25_010])  # the header and 25,000 bytes of the body
        got = bytearray()
        with trio.fail_after(10):
            while len(got) < 25_000:
                frame = await target.receive_frame()
                if isinstance(frame, DataFrame):
                    got += frame.data
        assert bytes(got) == blob[:25_000]  # (before the rest was sent)
        await opener.stream.send_all(wire[25_010:])
        with trio.fail_after(10):
            while len(got) < len(blob):
                frame = await target.receive_frame()
                if isinstance(frame, DataFrame):
                    got += frame.data
        assert bytes(got) == blob
        for framed in (opener, target):
            await framed.aclose()


async def _relayed_in_writes(opener: Channel, target: Channel, blob: bytes, send: Any) -> list[list[bytes]]:
    """Run ``send()`` (which sends ``blob`` on ``opener``, a relayed channel) while ``target``
    reads it all; the DATA frames of the channel in each write of the bus connection."""
    from bus.wire.frames import DataFrame, FrameDecoder

    relay = opener.raw
    assert isinstance(relay, RelayStream)
    writes: list[bytes] = []
    writer = relay._link.send
    real_send = writer.send_nowait

    def spy(frame: bytes) -> None:  # (the real write still happens)
        writes.append(bytes(frame))
        real_send(frame)

    writer.send_nowait = spy  # type: ignore[method-assign]
    got = bytearray()

    async def read() -> None:
        while len(got) < len(blob):
            got.extend(await target.receive_some())

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await send()
    writer.send_nowait = real_send  # type: ignore[method-assign]
    assert bytes(got) == blob
    decoder = FrameDecoder()
    per_write = []
    for write in writes:
        decoder.receive_data(write)
        per_write.append([bytes(f.data) for f in decoder if isinstance(f, DataFrame) and f.channel == relay.channel])
    return per_write


async def test_a_big_write_goes_out_as_64_kib_frames_several_to_a_write(tmp_path: Path) -> None:
    """RelayStream.send_all of a big write: DATA frames of at most MAX_DATA_FRAME and within
    the credit, as the protocol has them, but as many as the credit allows (up to SEND_BATCH
    bytes) handed to the bus connection as one write; the receiver gets the same bytes."""
    from clients.channels import MAX_DATA_FRAME, SEND_BATCH

    async with pair(tmp_path) as (_rb, service, client):
        accepted = hand_over_channels(service)
        opener = await client.open_channel("org.example.Echo", "raw", "relay")
        target = await accepted.receive()
        blob = os.urandom(3 * 1024 * 1024 + 12345)
        writes = await _relayed_in_writes(opener, target, blob, lambda: opener.send_all(blob))
        assert all(0 < len(frame) <= MAX_DATA_FRAME for frames in writes for frame in frames)
        assert all(sum(map(len, frames)) <= SEND_BATCH for frames in writes)
        assert b"".join(frame for frames in writes for frame in frames) == blob
        assert max(map(len, writes)) > 1  # (the credit allowed several at once, at least once)


@pytest.mark.parametrize("credit", [1, 1000, 24 * 1024, 40 * 1024])
async def test_small_relay_credit_never_stalls_a_sender(tmp_path: Path, credit: int) -> None:
    """The broker returns credit in batches of half its cap; the sender never waits for more."""
    from bus.core.broker import Limits

    async with pair(tmp_path, "unix", limits=Limits(relay_credit=credit)) as (_, service, client):
        accepted = hand_over_channels(service)
        ch = await client.open_channel("org.example.Echo", route="relay")
        theirs = await accepted.receive()
        # (At a credit of 1 byte every byte is a frame and a credit message: smaller sends
        # prove the same and keep the test short on a loaded machine.)
        sizes = [8 * 1024, 20000, 1, 70000, 3] if credit > 1 else [800, 2000, 1, 7000, 3]
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    for size in sizes:
                        await ch.send_all(b"s" * size)
                    await ch.send_eof()

                nursery.start_soon(send)
                got = 0
                while data := await theirs.receive_some():
                    got += len(data)
        assert got == sum(sizes)
        await ch.aclose()


async def test_direct_records_go_when_the_opener_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clients.channel_routes
    from clients.channel_routes import ChannelRoutes

    monkeypatch.setattr(clients.channel_routes, "DIRECT_TIMEOUT", 1.0)
    async with pair(tmp_path, "tcp") as (rb, service, client):
        service.handle_channels("raw", echo)

        async def stalled(self: ChannelRoutes, result: dict[str, Any], protocol: str) -> Channel:
            await trio.sleep_forever()  # a dial that never gets anywhere; the caller gives up
            raise AssertionError

        with monkeypatch.context() as patched:
            patched.setattr(ChannelRoutes, "_dial_direct", stalled)
            with trio.move_on_after(0.5):
                await client.open_channel("org.example.Echo", route="direct")
        with trio.fail_after(10):  # the opener reports it; the target's listener gives up too
            while rb.broker.core.direct:
                await trio.sleep(0.02)
        # A caller that gives up before the broker even answers: nothing is left behind either.
        for _ in range(5):
            with trio.move_on_after(0):
                await client.open_channel("org.example.Echo", route="direct")
        with trio.fail_after(10):
            while rb.broker.core.direct:
                await trio.sleep(0.02)


# -- fd passing asked where it cannot work -------------------------------------------------------


async def test_no_descriptor_passing_with_an_end_on_tcp_or_encrypted_unix(tmp_path: Path) -> None:
    """A descriptor cannot cross TCP (nor an encrypted Unix connection): "direct" between such
    ends is the tcp route, never unix-fd, and it works."""
    async with running_broker(tmp_path) as rb:
        async with (
            open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Echo") as service,
            open_bus(rb.tcp_address, identity=FRIEND) as over_tcp,
        ):
            service.handle_channels("raw", echo)
            ch = await over_tcp.open_channel("org.example.Echo", route="direct")
            assert ch.route == "tcp" and ch.encrypted
            assert await round_trip(ch, b"across") == b"across"
            await ch.aclose()
    async with running_broker(tmp_path / "enc", encrypt_unix=True) as rb:
        async with (
            open_bus(rb.unix_address, identity=PLUGIN, name="org.example.Echo") as service,
            open_bus(rb.unix_address, identity=FRIEND) as client,
        ):
            service.handle_channels("raw", echo)
            ch = await client.open_channel("org.example.Echo", route="direct")
            assert ch.route == "tcp"
            assert await round_trip(ch, b"local") == b"local"
            await ch.aclose()
            relayed = await client.open_channel("org.example.Echo", route="relay")
            assert relayed.encrypted  # the operator asked for encryption on the Unix socket too
            assert await round_trip(relayed, b"relayed") == b"relayed"
            await relayed.aclose()


async def test_a_unix_fd_offer_without_a_descriptor_is_refused_not_trusted(tmp_path: Path) -> None:
    """A broker (or anything speaking for it) that offers the unix-fd route over a connection
    that cannot carry descriptors gets a refusal; the target stays up."""
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.tcp_address, identity=PLUGIN, name="org.example.Echo") as service:
            service.handle_channels("raw", echo)
            link = service._link
            assert link is not None
            from bus.wire.messages import Request

            request = Request(
                "channel_request",
                999,
                {
                    "channel": 77,
                    "protocol": "raw",
                    "route": "unix-fd",
                    "encrypted": False,
                    "name": "org.example.Echo",
                    "opener": {"unique_id": ":9", "identity": FRIEND.id, "names": []},
                },
            )
            answer = service._routes._channel_request(link, request)
            assert answer is not None and answer["error"]["code"] == ChannelRejected.wire_code
            assert "did not arrive" in answer["error"]["message"]
            await service.ping()  # still connected and served


async def test_push_delivery_hands_over_what_was_buffered_then_everything_else(tmp_path: Path) -> None:
    """Channel.deliver_to on a relayed channel: buffered data first, then each frame as it
    comes, credit back as it is taken, then the end; receive_some is taken from then on."""
    async with pair(tmp_path) as (_rb, service, client):
        accepted = hand_over_channels(service)
        opener = await client.open_channel("org.example.Echo", "raw", "relay")
        target = await accepted.receive()
        relay = opener.raw
        assert isinstance(relay, RelayStream)
        handshake = relay.bytes_in
        await target.send_all(b"early")
        with trio.fail_after(10):
            while relay.bytes_in < handshake + 5:  # arrived and buffered, nobody reading yet
                await trio.sleep(0.01)
        got: list[bytes] = []
        ends: list[Exception | None] = []
        ended = trio.Event()

        def on_end(error: Exception | None) -> None:
            ends.append(error)
            ended.set()

        assert opener.deliver_to(got.append, on_end)
        assert got == [b"early"]  # handed over before deliver_to returned
        with pytest.raises(trio.BusyResourceError):
            await opener.receive_some()
        blob = os.urandom(3 * relay.window)  # more than the window: credit must come back
        await target.send_all(blob)
        await target.send_eof()
        with trio.fail_after(10):
            await ended.wait()
        assert b"".join(got) == b"early" + blob and ends == [None]
        assert opener.bytes_in == 5 + len(blob)


@pytest.mark.parametrize("views", [False, True])
async def test_push_delivery_with_views_hands_over_the_same_bytes(tmp_path: Path, views: bool) -> None:
    """deliver_to(views=True): frames that lay in one read of the bus connection come as views
    of it (no copy), valid during the call; the bytes are the same as with copies, in order,
    and what was buffered before (kept by the channel) comes as bytes.  Without views every
    piece is bytes of its own.  Frames of every size, from 1 byte to more than a relayed
    frame, so that some lie inside a read and some straddle two."""
    async with pair(tmp_path) as (_rb, service, client):
        accepted = hand_over_channels(service)
        opener = await client.open_channel("org.example.Echo", "raw", "relay")
        target = await accepted.receive()
        relay = opener.raw
        assert isinstance(relay, RelayStream)
        handshake = relay.bytes_in
        await target.send_all(b"early")
        with trio.fail_after(10):
            while relay.bytes_in < handshake + 5:
                await trio.sleep(0.01)
        got: list[bytes] = []
        kinds: set[type] = set()
        ended = trio.Event()

        def take(data: bytes | memoryview) -> None:
            kinds.add(type(data))
            got.append(bytes(data))  # (a view is valid only now: copied)

        assert opener.deliver_to(take, lambda error: ended.set(), views=views)
        assert got == [b"early"] and kinds == {bytes}
        blob = os.urandom(3 * relay.window)
        pos = 0
        for size in (1, 100, 5000, 65536, 70000, 300, 200_000, 7):
            await target.send_all(blob[pos : pos + size])
            pos += size
        await target.send_all(blob[pos:])
        await target.send_eof()
        with trio.fail_after(10):
            await ended.wait()
        assert b"".join(got) == b"early" + blob
        assert kinds == ({bytes, memoryview} if views else {bytes})


async def test_push_delivery_with_a_bigger_window_grants_the_difference_at_once(tmp_path: Path) -> None:
    """deliver_to(window=W): the end grants W minus its window at once (the broker may write
    W bytes to it unread), then credit goes back per half of W; the bytes are as sent."""
    async with pair(tmp_path) as (rb, service, client):
        accepted = hand_over_channels(service)
        opener = await client.open_channel("org.example.Echo", "raw", "relay")
        target = await accepted.receive()
        relay = opener.raw
        assert isinstance(relay, RelayStream)
        first = relay.window
        core = rb.broker.core

        def window_at_broker() -> int:
            """The most the broker may write on, of both directions (the target's window is
            the first one, so more than that is the opener's)."""
            assert len(core.channels) == 1
            (ch,) = {ch.id: ch for conn in list(rb.broker.sessions) for ch in core.channels.of_connection(conn)}.values()
            return max(ch.a_to_b.dst_window, ch.b_to_a.dst_window)

        got: list[bytes] = []
        ended = trio.Event()
        opener.deliver_to(lambda data: got.append(bytes(data)), lambda error: ended.set(), views=True, window=4 * first)
        assert relay.window == 4 * first
        with trio.fail_after(10):
            while window_at_broker() <= first:  # (the opener's grant of 3 x first more, on its way)
                await trio.sleep(0.01)
        assert window_at_broker() > 3 * first
        blob = os.urandom(10 * first)
        await target.send_all(blob)
        await target.send_eof()
        with trio.fail_after(10):
            await ended.wait()
        assert b"".join(got)[-len(blob):] == blob
        # Credit went back per half of the bigger window: what the broker may still write is
        # at most the window (never beyond what was granted).
        assert window_at_broker() <= 4 * first


async def test_push_delivery_a_consumer_refusing_the_bytes_resets_the_channel(tmp_path: Path) -> None:
    async with pair(tmp_path) as (_rb, service, client):
        accepted = hand_over_channels(service)
        opener = await client.open_channel("org.example.Echo", "raw", "relay")
        target = await accepted.receive()
        ends: list[Exception | None] = []

        def refuse(data: bytes) -> None:
            raise ValueError(f"no thanks to {data!r}")

        assert opener.deliver_to(refuse, ends.append)
        await target.send_all(b"junk")
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="bad data: no thanks"):
            while await target.receive_some():
                pass
        [error] = ends
        assert isinstance(error, trio.BrokenResourceError) and "ValueError: no thanks to b'junk'" in str(error)
        # Closing locally ends delivery too (once), as a read would have: ClosedResourceError.
        other = await client.open_channel("org.example.Echo", "raw", "relay")
        await accepted.receive()  # (its target end)
        closed: list[Exception | None] = []
        assert other.deliver_to(lambda data: None, closed.append)
        await other.aclose()
        assert len(closed) == 1 and isinstance(closed[0], trio.ClosedResourceError)
        # An end callback that raises is logged; the bus connection and its channels go on.
        third = await client.open_channel("org.example.Echo", "raw", "relay")
        far = await accepted.receive()

        def bad_end(error: Exception | None) -> None:
            raise RuntimeError("oops")

        assert third.deliver_to(lambda data: None, bad_end)
        await far.send_eof()
        fourth = await client.open_channel("org.example.Echo", "raw", "relay")
        await (await accepted.receive()).send_all(b"still here")
        with trio.fail_after(10):
            assert await fourth.receive_some() == b"still here"
        # A route without push says so.
        direct = await client.open_channel("org.example.Echo", "raw", "direct")
        assert direct.route == "unix-fd" and not direct.deliver_to(lambda data: None, closed.append)
        await direct.aclose()


def _small_views_of_big_reads(min_size: int) -> list[tuple[int, int]]:
    """(view size, read size) of every live memoryview under 1 KiB into a bytes of at least
    ``min_size``: a frame's view keeping a whole read alive."""
    found = []
    for obj in gc.get_objects():
        if type(obj) is memoryview:
            try:
                base = obj.obj
            except ValueError:
                continue  # (released)
            if type(base) is bytes and len(base) >= min_size and len(obj) < 1024:
                found.append((len(obj), len(base)))
    return found


async def test_an_idle_bus_connection_keeps_no_read_alive_through_a_small_view(tmp_path: Path) -> None:
    """A burst whose first frame is a small DATA frame (a view of the read), then 200 KiB: once
    the application has read it all and everyone waits, no view of a big read is alive (the
    bus connection's reader let its last frame go before waiting)."""
    big = 200 * 1024
    async with pair(tmp_path) as (_rb, service, client):
        accepted = hand_over_channels(service)
        channel = await client.open_channel("org.example.Echo", route="relay")
        served = await accepted.receive()
        await trio.sleep(0.1)
        relay = channel._io
        assert isinstance(relay, RelayStream)
        writer = relay._link.send
        writer.cork()  # (one write to the broker, which writes them on in one burst)
        assert relay.send_some_nowait(b"0123456789") == 10
        sent = 10 + relay.send_some_nowait(b"z" * big)
        writer.uncork()
        got = 0
        with trio.fail_after(5):
            while got < sent and (data := await served.receive_some()):
                got += len(data)
                del data
        await trio.sleep(0.2)  # (everyone idle, waiting for their next read)
        gc.collect()
        assert _small_views_of_big_reads(32 * 1024) == []


async def test_frames_sent_straight_to_the_relay_and_the_usual_way_keep_order_and_counts(tmp_path: Path) -> None:
    """A relayed channel's FrameWriter sends a frame that fits the credit straight to the relay
    (``direct``, from ``Channel.whole_frame_sender``) and anything else the usual way: with a
    slow reader, so that the credit runs out mid-burst and comes back, 300 frames of 10 B to
    600 kB arrive whole and in order, both ways are taken, and the channel counts every byte
    once on each side.  (From a review.)"""
    service = Service("org.example.Sink")
    got: list[int] = []
    done = trio.Event()
    server: list[Channel] = []

    @service.channel("raw")
    async def raw(channel: Channel) -> None:
        server.append(channel)
        framed = FramedStream(channel)
        while (frame := await framed.receive_frame()) is not None:
            if isinstance(frame, ControlFrame):
                got.append(frame.message["n"])
            if len(got) % 7 == 0:
                await trio.sleep(0.01)  # slow: the sender's credit runs out now and then
        done.set()

    rng = random.Random(5)
    sizes = [rng.choice([10, 100, 3000, 20_000, 70_000, 130_000, 600_000]) for _ in range(300)]
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN, name=service.name) as sbus:
            service.attach(sbus)
            async with open_bus(rb.unix_address, identity=FRIEND) as bus, trio.open_nursery() as nursery:
                nursery.cancel_scope.deadline = trio.current_time() + 120
                channel = await bus.open_channel(service.name, "raw", "relay")
                assert isinstance(channel.raw, RelayStream) and not channel.encrypted
                writer = FrameWriter(channel.secure, max_frames=8)
                direct = channel.whole_frame_sender()
                assert direct is not None
                taken_direct = 0

                def counting(frame: bytes) -> bool:
                    nonlocal taken_direct
                    taken = direct(frame)
                    taken_direct += taken
                    return taken

                writer.direct = counting
                nursery.start_soon(writer.run)
                before = channel.bytes_out
                total = 0
                for n, size in enumerate(sizes):
                    if size < 60_000:
                        frame = encode_control(0, {"n": n, "pad": b"x" * size})
                    else:  # over the control limit: a DATA frame of the channel after it
                        frame = encode_control(0, {"n": n}) + encode_data(0, b"y" * size)
                    total += len(frame)
                    await writer.put(frame)
                    if n % 11 == 0:
                        await trio.sleep(0)
                writer.finish()
                with trio.fail_after(60):
                    while writer.queued_bytes:
                        await trio.sleep(0.01)
                await channel.send_eof()
                with trio.fail_after(60):
                    await done.wait()
                assert got == list(range(len(sizes)))
                assert channel.bytes_out - before == total
                assert server[0].bytes_in == total
                assert 0 < taken_direct < len(sizes)  # both ways were taken
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("credit", [None, 24 * 1024])
async def test_pieces_go_out_as_send_all_would_send_them_joined(tmp_path: Path, credit: int | None) -> None:
    """RelayStream.send_pieces (a large RPC message given as pieces): the receiver gets the
    bytes of the pieces in order, as if joined, whatever their sizes (empty ones, one byte,
    pieces across frame and write bounds, views); every frame is at most MAX_DATA_FRAME and
    every write of the bus connection within SEND_BATCH, with the broker's credit small or
    not; the pieces themselves are never joined whole."""
    from bus.core.broker import Limits

    from clients.channels import MAX_DATA_FRAME, SEND_BATCH

    limits = Limits() if credit is None else Limits(relay_credit=credit)
    async with pair(tmp_path, "unix", limits=limits) as (_rb, service, client):
        accepted = hand_over_channels(service)
        opener = await client.open_channel("org.example.Echo", "raw", "relay")
        target = await accepted.receive()
        rng = random.Random(7)
        big = os.urandom(300_000)
        pieces: list[bytes | memoryview] = [b"", b"h", os.urandom(10), big, b"", memoryview(big)[5:70_000], os.urandom(65_536), b"t"]
        pieces += [os.urandom(rng.randrange(1, 5000)) for _ in range(40)]
        blob = b"".join(pieces) + b"after"

        async def send() -> None:
            await opener.secure.send_pieces(pieces, len(blob) - 5)
            await opener.send_all(b"after")  # (and the channel goes on as ever)

        writes = await _relayed_in_writes(opener, target, blob, send)
        assert opener.bytes_out == len(blob)
        assert all(0 < len(frame) <= MAX_DATA_FRAME for frames in writes for frame in frames)
        assert all(sum(map(len, frames)) <= SEND_BATCH for frames in writes)
        assert b"".join(frame for frames in writes for frame in frames) == blob
        assert max(sum(map(len, frames)) for frames in writes) < len(blob) - 5  # (never the whole, joined)


async def test_pieces_are_refused_as_send_all_refuses(tmp_path: Path) -> None:
    """send_pieces after send_eof, after close, or while another send is under way, fails as
    send_all fails."""
    async with pair(tmp_path) as (_rb, service, client):
        accepted = hand_over_channels(service)
        opener = await client.open_channel("org.example.Echo", "raw", "relay")
        await accepted.receive()
        relay = opener.raw
        assert isinstance(relay, RelayStream)
        relay._send_busy = True
        with pytest.raises(trio.BusyResourceError):
            await relay.send_pieces([b"x"], 1)
        relay._send_busy = False
        await opener.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await opener.secure.send_pieces([b"x"], 1)
        await opener.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await relay.send_pieces([b"x"], 1)
