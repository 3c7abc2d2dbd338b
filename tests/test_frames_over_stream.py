"""Frames carried by a SecureStream over real sockets, including hostile frames inside box-stream."""

from __future__ import annotations

import pytest
import trio

from bus.errors import FrameError, FrameTooLarge
from bus.io.secure import SecureStream
from bus.io.testing import secure_stream_pair, tcp_stream_pair
from bus.io.testing import unix_stream_pair as unix_socket_stream_pair
from bus.wire.frames import HEADER, ControlFrame, DataFrame, FrameDecoder, encode_control, encode_data
from bus.wire.identity import Identity


SERVER = Identity.generate()
CLIENT = Identity.generate()


async def connected(encrypted: bool, tcp: bool) -> tuple[SecureStream, SecureStream]:
    transports = await tcp_stream_pair() if tcp else unix_socket_stream_pair()
    return await secure_stream_pair(transports, CLIENT, SERVER, encrypted=encrypted)


async def read_frames(stream: SecureStream, decoder: FrameDecoder, count: int) -> list[object]:
    frames: list[object] = []
    while len(frames) < count:
        data = await stream.receive_some()
        if not data:
            decoder.end_of_input()
            break
        decoder.receive_data(data)
        frames.extend(decoder)
    return frames


@pytest.mark.parametrize(("encrypted", "tcp"), [(True, True), (False, False), (True, False)])
async def test_frames_round_trip_over_secure_stream(encrypted: bool, tcp: bool) -> None:
    client, server = await connected(encrypted, tcp)
    sent = [ControlFrame(0, {"op": "hello", "id": 1, "name": "org.example.Echo"}), DataFrame(5, b"x" * 200_000), ControlFrame(5, {"credit": 65536})]
    wire = b"".join(
        encode_control(f.channel, f.message) if isinstance(f, ControlFrame) else encode_data(f.channel, f.data)
        for f in sent
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, wire)
        assert await read_frames(server, FrameDecoder(), len(sent)) == sent
    await client.aclose()
    await server.aclose()


async def test_oversized_frame_inside_box_stream_is_refused_early() -> None:
    client, server = await connected(encrypted=True, tcp=True)
    await client.send_all(HEADER.pack(2, 0, 1, 50 * 1024 * 1024) + b"start of a huge body")
    decoder = FrameDecoder(max_body=1 << 20)
    with pytest.raises(FrameTooLarge):
        await read_frames(server, decoder, 1)
    assert decoder.buffered == 0
    await client.aclose()
    await server.aclose()


async def test_garbage_frame_inside_box_stream_is_a_frame_error() -> None:
    client, server = await connected(encrypted=True, tcp=True)
    await client.send_all(b"\x09garbage that is no frame")
    with pytest.raises(FrameError, match="unknown frame kind 9"):
        await read_frames(server, FrameDecoder(), 1)
    await client.aclose()
    await server.aclose()
