"""The client library against scripted brokers: deadlines and requests lost in flight."""

from __future__ import annotations

import math

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from bus.errors import ConnectionLost
from bus.io.framed import FramedStream
from bus.io.secure import SecureStream
from bus.wire.address import Endpoint, format_address
from bus.wire.frames import ControlFrame
from bus.wire.identity import Identity
from clients import link
from clients.bus import CannotConnect, RequestTimeout, open_bus

BROKER = Identity.generate()
CLIENT = Identity.generate()

Script = Callable[[FramedStream], Awaitable[None]]


async def scripted_broker(nursery: trio.Nursery, tmp: Path, script: Script) -> str:
    """A Unix listener that completes the handshake, answers hello, then runs ``script``."""
    path = tmp / "scripted.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    listener = trio.SocketListener(sock)

    async def handle(transport: trio.SocketStream) -> None:
        stream = SecureStream.server(transport, BROKER, encrypted=False)
        await stream.do_handshake()
        framed = FramedStream(stream)
        frame = await framed.receive_frame()
        assert isinstance(frame, ControlFrame) and frame.message["op"] == "hello"
        await framed.send_message({"re": frame.message["id"], "result": {"unique_id": ":1", "identity": CLIENT.id}})
        try:
            await script(framed)
        finally:
            await trio.aclose_forcefully(stream)

    nursery.start_soon(trio.serve_listeners, handle, [listener])
    return format_address([Endpoint("unix", BROKER.public_key, path=str(path))])


async def test_a_request_without_reply_times_out(tmp_path: Path) -> None:
    async def silent(framed: FramedStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        address = await scripted_broker(nursery, tmp_path, silent)
        async with open_bus(address, identity=CLIENT, reconnect=False, request_timeout=0.5) as bus:
            with pytest.raises(RequestTimeout, match="within 0.5 s"):
                await bus.request("list_names")
        nursery.cancel_scope.cancel()


async def test_requests_in_flight_fail_when_the_connection_drops_and_are_not_replayed(tmp_path: Path) -> None:
    received: list[str] = []

    async def hang_up_on_request(framed: FramedStream) -> None:
        frame = await framed.receive_frame()
        assert isinstance(frame, ControlFrame)
        received.append(frame.message["op"])
        # close without answering

    async with trio.open_nursery() as nursery:
        address = await scripted_broker(nursery, tmp_path, hang_up_on_request)
        async with open_bus(address, identity=CLIENT, reconnect=True) as bus:
            with pytest.raises(ConnectionLost):
                await bus.request("release_name", name="org.example.X")
            # The client reconnects (the scripted broker accepts again) but does not replay.
            with trio.fail_after(10):
                while not bus.reconnects:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
        assert received == ["release_name"]
        nursery.cancel_scope.cancel()


async def _listener(tmp: Path, name: str) -> tuple[trio.SocketListener, str]:
    path = tmp / name
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    return trio.SocketListener(sock), str(path)


async def test_one_deadline_for_dial_handshake_and_hello(tmp_path: Path) -> None:
    """connect_timeout bounds the whole connect; the error says what it waited for, and the
    client's socket is closed either way."""
    ends: list[bytes] = []

    async def no_handshake(transport: trio.SocketStream) -> None:
        async with transport:
            ends.append(await transport.receive_some())  # msg1, then what the client does next
            ends.append(await transport.receive_some())

    async def no_hello_answer(transport: trio.SocketStream) -> None:
        stream = SecureStream.server(transport, BROKER, encrypted=False)
        async with stream:
            await stream.do_handshake()
            framed = FramedStream(stream)
            frame = await framed.receive_frame()
            assert isinstance(frame, ControlFrame) and frame.message["op"] == "hello"
            ends.append(await stream.receive_some())

    for handler, expected in ((no_handshake, "cannot connect to the bus within 0.5 s"), (no_hello_answer, "did not answer hello within 0.5 s")):
        ends.clear()
        async with trio.open_nursery() as nursery:
            listener, path = await _listener(tmp_path, f"{handler.__name__}.sock")
            nursery.start_soon(trio.serve_listeners, handler, [listener])
            address = format_address([Endpoint("unix", BROKER.public_key, path=path)])
            with trio.fail_after(10):
                with pytest.raises(CannotConnect, match=expected):
                    async with open_bus(address, identity=CLIENT, reconnect=False, connect_timeout=0.5):
                        raise AssertionError("connected")
                while not ends or ends[-1] != b"":
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("handshake_timeout, connect_timeout", [(0.3, 5.0), (1.0, 1.0)])
async def test_a_stalled_endpoint_gives_way_to_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handshake_timeout: float, connect_timeout: float
) -> None:
    """With several endpoints, one whose handshake stalls is left after its share of the
    connect deadline (at most the handshake's own timeout); the next one is tried within the
    same deadline -- also when the two timeouts are equal, as by default."""
    monkeypatch.setattr(link, "DEFAULT_HANDSHAKE_TIMEOUT", handshake_timeout)

    async def stall(transport: trio.SocketStream) -> None:
        async with transport:
            await trio.sleep_forever()

    async def fine(framed: FramedStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listener, path = await _listener(tmp_path, "stall.sock")
        nursery.start_soon(trio.serve_listeners, stall, [listener])
        good = await scripted_broker(nursery, tmp_path, fine)
        address = format_address([Endpoint("unix", BROKER.public_key, path=path)]) + ";" + good
        with trio.fail_after(10):
            async with open_bus(address, identity=CLIENT, reconnect=False, connect_timeout=connect_timeout) as bus:
                assert bus.endpoint is not None and bus.endpoint.path == str(tmp_path / "scripted.sock")
                assert bus.unique_id == ":1"
        nursery.cancel_scope.cancel()


async def test_a_late_hello_answer_is_read(tmp_path: Path) -> None:
    """The client waits for the socket before reading hello's answer: one that comes late
    (and in two pieces) is read whole."""

    async def handle(transport: trio.SocketStream) -> None:
        stream = SecureStream.server(transport, BROKER, encrypted=False)
        async with stream:
            await stream.do_handshake()
            framed = FramedStream(stream)
            frame = await framed.receive_frame()
            assert isinstance(frame, ControlFrame)
            answer = framed.encode_message({"re": frame.message["id"], "result": {"unique_id": ":7", "identity": CLIENT.id}})
            await trio.sleep(0.2)
            await stream.send_all(answer[:5])
            await trio.sleep(0.1)
            await stream.send_all(answer[5:])
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listener, path = await _listener(tmp_path, "late.sock")
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        address = format_address([Endpoint("unix", BROKER.public_key, path=path)])
        with trio.fail_after(10):
            async with open_bus(address, identity=CLIENT, reconnect=False) as bus:
                assert bus.unique_id == ":7"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("timeout", [math.inf, math.nan, 0.0, -1.0])
async def test_connecting_needs_a_finite_deadline(timeout: float) -> None:
    """Every wait on a peer has a deadline: a connect timeout that is not a positive finite
    number of seconds is refused before anything is dialled."""
    with pytest.raises(ValueError, match="connect_timeout must be a positive number"):
        address = format_address([Endpoint("unix", BROKER.public_key, path="/nonexistent")])
        async with open_bus(address, identity=CLIENT, connect_timeout=timeout):
            pass


async def test_a_failed_handshake_closes_its_stream_and_frees_it_without_a_garbage_collection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that answers msg1 with garbage: the connect fails with the handshake's reason,
    the client's end is closed (the broker reads its end of stream), and the client's
    SecureStream is closed and freed by reference counting alone (its error's tracebacks, which
    hold the stream's frames, are dropped)."""
    import gc
    import weakref

    ends: list[bytes] = []
    made: list[weakref.ref[SecureStream]] = []
    closed: list[bool] = []
    real_client = SecureStream.client

    def client(*args: object, **kwargs: object) -> SecureStream:
        stream = real_client(*args, **kwargs)  # type: ignore[arg-type]
        ref = weakref.ref(stream)
        made.append(ref)

        def close_nowait() -> bool:  # (holds the stream weakly: no cycle of the test's own)
            closed.append(True)
            stream = ref()
            assert stream is not None
            return SecureStream.close_nowait(stream)

        stream.close_nowait = close_nowait  # type: ignore[method-assign]
        return stream

    monkeypatch.setattr(link.SecureStream, "client", client)

    async def garbage(transport: trio.SocketStream) -> None:
        async with transport:
            await transport.receive_some()  # msg1
            await transport.send_all(bytes(64))  # not a msg2
            ends.append(await transport.receive_some())

    async with trio.open_nursery() as nursery:
        listener, path = await _listener(tmp_path, "garbage.sock")
        nursery.start_soon(trio.serve_listeners, garbage, [listener])
        address = format_address([Endpoint("unix", BROKER.public_key, path=path)])
        gc.collect()
        gc.disable()
        try:
            with trio.fail_after(10):
                with pytest.raises(CannotConnect, match="handshake failed"):
                    async with open_bus(address, identity=CLIENT, reconnect=False):
                        raise AssertionError("connected")
            assert len(made) == 1 and closed == [True]
            assert made[0]() is None  # (freed: no cycle left for the collector)
        finally:
            gc.enable()
        with trio.fail_after(10):
            while ends != [b""]:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_the_connect_deadline_ends_with_the_connect(tmp_path: Path) -> None:
    """open_bus puts connect_timeout's deadline on the bus's own nursery while it connects:
    once connected, the block and the bus's tasks run without it (a block longer than the
    connect timeout is not cut short, and the bus still answers)."""

    async def answer_pings(framed: FramedStream) -> None:
        while (frame := await framed.receive_frame()) is not None:
            assert isinstance(frame, ControlFrame)
            await framed.send_message({"re": frame.message["id"], "result": {}})

    async with trio.open_nursery() as nursery:
        address = await scripted_broker(nursery, tmp_path, answer_pings)
        with trio.fail_after(10):
            async with open_bus(address, identity=CLIENT, reconnect=False, connect_timeout=0.3) as bus:
                await trio.sleep(0.6)
                await bus.ping()
                assert trio.current_effective_deadline() > trio.current_time() + 5
        nursery.cancel_scope.cancel()


async def test_an_outer_cancellation_during_the_connect_stays_a_cancellation(tmp_path: Path) -> None:
    """A scope around open_bus that is cancelled while the broker has not answered hello ends
    the connect as a cancellation (that scope takes it), not as the connect's timeout."""
    ends: list[bytes] = []

    async def no_hello_answer(transport: trio.SocketStream) -> None:
        stream = SecureStream.server(transport, BROKER, encrypted=False)
        async with stream:
            await stream.do_handshake()
            ends.append(await stream.receive_some())  # hello
            ends.append(await stream.receive_some())  # the client's end

    async with trio.open_nursery() as nursery:
        listener, path = await _listener(tmp_path, "outer.sock")
        nursery.start_soon(trio.serve_listeners, no_hello_answer, [listener])
        address = format_address([Endpoint("unix", BROKER.public_key, path=path)])
        with trio.move_on_after(0.3) as outer:
            async with open_bus(address, identity=CLIENT, reconnect=False, connect_timeout=5):
                raise AssertionError("connected")
        assert outer.cancelled_caught
        with trio.fail_after(10):
            while len(ends) < 2:
                await trio.sleep(0.01)
        assert ends[-1] == b""  # (its socket was closed)
        nursery.cancel_scope.cancel()
