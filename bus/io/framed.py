"""Frames over a byte stream (trio): receive decoded frames, send encoded ones.

A :class:`FramedStream` owns a :class:`~bus.wire.frames.FrameDecoder` and reads from the
stream only when the decoder needs more bytes.  Sending is not locked here: each user keeps
exactly one task that sends (the broker's and the client's writer tasks), which also means a
cancelled caller can never leave half a frame on the wire.
"""

from __future__ import annotations

from typing import Any

import trio

from ..wire.frames import DEFAULT_MAX_CONTROL, DEFAULT_MAX_FRAME, Frame, FrameDecoder, encode_control

__all__ = ["FramedStream"]

_RECEIVE_SIZE = 1 << 18  # a whole 64 KiB data frame and more in one read


class FramedStream:
    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_control: int = DEFAULT_MAX_CONTROL,
        receive_stream: trio.abc.ReceiveStream | None = None,
    ) -> None:
        self.stream = stream
        # Where frames are read from: ``stream`` unless a layer below it may be read directly
        # (a plain SecureStream's transport, see SecureStream.plain_transport).
        self._receive_stream = receive_stream or stream
        self.max_frame = max_frame
        self.max_control = max_control
        self._decoder = FrameDecoder(max_frame, max_control)

    async def receive_frame(self) -> Frame | None:
        """The next frame, or ``None`` at a clean end of stream.

        Raises :class:`~bus.errors.FrameError` for a framing violation (the stream is then
        out of sync) and trio's stream errors for a broken transport.
        """
        decoder = self._decoder
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            data = await self._receive_stream.receive_some(_RECEIVE_SIZE)
            if not data:
                decoder.end_of_input()
                return None
            decoder.receive_data(data)

    def encode_message(self, message: dict[str, Any], channel: int = 0) -> bytes:
        return encode_control(channel, message, self.max_control)

    async def send_message(self, message: dict[str, Any], channel: int = 0) -> None:
        await self.stream.send_all(self.encode_message(message, channel))

    async def aclose(self) -> None:
        await self.stream.aclose()
