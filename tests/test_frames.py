"""The frame codec (sans-io): round trips, the CBOR profile, and hostile bytes."""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bus.errors import FrameError, FrameTooLarge, LimitError, LocalProtocolError
from bus.wire.frames import (
    _FLAT_ITEMS,
    _decode_flat,
    HEADER,
    HEADER_SIZE,
    ControlFrame,
    DataFrame,
    CallFrames,
    EmitFrames,
    EventFrames,
    FrameDecoder,
    FrameKind,
    check_cbor,
    decode_control_body,
    encode_control,
    encode_data,
    encode_frame,
)

# Values the CBOR profile allows: what control messages are made of.
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=40) | st.binary(max_size=40)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10) | st.integers(-1000, 1000), inner, max_size=5),
    max_leaves=30,
)
messages = st.dictionaries(st.text(max_size=12), values, max_size=8)
channels = st.integers(0, 2**32 - 1)
frames = st.builds(ControlFrame, channels, messages) | st.builds(DataFrame, channels, st.binary(max_size=3000))


#: A budget of items no test value reaches (_canonical_size's, where a test measures it alone).
_NO_BUDGET = 1 << 40

def decode_all(data: bytes, max_body: int = 1 << 20, step: int | None = None) -> list[Any]:
    dec = FrameDecoder(max_body)
    out: list[Any] = []
    step = step or max(1, len(data))
    for i in range(0, len(data), step):
        dec.receive_data(data[i : i + step])
        out.extend(dec)
    dec.end_of_input()
    return out


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(frames, max_size=6), step=st.integers(1, 700))
def test_every_frame_round_trips(batch: list[Any], step: int) -> None:
    wire = b"".join(encode_frame(f) for f in batch)
    assert decode_all(wire, step=step) == batch


def test_header_layout() -> None:
    wire = encode_data(7, b"abc")
    assert wire == bytes([2, 0, 0, 0, 0, 7, 0, 0, 0, 3]) + b"abc"
    wire = encode_control(0, {"op": "ping"})
    kind, flags, channel, length = HEADER.unpack_from(wire)
    assert (kind, flags, channel, length) == (1, 0, 0, len(wire) - 10)
    assert cbor2.loads(wire[10:]) == {"op": "ping"}


def test_oversized_frame_is_refused_before_its_body_arrives() -> None:
    dec = FrameDecoder(max_body=1024)
    dec.receive_data(HEADER.pack(2, 0, 1, 1025))
    with pytest.raises(FrameTooLarge, match="1025 bytes"):
        dec.next_frame()
    assert dec.buffered == 0
    with pytest.raises(LocalProtocolError):
        dec.receive_data(b"more")


def test_frame_at_the_limit_is_fine() -> None:
    assert decode_all(encode_data(1, b"x" * 1024), max_body=1024) == [DataFrame(1, b"x" * 1024)]


def test_huge_announced_length_allocates_nothing() -> None:
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        dec.receive_data(HEADER.pack(2, 0, 1, 2**32 - 1))
        with pytest.raises(FrameTooLarge):
            dec.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_too_large_is_also_a_limit_and_a_remote_error() -> None:
    from bus.errors import RemoteProtocolError

    assert issubclass(FrameTooLarge, LimitError) and issubclass(FrameTooLarge, RemoteProtocolError)


def test_sending_oversized_is_a_local_limit_error() -> None:
    with pytest.raises(LimitError):
        encode_data(1, b"x" * 11, max_body=10)
    with pytest.raises(LimitError):
        encode_control(0, {"blob": b"x" * 100}, max_body=10)


@pytest.mark.parametrize("header", [HEADER.pack(0, 0, 0, 0), HEADER.pack(3, 0, 0, 0), HEADER.pack(255, 0, 0, 0), HEADER.pack(2, 1, 0, 0)])
def test_unknown_kind_or_flags_is_a_frame_error(header: bytes) -> None:
    dec = FrameDecoder()
    dec.receive_data(header)
    with pytest.raises(FrameError):
        dec.next_frame()


def test_stream_ending_inside_a_frame() -> None:
    dec = FrameDecoder()
    dec.receive_data(encode_data(1, b"abcdef")[:-2])
    assert dec.next_frame() is None
    with pytest.raises(FrameError, match="inside a frame"):
        dec.end_of_input()


def _control(body: bytes) -> bytes:
    return HEADER.pack(1, 0, 0, len(body)) + body


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "not a CBOR map"),
        (cbor2.dumps([1, 2]), "not a CBOR map"),
        (cbor2.dumps({"a": 1}) + b"\x00", "trailing"),
        (b"\xbf\x61a\x01\xff", "indefinite"),  # indefinite map
        (b"\xa1\x61a\x9f\xff", "indefinite"),
        (b"\xa1\x61a\xc1\x1a\x00\x00\x00\x00", "tags"),  # datetime tag
        (b"\xa1\x61a\xd8\x23\x61x", "tags"),  # regex tag
        (b"\xa1\x61a\xf7", "simple"),  # undefined
        (b"\xa1\x61a\xf8\x20", "simple"),  # simple(32)
        (b"\xa1\x41a\x01", "keys must be text or integers"),
        (b"\xa1\x81\x01\x01", "keys must be text or integers"),
        (b"\xa2\x61a\x01\x61a\x02", "duplicate"),
        (b"\xa1\x61a\x18\x01", "shortest"),
        (b"\xa1\x61a\x9b\xff\xff\xff\xff\xff\xff\xff\xff", "array claims"),
        (b"\xa1\x61a\x5a\xff\xff\xff\xff", "longer than the message"),
        (b"\xa1\x61a\xbb\x00\x00\x00\x01\x00\x00\x00\x00", "map claims"),
        (b"\xa1\x61a" + b"\x81" * 40 + b"\x01", "nesting"),
        (b"\xa1\x61a\x62\xff\xfe", "does not decode"),  # invalid UTF-8
        (b"\xa1\x61a", "truncated"),
    ],
)
def test_cbor_outside_the_profile_is_a_frame_error(body: bytes, why: str) -> None:
    dec = FrameDecoder()
    dec.receive_data(_control(body))
    with pytest.raises(FrameError, match=why):
        dec.next_frame()


def test_encoding_refuses_what_peers_would_refuse() -> None:
    import datetime

    with pytest.raises(LocalProtocolError):
        encode_control(0, {"when": datetime.datetime.now(datetime.timezone.utc)})
    with pytest.raises(LocalProtocolError):
        encode_control(0, {"big": 2**70})
    with pytest.raises(LocalProtocolError):
        encode_control(0, {"set": {1, 2}})
    for channel in (2**32, -1):
        with pytest.raises(LocalProtocolError, match=f"channel id {channel} is outside"):
            encode_control(channel, {})


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=400), step=st.integers(1, 64))
def test_arbitrary_bytes_decode_or_raise_frame_error(data: bytes, step: int) -> None:
    dec = FrameDecoder(max_body=256)
    try:
        for i in range(0, len(data), step):
            dec.receive_data(data[i : i + step])
            for frame in dec:
                assert isinstance(frame, (ControlFrame, DataFrame))
        assert dec.buffered <= 256 + 10 + step
    except FrameError:
        pass


@settings(max_examples=1000, deadline=None)
@given(body=st.binary(max_size=300))
def test_arbitrary_control_bodies_decode_or_raise_frame_error(body: bytes) -> None:
    try:
        check_cbor(body)
    except FrameError:
        return
    # What passes the profile check decodes without surprises.
    dec = FrameDecoder()
    dec.receive_data(_control(body))
    try:
        frame = dec.next_frame()
    except FrameError:
        return  # e.g. invalid UTF-8 inside a text string
    assert isinstance(frame, ControlFrame) and isinstance(frame.message, dict)


@settings(max_examples=300, deadline=None)
@given(message=messages)
def test_valid_cbor_maps_pass_the_profile(message: dict[str, Any]) -> None:
    check_cbor(cbor2.dumps(message))


def test_header_struct_is_ten_bytes() -> None:
    assert HEADER.size == 10 == struct.calcsize(">BBII")


def test_control_frames_have_a_tighter_limit() -> None:
    dec = FrameDecoder(max_body=1 << 20, max_control=64 * 1024)
    dec.receive_data(HEADER.pack(1, 0, 0, 64 * 1024 + 1))
    with pytest.raises(FrameTooLarge, match="control frame"):
        dec.next_frame()
    dec = FrameDecoder(max_body=1 << 20, max_control=64 * 1024)
    dec.receive_data(HEADER.pack(2, 0, 3, 64 * 1024 + 1))
    assert dec.next_frame() is None  # a DATA frame that size is fine; its body is on the way
    with pytest.raises(LimitError):
        encode_control(0, {"blob": b"x" * 70_000})


@pytest.mark.parametrize("whole", [True, False])
def test_a_control_body_on_a_channel_has_its_own_item_budget(whole: bool) -> None:
    """``channel_items`` bounds the CONTROL bodies of channels other than 0 (the broker's 16),
    however they arrive (a whole frame in one read, or cut); channel 0 keeps ``max_items``."""
    from bus.wire.frames import CHANNEL_CONTROL_ITEMS

    def frames(*bodies: tuple[int, dict[str, Any]]) -> list[Any]:
        dec = FrameDecoder(max_items=4096, channel_items=CHANNEL_CONTROL_ITEMS)
        data = b"".join(encode_control(channel, body) for channel, body in bodies)
        got = []
        for piece in ([data] if whole else [data[i : i + 7] for i in range(0, len(data), 7)]):
            dec.receive_data(piece)
            while (frame := dec.next_frame()) is not None:
                got.append(frame)
        return got

    at_most = {"credit": 1, "pad": [0] * (CHANNEL_CONTROL_ITEMS - 5)}  # 16 items
    assert frames((5, at_most), (5, {"reset": "r" * 60_000}), (0, {"op": "x", "pad": [{}] * 4000})) == [
        ControlFrame(5, at_most),
        ControlFrame(5, {"reset": "r" * 60_000}),
        ControlFrame(0, {"op": "x", "pad": [{}] * 4000}),
    ]
    with pytest.raises(FrameError, match=f"more than {CHANNEL_CONTROL_ITEMS} data items"):
        frames((5, {"credit": 1, "pad": [0] * (CHANNEL_CONTROL_ITEMS - 4)}))
    with pytest.raises(FrameError, match=f"more than {CHANNEL_CONTROL_ITEMS} data items"):
        frames((77, {"credit": 1, "pad": [{}] * 4090}))
    # Without it, a channel's bodies have the same budget as channel 0's.
    dec = FrameDecoder(max_items=4096)
    dec.receive_data(encode_control(77, {"credit": 1, "pad": [{}] * 4090}))
    assert dec.next_frame() == ControlFrame(77, {"credit": 1, "pad": [{}] * 4090})


# -- the one-pass profile check against a plain recursive reading of the profile ------------


class _Refused(Exception):
    pass


def _reference_item(buf: bytes, pos: int, depth: int) -> int:
    """The profile as the docs state it, one item at a time (slow and obvious)."""
    if depth > 32:
        raise _Refused("too deep")
    if pos >= len(buf):
        raise _Refused("truncated")
    major, info = buf[pos] >> 5, buf[pos] & 0x1F
    pos += 1
    if info < 24:
        arg = info
    elif info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(buf):
            raise _Refused("truncated")
        arg = int.from_bytes(buf[pos : pos + size], "big")
        pos += size
        if major != 7 and arg < (24, 256, 65536, 2**32)[info - 24]:
            raise _Refused("not shortest")
    else:
        raise _Refused("indefinite or reserved")
    if major in (0, 1):
        return pos
    if major in (2, 3):
        if pos + arg > len(buf):
            raise _Refused("string too long")
        return pos + arg
    if major == 4:
        for _ in range(arg):
            pos = _reference_item(buf, pos, depth + 1)
        return pos
    if major == 5:
        keys = set()
        for _ in range(arg):
            if pos >= len(buf) or buf[pos] >> 5 not in (0, 1, 3):
                raise _Refused("bad key")
            end = _reference_item(buf, pos, depth + 1)
            if buf[pos:end] in keys:
                raise _Refused("duplicate key")
            keys.add(buf[pos:end])
            pos = _reference_item(buf, end, depth + 1)
        return pos
    if major == 6:
        raise _Refused("tag")
    if info in (20, 21, 22, 25, 26, 27):
        return pos
    raise _Refused("simple value")


def _reference_accepts(body: bytes) -> bool:
    if not body or body[0] >> 5 != 5:
        return False
    try:
        return _reference_item(body, 0, 1) == len(body)
    except (_Refused, RecursionError):
        return False


def _accepts(body: bytes) -> bool:
    try:
        check_cbor(body)
    except FrameError:
        return False
    return True


@settings(max_examples=500, deadline=None)
@given(message=messages, edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3), cut=st.integers(0, 40))
def test_profile_check_agrees_with_a_plain_reading_on_damaged_messages(
    message: dict[str, Any], edits: list[tuple[int, int]], cut: int
) -> None:
    body = bytearray(cbor2.dumps(message))
    for where, byte in edits:
        body[where % len(body)] = byte
    damaged = bytes(body[: max(1, len(body) - cut)]) if cut % 3 == 0 else bytes(body)
    assert _accepts(damaged) == _reference_accepts(damaged)


@settings(max_examples=500, deadline=None)
@given(body=st.binary(max_size=200))
def test_profile_check_agrees_with_a_plain_reading_on_arbitrary_bytes(body: bytes) -> None:
    assert _accepts(body) == _reference_accepts(body)


@pytest.mark.parametrize("depth", [30, 31, 32, 33, 34])
@pytest.mark.parametrize("innermost", [b"\x80", b"\xa0", b"\x81\x01", b"\xa1\x01\x02"])
def test_nesting_limit_is_the_same_for_empty_and_full_containers(depth: int, innermost: bytes) -> None:
    # A map holding arrays nested ``depth`` deep in total (the top map counts as 1).
    body = b"\xa1\x01" + b"\x81" * (depth - 2) + innermost
    assert _accepts(body) == _reference_accepts(body)
    items_depth = depth + (1 if innermost in (b"\x81\x01", b"\xa1\x01\x02") else 0)
    assert _accepts(body) == (items_depth <= 32)


@settings(max_examples=300, deadline=None)
@given(message=messages)
def test_encoding_fast_path_only_skips_the_check_for_bytes_peers_accept(message: dict[str, Any]) -> None:
    frame = encode_control(0, message)
    check_cbor(frame[10:])  # what went out without the byte check passes it anyway


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "message",
    [
        {"key": True, True: 1},  # a bool key: not text or integer
        {"n": 2**64},  # an integer that needs a bignum tag
        {"nested": _nested(33)},  # the innermost 1 sits 35 deep (the top map is 1)
    ],
)
def test_encoding_refuses_what_the_fast_path_hands_to_the_byte_check(message: dict[Any, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        encode_control(0, message)


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(frames | st.builds(DataFrame, channels, st.binary(min_size=2000, max_size=70_000)), max_size=6),
    cuts=st.lists(st.integers(1, 90_000), max_size=12),
    as_bytearray=st.booleans(),
)
def test_frames_round_trip_whatever_the_reads(batch: list[Any], cuts: list[int], as_bytearray: bool) -> None:
    """Reads of any sizes (a frame straddling many reads, many frames in one, a header cut
    in two): the frames come out whole and unchanged, and nothing is left over."""
    wire = b"".join(encode_frame(f) for f in batch)
    dec = FrameDecoder()
    out: list[Any] = []
    pos = 0
    for cut in [*cuts, len(wire)]:
        piece = wire[pos : pos + cut]
        pos += len(piece)
        dec.receive_data(bytearray(piece) if as_bytearray else piece)
        out.extend(dec)
        assert dec.buffered <= pos - len(b"".join(encode_frame(f) for f in out))
    dec.end_of_input()
    assert out == batch and all(type(f.data) is bytes for f in out if isinstance(f, DataFrame))


def test_a_reused_buffer_fed_to_the_decoder_does_not_change_what_it_holds() -> None:
    """The decoder keeps what it was given only as bytes of its own (a caller may reuse a
    bytearray for the next read)."""
    wire = encode_data(1, b"a" * 5000) + encode_data(2, b"b" * 10)
    dec = FrameDecoder()
    buf = bytearray(wire[:3000])
    dec.receive_data(buf)
    assert dec.next_frame() is None
    buf[:] = b"z" * 3000  # reused
    dec.receive_data(bytearray(wire[3000:]))
    assert list(dec) == [DataFrame(1, b"a" * 5000), DataFrame(2, b"b" * 10)]


def test_a_trusted_decoder_skips_the_profile_check_but_not_cbor_itself() -> None:
    """A client's link trusts its broker to have checked what it relays (docs/protocol.md):
    its decoder takes CBOR the profile would refuse, but never malformed CBOR or a non-map."""
    outside_profile = bytes([0xA1, 0x61, 0x6B, 0x18, 0x01])  # {"k": 1} with 1 not in its shortest form
    frame = HEADER.pack(FrameKind.CONTROL, 0, 0, len(outside_profile)) + outside_profile
    strict = FrameDecoder()
    strict.receive_data(frame)
    with pytest.raises(FrameError, match="shortest"):
        strict.next_frame()
    trusted = FrameDecoder(trusted=True)
    trusted.receive_data(frame)
    assert trusted.next_frame() == ControlFrame(0, {"k": 1})
    for body in (bytes([0x81, 0x01]), bytes([0xA1, 0x61]), bytes([0xA1, 0x62, 0xFF, 0xFE, 0x01])):  # a list; cut; bad UTF-8
        decoder = FrameDecoder(trusted=True)
        decoder.receive_data(HEADER.pack(FrameKind.CONTROL, 0, 0, len(body)) + body)
        with pytest.raises(FrameError):
            decoder.next_frame()


def _checked_loads(raw: bytes, max_items: int | None) -> Any:
    """The reference decode_control_body is held to: check_cbor, then cbor2.loads (what it
    cannot read, in the profile's shape -- bad UTF-8 -- a FrameError)."""
    check_cbor(raw, max_items)
    try:
        return cbor2.loads(raw)
    except Exception as exc:
        raise FrameError(str(exc)) from exc


def _verdict(fn: Any) -> Any:
    try:
        return ("ok", cbor2.dumps(fn()))  # (as bytes: a NaN in it is not equal to itself)
    except FrameError:
        return ("refused", None)


@settings(max_examples=400, deadline=None)
@given(value=st.dictionaries(st.text(max_size=8), values, max_size=6), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3), items=st.sampled_from([None, 3, 8, 4096]))
def test_the_quick_decode_refuses_exactly_what_the_profile_check_refuses(value: Any, flips: list[tuple[int, int]], items: int | None) -> None:
    """decode_control_body decodes first and checks what cbor2 built; whatever the bytes
    (valid ones, and the same with bytes changed), it agrees with check_cbor + cbor2.loads."""
    from bus.wire.frames import decode_control_body

    body = bytearray(cbor2.dumps(value))
    for pos, byte in flips:
        body[pos % len(body)] = byte
    data = bytes(body)

    assert _verdict(lambda: decode_control_body(data, items)) == _verdict(lambda: _checked_loads(data, items))


def test_the_quick_decode_refuses_duplicates_tags_long_forms_and_too_many_items() -> None:
    from bus.wire.frames import decode_control_body

    cases = {
        "duplicate map key": bytes([0xA2, 0x61, 0x6B, 0x01, 0x61, 0x6B, 0x02]),
        "tags are not allowed": bytes([0xA1, 0x61, 0x6B, 0xC1, 0x01]),
        "shortest": bytes([0xA1, 0x61, 0x6B, 0x18, 0x01]),
        "indefinite": bytes([0xA1, 0x61, 0x6B, 0x9F, 0x01, 0xFF]),
        "simple values": bytes([0xA1, 0x61, 0x6B, 0xF7]),
        "more than 3 data items": cbor2.dumps({"k": [1, 2]}),
    }
    for reason, body in cases.items():
        with pytest.raises(FrameError, match=reason):
            decode_control_body(body, 3 if "items" in reason else None)
    # In the profile but not as cbor2 writes it (a half-precision float): still taken.
    assert decode_control_body(bytes([0xA1, 0x61, 0x6B, 0xF9, 0x3C, 0x00])) == {"k": 1.0}


def _damaged_reads(frames: list[bytes], damage: list[tuple[int, int]], cuts: list[int]) -> list[bytes]:
    """``frames`` joined, bytes damaged (at each place, modulo the length: a value), then cut
    into reads of the sizes ``cuts`` gives (the rest in one)."""
    wire = bytearray(b"".join(frames))
    for where, value in damage:
        if wire:
            wire[where % len(wire)] = value
    pieces, pos = [], 0
    for cut in [*cuts, len(wire)]:
        piece = bytes(wire[pos : pos + cut])
        pos += len(piece)
        if piece:
            pieces.append(piece)
    return pieces


def _frames_the_usual_way(pieces: list[bytes], trusted: bool = False) -> tuple[list[Any], str | None]:
    dec = FrameDecoder(max_body=4096, max_control=512, trusted=trusted)
    out: list[Any] = []
    try:
        for piece in pieces:
            dec.receive_data(piece)
            out.extend(dec)
        dec.end_of_input()
    except FrameError as exc:
        return out, type(exc).__name__
    return out, None


def _frames_from_pieces(pieces: list[bytes], whole: bool = False, trusted: bool = False) -> tuple[list[Any], str | None]:
    """As a reader of relayed messages takes them: each piece through ``next_frame_from``
    (with ``whole``, first offered as one whole message, as a pushed RPC channel reads)."""
    dec = FrameDecoder(max_body=4096, max_control=512, trusted=trusted)
    out: list[Any] = []
    try:
        for piece in pieces:
            if whole:
                message = dec.whole_message_from(piece)
                if message is not None:
                    out.append(ControlFrame(0, message))
                    continue
            frame = dec.next_frame_from(piece)
            if frame is not None:
                out.append(frame)
                out.extend(dec)
        dec.end_of_input()
    except FrameError as exc:
        return out, type(exc).__name__
    return out, None


@settings(max_examples=500, deadline=None)
@given(
    batch=st.lists(frames, max_size=5),
    cuts=st.lists(st.integers(1, 600), max_size=8),
    damage=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=2),
    whole=st.booleans(),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_next_frame_from_decides_as_receive_data_and_next_frame(
    batch: list[Any], cuts: list[int], damage: list[tuple[int, int]], whole: bool, kind: Any
) -> None:
    """The shortcut for bytes that are exactly one frame (a relayed message) gives the same
    frames and the same errors as feeding the bytes and cutting, whatever the pieces: one
    frame per piece, frames straddling pieces, several in one, a header cut in two, damaged
    headers and bodies, frames over the limits."""
    encoded = [encode_frame(f) for f in batch]
    # (one frame per piece: the shortcut's case)
    pieces = encoded if whole and not damage else _damaged_reads(encoded, damage, cuts)
    pieces = [kind(piece) for piece in pieces]  # (the shortcut takes bytes; others are fed)
    # (compared as text: damage can make a float NaN, which is not equal to itself)
    usual = repr(_frames_the_usual_way(pieces))
    assert repr(_frames_from_pieces(pieces)) == usual
    # The pushed RPC channel's quick way (a piece that is one whole control message on
    # channel 0 is decoded straight from it) decides the same, trusted or not.
    assert repr(_frames_from_pieces(pieces, whole=True)) == usual
    assert repr(_frames_from_pieces(pieces, whole=True, trusted=True)) == repr(_frames_the_usual_way(pieces, trusted=True))


def test_whole_message_from_takes_only_one_whole_control_frame_on_channel_0_with_nothing_buffered() -> None:
    message = {"re": 1, "result": "x"}
    one = encode_control(0, message)
    dec = FrameDecoder(max_body=4096, max_control=512)
    assert dec.whole_message_from(memoryview(one)) == message
    for other in (encode_control(3, message), encode_data(0, one), one + one, one[:-1], one[:5]):
        assert dec.whole_message_from(other) is None  # (nothing changed: fed the usual way)
        assert dec.buffered == 0
    dec.receive_data(one[:4])  # something buffered: the usual way, for the order
    assert dec.whole_message_from(one) is None
    assert dec.buffered == 4
    # A body that fails its check fails the decoder, as next_frame_from would.
    bad = FrameDecoder(max_body=4096, max_control=512)
    body = bytes([0xA2, 0x61, 0x6B, 0x01, 0x61, 0x6B, 0x02])  # (a duplicate key)
    with pytest.raises(FrameError, match="duplicate"):
        bad.whole_message_from(HEADER.pack(FrameKind.CONTROL, 0, 0, len(body)) + body)
    with pytest.raises(LocalProtocolError, match="already failed"):
        bad.next_frame_from(one)


def test_lone_data_takes_only_one_whole_data_frame_with_nothing_buffered() -> None:
    one = encode_data(7, b"payload")
    dec = FrameDecoder(max_body=4096, max_control=512)
    assert dec.lone_data(one) == 7
    assert dec.lone_data(encode_data(0xFFFFFFFF, b"x")) == 0xFFFFFFFF
    too_big = FrameDecoder(max_body=8, max_control=512)
    assert too_big.lone_data(encode_data(1, b"x" * 9)) == -1  # (next_frame refuses it, and says why)
    flagged = HEADER.pack(FrameKind.DATA, 1, 7, 1) + b"x"
    for other in (encode_control(7, {"k": 1}), one + one, one[:-1], one + b"\0", one[:10], HEADER.pack(FrameKind.DATA, 0, 7, 0), flagged):
        assert dec.lone_data(other) == -1  # (nothing changed: fed the usual way)
        assert dec.buffered == 0
    dec.receive_data(one[:4])  # something buffered: the usual way, for the order
    assert dec.lone_data(one) == -1
    assert dec.buffered == 4
    # The frames it takes are the ones next_frame_from would cut, with the same body.
    usual = FrameDecoder(max_body=4096, max_control=512).next_frame_from(one)
    assert usual == DataFrame(7, one[HEADER_SIZE:])


BIG_VALUE = bytes(range(256)) * 800  # 204,800 bytes: a body of few items for its size


@pytest.mark.parametrize("as_type", [bytes, bytearray])
def test_a_big_body_of_few_items_is_checked_exactly_without_encoding_it_again(as_type: type) -> None:
    # Few items for many bytes: the decode steps over the big string in check_cbor instead of
    # comparing cbor2's encoding, with the same verdicts.
    from bus.wire.frames import decode_control_body

    good = cbor2.dumps({"args": [BIG_VALUE, "x"], "method": "take"})
    assert decode_control_body(as_type(good)) == {"args": [BIG_VALUE, "x"], "method": "take"}
    head = bytes([0x5A]) + len(BIG_VALUE).to_bytes(4, "big")  # (the big string's head, shortest form)
    assert good.count(head) == 1
    cases = {
        "trailing bytes": good + b"\x00",
        "shortest": good.replace(head, bytes([0x5B]) + len(BIG_VALUE).to_bytes(8, "big")),
        "tags are not allowed": good.replace(head, b"\xc2" + head),
        "duplicate map key": b"\xa3" + b"".join(map(cbor2.dumps, ["args", [BIG_VALUE], "method", "take", "args", 1])),
        "a string is longer than the message": good[: len(good) // 2],
        "indefinite": good.replace(head, bytes([0x5F, 0x5A]) + len(BIG_VALUE).to_bytes(4, "big"), 1) + b"\xff",
        "more than 3 data items": good,
    }
    for reason, body in cases.items():
        with pytest.raises(FrameError, match=reason):
            decode_control_body(as_type(body), 3 if "items" in reason else None)


# -- DATA bodies filled into a buffer the consumer gives (fill_data_into) -----------------------


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40_000), min_size=1, max_size=5),
    cuts=st.lists(st.integers(1, 50_000), max_size=12),
    read_into=st.lists(st.sampled_from(["receive", "room", "fill_with"]), max_size=12),
)
def test_data_bodies_fill_the_given_buffer_whatever_the_reads(sizes: list[int], cuts: Any, read_into: list[str]) -> None:
    """A header frame, then DATA frames whose bodies go into one buffer, then more frames:
    split across reads of any size, some of them read straight into fill_room() (as a socket
    reader does), some offered to fill_with() first (as a relayed RPC body's pieces are), the
    bodies land in the buffer in order, each frame comes out with its size in ``filled``, and
    what follows the buffer's frames comes out as usual."""
    bodies = [bytes([i + 1]) * size for i, size in enumerate(sizes)]
    after = [DataFrame(3, b"after" * 100), ControlFrame(0, {"k": 1})]
    wire = encode_control(0, {"follows": sum(sizes)}) + b"".join(encode_data(0, b) for b in bodies)
    wire += b"".join(encode_frame(f) for f in after)
    dec = FrameDecoder()
    buffer = bytearray(sum(sizes))
    out: list[Any] = []

    def take_frames() -> None:
        for frame in dec:
            out.append(frame)
            if isinstance(frame, ControlFrame) and "follows" in frame.message:
                dec.fill_data_into(buffer)

    pos = 0
    reads = iter(read_into)
    cuts = iter(cuts)
    while pos < len(wire):
        cut = next(cuts, len(wire))
        room = dec.fill_room()
        how = next(reads, "receive")
        if room is not None and how == "room":
            piece = wire[pos : pos + min(cut, len(room))]
            room[: len(piece)] = piece
            dec.filled(len(piece))
        else:
            piece = wire[pos : pos + cut]
            if how != "fill_with" or not dec.fill_with(memoryview(piece)):
                dec.receive_data(piece)
        pos += len(piece)
        take_frames()
    dec.end_of_input()
    assert buffer == b"".join(bodies)
    assert out[1 : 1 + len(sizes)] == [DataFrame(0, b"", size) for size in sizes]
    assert out[1 + len(sizes) :] == after


def test_fill_with_takes_only_the_middle_of_a_frame_being_filled() -> None:
    """fill_with puts bytes into the frame being filled while they do not complete it, and
    declines (changing nothing) otherwise: no frame being filled, nothing given, or bytes
    that reach the frame's end (or run past it), which go the usual way."""
    dec = FrameDecoder()
    buffer = bytearray(100)
    wire = encode_data(0, b"a" * 60) + encode_data(0, b"b" * 40)
    assert not dec.fill_with(wire[:10])  # (no buffer given: nothing is being filled)
    dec.fill_data_into(buffer)
    assert not dec.fill_with(wire[:10])  # (a buffer, but no frame's header read yet)
    dec.receive_data(wire[:20])  # (the header and 10 bytes of the first body)
    assert dec.next_frame() is None and len(dec.fill_room() or b"") == 50
    assert not dec.fill_with(b"")
    assert dec.fill_with(wire[20:69]) and len(dec.fill_room() or b"") == 1 and dec.buffered == 0
    assert buffer[:59] == b"a" * 59
    assert not dec.fill_with(wire[69:70])  # (the last byte completes the frame: declined)
    assert not dec.fill_with(wire[69:75])  # (nor past the frame's end)
    assert len(dec.fill_room() or b"") == 1  # (declining changed nothing)
    dec.receive_data(wire[69:])
    assert list(dec) == [DataFrame(0, b"", 60), DataFrame(0, b"", 40)]
    assert buffer == b"a" * 60 + b"b" * 40


def test_a_data_frame_that_does_not_fit_the_buffer_comes_out_as_usual() -> None:
    dec = FrameDecoder()
    buffer = bytearray(100)
    dec.fill_data_into(buffer)
    dec.receive_data(encode_data(0, b"a" * 60) + encode_data(0, b"b" * 60) + encode_data(0, b"c" * 40))
    # (the second does not fit in the 40 bytes left: its consumer refuses it, as a body overrun)
    assert list(dec) == [DataFrame(0, b"", 60), DataFrame(0, b"b" * 60), DataFrame(0, b"", 40)]
    assert buffer == b"a" * 60 + b"c" * 40
    dec.receive_data(encode_data(0, b"d"))
    assert list(dec) == [DataFrame(0, b"d")]  # (full: let go)


def test_letting_the_buffer_go_finishes_the_frame_being_filled_then_stops() -> None:
    dec = FrameDecoder()
    buffer = bytearray(300)
    dec.fill_data_into(buffer)
    wire = encode_data(0, b"a" * 100) + encode_data(0, b"b" * 100)
    dec.receive_data(wire[:50])
    assert dec.next_frame() is None and dec.fill_room() is not None
    with pytest.raises(LocalProtocolError, match="still being put"):
        dec.fill_data_into(bytearray(10))
    dec.fill_data_into(None)  # (the consumer gave the body up)
    dec.receive_data(wire[50:])
    assert list(dec) == [DataFrame(0, b"", 100), DataFrame(0, b"b" * 100)]
    assert dec.fill_room() is None and buffer[:100] == b"a" * 100 and not any(buffer[100:])
    with pytest.raises(LocalProtocolError):
        dec.filled(1)


def test_a_stream_that_ends_while_a_body_is_filled_is_a_frame_error() -> None:
    dec = FrameDecoder()
    dec.fill_data_into(bytearray(100))
    dec.receive_data(encode_data(0, b"a" * 100)[:70])
    assert dec.next_frame() is None
    with pytest.raises(FrameError, match="ended inside a frame"):
        dec.end_of_input()


def test_next_frame_from_fills_the_given_buffer_with_a_whole_data_frame() -> None:
    """A DATA frame that comes whole while a body's buffer is set goes into the buffer, as
    through receive_data + next_frame (the one-frame shortcut must not hand it out)."""
    dec = FrameDecoder()
    buffer = bytearray(100)
    dec.fill_data_into(buffer)
    assert dec.next_frame_from(encode_data(0, b"a" * 60)) == DataFrame(0, b"", 60)
    assert dec.next_frame_from(encode_data(0, b"b" * 40)) == DataFrame(0, b"", 40)
    assert buffer == b"a" * 60 + b"b" * 40
    assert dec.next_frame_from(encode_data(0, b"c")) == DataFrame(0, b"c")  # (full: let go)


# -- the item budget's walk: a list value is walked in place, exactly as its own call would --


def _items_within_reference(value: Any, depth: int, budget: int) -> int:
    """_items_within as it was before lists in a map were walked in place: every container
    its own call (the rules of check_cbor's item count, plain types, depth)."""
    from bus.wire.frames import MAX_CBOR_DEPTH

    budget -= 1
    kind = type(value)
    if kind in (str, bytes, bool, float, type(None)):
        return budget
    if kind is int:
        return budget if -(1 << 64) <= value <= (1 << 64) - 1 else -1
    if depth >= MAX_CBOR_DEPTH or budget < 0:
        return -1
    if kind is dict:
        for key, item in value.items():
            if not (type(key) is str or (type(key) is int and -(1 << 64) <= key <= (1 << 64) - 1)):
                return -1
            budget = _items_within_reference(item, depth + 1, budget - 1)
            if budget < 0:
                return -1
        return budget
    if kind is list:
        for item in value:
            budget = _items_within_reference(item, depth + 1, budget)
            if budget < 0:
                return -1
        return budget
    return -1


_PLAIN_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 65), max_value=1 << 65), st.floats(allow_nan=False),
    st.text(max_size=3), st.binary(max_size=3), st.sampled_from([(), frozenset(), 1j]),  # (the last: not plain)
)
_VALUES = st.recursive(
    _PLAIN_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.one_of(st.text(max_size=2), st.integers(-3, 3)), inner, max_size=4),
    max_leaves=40,
)


@given(value=st.dictionaries(st.text(max_size=2), _VALUES, max_size=5), budget=st.integers(0, 60), depth=st.integers(1, 34))
@settings(max_examples=400, deadline=None)
def test_items_within_walks_a_maps_lists_as_their_own_calls_would(value: dict[str, Any], budget: int, depth: int) -> None:
    from bus.wire.frames import _items_within

    assert _items_within(value, depth, budget) == _items_within_reference(value, depth, budget)


@pytest.mark.parametrize("depth", range(27, 34))
@pytest.mark.parametrize("budget", [0, 1, 2, 3, 4, 5, 50])
def test_items_within_at_the_depth_and_budget_edges(depth: int, budget: int) -> None:
    from bus.wire.frames import _items_within

    for value in ({"a": [[1]]}, {"a": [{"b": 1}]}, {"a": [1, [2, [3]]]}, {"a": []}, {"a": [1, 2, 3]}, {"a": [1j]}):
        assert _items_within(value, depth, budget) == _items_within_reference(value, depth, budget), value
def _outcome(decoder: FrameDecoder, pieces: list[bytes]) -> tuple[list[Any], str | None]:
    """Frames decoded from ``pieces`` fed one by one, and the error that ended it, if any."""
    out: list[Any] = []
    try:
        for piece in pieces:
            decoder.receive_data(piece)
            out.extend(decoder)
        decoder.end_of_input()
    except FrameError as exc:
        with pytest.raises(LocalProtocolError):  # (a failed decoder stays failed)
            decoder.next_frame()
        return out, f"{type(exc).__name__}: {exc}"
    return out, None


@settings(max_examples=500, deadline=None)
@given(
    batch=st.lists(frames, max_size=6),
    damage=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    trusted=st.booleans(),
    max_control=st.sampled_from([16, 200, 64 * 1024]),
    max_items=st.sampled_from([None, 4]),
)
def test_a_whole_control_frame_in_one_read_is_judged_as_one_cut_from_pieces(
    batch: list[Any], damage: list[tuple[int, int]], trusted: bool, max_control: int, max_items: int | None
) -> None:
    """The decoder's quick way -- a whole CONTROL frame in the bytes of one read, cut straight
    out of them -- keeps every check: the same frames and the same error (unknown kind, flags,
    a control frame over its limit, a body outside the profile or not CBOR at all, trusted or
    not) as when the same bytes come one at a time, which never takes it."""
    wire = bytearray(b"".join(encode_frame(f) for f in batch))
    for where, value in damage:
        if wire:
            wire[where % len(wire)] = value
    data = bytes(wire)

    def decoder() -> FrameDecoder:
        return FrameDecoder(1 << 20, max_control, max_items, trusted=trusted)

    whole = _outcome(decoder(), [data])
    # (compared as text: damage can make a float NaN, which is not equal to itself)
    assert repr(whole) == repr(_outcome(decoder(), [data[i : i + 1] for i in range(len(data))]))
    if not damage and max_control == 64 * 1024 and max_items is None:
        assert whole == (batch, None)


def test_the_quick_way_refuses_a_bad_header_after_good_frames_in_the_same_read() -> None:
    good = encode_control(0, {"event": "event", "n": 1})
    for bad, error in (
        (HEADER.pack(3, 0, 0, 0), "unknown frame kind 3"),
        (HEADER.pack(FrameKind.CONTROL, 1, 0, 0), "unknown frame flags 0x01"),
        (HEADER.pack(FrameKind.CONTROL, 0, 0, 101) + b"\xa0" * 101, "a control frame announces 101 bytes"),
    ):
        for trusted in (False, True):
            decoder = FrameDecoder(1000, 100, trusted=trusted)
            decoder.receive_data(good + good + bad + good)
            assert decoder.next_frame() == ControlFrame(0, {"event": "event", "n": 1})
            assert decoder.next_frame() == ControlFrame(0, {"event": "event", "n": 1})
            with pytest.raises(FrameError, match=error):
                decoder.next_frame()
            with pytest.raises(LocalProtocolError):
                decoder.next_frame()


def _frames_taking_bytes(dec: FrameDecoder, pieces: list[bytes], via_next_frame_from: bool) -> tuple[list[Any], str | None, int]:
    """Frames from ``dec`` fed ``pieces`` (through ``next_frame_from``, or ``receive_data``),
    each DATA body's bytes taken at once (a view, as its owner must), with how many came as
    views."""
    out: list[Any] = []
    views = 0

    def take(frame: Any) -> None:
        nonlocal views
        if isinstance(frame, DataFrame) and type(frame.data) is memoryview:
            views += 1
            frame = DataFrame(frame.channel, bytes(frame.data), frame.filled)
        out.append(frame)

    try:
        for piece in pieces:
            if via_next_frame_from:
                frame = dec.next_frame_from(piece)
                if frame is not None:
                    take(frame)
            else:
                dec.receive_data(piece)
            for frame in dec:
                take(frame)
        dec.end_of_input()
    except FrameError as exc:
        return out, type(exc).__name__, views
    return out, None, views


def _frames_with_views(pieces: list[bytes], via_next_frame_from: bool) -> tuple[list[Any], str | None, int]:
    """Frames from a decoder that hands DATA bodies out as views."""
    dec = FrameDecoder(max_body=4096, max_control=512)
    dec.data_views = True
    return _frames_taking_bytes(dec, pieces, via_next_frame_from)


@settings(max_examples=400, deadline=None)
@given(
    batch=st.lists(frames, max_size=6),
    cuts=st.lists(st.integers(1, 7000), max_size=8),
    damage=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 255)), max_size=2),
    via_next_frame_from=st.booleans(),
)
def test_data_views_give_the_same_frames_and_errors_as_copies(
    batch: list[Any], cuts: list[int], damage: list[tuple[int, int]], via_next_frame_from: bool
) -> None:
    """A decoder handing DATA bodies out as views of its reads (a relay's, a bus
    connection's) gives the same frames, in the same order, and the same errors as one
    that copies them, whatever the reads: frames inside one read, straddling reads, damaged."""
    pieces = _damaged_reads([encode_frame(f) for f in batch], damage, cuts)
    out, error, _views = _frames_with_views(pieces, via_next_frame_from)
    # (Compared by repr, as the tests above compare: damage can make a float a NaN, which is
    # never equal to itself, so == would fail on the very same frames.)
    assert repr((out, error)) == repr(_frames_the_usual_way(pieces))


def _stream_view(out: list[Any]) -> tuple[list[Any], dict[int, bytes]]:
    """What a bus connection's reader makes of a decoder's frames: the frames other than a
    channel's DATA frames, in order, and each channel's bytes (its DATA bodies joined)."""
    others: list[Any] = []
    streams: dict[int, bytes] = {}
    for frame in out:
        if isinstance(frame, DataFrame) and frame.channel:
            streams[frame.channel] = streams.get(frame.channel, b"") + bytes(frame.data)
            others.append(("data", frame.channel))  # (where a channel's bytes came: in order)
        else:
            others.append(frame)
    merged: list[Any] = []
    for item in others:  # (pieces of one frame, or frames of one channel back to back: one mark)
        if not (merged and type(item) is tuple and merged[-1] == item):
            merged.append(item)
    return merged, streams


def _frames_in_pieces(pieces: list[bytes], views: bool, via_next_frame_from: bool) -> tuple[list[Any], str | None]:
    """Frames from a decoder with ``partial_data`` (a bus connection's reader's)."""
    dec = FrameDecoder(max_body=4096, max_control=512)
    dec.partial_data = True
    dec.data_views = views
    out, error, _views = _frames_taking_bytes(dec, pieces, via_next_frame_from)
    return out, error


def _empty_data_frames(out: list[Any]) -> int:
    return sum(1 for frame in out if isinstance(frame, DataFrame) and not frame.data)


@settings(max_examples=400, deadline=None)
@given(
    batch=st.lists(frames, max_size=6),
    cuts=st.lists(st.integers(1, 7000), max_size=8),
    damage=st.lists(st.tuples(st.integers(0, 20_000), st.integers(0, 255)), max_size=2),
    views=st.booleans(),
    via_next_frame_from=st.booleans(),
)
def test_partial_data_gives_each_channel_the_same_bytes_and_the_same_errors(
    batch: list[Any], cuts: list[int], damage: list[tuple[int, int]], views: bool, via_next_frame_from: bool
) -> None:
    """A decoder handing a channel's DATA frames out in pieces as their bytes arrive (a bus
    connection's reader: ``partial_data``) gives every channel the same bytes, in the same
    order among the other frames, and fails with the same error, as one that waits for each
    frame whole, whatever the reads (frames straddling them, damaged); where the stream
    fails, what the whole way gave each channel is what the pieces gave it, or the start of
    it (a frame cut short by the failure has given its first pieces).  A DATA frame on
    channel 0, a CONTROL frame and an empty DATA frame come out whole, as ever."""
    pieces = _damaged_reads([encode_frame(f) for f in batch], damage, cuts)
    out, error = _frames_in_pieces(pieces, views, via_next_frame_from)
    usual, usual_error = _frames_the_usual_way(pieces)
    assert error == usual_error
    got, got_streams = _stream_view(out)
    want, want_streams = _stream_view(usual)
    # (A piece is never empty: an empty DATA frame could read as an end of the stream.)
    assert _empty_data_frames(out) == _empty_data_frames(usual) or error is not None
    if error is None:
        assert (got, got_streams) == (want, want_streams)
        assert len(out) >= len(usual)
    else:
        assert [f for f in got if type(f) is not tuple] == [f for f in want if type(f) is not tuple]
        assert set(want_streams) <= set(got_streams)
        assert all(got_streams[channel].startswith(data) for channel, data in want_streams.items())


def test_a_data_frame_straddling_reads_comes_out_in_pieces_as_its_bytes_arrive() -> None:
    """With ``partial_data``, a DATA frame whose body is cut by the reads comes out as each
    read brings its bytes (views of the reads, with ``data_views``), no join; the frame's header
    held across a read too; a CONTROL frame and a DATA frame on channel 0 wait to be whole."""
    frame = encode_data(5, b"a" * 1000 + b"b" * 1000)
    dec = FrameDecoder()
    dec.partial_data = dec.data_views = True
    first, second, third = frame[:4], frame[4:1010], frame[1010:]  # (a header cut, then the body)
    dec.receive_data(first)
    assert dec.next_frame() is None
    dec.receive_data(second)
    piece = dec.next_frame()
    assert piece == DataFrame(5, b"a" * 1000) and dec.next_frame() is None
    dec.receive_data(third)
    piece = dec.next_frame()
    assert isinstance(piece, DataFrame) and piece.data is third  # (the whole read: itself, no copy)
    assert dec.next_frame() is None and not dec.buffered
    dec.receive_data(frame[:510])
    assert dec.next_frame() == DataFrame(5, b"a" * 500)
    read = frame[510:] + encode_data(6, b"next")  # (the rest of a frame and a whole one: views of it)
    dec.receive_data(read)
    piece, after = dec.next_frame(), dec.next_frame()
    assert isinstance(piece, DataFrame) and type(piece.data) is memoryview and piece.data.obj is read
    assert piece == DataFrame(5, b"a" * 500 + b"b" * 1000) and after == DataFrame(6, b"next")
    control = encode_control(0, {"op": "ping", "id": 1}) + encode_data(0, b"zero")
    dec.receive_data(control[:15])
    assert dec.next_frame() is None  # (a CONTROL frame: whole or nothing)
    dec.receive_data(control[15:-2])
    assert dec.next_frame() == ControlFrame(0, {"op": "ping", "id": 1})
    assert dec.next_frame() is None  # (a DATA frame on channel 0: whole, so the reader refuses it whole)
    dec.receive_data(control[-2:])
    assert dec.next_frame() == DataFrame(0, b"zero")
    dec.receive_data(frame[:500])
    assert dec.next_frame() == DataFrame(5, b"a" * 490)
    with pytest.raises(FrameError, match="inside a frame"):
        dec.end_of_input()  # (cut short: its first pieces came, the end is an error)


def test_data_frames_inside_one_read_come_out_as_views_of_it() -> None:
    """Two DATA frames and a CONTROL frame in one read: the DATA bodies are views (no copy),
    the CONTROL frame is decoded as ever; a decoder not told so copies."""
    read = encode_data(3, b"a" * 1000) + encode_control(3, {"credit": 5}) + encode_data(4, b"b" * 2000)
    dec = FrameDecoder()
    dec.data_views = True
    dec.receive_data(read)
    got = list(dec)
    assert [type(f) for f in got] == [DataFrame, ControlFrame, DataFrame]
    assert type(got[0].data) is memoryview and got[0].data.obj is read and bytes(got[0].data) == b"a" * 1000
    assert got[1] == ControlFrame(3, {"credit": 5})
    assert type(got[2].data) is memoryview and bytes(got[2].data) == b"b" * 2000
    plain = FrameDecoder()
    plain.receive_data(read)
    assert [type(f.data) for f in plain if isinstance(f, DataFrame)] == [bytes, bytes]


@pytest.mark.parametrize("views", [False, True])
@pytest.mark.parametrize("via_next_frame_from", [False, True])
def test_a_whole_data_frame_over_the_limit_in_one_read_is_refused(views: bool, via_next_frame_from: bool) -> None:
    """A DATA frame over max_body is refused even when all of it is in the read at hand (the
    quick way cuts whole frames only within the limits), after the good frame before it."""
    read = encode_data(1, b"a" * 100) + encode_data(1, b"b" * 101, max_body=1000)
    dec = FrameDecoder(max_body=100, max_control=100)
    dec.data_views = views
    if via_next_frame_from:
        first = dec.next_frame_from(read)
    else:
        dec.receive_data(read)
        first = dec.next_frame()
    assert isinstance(first, DataFrame) and bytes(first.data) == b"a" * 100
    with pytest.raises(FrameTooLarge, match="101 bytes"):
        dec.next_frame()
    with pytest.raises(LocalProtocolError):
        dec.next_frame()


def _frames_taking_runs(
    pieces: list[bytes], trusted: bool, pattern: list[bool], max_bytes: int | None = None
) -> tuple[list[Any], str | None]:
    """Frames cut as a bus connection's reader cuts a burst: after each frame, the run of
    control messages take_control_messages gives (as ControlFrames on channel 0), then
    next_frame; ``pattern`` says, per step, whether to ask for a run first."""
    dec = FrameDecoder(max_body=4096, max_control=512, trusted=trusted)
    out: list[Any] = []
    step = 0
    try:
        for piece in pieces:
            dec.receive_data(piece)
            while True:
                ask = pattern[step % len(pattern)] if pattern else True
                step += 1
                if ask:
                    chunk, start = dec._chunk, dec._pos  # (where a run is taken from)
                    run = dec.take_control_messages(max_bytes=max_bytes)
                    if max_bytes is not None and len(run) > 1:
                        # (no frame taken once max_bytes were: all but the last are within
                        # it; their sizes from their headers, as a trusted run may hold CBOR
                        # that encode_control would refuse)
                        end = start
                        for _ in run[:-1]:
                            end += HEADER.size + HEADER.unpack_from(chunk, end)[3]
                        assert end - start < max_bytes
                    out.extend(ControlFrame(0, message) for message in run)
                frame = dec.next_frame()
                if frame is None:
                    break
                out.append(frame)
        dec.end_of_input()
    except FrameError as exc:
        return out, type(exc).__name__
    return out, None


@settings(max_examples=500, deadline=None)
@given(
    batch=st.lists(frames | st.builds(ControlFrame, st.just(0), messages), max_size=8),
    cuts=st.lists(st.integers(1, 600), max_size=8),
    damage=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=2),
    bad_bodies=st.lists(st.tuples(st.integers(0, 7), st.sampled_from(
        [b"\xa1\x61k\xc1\x01", b"\xa1\x61k\x18\x01", b"\x80", b"\xa1\x61k", b"\xff", b"\xa1\x61k\x9f\x01\xff", b"\xa2\x61k\x01\x61k\x02"]
    )), max_size=2),
    trusted=st.booleans(),
    pattern=st.lists(st.booleans(), max_size=4),
    max_bytes=st.sampled_from([None, 1, 11, 40, 300]),
)
@example(  # (a trusted run holding a tag: the bound is checked from the headers)
    batch=[ControlFrame(0, {}), ControlFrame(0, {})], cuts=[], damage=[], bad_bodies=[(1, b"\xa1ak\xc1\x01")],
    trusted=True, pattern=[], max_bytes=40,
)
def test_taking_runs_of_control_messages_decides_as_next_frame(
    batch: list[Any], cuts: list[int], damage: list[tuple[int, int]], bad_bodies: list[tuple[int, bytes]],
    trusted: bool, pattern: list[bool], max_bytes: int | None,
) -> None:
    """take_control_messages gives the same frames in the same order, and the same error
    after the same frames, as next_frame alone, trusted or not, whatever the reads: runs of
    control frames on channel 0, broken by other channels, DATA frames, frames straddling
    reads, damaged headers, bodies outside the profile or not CBOR at all, frames over the
    limits."""
    encoded = [encode_frame(f) for f in batch]
    for where, body in bad_bodies:
        if encoded:
            encoded[where % len(encoded)] = HEADER.pack(1, 0, 0, len(body)) + body
    pieces = _damaged_reads(encoded, damage, cuts)
    # (compared as text: damage can make a float NaN, which is not equal to itself)
    assert repr(_frames_taking_runs(pieces, trusted, pattern, max_bytes)) == repr(_frames_the_usual_way(pieces, trusted))


def test_a_run_stops_before_a_bad_body_which_next_frame_then_refuses() -> None:
    good = encode_control(0, {"event": "event", "n": 1})
    bad = HEADER.pack(1, 0, 0, 5) + b"\xa1\x61k\xc1\x01"  # a tag: outside the profile
    dec = FrameDecoder()
    dec.receive_data(good + good + bad + good)
    assert dec.take_control_messages() == [{"event": "event", "n": 1}] * 2
    assert dec.take_control_messages() == []
    with pytest.raises(FrameError, match="tags"):
        dec.next_frame()
    with pytest.raises(LocalProtocolError):
        dec.next_frame()
    assert dec.take_control_messages() == []  # (a failed decoder cuts nothing more)


def test_a_run_takes_no_frame_once_it_holds_max_bytes() -> None:
    """A caller sharing its time (busd's reader) takes a read's requests a part at a time:
    checking them costs CPU per byte and item, and a read holds up to 256 KiB."""
    frame = encode_control(0, {"op": "ping", "id": 7})
    dec = FrameDecoder()
    dec.receive_data(frame * 10)
    assert dec.take_control_messages(max_bytes=len(frame)) == [{"op": "ping", "id": 7}]
    assert dec.take_control_messages(max_bytes=len(frame) + 1) == [{"op": "ping", "id": 7}] * 2
    assert dec.take_control_messages(max_bytes=1) == [{"op": "ping", "id": 7}]  # (one frame at least)
    assert dec.take_control_messages(max_bytes=3 * len(frame)) == [{"op": "ping", "id": 7}] * 3
    assert dec.take_control_messages() == [{"op": "ping", "id": 7}] * 3
    assert dec.buffered == 0


def test_a_run_leaves_data_frames_and_other_channels_to_next_frame() -> None:
    dec = FrameDecoder(trusted=True)
    dec.receive_data(encode_control(0, {"a": 1}) + encode_control(5, {"b": 2}) + encode_control(0, {"c": 3}) + encode_data(0, b"x"))
    assert dec.take_control_messages() == [{"a": 1}]
    assert dec.next_frame() == ControlFrame(5, {"b": 2})
    assert dec.take_control_messages() == [{"c": 3}]
    assert dec.take_control_messages() == []
    assert dec.next_frame() == DataFrame(0, b"x")
    assert dec.buffered == 0 and dec.next_frame() is None


# -- the quick profile check (no second encoding) against check_cbor, on hostile bodies ------


def _head(major: int, arg: int, wide: int) -> bytes:
    """A head for ``arg``: shortest, or ``wide`` steps wider than it need be (non-canonical)."""
    widths = [0, 1, 2, 4, 8]
    shortest = 0 if arg < 24 else 1 if arg < 0x100 else 2 if arg < 0x10000 else 3 if arg < 0x100000000 else 4
    width = widths[min(4, shortest + wide)]
    if width == 0:
        return bytes([major << 5 | arg])
    return bytes([major << 5 | (24 + [1, 2, 4, 8].index(width))]) + arg.to_bytes(width, "big")


def _hostile(value: Any, data: list[int], depth: int = 0) -> bytes:
    """``value`` written mostly as cbor2 would, but each head may be drawn the long way, a
    container or string indefinite, a map given a duplicate key, a value wrapped in a tag
    cbor2 decodes to a plain value (bignum, self-describe, shareable) or replaced by a float
    of another width: ``data`` says which, one number per choice, taken from its end.  (A
    float only the long way shows a float struct cannot pack at a narrower width.)"""
    odd = data.pop() if data else 0  # mostly 0: canonical
    wide = 1 if odd == 1 else 0
    if odd == 2 and depth < 3:
        tag = [55799, 28, 24, 2][(data.pop() if data else 0) % 4]
        if type(value) is int and value >= 0:  # (a bignum: as long as the head, or shorter, for some)
            raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
            return _head(6, 2, 0) + _head(2, len(raw), 0) + raw
        return _head(6, tag, 0) + _hostile(value, data, depth + 1)
    if type(value) is bool:
        return b"\xf5" if value else b"\xf4"
    if value is None:
        return b"\xf6"
    if type(value) is int:
        return _head(0, value, wide) if value >= 0 else _head(1, -1 - value, wide)
    if type(value) is float:
        width = "efd"[(data.pop() if data else 0) % 3]
        if odd == 3:
            try:
                return {"e": b"\xf9", "f": b"\xfa", "d": b"\xfb"}[width] + struct.pack(">" + width, value)
            except OverflowError:
                pass
        return b"\xfb" + struct.pack(">d", value)
    if type(value) in (str, bytes):
        raw = value.encode() if type(value) is str else value
        major = 3 if type(value) is str else 2
        if odd == 4:
            return bytes([major << 5 | 31]) + _head(major, len(raw), 0) + raw + b"\xff"
        return _head(major, len(raw), wide) + raw
    if type(value) is list:
        items = b"".join(_hostile(item, data, depth + 1) for item in value)
        if odd == 4:
            return b"\x9f" + items + b"\xff"
        return _head(4, len(value), wide) + items
    assert type(value) is dict
    entries = [_hostile(k, data, depth + 1) + _hostile(v, data, depth + 1) for k, v in value.items()]
    if odd == 5 and entries:
        entries.append(entries[0])  # a duplicate key (cbor2 keeps the last value)
    if odd == 6 and len(entries) >= 2:
        # The second entry's value a shared reference to the first's (tags 28 and 29): fewer
        # bytes than writing it again, when it is long enough.
        (k1, v1), (k2, _) = list(value.items())[:2]
        entries[0] = _hostile(k1, data, depth + 1) + b"\xd8\x1c" + _hostile(v1, data, depth + 1)
        entries[1] = _hostile(k2, data, depth + 1) + b"\xd8\x1d\x00"
    if odd == 4:
        return b"\xbf" + b"".join(entries) + b"\xff"
    return _head(5, len(entries), wide) + b"".join(entries)


def _verdict_of(fn: Any, body: bytes) -> Any:
    try:
        return ("ok", repr(fn(body)))
    except FrameError:
        return ("refused",)


@settings(max_examples=600, deadline=None)
@given(
    value=st.dictionaries(st.text(max_size=8) | st.integers(-70000, 70000), values | st.integers(0x10000, 0xFFFFFF), max_size=6),
    data=st.lists(st.sampled_from([0, 0, 0, 0, 1, 2, 3, 4, 5, 6]), max_size=60),
    items=st.sampled_from([None, 2, 5, 12, 4096]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=2),
)
def test_the_check_without_a_second_encoding_refuses_exactly_what_check_cbor_refuses(
    value: dict[Any, Any], data: list[int], items: int | None, flips: list[tuple[int, int]]
) -> None:
    """decode_control_body, whose first way measures the decoded value instead of encoding it
    again, takes exactly the bodies check_cbor takes (and gives cbor2's reading of them),
    over bodies written canonically and hostile ones: heads the long way, indefinite lengths,
    duplicate keys, tags cbor2 reads as plain values (bignums, self-describe, shared values
    and references to them), floats of every width, item budgets, damaged bytes."""
    body = bytearray(_hostile(value, list(data)))
    for where, byte in flips:
        body[where % len(body)] = byte
    body = bytes(body)

    assert _verdict_of(lambda raw: decode_control_body(raw, items), body) == _verdict_of(lambda raw: _checked_loads(raw, items), body)


@pytest.mark.parametrize(
    "body",
    [
        # Equal in length to the canonical form of what cbor2 reads, yet outside the profile.
        bytes.fromhex("a2") + b"\x61a" + bytes.fromhex("d81c1a000f4240") + b"\x61b" + bytes.fromhex("d81d00"),  # shared int
        bytes.fromhex("a1") + b"\x61a" + bytes.fromhex("c243010000"),  # bignum 65536 (5 bytes, as its canonical head)
        bytes.fromhex("d90100a2") + b"\x61a\x63xyz\x61b" + bytes.fromhex("d81900"),  # stringref namespace
        bytes.fromhex("a2") + b"\x61a" + bytes.fromhex("1801") + b"\x61b" + bytes.fromhex("f93c00"),  # long int + half float
        bytes.fromhex("a2") + b"\x61a\x01\x61a\x02",  # duplicate key
        bytes.fromhex("bf") + b"\x61a\x01" + bytes.fromhex("ff"),  # indefinite map
        bytes.fromhex("a1") + b"\x41a\x01",  # a bytes key
        # An indefinite array of 24 items takes the two bytes its canonical head takes.
        bytes.fromhex("a1") + b"\x61a" + bytes.fromhex("9f") + bytes(24) + bytes.fromhex("ff"),
        # ... and of 256 or more, a byte less: room for a head written the long way.
        bytes.fromhex("a1") + bytes.fromhex("7801") + b"a" + bytes.fromhex("9f") + bytes(300) + bytes.fromhex("ff"),
        # ... or, three of them, for a duplicate key whose value cbor2 drops.
        bytes.fromhex("a5") + b"\x61a\x00\x61a\x00"
        + b"".join(key + bytes.fromhex("9f") + bytes(256) + bytes.fromhex("ff") for key in (b"\x61b", b"\x61c", b"\x61d")),
    ],
)
def test_bodies_the_measure_alone_would_take_are_refused(body: bytes) -> None:
    try:
        check_cbor(body)
    except FrameError:
        pass
    else:  # pragma: no cover - each case is outside the profile
        raise AssertionError("check_cbor took it")
    with pytest.raises(FrameError):
        decode_control_body(body)


def test_a_canonical_body_is_taken_without_encoding_it_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain, float-free emit is taken by its measure: cbor2 never encodes it again."""
    body = cbor2.dumps({"op": "emit", "id": 100, "member": "Tick", "payload": b"x" * 64, "quiet": True, "source": "org.bench.Emitter"})
    import bus.wire.frames as frames_module

    def no_dumps(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("encoded again")

    monkeypatch.setattr(frames_module.cbor2, "dumps", no_dumps)
    assert decode_control_body(body) == cbor2.loads(body)


def test_a_canonical_body_with_tag_bytes_in_its_strings_is_taken_by_one_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain, float-free body of its canonical length whose byte strings hold bytes that
    could begin a tag, a bignum or an indefinite length (a binary payload) is taken by
    comparing it with its canonical encoding: no walk of the profile over its bytes, no second
    walk over the value."""
    import bus.wire.frames as frames_module

    payload = bytes(range(0xC0, 0xE0)) + b"\x9f\xbf\x5f\x7f" * 8
    body = cbor2.dumps({"op": "emit", "id": 100, "member": "Tick", "payload": payload, "quiet": True, "source": "org.x.A"})

    def refuse(*args: Any) -> Any:
        raise AssertionError("not the quick way")

    monkeypatch.setattr(frames_module, "check_cbor", refuse)
    monkeypatch.setattr(frames_module, "_items_within", refuse)
    assert decode_control_body(body, 4096) == cbor2.loads(body)


@pytest.mark.parametrize(
    "head",
    [b"\xd8\x1c", b"\xd8\x1d", b"\xd8\x19", b"\xd9\x01\x00", b"\xd9\x00\x1c", b"\xda\x00\x00\x00\x1d", b"\xdb" + bytes(7) + b"\x19"],
)
def test_a_body_that_could_hold_a_sharing_tag_is_checked_before_it_is_decoded(monkeypatch: pytest.MonkeyPatch, head: bytes) -> None:
    """The same with the head of a tag with which cbor2 makes one value reachable from many
    places in its payload (a shared value or reference, a string reference, in any width):
    check_cbor decides before cbor2 decodes it (a body that holds such a tag could make cbor2
    build a value of more paths than it has bytes), then cbor2 decodes it once, and nothing
    walks what it built."""
    import bus.wire.frames as frames_module
    from bus.wire.frames import _may_share

    payload = bytes(range(0xC0, 0xE0)) + head + b"\x9f\xbf\x5f\x7f" * 8
    assert _may_share(payload) and not _may_share(bytes(range(0xC0, 0xE0)))
    body = cbor2.dumps({"op": "emit", "id": 100, "member": "Tick", "payload": payload, "quiet": True, "source": "org.x.A"})
    order: list[str] = []
    real_check, real_loads = frames_module.check_cbor, cbor2.loads

    def check(*args: Any) -> Any:
        order.append("check")
        return real_check(*args)

    def loads(data: Any) -> Any:
        order.append("loads")
        return real_loads(data)

    def refuse(*args: Any) -> Any:
        raise AssertionError("a walk over the value")

    monkeypatch.setattr(frames_module, "check_cbor", check)
    monkeypatch.setattr(frames_module.cbor2, "loads", loads)
    monkeypatch.setattr(frames_module, "_items_within", refuse)
    monkeypatch.setattr(frames_module, "_canonical_size", refuse)
    assert decode_control_body(body, 4096) == real_loads(body)
    assert order == ["check", "loads"]


def _stringref_padded(head: int) -> bytes:
    """{"a": s, "b": s, "c": 0} for a 26-letter s, its second s a string reference (tag 256
    around the map, tag 25 for the reference), both tags' heads beginning with ``head``
    (0xD9, 0xDA or 0xDB: their arguments in 2, 4 or 8 bytes); then widened back to the
    canonical length by a duplicate key whose first value (a byte string of the bytes it
    lacks) is dropped."""
    width = {0xD9: 2, 0xDA: 4, 0xDB: 8}[head]
    letters = b"abcdefghijklmnopqrstuvwxyz"
    namespace = bytes((head,)) + (256).to_bytes(width, "big")
    reference = bytes((head,)) + (25).to_bytes(width, "big") + b"\x00"
    canonical = len(cbor2.dumps({"a": letters.decode(), "b": letters.decode(), "c": 0}))
    fixed = 1 + 2 + 2 + len(letters) + 2 + 2 + 1 + 3
    filler = canonical - fixed - len(namespace) - len(reference)
    return (
        namespace + b"\xa4" + b"\x61a\x78\x1a" + letters + b"\x61b" + reference
        + b"\x61c" + bytes((0x40 | filler,)) + bytes(filler) + b"\x61c\x00"
    )


@pytest.mark.parametrize(
    "body",
    [
        # Of the canonical length of what cbor2 reads, a tag byte in them: the comparison with
        # the canonical encoding (the way a binary payload takes) tells them apart.
        bytes.fromhex("a2") + b"\x61a" + bytes.fromhex("d81c1a000f4240") + b"\x61b" + bytes.fromhex("d81d00"),  # shared int
        bytes.fromhex("a1") + b"\x61a" + bytes.fromhex("c243010000"),  # bignum 65536
        # ... with a byte string holding tag bytes too (a binary payload beside them).
        bytes.fromhex("a2") + b"\x61a" + bytes.fromhex("c243010000") + b"\x61p" + bytes.fromhex("44c0d8dbff"),
        bytes.fromhex("a3") + b"\x61p" + bytes.fromhex("43d81c00") + b"\x61a" + bytes.fromhex("d81c1a000f4240")
        + b"\x61b" + bytes.fromhex("d81d00"),
        # Shorter than canonical, then widened back to it by long heads: a bignum of 2**32
        # (7 bytes against 9), one below -2**32, a bignum's tag in a long head; a string
        # reference (tag 256 around the map, tag 25 for the second "abcdefgh").
        bytes.fromhex("b801") + bytes.fromhex("780161") + bytes.fromhex("c2450100000000"),
        bytes.fromhex("b801") + bytes.fromhex("780161") + bytes.fromhex("c3450100000000"),
        bytes.fromhex("b801") + bytes.fromhex("d802450100000000") + b"\x61a",
        bytes.fromhex("d90100b802") + bytes.fromhex("780161") + b"\x68abcdefgh" + bytes.fromhex("780162d81900"),
        _stringref_padded(0xD9),  # (no other byte of _SHORT_WAYS in these three)
        _stringref_padded(0xDA),
        _stringref_padded(0xDB),
        # An indefinite-length array and map of 24 to 255 items: as long as canonical ones.
        bytes.fromhex("a1") + b"\x61a" + bytes.fromhex("9f") + bytes(30) + bytes.fromhex("ff"),
        bytes.fromhex("bf") + b"".join(cbor2.dumps(f"k{i:02}") + b"\x00" for i in range(30)) + bytes.fromhex("ff"),
    ],
)
def test_bodies_of_canonical_length_with_tag_bytes_are_refused_by_the_comparison(body: bytes) -> None:
    with pytest.raises(FrameError):
        check_cbor(body)
    message = cbor2.loads(body)
    from bus.wire.frames import _canonical_size

    assert _canonical_size(message, 1, _NO_BUDGET)[0] == len(body)  # (so the measure alone would take it)
    with pytest.raises(FrameError):
        decode_control_body(body)
    with pytest.raises(FrameError):
        decode_control_body(body, 4096)


def test_a_canonical_body_with_bytes_that_cannot_shorten_it_is_taken_by_its_measure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes that begin no short way (_SHORT_WAYS) -- one-byte tags other than the bignums',
    indefinite-length strings, the reserved and simple heads -- inside strings and integers
    of a canonical body leave it to its measure: it is not encoded again."""
    import bus.wire.frames as frames_module

    # (Written out, not worked out from _SHORT_WAYS: a byte put back in the scan fails this.)
    others = bytes((0xC0, 0xC1, *range(0xC4, 0xD8), *range(0xDC, 0xE0), 0x5F, 0x7F, 0xFF, 0xF7))
    message = {"op": "call", "id": 0xC5_D0_5F, "method": "echo", "args": [others, "\x7f\x5f"], "re": -0xD4}
    body = cbor2.dumps(message)
    assert b"\xc5\xd0\x5f" in body and b"\x38\xd3" in body  # (the integers' bytes are among them)

    def no_dumps(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("encoded again")

    monkeypatch.setattr(frames_module.cbor2, "dumps", no_dumps)
    assert decode_control_body(body) == message
    assert decode_control_body(body, 4096) == message


def test_the_scan_looks_for_exactly_the_bytes_of_short_ways() -> None:
    """_holds_short_way (the quick way's scan) and _SHORT_WAYS (the bytes argued for) are the
    same bytes: each byte alone, and each inside a body of bytes that are not -- in a body
    given as bytes, as a bytearray and as an mmap (a large message's buffer, scanned its own
    way)."""
    from bus.wire.frames import _SHORT_WAYS, _holds_short_way

    for kind in ("bytes", "bytearray", "mmap"):
        for byte in range(256):
            assert _holds_short_way(_body_as(bytes((byte,)), kind)) == (byte in _SHORT_WAYS), (kind, hex(byte))
            inside = b"x" * 1000 + bytes((byte,)) + b"x" * 50
            assert _holds_short_way(_body_as(inside, kind)) == (byte in _SHORT_WAYS), (kind, hex(byte))
        assert not _holds_short_way(_body_as(bytes(b for b in range(256) if b not in _SHORT_WAYS) * 8, kind)), kind


_INNER_ITEMS = [
    0, 23, 24, 2**32, 2**64 - 1, -1, -(2**40), b"", b"\x01\x02", "", "2020-01-01T00:00:00Z", "1", [], [1, 2], [-2, 3],
    [1, [2]], {}, {"a": 1}, {1: "b"}, None, True, False, 1.5, 0.0,
]


@pytest.mark.parametrize(
    ("chunks", "more"),
    [
        ([], 1), ([b""], 2), ([b"a"], 2), ([b"a", b""], 3), ([b"ab" * 12], 2), ([b"a" * 23, b"a"], 2),
        ([b"a" * 255, b"a"], 2), ([b"a" * 65535, b"a"], 1), ([b"a" * 65535, b"a" * 23], 1),
    ],
)
def test_an_indefinite_length_string_takes_at_least_one_byte_more_than_its_canonical_form(chunks: list[bytes], more: int) -> None:
    """What lets _SHORT_WAYS leave out 0x5F and 0x7F: an indefinite-length string is longer
    than the canonical form of what cbor2 makes of it -- by one byte at the least (no chunk,
    or 65536 bytes or more in chunks with shorter heads) -- so it cannot make up for a long
    head elsewhere; a body holding one is refused."""
    from bus.wire.frames import _SHORT_WAYS, _canonical_size

    for major in (2, 3):
        item = bytes((major << 5 | 31,)) + b"".join(cbor2.dumps(c if major == 2 else c.decode()) for c in chunks) + b"\xff"
        body = b"\xa1\x61a" + item
        size, _ = _canonical_size(cbor2.loads(body), 1, _NO_BUDGET)
        assert len(body) - size == more
        assert not set(body) & set(_SHORT_WAYS)
        with pytest.raises(FrameError):
            decode_control_body(body)


@pytest.mark.parametrize(
    ("value", "spare"),
    [
        (2**16 - 1, -1), (2**16, 0), (2**24 - 1, 0), (2**24, -1), (2**32 - 1, -1), (2**32, 2), (2**40 - 1, 2),
        (2**40, 1), (2**48 - 1, 1), (2**48, 0), (2**56 - 1, 0), (2**56, -1), (2**64 - 1, -1),
    ],
)
def test_a_bignum_is_as_short_as_the_canonical_form_where_short_ways_says(value: int, spare: int) -> None:
    """_SHORT_WAYS's reason for 0xC2 and 0xC3: a bignum (without leading zeros) takes fewer
    bytes than the canonical form of its integer from 2**32 to 2**48 - 1, as many from 2**16
    to 2**24 - 1 and from 2**48 to 2**56 - 1, and more elsewhere; the same for tag 3 and the
    negative integers one below."""
    digits = value.to_bytes((value.bit_length() + 7) // 8, "big")
    for tag, number in ((0xC2, value), (0xC3, -1 - value)):
        bignum = bytes((tag, 0x40 | len(digits))) + digits
        assert cbor2.loads(bignum) == number
        assert len(cbor2.dumps(number)) - len(bignum) == spare


@pytest.mark.parametrize("tag", [t for t in range(24) if t not in (2, 3)])
def test_a_one_byte_tag_other_than_a_bignum_never_decodes_to_a_plain_value(tag: int) -> None:
    """What lets _SHORT_WAYS leave out the one-byte heads of tags 0-23 but 2 and 3: cbor2 reads
    none of them, around any item, to a value the quick way measures (it fails, or makes a
    datetime, a Decimal or a CBORTag), so such a body is never taken by its length.  (Held
    here against the cbor2 installed, since a later cbor2 could read more tags.)"""
    from bus.wire.frames import _canonical_size

    for inner in _INNER_ITEMS:
        body = b"\xa1\x61a" + bytes((0xC0 | tag,)) + cbor2.dumps(inner)
        try:
            message = cbor2.loads(body)
        except Exception:
            message = None
        if message is not None:
            assert _canonical_size(message, 1, _NO_BUDGET) == (-1, 0), (tag, inner, message)
        with pytest.raises(FrameError):
            decode_control_body(body)


@settings(max_examples=200)
@given(
    st.text(min_size=1, max_size=300),
    st.text(min_size=1, max_size=300),
    st.binary(max_size=300),
    st.text(max_size=40),
    st.text(max_size=60),
)
def test_event_frames_are_the_bytes_encode_control_makes(source: str, member: str, payload: bytes, sender: str, identity: str) -> None:
    """EventFrames (busd's event encoder) makes exactly what encode_control makes of the
    event message, every head in its shortest form: a memo hit as well as a miss."""
    events = EventFrames(keep=2)
    message = {"source": source, "member": member, "payload": payload, "sender": sender, "identity": identity, "event": "event"}
    expected = encode_control(0, message, 1 << 20)
    assert events.encode(source, member, payload, sender, identity, 1 << 20) == expected
    assert events.encode(source, member, payload, sender, identity, 1 << 20) == expected  # (its kept parts)
    frame = decode_all(expected)[0]
    assert frame == ControlFrame(0, message)


@pytest.mark.parametrize("size", [0, 23, 24, 255, 256, 65535, 65536, 200_000])
def test_event_frames_write_each_payload_length_in_its_shortest_head(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    message = {"source": "org.example.A", "member": "Tick", "payload": payload, "sender": ":3", "identity": "k" * 44, "event": "event"}
    assert EventFrames().encode("org.example.A", "Tick", payload, ":3", "k" * 44, 1 << 20) == encode_control(0, message, 1 << 20)


def test_event_frames_refuse_a_body_over_the_limit_and_keep_a_bounded_memo() -> None:
    events = EventFrames(keep=4)
    body = len(encode_control(0, {"source": "a", "member": "b", "payload": b"x" * 100, "sender": ":1", "identity": "k", "event": "event"})) - HEADER.size
    assert len(events.encode("a", "b", b"x" * 100, ":1", "k", body)) == HEADER.size + body
    with pytest.raises(LimitError):
        events.encode("a", "b", b"x" * 101, ":1", "k", body)
    for i in range(50):  # many emitters and kinds: what is kept stays within its bound
        events.encode(f"org.example.N{i}", "Tick", b"", f":{i}", "k")
        assert len(events._parts) <= 4
    with pytest.raises(LocalProtocolError):
        events.encode("a", 5, b"", ":1", "k")  # type: ignore[arg-type]


def test_event_frames_refuse_text_that_is_no_utf8_as_encode_control_does() -> None:
    """Refused with the error encode_control gives (a BusError, which busd logs), not a
    UnicodeEncodeError out of the fan-out; and nothing is kept for it."""
    message = {"source": "\ud800", "member": "b", "payload": b"", "sender": ":1", "identity": "k", "event": "event"}
    with pytest.raises(LocalProtocolError):
        encode_control(0, message)
    events = EventFrames()
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        events.encode("\ud800", "b", b"", ":1", "k")
    assert not events._parts


@settings(max_examples=300)
@given(
    st.text(min_size=1, max_size=300),
    st.none() | st.text(max_size=300),
    st.none() | st.text(max_size=40),
    st.binary(max_size=300) | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536]).map(bytes),
    st.integers(0, 2**64 - 1) | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32]),
)
def test_emit_frames_are_the_bytes_encode_control_makes(
    member: str, source: str | None, destination: str | None, payload: bytes, request_id: int
) -> None:
    """EmitFrames (a publishing client's encoder) makes exactly what encode_control makes of
    the quiet emit, as publish builds it: a memo hit as well as a miss; and a checking
    decoder knows the second such emit of a kind by its shape."""
    frames = EmitFrames(keep=2)
    message: dict[str, Any] = {"member": member, "payload": payload, "quiet": True}
    if source is not None:
        message["source"] = source
    if destination is not None:
        message["destination"] = destination
    message["op"] = "emit"
    message["id"] = request_id
    expected = encode_control(0, message, 1 << 20)
    assert frames.encode(member, source, destination, payload, request_id, 1 << 20) == expected
    assert frames.encode(member, source, destination, payload, request_id, 1 << 20) == expected  # (its kept parts)
    dec = FrameDecoder(1 << 20, 1 << 20, 4096)
    assert dec.take_control_messages(expected + expected) == [message, message]
    assert dec._shapes or len(expected) > 512


def test_emit_frames_refuse_what_encode_control_refuses_and_keep_a_bounded_memo() -> None:
    frames = EmitFrames(keep=4)
    body = len(encode_control(0, {"member": "T", "payload": b"x" * 100, "quiet": True, "op": "emit", "id": 7})) - HEADER.size
    assert len(frames.encode("T", None, None, b"x" * 100, 7, body)) == HEADER.size + body
    with pytest.raises(LimitError):
        frames.encode("T", None, None, b"x" * 101, 7, body)
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        frames.encode("\ud800", None, None, b"", 1)
    with pytest.raises(LocalProtocolError):
        frames.encode("T", 5, None, b"", 1)  # type: ignore[arg-type]
    for bad_id in (-1, 1 << 64):
        with pytest.raises(LocalProtocolError):
            frames.encode("T", None, None, b"", bad_id)
    for i in range(50):  # many kinds: what is kept stays within its bound
        frames.encode(f"M{i}", "org.example.A", None, b"", i)
        assert len(frames._parts) <= 4


@settings(max_examples=300, deadline=None)
@given(
    method=st.text(min_size=1, max_size=300),
    argument=st.binary(max_size=300) | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536]).map(bytes),
    request_id=st.integers(0, 2**64 - 1) | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32]),
)
def test_call_frames_are_the_bytes_encode_control_makes(method: str, argument: bytes, request_id: int) -> None:
    """CallFrames (a caller's encoder of calls of one byte-string argument) makes exactly what
    encode_control makes of the call, as RpcConnection.call builds it: a memo hit as well as a
    miss; and a service's channel decoder knows the second such call by its shape."""
    frames = CallFrames(keep=2)
    call = {"method": method, "args": [argument], "op": "call", "id": request_id}
    expected = encode_control(0, call, 1 << 20)
    assert frames.encode(method, argument, request_id, 1 << 20) == expected
    assert frames.encode(method, argument, request_id, 1 << 20) == expected  # (its kept parts)
    dec = FrameDecoder(1 << 20, 1 << 20)
    assert [dec.whole_message_from(expected), dec.whole_message_from(expected)] == [call, call]
    assert dec._call_shapes or len(expected) > 512


def test_call_frames_refuse_what_encode_control_refuses_and_keep_a_bounded_memo() -> None:
    frames = CallFrames(keep=4)
    body = len(encode_control(0, {"method": "m", "args": [b"x" * 100], "op": "call", "id": 7})) - HEADER.size
    assert len(frames.encode("m", b"x" * 100, 7, body)) == HEADER.size + body
    with pytest.raises(LimitError):
        frames.encode("m", b"x" * 101, 7, body)
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        frames.encode("\ud800", b"", 1)
    with pytest.raises(LocalProtocolError):
        frames.encode(5, b"", 1)  # type: ignore[arg-type]
    for bad_id in (-1, 1 << 64):
        with pytest.raises(LocalProtocolError):
            frames.encode("m", b"", bad_id)
    for i in range(50):  # many methods: what is kept stays within its bound
        frames.encode(f"m{i}", b"", i)
        assert len(frames._parts) <= 4


# -- a trusted run knows the broker's events of one kind by their bytes --------------------------

def _reads_of(bodies: list[bytes], others: list[tuple[int, dict[str, Any]]], damage: list[tuple[int, int]], cuts: list[int]) -> list[bytes]:
    """CONTROL frames of ``bodies``, with ``others`` (messages) put in at their places, bytes
    damaged, cut into reads."""
    encoded = [HEADER.pack(1, 0, 0, len(body)) + body for body in bodies]
    for where, message in others:
        encoded.insert(where % (len(encoded) + 1), encode_control(0, message, 1 << 20))
    return _damaged_reads(encoded, damage, cuts)


_KINDS = [
    ("org.example.A", "Tick", ":3", "k" * 44),
    ("org.example.A", "Tock", ":3", "k" * 44),
    ("org.example.B", "Tick", ":4", "j" * 44),
    ("é€", "Tick", "", ""),
]


def _event_body(kind: int | tuple[str, str, str, str], payload_item: bytes) -> bytes:
    """An event's body as busd writes it, with ``payload_item`` (the payload's CBOR item, as
    given: any head, or anything else) in its place; ``kind``: its names, or their index in
    _KINDS."""
    source, member, sender, identity = _KINDS[kind] if isinstance(kind, int) else kind
    dumps = cbor2.dumps
    return (
        b"\xa6" + dumps("source") + dumps(source) + dumps("member") + dumps(member) + dumps("payload")
        + payload_item
        + dumps("sender") + dumps(sender) + dumps("identity") + dumps(identity) + dumps("event") + dumps("event")
    )


def _bytes_written(data: bytes, way: int) -> bytes:
    """A byte string's item: its shortest head (way 0), a head in 1, 2, 4 or 8 bytes whatever
    its length (ways 1-4), or in chunks (5)."""
    n = len(data)
    if way == 0:
        return cbor2.dumps(data)
    if way == 5:
        return b"\x5f" + cbor2.dumps(data[:1]) + cbor2.dumps(data[1:]) + b"\xff"
    size = 1 << (way - 1)
    if n >= 1 << (8 * size):
        return cbor2.dumps(data)
    return bytes((0x57 + way,)) + n.to_bytes(size, "big") + data


_payload_items = (
    st.tuples(st.binary(max_size=300), st.integers(0, 5)).map(lambda t: _bytes_written(*t))
    | st.builds(cbor2.dumps, st.text(max_size=20) | st.integers() | st.none() | st.lists(st.integers(), max_size=3))
    | st.sampled_from([b"", b"\x41", b"\x41x\x41y", b"\x58", b"\x59\x00", b"\x5b" + bytes(8), b"\x42x", b"\x5f\xff", b"\xc2\x41\x01"])
    # (heads no byte string has, each followed by what a head in 16 to 128 bytes would count)
    | st.sampled_from([bytes((head,)) + (3).to_bytes(1 << (head - 0x58), "big") + b"abc" for head in (0x5C, 0x5D, 0x5E, 0x5F)])
)


@settings(max_examples=400, deadline=None)
@given(
    events=st.lists(st.tuples(st.integers(0, len(_KINDS) - 1), _payload_items), min_size=1, max_size=10),
    others=st.lists(st.tuples(st.integers(0, 9), messages), max_size=2),
    damage=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=2),
    cuts=st.lists(st.integers(1, 600), max_size=4),
    pattern=st.lists(st.booleans(), max_size=4),
)
def test_a_trusted_run_makes_of_event_bodies_what_cbor2_makes_of_them(
    events: list[tuple[int, bytes]], others: list[tuple[int, dict[str, Any]]], damage: list[tuple[int, int]],
    cuts: list[int], pattern: list[bool],
) -> None:
    """A trusted run makes the broker's events of a kind it decoded before without cbor2: it
    still gives exactly what cbor2 gives (next_frame's way), in order, whatever the payload's
    item is (a byte string with any head, in chunks, no byte string, two items, cut short),
    with other messages between them, damaged bytes and any reads."""
    pieces = _reads_of([_event_body(kind, item) for kind, item in events], others, damage, cuts)
    assert repr(_frames_taking_runs(pieces, True, pattern)) == repr(_frames_the_usual_way(pieces, True))


def test_a_trusted_run_decodes_a_kind_of_event_once_with_cbor2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker's events of the kind last decoded are made without cbor2 (the subscriber's
    hot path); any other body, or a kind not seen before, goes through cbor2 (and its kind
    is the one known after it)."""
    calls: list[int] = []
    real_loads = cbor2.loads

    def counting_loads(data: bytes) -> Any:
        calls.append(len(data))
        return real_loads(data)

    monkeypatch.setattr(cbor2, "loads", counting_loads)
    bodies = [_event_body(0, cbor2.dumps(bytes([i]) * i)) for i in range(40)]  # (heads of 1 and 2 bytes)
    bodies += [_event_body(0, _bytes_written(b"xyz", way)) for way in (1, 2, 3, 4)]  # (not the shortest heads)
    bodies += [_event_body(2, cbor2.dumps(b"a")), _event_body(2, cbor2.dumps(b"b"))]  # (another kind)
    bodies += [_event_body(0, cbor2.dumps(b"c")), _event_body(0, cbor2.dumps("text"))]  # (back; a text payload)
    wire = b"".join(HEADER.pack(1, 0, 0, len(body)) + body for body in bodies)
    dec = FrameDecoder(1 << 20, 1 << 16, trusted=True)
    run = dec.take_control_messages(wire)
    assert run == [real_loads(body) for body in bodies]
    assert [message["payload"] for message in run[40:44]] == [b"xyz"] * 4
    assert len(calls) == 3  # the first of kind 0, the first of kind 2, the text (kind 0 is known still)
    # The names are the ones decoded first, shared by the events of their kind.
    assert run[1]["identity"] is run[2]["identity"] and run[1] is not run[2]
    run[1]["payload"] = b"changed"  # (each map its own: a handler may change or keep it)
    assert run[2]["payload"] == bytes([2]) * 2
    assert dec.buffered == 0
    # The kind is known from one read to the next.
    later = [_event_body(0, cbor2.dumps(b"later")), _event_body(0, cbor2.dumps(b"and later"))]
    assert dec.take_control_messages(b"".join(HEADER.pack(1, 0, 0, len(body)) + body for body in later)) == [real_loads(b) for b in later]
    assert len(calls) == 3


def test_a_decoder_learns_shapes_on_credit_that_bodies_taken_by_them_earn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Learning a shape costs more than decoding the body: a decoder learns two at first, then
    one more for every _LEARN_COST bodies its shapes took.  Kinds in turn (up to _SHAPES) are
    all known; a stream of kinds never seen again stops being learned after two (and costs
    the failed tests, no learning); the credit that known kinds earn back lets it learn again."""
    import bus.wire.frames as frames_module

    learned: list[int] = []
    decoded: list[int] = []
    real_shape, real_loads = frames_module._event_shape, cbor2.loads

    def counting_shape(message: dict[Any, Any]) -> Any:
        learned.append(1)
        return real_shape(message)

    def counting_loads(data: bytes) -> Any:
        decoded.append(1)
        return real_loads(data)

    monkeypatch.setattr(frames_module, "_event_shape", counting_shape)
    monkeypatch.setattr(cbor2, "loads", counting_loads)

    def take(bodies: list[bytes]) -> None:
        wire = b"".join(HEADER.pack(1, 0, 0, len(body)) + body for body in bodies)
        assert dec.take_control_messages(wire) == [real_loads(body) for body in bodies]

    dec = FrameDecoder(1 << 20, 1 << 16, trusted=True)
    take([_event_body(i % 3, cbor2.dumps(bytes([i]))) for i in range(30)])  # (three kinds in turn)
    # Kinds 0 and 1 on the first credit; kind 2 at its third time, once four were taken.
    assert (len(decoded), len(learned), len(dec._shapes)) == (5, 3, 3)
    strangers = [("org.example.N%d" % i, "Tick", ":%d" % i, "k") for i in range(40)]
    take([_event_body(names, cbor2.dumps(b"s")) for names in strangers])
    assert (len(decoded), len(learned), len(dec._shapes)) == (45, 5, frames_module._SHAPES)
    known = dec._shapes[0][2]
    take([_event_body(known, cbor2.dumps(b"k"))] * frames_module._LEARN_COST + [_event_body(("org.example.New", "Tick", ":9", "k"), b"\x41n")] * 2)
    assert (len(decoded), len(learned)) == (46, 6)  # (learned once more: the second of it was taken)


def test_an_untrusted_run_never_takes_a_body_by_its_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """busd's decoders check every body: an event-shaped request that only the profile check
    refuses (a payload with a head longer than it needs) is refused as ever, after the same
    body written right was taken."""
    good = _event_body(0, cbor2.dumps(b"ab"))
    padded = _event_body(0, b"\x58\x02ab")
    dec = FrameDecoder()
    dec.receive_data(b"".join(HEADER.pack(1, 0, 0, len(body)) + body for body in (good, good, padded)))
    assert dec.take_control_messages() == [cbor2.loads(good)] * 2
    assert dec.take_control_messages() == []
    with pytest.raises(FrameError):
        dec.next_frame()


# -- a checked run knows a connection's requests with a payload by their shape --------------------


def _uint_written(n: int, way: int) -> bytes:
    """An unsigned integer's item: its shortest head (way 0) or a head in 1, 2, 4 or 8 bytes."""
    if way == 0:
        return cbor2.dumps(n)
    size = 1 << (way - 1)
    return cbor2.dumps(n) if n >= 1 << (8 * size) else bytes((0x17 + way,)) + n.to_bytes(size, "big")


def _request_body(names: tuple[str, str], payload_item: bytes, id_item: bytes, quiet: Any = True) -> bytes:
    """An emit as ``publish`` writes it, with the payload's and the id's items as given."""
    member, source = names
    dumps = cbor2.dumps
    return (
        b"\xa6" + dumps("member") + dumps(member) + dumps("payload") + payload_item
        + dumps("quiet") + dumps(quiet) + dumps("source") + dumps(source) + dumps("op") + dumps("emit") + dumps("id") + id_item
    )


_REQUEST_NAMES = [("Tick", "org.example.A"), ("Tock", "org.example.A"), ("Tick", "org.example.é€")]
_id_items = (
    st.tuples(st.integers(0, 2**64 - 1) | st.sampled_from([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32]), st.integers(0, 4)).map(lambda t: _uint_written(*t))
    | st.builds(cbor2.dumps, st.integers(-(2**64), -1) | st.text(max_size=3) | st.floats(allow_nan=False) | st.integers(2**64, 2**70))
    | st.sampled_from([b"", b"\x18", b"\x19\x01", b"\x01\x02", b"\xc2\x41\x01", b"\x1c", b"\x1f", b"\x20"])
)


@settings(max_examples=600, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.integers(0, len(_REQUEST_NAMES) - 1), _payload_items, _id_items, st.sampled_from([True, True, True, False, 1, None])),
        min_size=1, max_size=10,
    ),
    others=st.lists(st.tuples(st.integers(0, 9), messages), max_size=2),
    damage=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=2),
    cuts=st.lists(st.integers(1, 600), max_size=4),
    pattern=st.lists(st.booleans(), max_size=4),
)
@example(  # (a payload and an id whose heads are longer than they need be, after the same written right)
    requests=[(0, b"\x41a", b"\x01", True), (0, b"\x58\x01a", b"\x01", True), (0, b"\x41a", b"\x18\x01", True)],
    others=[], damage=[], cuts=[], pattern=[],
)
def test_a_checked_run_takes_a_shaped_request_only_as_the_profile_check_would(
    requests: list[tuple[int, bytes, bytes, Any]], others: list[tuple[int, dict[str, Any]]], damage: list[tuple[int, int]],
    cuts: list[int], pattern: list[bool],
) -> None:
    """A checked run takes requests shaped as one it checked before (the same bytes around a
    byte-string payload and an unsigned id) without checking them all again: it still gives
    exactly what next_frame's check gives, and refuses exactly what it refuses, after the
    same frames -- whatever the payload's and the id's items are (heads longer than they need
    be, in chunks, other types, tags, cut short), with other messages between them, damaged
    bytes and any reads."""
    bodies = [_request_body(_REQUEST_NAMES[names], payload_item, id_item, quiet) for names, payload_item, id_item, quiet in requests]
    pieces = _reads_of(bodies, others, damage, cuts)
    assert repr(_frames_taking_runs(pieces, False, pattern)) == repr(_frames_the_usual_way(pieces, False))


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Has decode_control_body (as frames.py calls it) note the length of each body it
    checks in the list returned."""
    import bus.wire.frames as frames_module

    checked: list[int] = []
    real_check = frames_module.decode_control_body

    def counting_check(body: bytes, max_items: int | None = None) -> Any:
        checked.append(len(body))
        return real_check(body, max_items)

    monkeypatch.setattr(frames_module, "decode_control_body", counting_check)
    return checked


def test_a_checked_run_checks_a_shape_of_request_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests shaped as the last one with a byte-string payload this decoder checked are
    taken without decode_control_body, from one read to the next; any other shape, or a
    payload or id whose head is longer than it need be, is checked (and refused) as ever."""
    checked = _count_checks(monkeypatch)

    def wire(bodies: list[bytes]) -> bytes:
        return b"".join(HEADER.pack(1, 0, 0, len(body)) + body for body in bodies)

    names = _REQUEST_NAMES[0]
    sizes = [0, 1, 23, 24, 255, 256, 1000, 65535, 65536, 70000]
    ids = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
    bodies = [_request_body(names, cbor2.dumps(bytes(size)), cbor2.dumps(i)) for size, i in zip(sizes, ids)]
    dec = FrameDecoder(1 << 20, 1 << 20, 4096)
    run = dec.take_control_messages(wire(bodies))
    assert run == [decode_control_body(body, 4096) for body in bodies]
    assert len(checked) == 1  # (the first: every other is of its shape)
    run[1]["payload"] = b"changed"  # (each map its own)
    assert run[2]["payload"] == bytes(23) and run[2]["quiet"] is True
    later = [_request_body(names, cbor2.dumps(b"x"), cbor2.dumps(7))]
    assert dec.take_control_messages(wire(later)) == [decode_control_body(later[0])]
    assert len(checked) == 1
    # Another shape is checked, and known after it; not a byte string, or no id last, is checked.
    other = [_request_body(_REQUEST_NAMES[1], cbor2.dumps(b"y"), cbor2.dumps(8)), _request_body(_REQUEST_NAMES[1], cbor2.dumps(b"z"), cbor2.dumps(9))]
    text = encode_control(0, {"member": "Tock", "payload": "text", "op": "emit", "id": 10})[HEADER.size :]
    assert dec.take_control_messages(wire([*other, text, other[0]])) == [decode_control_body(b) for b in [*other, text, other[0]]]
    assert len(checked) == 3
    # Heads longer than they need be, heads no byte string or integer has, bytes after the
    # id: refused by the check, as ever, after the request of the same shape before them.
    payloads = [b"\x58\x01y", b"\x59\x00\x64" + bytes(100), b"\x5a\x00\x00\x01\x2c" + bytes(300), b"\x5b" + (1).to_bytes(8, "big") + b"y"]
    payloads += [bytes((head,)) + (1).to_bytes(1 << (head - 0x58), "big") + b"y" for head in (0x5C, 0x5D, 0x5E, 0x5F)]
    ids = [b"\x18\x08", b"\x19\x00\x64", b"\x1a\x00\x00\x01\x2c", b"\x1b" + (70000).to_bytes(8, "big"), b"\x08\x00", b"\x19\x01\x2c\x00"]
    ids += [bytes((head,)) + (300).to_bytes(1 << (head - 0x18), "big") for head in (0x1C, 0x1D, 0x1E)] + [b"\x1f"]
    bad = [_request_body(_REQUEST_NAMES[1], item, b"\x08") for item in payloads] + [_request_body(_REQUEST_NAMES[1], b"\x41y", item) for item in ids]
    for body in bad:
        dec = FrameDecoder(1 << 20, 1 << 20, 4096)
        assert dec.take_control_messages(wire([other[0], body, other[1]])) == [decode_control_body(other[0])]
        with pytest.raises(FrameError):
            dec.next_frame()
    # The map kept for a shape is not the one handed on: changing that one changes no other.
    dec = FrameDecoder(1 << 20, 1 << 20, 4096)
    first, second = dec.take_control_messages(wire(other))
    first["quiet"] = False
    assert second["quiet"] is True and dec.take_control_messages(wire(other[1:]))[0]["quiet"] is True


def test_a_checked_run_knows_request_shapes_in_turn_and_stops_learning_shapes_never_seen_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Emits of a few kinds in turn (up to _SHAPES) are all known after their first; a peer
    whose every request has a new shape makes busd learn two, then none until its shapes
    are taken again (each learning costs busd more than the check), so it costs busd the
    check and a few failed tests per request -- no learning."""
    import bus.wire.frames as frames_module

    checked: list[int] = []
    learned: list[int] = []
    real_check, real_shape = frames_module.decode_control_body, frames_module._request_shape

    def counting_check(body: bytes, max_items: int | None = None) -> Any:
        checked.append(1)
        return real_check(body, max_items)

    def counting_shape(message: dict[Any, Any], body: bytes) -> Any:
        learned.append(1)
        return real_shape(message, body)

    monkeypatch.setattr(frames_module, "decode_control_body", counting_check)
    monkeypatch.setattr(frames_module, "_request_shape", counting_shape)
    dec = FrameDecoder(1 << 20, 1 << 20, 4096)

    def take(bodies: list[bytes]) -> None:
        wire = b"".join(HEADER.pack(1, 0, 0, len(body)) + body for body in bodies)
        assert dec.take_control_messages(wire) == [real_check(body, 4096) for body in bodies]

    take([_request_body(_REQUEST_NAMES[i % 2], cbor2.dumps(bytes([i])), cbor2.dumps(i)) for i in range(20)])
    assert (len(checked), len(learned)) == (2, 2)
    take([_request_body((f"M{i}", "org.example.A"), b"\x41s", cbor2.dumps(100 + i)) for i in range(40)])
    assert (len(checked), len(learned)) == (42, 4) and len(dec._shapes) == 4


def test_a_request_shape_is_kept_only_for_plain_values_and_a_bounded_size() -> None:
    """A decoder keeps a request's shape only where the request's other values are plain and
    immutable (each request gets its own copy of the map, and shares them) and the bytes
    around the payload are at most SHAPE_BYTES: what a connection can make busd keep is
    bounded."""
    from bus.wire.frames import SHAPE_BYTES

    def shape_after(message: dict[str, Any]) -> Any:
        dec = FrameDecoder(1 << 20, 1 << 20, 4096)
        dec.receive_data(encode_control(0, message, 1 << 20))
        assert dec.take_control_messages() == [message]
        return dec._shapes[0] if dec._shapes else None

    plain = {"member": "Tick", "payload": b"x", "n": 5, "flag": None, "op": "emit", "id": 3}
    assert shape_after(plain) is not None
    assert shape_after({**plain, "n": [1]}) is None  # (a list: shared by every request of its shape)
    assert shape_after({**plain, "n": {"a": 1}}) is None
    assert shape_after({**plain, "n": 1.5}) is None  # (floats: cbor2 writes some in other sizes)
    assert shape_after({"member": "Tick", "payload": b"x", "op": "emit"}) is None  # (no id)
    assert shape_after({"member": "Tick", "payload": b"x", "op": "emit", "id": -1}) is None
    assert shape_after({"id": 3, "payload": b"x", "op": "emit"}) is None  # (the id not last)
    assert shape_after({"payload": b"x", "id": 3}) is not None
    assert shape_after({"member": "T" * (SHAPE_BYTES - 30), "payload": b"x", "op": "emit", "id": 3}) is not None
    assert shape_after({"member": "T" * SHAPE_BYTES, "payload": b"x", "op": "emit", "id": 3}) is None


def test_a_request_shape_keeps_no_payload() -> None:
    """What a decoder keeps of a request's shape is its bytes around the payload and the
    other values, not the payload it was learned from: an idle connection whose last
    request carried a payload of max_control bytes does not make busd hold on to them."""
    from bus.wire.frames import SHAPE_BYTES

    payload = bytes(60_000)
    message = {"member": "Tick", "payload": payload, "op": "emit", "id": 3}
    dec = FrameDecoder(1 << 20, 1 << 20, 4096)
    dec.receive_data(encode_control(0, message, 1 << 20))
    assert dec.take_control_messages() == [message]
    shape = dec._shapes[0]
    assert shape is not None
    head, tail, kept = shape
    held = len(head) + len(tail) + sum(len(value) for value in kept.values() if type(value) in (str, bytes))
    assert held <= 2 * SHAPE_BYTES  # (its text values are in head and tail too)
    # (and the shape still gives the next requests their own payloads, in the same key order)
    later = {"member": "Tick", "payload": b"later", "op": "emit", "id": 4}
    assert dec.take_control_messages(encode_control(0, later)) == [later]
    assert list(dec.take_control_messages(encode_control(0, later))[0]) == list(later)


def test_a_request_too_big_for_a_shape_costs_no_encoding_of_its_items(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose bytes around the payload are over SHAPE_BYTES is not encoded again
    item by item to find that out: a peer's requests of max_items tiny items with a payload
    (which can never be a shape) cost busd the check they always cost, not as much again."""
    import bus.wire.frames as frames_module

    message: dict[Any, Any] = {i: i for i in range(2045)}
    message["payload"], message["id"] = b"x", 1
    body = cbor2.dumps(message)
    checked = frames_module.decode_control_body(body, 4096)
    calls: list[int] = []
    real_dumps = cbor2.dumps

    def counting_dumps(value: Any) -> bytes:
        calls.append(1)
        return real_dumps(value)

    monkeypatch.setattr(cbor2, "dumps", counting_dumps)
    assert frames_module._request_shape(checked, body) is None
    assert len(calls) <= 4


def _call_body(method: str, argument_item: bytes, id_item: bytes, args_head: bytes = b"\x81") -> bytes:
    """An RPC call as ``RpcConnection.call`` writes it (``{"method", "args", "op", "id"}``),
    with the items of its argument and its id, and its array's head, as given."""
    dumps = cbor2.dumps
    return (
        b"\xa4" + dumps("method") + dumps(method) + dumps("args") + args_head + argument_item
        + dumps("op") + dumps("call") + dumps("id") + id_item
    )


def _whole_or_refused(dec: FrameDecoder, body: bytes) -> Any:
    """What ``whole_message_from`` makes of ``body`` in one CONTROL frame: the map with its
    keys in order, or the name of the error that refused it."""
    try:
        message = dec.whole_message_from(HEADER.pack(1, 0, 0, len(body)) + body)
    except FrameError as exc:
        return type(exc).__name__
    assert message is not None
    return message, list(message)


def _checked_or_refused(body: bytes) -> Any:
    try:
        message = decode_control_body(body)
    except FrameError as exc:
        return type(exc).__name__
    return message, list(message)


@settings(max_examples=600, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.sampled_from(["echo", "take", "é€"]),
            _payload_items,
            _id_items,
            st.sampled_from([b"\x81", b"\x81", b"\x81", b"\x82\x01", b"\x80", b"\x98\x01", b"\x9f", b"\xc2\x81"]),
        ),
        min_size=1, max_size=10,
    ),
)
@example(  # (an argument and an id whose heads are longer than they need be, after the same written right)
    calls=[("echo", b"\x41a", b"\x01", b"\x81"), ("echo", b"\x58\x01a", b"\x01", b"\x81"), ("echo", b"\x41a", b"\x18\x01", b"\x81")],
)
def test_whole_message_from_takes_a_shaped_call_only_as_the_profile_check_would(calls: list[tuple[str, bytes, bytes, bytes]]) -> None:
    """A channel's decoder takes RPC calls shaped as one it checked before (the same bytes
    around one byte-string argument and an unsigned id) without checking them all again: it
    still gives exactly the map decode_control_body gives, keys in the same order, and refuses
    exactly what it refuses -- whatever the argument's and the id's items are (heads longer
    than they need be, in chunks, other types, tags, cut short) and whatever the array."""
    dec = FrameDecoder(1 << 20, 1 << 20)
    for method in ("echo", "take", "é€"):  # (each shape known first, so that the calls test them)
        body = _call_body(method, cbor2.dumps(b"known"), cbor2.dumps(1))
        assert _whole_or_refused(dec, body) == _checked_or_refused(body)
    for method, argument_item, id_item, args_head in calls:
        body = _call_body(method, argument_item, id_item, args_head)
        got = _whole_or_refused(dec, body)
        assert repr(got) == repr(_checked_or_refused(body))
        if type(got) is str:
            break  # (the decoder failed, as next_frame's would)


def test_whole_message_from_checks_a_shape_of_call_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls shaped as one this decoder checked (a relayed RPC channel's, at one call in
    flight) are taken without decode_control_body, each with a list of its own; another shape
    is checked, then known too; a reply (no id last) is checked every time, and learns nothing."""
    checked = _count_checks(monkeypatch)
    sizes = [0, 1, 23, 24, 255, 256, 1000, 65535, 65536, 70000]
    ids = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
    calls = [{"method": "take", "args": [bytes([i]) * size], "op": "call", "id": request_id} for i, (size, request_id) in enumerate(zip(sizes, ids))]
    dec = FrameDecoder(1 << 20, 1 << 20)
    taken = [dec.whole_message_from(encode_control(0, call, 1 << 20)) for call in calls]
    assert taken == calls and all(list(message) == list(call) for message, call in zip(taken, calls) if message)
    assert len(checked) == 1  # (the first: every other is of its shape)
    assert taken[1] is not None and taken[2] is not None
    taken[1]["args"].append(b"changed")  # (each call its own list)
    assert taken[2]["args"] == [bytes([2]) * 23]
    echo = [{"method": "echo", "args": [b"x"], "op": "call", "id": 5}, {"method": "echo", "args": [b"y"], "op": "call", "id": 6}]
    assert [dec.whole_message_from(encode_control(0, call)) for call in [*echo, calls[0]]] == [*echo, calls[0]]
    assert len(checked) == 2
    reply = {"re": 6, "result": "y"}  # (a text value: not a plain reply, see below)
    assert [dec.whole_message_from(encode_control(0, reply)) for _ in range(3)] == [reply] * 3
    assert len(checked) == 5 and len(dec._call_shapes) == 2
    # Two arguments, or one that is no byte string: checked, and no shape.
    for other in ({"method": "echo", "args": [b"x", b"y"], "op": "call", "id": 7}, {"method": "echo", "args": ["x"], "op": "call", "id": 8}):
        assert [dec.whole_message_from(encode_control(0, other)) for _ in range(2)] == [other] * 2
    assert len(checked) == 9 and len(dec._call_shapes) == 2


@settings(max_examples=800, deadline=None)
@given(
    map_head=st.sampled_from([b"\xa2", b"\xa2", b"\xa2", b"\xa1", b"\xa3", b"\xb8\x02", b"\xbf"]),
    id_item=_id_items,
    result_item=_payload_items | _id_items,
    after=st.sampled_from([b"", b"", b"", b"\xff", b"\x00", b"\x62re\x01"]),
)
@example(map_head=b"\xa2", id_item=b"\x18\x05", result_item=b"\x41x", after=b"")  # (an id's head longer than it need be)
@example(map_head=b"\xa2", id_item=b"\x05", result_item=b"\x58\x01x", after=b"")  # (a value's)
@example(map_head=b"\xa2", id_item=b"\x05", result_item=b"\x18\x05", after=b"")
@example(map_head=b"\xa2", id_item=b"\x19\x00\x05", result_item=b"\x05", after=b"")
def test_whole_message_from_takes_a_plain_reply_only_as_the_profile_check_would(
    map_head: bytes, id_item: bytes, result_item: bytes, after: bytes
) -> None:
    """A reply ``{"re", "result"}`` whose value is a byte string or an unsigned integer is
    read without cbor2 and the profile check where it is exactly its canonical encoding: the
    same map as decode_control_body's, and whatever else -- heads longer than they need be,
    other types, tags, chunks, another map head, bytes after it -- as decode_control_body
    decides it."""
    dumps = cbor2.dumps
    body = map_head + dumps("re") + id_item + dumps("result") + result_item + after
    assert repr(_whole_or_refused(FrameDecoder(1 << 20, 1 << 20), body)) == repr(_checked_or_refused(body))
    # (and with an item budget under the reply's five items, as the budget decides)
    assert repr(_whole_or_refused(FrameDecoder(1 << 20, 1 << 20, 4), body)) == repr(_checked_or_refused_within(body, 4))


def _checked_or_refused_within(body: bytes, max_items: int) -> Any:
    try:
        message = decode_control_body(body, max_items)
    except FrameError as exc:
        return type(exc).__name__
    return message, list(message)


def test_whole_message_from_reads_a_plain_reply_without_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replies of a byte string or an unsigned integer, at every size of id and value, are
    read without decode_control_body; any other reply is checked."""
    checked = _count_checks(monkeypatch)
    dec = FrameDecoder(1 << 20, 1 << 20)
    values: list[Any] = [b"", b"x" * 23, b"x" * 24, b"x" * 255, b"x" * 256, b"x" * 65536, 0, 23, 24, 2**64 - 1]
    for request_id in (0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1):
        for value in values:
            reply = {"re": request_id, "result": value}
            assert dec.whole_message_from(encode_control(0, reply, 1 << 20)) == reply
    assert checked == []
    for other in ({"re": 1, "result": "text"}, {"re": 1, "result": [b"x"]}, {"re": 1, "error": {"code": "x"}}, {"result": b"x", "re": 1}):
        assert dec.whole_message_from(encode_control(0, other)) == other
    assert len(checked) == 4


def test_a_caller_churning_call_shapes_costs_only_its_own_channel_and_a_bounded_learning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller whose every call has a new method, or one that can never be a shape (another
    value not plain), makes its channel's decoder try to learn twice, then not again until
    its shapes are taken: the check per call, as ever, and at most _SHAPES shapes kept.
    Another channel's decoder, which knows its caller's calls, goes on taking them without
    the check."""
    import bus.wire.frames as frames_module

    learned: list[int] = []
    real_shape = frames_module._request_shape

    def counting_shape(message: dict[Any, Any], body: bytes, hole: str = "payload") -> Any:
        learned.append(1)
        return real_shape(message, body, hole)

    monkeypatch.setattr(frames_module, "_request_shape", counting_shape)
    honest, churned = FrameDecoder(1 << 20, 1 << 20), FrameDecoder(1 << 20, 1 << 20)
    echo = {"method": "echo", "args": [b"x"], "op": "call", "id": 1}
    assert honest.whole_message_from(encode_control(0, echo)) == echo
    checked = _count_checks(monkeypatch)
    churn = [{"method": f"m{i}", "args": [b"x"], "op": "call", "id": i} for i in range(40)]
    churn += [{"method": "m", "args": [b"x"], "op": "call", "extra": [i], "id": i} for i in range(40)]
    for i, call in enumerate(churn):
        assert churned.whole_message_from(encode_control(0, call)) == call
        mine = {**echo, "id": i + 2}
        assert honest.whole_message_from(encode_control(0, mine)) == mine
    assert len(learned) == 3  # (the honest decoder's first, then two of the churn's)
    assert len(checked) == len(churn)  # (every churned call checked; none of the honest ones)
    assert len(churned._call_shapes) <= 4


def test_a_call_shape_keeps_no_argument() -> None:
    """What a channel's decoder keeps of a call's shape is its bytes around the argument and
    its other values, not the argument (up to max_control bytes) it was learned from."""
    from bus.wire.frames import SHAPE_BYTES

    call = {"method": "take", "args": [bytes(60_000)], "op": "call", "id": 3}
    dec = FrameDecoder(1 << 20, 1 << 20)
    assert dec.whole_message_from(encode_control(0, call, 1 << 20)) == call
    head, tail, kept = dec._call_shapes[0]
    held = len(head) + len(tail) + sum(len(value) for value in kept.values() if type(value) in (str, bytes))
    assert held <= 2 * SHAPE_BYTES
    later = {"method": "take", "args": [b"later"], "op": "call", "id": 4}
    assert dec.whole_message_from(encode_control(0, later)) == later


# -- decode_control_body's quick way against the profile, on bodies written every way CBOR allows --

_lib_text = st.text(max_size=6) | st.sampled_from(["op", "id", "payload", "é", "€€€", "x" * 30])
_lib_bytes = st.binary(max_size=6) | st.sampled_from([bytes(range(0xC0, 0xE0)), b"\x9f\xbf\x5f\x7f\xd8\x1c", b"\xff" * 25])
_lib_edges = st.sampled_from([0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]).flatmap(lambda n: st.sampled_from([n, -1 - n]))
_lib_ints = st.integers(-(2**64), 2**64 - 1) | _lib_edges
_lib_keys = _lib_text | st.integers(-300, 70000) | _lib_edges
_lib_scalars = st.none() | st.booleans() | _lib_ints | _lib_text | _lib_bytes | st.floats(allow_nan=False, width=16)


def _lib_chain(depth: int, inner: Any, as_map: bool) -> Any:
    for _ in range(depth):
        inner = {1: inner} if as_map else [inner]
    return inner


# Containers nested around the profile's limit (the top map is depth 1: these go 27 to 34 deep).
_lib_deep = st.builds(_lib_chain, st.integers(26, 33), st.sampled_from([[], {}, [1], {"a": 1}, 5, b"\xd8"]), st.booleans())
_lib_values = st.recursive(_lib_scalars, lambda inner: st.lists(inner, max_size=26) | st.dictionaries(_lib_keys, inner, max_size=5), max_leaves=60)


class _LiberalWriter:
    """Writes a value as CBOR taking liberties -- heads longer than they need be, indefinite
    lengths, tags cbor2 reads through (self-describe, shareable, bignums), shared references,
    duplicate keys -- each with probability ``rate`` (a string seen before is referred to
    with probability ``share``, an array or map is of indefinite length with probability
    ``indefinite``), driven by a seeded Random (so the same seed writes the same bytes).  ``pad``: bytes to widen heads by, in all, where they allow (to bring a body to
    exactly its value's canonical length)."""

    def __init__(self, seed: int, rate: float, pad: int = 0, share: float | None = None, indefinite: float | None = None) -> None:
        import random

        self.rng = random.Random(seed)
        self.rate = rate
        self.share = rate if share is None else share
        self.indefinite = rate if indefinite is None else indefinite
        self.pad = pad
        self.shared: list[Any] = []

    def _liberty(self) -> bool:
        return self.rng.random() < self.rate

    def head(self, major: int, arg: int) -> bytes:
        m = major << 5
        forms = [bytes((m | arg,))] if arg < 24 else []
        for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
            if arg < 1 << (8 * width):
                forms.append(bytes((m | info,)) + arg.to_bytes(width, "big"))
        chosen = forms[0]
        if self._liberty():
            chosen = self.rng.choice(forms)
        for form in forms:  # the widest that fits what is left to pad
            if len(chosen) < len(form) <= len(chosen) + self.pad:
                chosen, self.pad = form, self.pad - (len(form) - len(chosen))
        return chosen

    def write(self, value: Any) -> bytes:
        rng, kind = self.rng, type(value)
        out = b""
        if self._liberty():
            out = b"\xd9\xd9\xf7"  # self-describe
        if kind in (str, bytes) and len(value) > 1:
            for index, shared in enumerate(self.shared):
                if type(shared) is kind and shared == value and rng.random() < self.share:
                    return out + b"\xd8\x1d" + self.head(0, index)
            if rng.random() < self.share:
                self.shared.append(value)
                out += b"\xd8\x1c"
        if value is None or kind is bool or kind is float:
            return out + cbor2.dumps(value)
        if kind is int:
            if self._liberty():  # a bignum (tag 2 or 3), its tag's head short or long, maybe a zero byte first
                magnitude = value if value >= 0 else -1 - value
                digits = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big")
                if rng.random() < 0.2:
                    digits = b"\x00" + digits
                tag = 2 if value >= 0 else 3
                return out + (bytes((0xC0 | tag,)) if rng.random() < 0.8 else b"\xd8" + bytes((tag,))) + self.head(2, len(digits)) + digits
            return out + (self.head(0, value) if value >= 0 else self.head(1, -1 - value))
        if kind is str or kind is bytes:
            raw = value.encode() if kind is str else value
            major = 3 if kind is str else 2
            if self._liberty():
                cut = rng.randint(0, len(raw))
                chunks = self.head(major, cut) + raw[:cut] + self.head(major, len(raw) - cut) + raw[cut:]
                return out + bytes((major << 5 | 31,)) + chunks + b"\xff"
            return out + self.head(major, len(raw)) + raw
        if kind is list:
            items = [self.write(item) for item in value]
        else:
            items = [self.write(k) + self.write(v) for k, v in value.items()]
            if items and self._liberty():  # a duplicate key
                key = rng.choice(list(value))
                items.insert(rng.randint(0, len(items)), self.write(key) + self.write(rng.choice([0, "dup", None])))
        if rng.random() < self.indefinite:
            return out + bytes(((4 if kind is list else 5) << 5 | 31,)) + b"".join(items) + b"\xff"
        return out + self.head(4 if kind is list else 5, len(items)) + b"".join(items)


def _items_of(body: bytes) -> int | None:
    """The least item budget check_cbor takes ``body`` with (None: it refuses it anyway)."""
    try:
        check_cbor(body)
    except FrameError:
        return None
    low, high = 0, len(body) + 1
    while low < high:
        middle = (low + high) // 2
        try:
            check_cbor(body, middle)
            high = middle
        except FrameError:
            low = middle + 1
    return low


def _body_as(body: bytes, kind: str) -> Any:
    if kind == "bytes":
        return body
    if kind == "bytearray":
        return bytearray(body)
    import mmap

    mapped = mmap.mmap(-1, len(body))
    mapped.write(body)
    return mapped


@settings(max_examples=400, deadline=None)
@given(
    message=st.dictionaries(_lib_keys, _lib_values | _lib_deep, max_size=6),
    seed=st.integers(0, 2**32),
    rate=st.sampled_from([0.0, 0.02, 0.1, 0.3]),
    budget=st.sampled_from(["none", "one", "count-1", "count", "count+1", "4096"]),
    as_type=st.sampled_from(["bytes", "bytearray", "mmap"]),
)
def test_the_quick_decode_agrees_with_the_profile_on_bodies_written_every_way(
    message: dict[Any, Any], seed: int, rate: float, budget: str, as_type: str
) -> None:
    """decode_control_body against check_cbor + cbor2.loads, on bodies written canonically and
    with liberties (long heads, indefinite lengths, tags, shared references, duplicate keys),
    nested up to and past the depth limit, with int and text keys, floats, item budgets at and
    around the body's count, given as bytes, bytearray or mmap."""
    body = _LiberalWriter(seed, rate).write(message)
    count = _items_of(body)
    max_items = {"none": None, "one": 1, "4096": 4096}.get(budget)
    if budget.startswith("count"):
        max_items = None if count is None else count + {"count-1": -1, "count": 0, "count+1": 1}[budget]

    assert _verdict(lambda: decode_control_body(_body_as(body, as_type), max_items)) == _verdict(lambda: _checked_loads(body, max_items))


# (Mostly scalars without a byte that could begin a tag or an indefinite length: a body
# that holds one is compared with its canonical encoding, and the scan is not put to the test.)
_lib_no_floats = st.recursive(
    st.none() | st.booleans() | st.integers(-30, 190) | _lib_edges
    | st.sampled_from(["hello", "op", "é" * 5, "x" * 30, b"\xd8\x1cab", b"payload!" * 4, "y" * 300]),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(_lib_keys, inner, max_size=4)
    | st.integers(250, 300).map(lambda n: [0] * n)  # (indefinite: shorter than a head of 256 or more)
    | st.integers(250, 300).map(lambda n: {f"k{i}": None for i in range(n)}),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(
    message=st.dictionaries(_lib_text | st.integers(-30, 190), _lib_no_floats, min_size=1, max_size=6),
    seed=st.integers(0, 2**32),
    rate=st.sampled_from([0.0, 0.001, 0.02]),
    share=st.sampled_from([0.0, 0.5, 0.9]),
    indefinite=st.sampled_from([0.0, 0.3]),
    max_items=st.sampled_from([None, 4096]),
)
def test_bodies_shortened_by_tags_and_padded_to_their_canonical_length_are_refused(
    message: dict[Any, Any], seed: int, rate: float, share: float, indefinite: float, max_items: int | None
) -> None:
    """Shared references, indefinite lengths and tags can make a body shorter than its
    value's canonical form, and long heads can make up for it to the byte: the length alone
    cannot tell such a body from a canonical one, and the quick way must still refuse it."""
    body = _LiberalWriter(seed, rate, share=share, indefinite=indefinite).write(message)
    try:
        short = len(cbor2.dumps(cbor2.loads(body))) - len(body)
    except Exception:
        return
    if short > 0:
        writer = _LiberalWriter(seed, rate, pad=short, share=share, indefinite=indefinite)
        body = writer.write(message)
        if writer.pad:
            return  # (not enough heads to widen)

    def reference() -> Any:
        check_cbor(body, max_items)
        return cbor2.loads(body)

    assert _verdict(lambda: decode_control_body(body, max_items)) == _verdict(reference)


def _deepest_container(value: Any, depth: int = 1) -> int:
    if type(value) is dict:
        return max([depth, *(_deepest_container(v, depth + 1) for v in value.values())])
    if type(value) is list:
        return max([depth, *(_deepest_container(v, depth + 1) for v in value)])
    return 0


@settings(max_examples=400, deadline=None)
@given(
    value=st.dictionaries(
        _lib_keys,
        st.recursive(
            _lib_scalars.filter(lambda v: type(v) is not float) | st.text(max_size=300) | st.binary(max_size=300),
            lambda inner: st.lists(inner, max_size=30) | st.dictionaries(_lib_keys, inner, max_size=5),
            max_leaves=50,
        )
        | _lib_deep,
        max_size=8,
    )
)
def test_canonical_size_is_the_length_and_item_count_of_the_canonical_encoding(value: dict[Any, Any]) -> None:
    """The measure the quick decode trusts: for a plain, float-free value, exactly the bytes
    cbor2 writes (its canonical form, for such values) and check_cbor's count of items; it
    gives up (-1) only on a container at the profile's depth limit or past it."""
    from bus.wire.frames import MAX_CBOR_DEPTH, _canonical_size

    size, items = _canonical_size(value, 1, _NO_BUDGET)
    body = cbor2.dumps(value)
    if _deepest_container(value) >= MAX_CBOR_DEPTH:
        assert (size, items) == (-1, 0)
        return
    assert size == len(body)
    assert items == _items_of(body)
    # With a budget of exactly its items it measures the same; one fewer, it gives up.
    assert _canonical_size(value, 1, items) == (size, items)
    assert _canonical_size(value, 1, items - 1) == (-1, 0)


@pytest.mark.parametrize(
    "items",
    [
        [],
        [b"p" * 64],
        ["text", b"", 0, 23],
        [b"x"] * 23,  # the last length with a one-byte head, measured in the map's loop
        [b"x"] * 24,  # a two-byte head: measured by the call
        [24],
        [255, 256, 65536],
        [-1],
        [True, None, False],
        ["\u00e9t\u00e9"],  # not ASCII: its UTF-8 bytes
        [1.5],  # a float: not measured
        [[b"a"], {"k": 1}],
        [b"a" * 300, "b" * 70000],
    ],
)
def test_canonical_size_measures_an_argument_list_as_its_encoding(items: list[Any]) -> None:
    """A map's short array (an RPC call's arguments) is measured in the map's loop: the same
    bytes and items as cbor2 writes and check_cbor counts, or -1 where it cannot tell."""
    from bus.wire.frames import MAX_CBOR_DEPTH, _canonical_size

    message = {"method": "echo", "args": items, "op": "call", "id": 7}
    size, count = _canonical_size(message, 1, _NO_BUDGET)
    if any(type(item) is float for item in items):
        assert (size, count) == (-1, 0)
        return
    body = cbor2.dumps(message)
    assert (size, count) == (len(body), _items_of(body))
    assert decode_control_body(body) == message
    # At the depth limit the array is not measured (the body is refused on its depth).
    deep: Any = message
    for _ in range(MAX_CBOR_DEPTH - 2):
        deep = {"d": deep}
    assert _canonical_size(deep, 1, _NO_BUDGET) == (-1, 0)
    if not any(type(item) in (list, dict) for item in items):
        shallower = deep["d"]  # the array one level up, at MAX_CBOR_DEPTH - 1: measured
        assert _canonical_size(shallower, 1, _NO_BUDGET)[0] == len(cbor2.dumps(shallower))


# -- the one-pass decoding of a big body's flat map (_decode_flat) -------------------------

flat_scalars = st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats() | st.text(max_size=40) | st.binary(max_size=40)
flat_messages = st.dictionaries(
    st.text(max_size=8) | st.integers(-(2**64), 2**64 - 1), flat_scalars | st.lists(flat_scalars, max_size=6), max_size=5
)


def _same(a: Any, b: Any) -> bool:
    """Equal, floats by their bits (a NaN is the same NaN), bool never equal to int."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack(">d", a) == struct.pack(">d", b)
    if type(a) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=500, deadline=None)
@given(message=flat_messages, half=st.booleans())
def test_flat_decoding_takes_every_flat_map_as_cbor2_does(message: dict[Any, Any], half: bool) -> None:
    """A flat map (scalars and arrays of scalars; floats in every width) of at most
    _FLAT_ITEMS items decodes in one pass to what cbor2 makes of it; more items: undecided."""
    body = cbor2.dumps(message, canonical=half)  # (canonical: floats in their shortest width)
    items = 1 + sum(2 + (len(v) if type(v) is list else 0) for v in message.values())
    got = _decode_flat(memoryview(body), None)
    if items > _FLAT_ITEMS:
        assert got is None
    else:
        assert got is not None and _same(got, cbor2.loads(body))
        assert _decode_flat(memoryview(body), items - 1) is None  # (over max_items: undecided)


@settings(max_examples=1500, deadline=None)
@given(
    message=flat_messages | messages,
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 40),
    insert=st.binary(max_size=3),
)
def test_flat_decoding_decides_only_bodies_in_the_profile(message: dict[Any, Any], edits: list[tuple[int, int]], cut: int, insert: bytes) -> None:
    """Whatever the body -- damaged, cut short, with bytes put in, nested, written the long
    way -- a map _decode_flat returns is one the profile accepts (the plain reading above)
    and exactly what cbor2 decodes; anything else it leaves undecided (None)."""
    body = bytearray(cbor2.dumps(message))
    for where, byte in edits:
        body[where % len(body)] = byte
    if insert:
        where = edits[0][0] % len(body) if edits else len(body) // 2
        body[where:where] = insert
    damaged = bytes(body[: max(1, len(body) - cut)]) if cut % 3 == 0 else bytes(body)
    got = _decode_flat(memoryview(damaged), None)
    if got is not None:
        assert _reference_accepts(damaged)
        assert _same(got, cbor2.loads(damaged))


def test_a_big_body_in_a_buffer_is_decoded_in_one_pass_and_refused_as_before() -> None:
    """decode_control_body takes a big body in a buffer (a large message's) the flat way:
    the same value; a body out of the profile is refused with the same reason as ever."""
    import mmap

    value = bytes(range(256)) * 512  # (128 KiB, every byte value: tag and break bytes too)
    body = cbor2.dumps({"method": "take", "args": [value, "é" * 70_000, 7, -8, 1.5, None]})
    buffer = mmap.mmap(-1, len(body))
    buffer[:] = body
    assert _decode_flat(buffer, 1 << 20) is not None
    assert decode_control_body(buffer, 1 << 20) == cbor2.loads(body)
    long_way = body.replace(b"\x07\x27", b"\x18\x07\x27")  # 7 written in two bytes
    assert long_way != body
    buffer = mmap.mmap(-1, len(long_way))
    buffer[:] = long_way
    assert _decode_flat(buffer, 1 << 20) is None
    with pytest.raises(FrameError, match="shortest"):
        decode_control_body(buffer, 1 << 20)


@pytest.mark.parametrize("half", [0x7E8C, 0xFEA0, 0x7C01, 0xFC01, 0x7FFF, 0x7E00, 0xFE00])
def test_flat_decoding_gives_a_half_float_nan_as_cbor2_does(half: int) -> None:
    """A NaN in half precision carries a payload (and a sign): cbor2 keeps it in the float it
    makes (struct's half unpacking drops it); the one-pass way gives the same bits, or decides
    nothing -- as the way for a small body (cbor2) gives."""
    import mmap

    body = cbor2.dumps({"args": ["x" * 70_000, 0.0]})
    assert body.endswith(b"\xfb" + bytes(8))  # (0.0, written in 64 bits)
    body = body[:-9] + b"\xf9" + half.to_bytes(2, "big")
    expected = cbor2.loads(body)["args"][1]
    got = _decode_flat(memoryview(body), None)
    assert got is None or _same(got["args"][1], expected)
    buffer = mmap.mmap(-1, len(body))
    buffer[:] = body
    assert _same(decode_control_body(buffer)["args"][1], expected)


# -- shared values: a few hundred bytes that cbor2 builds into a value of many paths ----------


def _shared_dag(levels: int, fan: int = 23) -> bytes:
    """A map whose array holds shared values (tag 28), each an array of ``fan`` references
    (tag 29) to the one before: cbor2 builds it in linear time, but a walk over every path of
    what it built visits ``fan ** levels`` values.  Refused by the profile (tags)."""
    parts = [b"\xd8\x1c\x80"]  # shared value 0: []
    for k in range(1, levels + 1):
        reference = b"\xd8\x1d" + cbor2.dumps(k - 1)
        parts.append(b"\xd8\x1c" + bytes([0x80 | fan]) + reference * fan)
    return b"\xa1\x61a" + bytes([0x80 | (levels + 1)]) + b"".join(parts)


@pytest.mark.parametrize("budget", [16, 4096, 1 << 16])
def test_the_walks_over_a_decoded_value_stop_at_their_budget_on_shared_references(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    """What cbor2 builds from 583 bytes of shared references (tags 28 and 29) has 23**8
    paths: the walks that measure a decoded value (_canonical_size, _items_within) give up
    having looked at no more of it than their budget.  (decode_control_body gives cbor2 no
    such body before check_cbor refused it: this holds the walks to their bound anyway.  A
    walk over every path would not end in this test's lifetime: the count stops it at twice
    the budget, and fails.)"""
    import bus.wire.frames as frames_module

    value = cbor2.loads(_shared_dag(8))
    real, real_within = frames_module._canonical_size, frames_module._items_within
    visits = [0]

    def counted(value: Any, depth: int, left: int) -> tuple[int, int]:
        visits[0] += 1
        assert visits[0] <= 2 * budget, "the walk went past its budget"
        return real(value, depth, left)

    def counted_within(value: Any, depth: int, left: int) -> int:
        visits[0] += 1
        assert visits[0] <= 2 * budget, "the walk went past its budget"
        return real_within(value, depth, left)

    monkeypatch.setattr(frames_module, "_canonical_size", counted)
    monkeypatch.setattr(frames_module, "_items_within", counted_within)
    assert frames_module._canonical_size(value, 1, budget) == (-1, 0)
    visits[0] = 0
    assert frames_module._items_within(value, 1, budget) == -1
    with pytest.raises(FrameError, match="tags are not allowed"):
        decode_control_body(_shared_dag(8), budget)


@pytest.mark.parametrize("as_type", ["bytes", "bytearray", "mmap"])
def test_a_float_beside_shared_references_does_not_make_them_written_out(monkeypatch: pytest.MonkeyPatch, as_type: str) -> None:
    """A 20,000-byte string shared and referenced 10,000 times, and a float (so the value is
    not measured, and takes the way that would encode it again to compare): 50 KB that cbor2
    writes out as 200 MB.  Refused for its tags without being encoded again."""
    import bus.wire.frames as frames_module

    shared = b"x" * 20_000
    refs = 10_000
    items = b"\xd8\x1c" + cbor2.dumps(shared) + b"\xd8\x1d\x00" * refs + b"\xf9\x3e\x00"  # 1.5, a half float
    body = b"\xa1\x61a" + b"\x99" + (refs + 2).to_bytes(2, "big") + items
    real_dumps = cbor2.dumps
    written: list[int] = []

    def measured_dumps(value: Any, *args: Any, **kwargs: Any) -> bytes:
        out = real_dumps(value, *args, **kwargs)
        written.append(len(out))
        return out

    monkeypatch.setattr(frames_module.cbor2, "dumps", measured_dumps)
    tracemalloc.start()
    try:
        with pytest.raises(FrameError, match="tags are not allowed"):
            decode_control_body(_body_as(body, as_type), None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(size <= 3 * len(body) for size in written), written
    assert peak < 20 * len(body), peak  # (what cbor2 builds: the shared string and the references)


def _dag_key_request(levels: int, fan: int = 23) -> bytes:
    """{"op": "ping", <key>: 1} where the key is a shared array of ``fan`` references to the
    one before, ``levels`` deep: cbor2 makes the key a tuple and hashes it, walking each of
    its ``fan ** levels`` paths, before anything it built can be looked at."""
    key = b"\xd8\x1c\x80"  # shared value 0: []
    parts = [key]
    for k in range(1, levels + 1):
        parts.append(b"\xd8\x1c" + bytes([0x80 | fan]) + (b"\xd8\x1d" + cbor2.dumps(k - 1)) * fan)
    # the key: an array of the shared values, the last one referenced again
    array_key = bytes([0x80 | (levels + 1)]) + b"".join(parts)
    return b"\xa2" + cbor2.dumps("op") + cbor2.dumps("ping") + array_key + b"\x01"


def _shared_text_refs(text_len: int, refs: int) -> bytes:
    """{"a": [shared non-ASCII text, then ``refs`` references to it]}: measuring each
    reference's UTF-8 length would encode the whole text again."""
    text = cbor2.dumps("\u00e9" * (text_len // 2))
    return b"\xa1\x61a" + b"\x99" + (refs + 1).to_bytes(2, "big") + b"\xd8\x1c" + text + b"\xd8\x1d\x00" * refs


@pytest.mark.parametrize("as_type", ["bytes", "bytearray", "mmap"])
@pytest.mark.parametrize("max_items", [None, 4096, 1 << 20])
@pytest.mark.parametrize(
    "body",
    [_dag_key_request(9), _shared_dag(8), _shared_text_refs(3000, 20_000), b"\xa1" + b"\x82\x01\x02" + b"\x59\x13\x88" + b"x" * 5000],
    ids=["a key of 23**9 paths", "an array of 23**8 paths", "a shared text referenced 20,000 times", "an array key, 5 KB"],
)
def test_cbor2_is_given_no_body_that_could_make_it_build_a_monster(
    monkeypatch: pytest.MonkeyPatch, body: bytes, max_items: int | None, as_type: str
) -> None:
    """A body that may hold a tag of 24 or more (shared values and their references, string
    references), or of more than _DECODE_FIRST bytes, is checked before cbor2 decodes a byte
    of it: refused for its tags or its keys, and cbor2 never called.  (Given first to cbor2,
    the first would take it hours: it hashes the key's every path.)"""
    import bus.wire.frames as frames_module

    def never(data: Any) -> Any:
        raise AssertionError("cbor2 was given a body before its check")

    monkeypatch.setattr(frames_module.cbor2, "loads", never)
    with pytest.raises(FrameError, match="tags are not allowed|map keys must be text or integers|more than"):
        decode_control_body(_body_as(body, as_type), max_items)
