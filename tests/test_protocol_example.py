"""docs/session-example.md cannot go stale: a fresh run must give it byte for byte, and every
frame on it must decode with the real frame decoder (tools/session_example.py makes it)."""

from __future__ import annotations

import re

import cbor2

from bus.wire.boxstream import HEADER_SIZE as BOX_HEADER
from bus.wire.frames import HEADER, ControlFrame, DataFrame, FrameDecoder
from bus.wire.shs import CLIENT_AUTH_SIZE, HELLO_SIZE, SERVER_ACCEPT_SIZE
from tools.session_example import DOCUMENT, cbor_diagnostic, generate

_BLOCK = re.compile(r"^```(\S+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer(DOCUMENT.read_text(encoding="utf-8"))]


def _bytes(block: str) -> bytes:
    """The bytes of an annotated hex block: on each line, the hex before ``#``."""
    return bytes.fromhex("".join(line.split("#", 1)[0] for line in block.splitlines()))


async def test_the_document_is_what_a_fresh_run_gives() -> None:
    fresh = await generate()
    assert fresh == DOCUMENT.read_text(encoding="utf-8"), (
        "docs/session-example.md is stale: run python -m tools.session_example --write"
    )


def test_every_frame_decodes_with_the_frame_decoder() -> None:
    blocks = _blocks()
    seen = {"control": 0, "data": 0, "boxed": 0}
    for i, (kind, text) in enumerate(blocks):
        if kind != "frame":
            continue
        raw = _bytes(text)
        _kind, _flags, _channel, length = HEADER.unpack_from(raw)
        assert length == len(raw) - HEADER.size, text
        decoder = FrameDecoder(max_items=4096)  # the broker's limits
        decoder.receive_data(raw)
        frame = decoder.next_frame()
        assert frame is not None, text
        assert decoder.next_frame() is None and decoder.buffered == 0
        decoder.end_of_input()
        if isinstance(frame, DataFrame):
            assert frame.data == raw[HEADER.size :]
            seen["data"] += 1
            continue
        assert isinstance(frame, ControlFrame)
        body = raw[HEADER.size :]
        assert cbor2.loads(body) == frame.message
        # Its diagnostic notation follows, and says the same.
        assert blocks[i + 1][0] == "cbor-diag", text
        assert blocks[i + 1][1].rstrip("\n") == cbor_diagnostic(body)
        seen["control"] += 1
        if blocks[i - 1][0] == "text" and "body_mac" in blocks[i - 1][1]:
            seen["boxed"] += 1  # (a frame opened from a box-stream box)
    assert seen["control"] >= 25 and seen["data"] >= 12 and seen["boxed"] == 2, seen


def test_handshake_messages_and_boxes_have_their_sizes() -> None:
    sizes = [len(_bytes(text)) for kind, text in _blocks() if kind == "shs1"]
    # Three connections (A, B, C), each msg1 to msg4 in order.
    assert sizes == [HELLO_SIZE, HELLO_SIZE, CLIENT_AUTH_SIZE, SERVER_ACCEPT_SIZE] * 3
    boxes = [len(_bytes(text)) for kind, text in _blocks() if kind == "box"]
    assert len(boxes) == 3 and boxes[-1] == BOX_HEADER  # two boxes with a body, then a goodbye
    assert all(size > BOX_HEADER for size in boxes[:2])
