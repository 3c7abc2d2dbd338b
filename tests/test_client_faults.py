"""The client library against scripted brokers: deadlines and requests lost in flight."""

from __future__ import annotations

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
from clients.bus import RequestTimeout, open_bus

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
