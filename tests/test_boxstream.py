"""Box-stream encoder and decoder (sans-io)."""

from __future__ import annotations

import os

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.errors import BoxStreamError, BoxStreamTruncated, LocalProtocolError
from bus.wire.boxstream import HEADER_SIZE, MAX_BODY, BoxStreamDecoder, BoxStreamEncoder

KEY, NONCE = os.urandom(32), os.urandom(24)


def pair(nonce: bytes = NONCE) -> tuple[BoxStreamEncoder, BoxStreamDecoder]:
    return BoxStreamEncoder(KEY, nonce), BoxStreamDecoder(KEY, nonce)


def test_layout_matches_the_spec() -> None:
    """Header = box(len || body_mac, n); body = box(piece, n+1) without its MAC."""
    enc = BoxStreamEncoder(KEY, NONCE)
    wire = enc.encode(b"hello")
    assert len(wire) == HEADER_SIZE + 5
    n = int.from_bytes(NONCE, "big")
    body = sodium.crypto_secretbox_easy(b"hello", (n + 1).to_bytes(24, "big"), KEY)
    header = sodium.crypto_secretbox_easy(b"\x00\x05" + body[:16], NONCE, KEY)
    assert wire == header + body[16:]
    assert enc.nonce == (n + 2).to_bytes(24, "big")
    goodbye = enc.goodbye()
    assert sodium.crypto_secretbox_open_easy(goodbye, (n + 2).to_bytes(24, "big"), KEY) == bytes(18)


def test_large_writes_are_cut_into_4096_byte_pieces() -> None:
    enc, dec = pair()
    data = os.urandom(3 * MAX_BODY + 5)
    wire = enc.encode(data)
    assert len(wire) == len(data) + 4 * HEADER_SIZE
    dec.receive_data(wire)
    assert dec.read() == data


def test_empty_write_sends_nothing() -> None:
    enc, _ = pair()
    assert enc.encode(b"") == b""


@settings(max_examples=200, deadline=None)
@given(
    writes=st.lists(st.binary(max_size=9000), max_size=6),
    cut=st.lists(st.integers(1, 5000), min_size=1, max_size=8),
)
def test_round_trip_under_any_rechunking(writes: list[bytes], cut: list[int]) -> None:
    enc, dec = pair()
    wire = b"".join(enc.encode(w) for w in writes) + enc.goodbye()
    got = bytearray()
    pos = 0
    i = 0
    while pos < len(wire):
        step = cut[i % len(cut)]
        dec.receive_data(wire[pos : pos + step])
        got += dec.read()
        pos += step
        i += 1
    assert bytes(got) == b"".join(writes)
    assert dec.ended
    dec.end_of_input()  # a clean end


def test_nonce_wraps_around() -> None:
    top = (2**192 - 1).to_bytes(24, "big")
    enc, dec = pair(top)
    wire = enc.encode(b"x" * 10) + enc.encode(b"y")
    # box 1: header 2**192-1, body 0; box 2: header 1, body 2; next header 3.
    assert enc.nonce == (3).to_bytes(24, "big")
    dec.receive_data(wire)
    assert dec.read() == b"x" * 10 + b"y"


def test_every_tampered_byte_is_caught() -> None:
    enc = BoxStreamEncoder(KEY, NONCE)
    wire = enc.encode(b"some secret payload")
    for i in range(len(wire)):
        dec = BoxStreamDecoder(KEY, NONCE)
        bad = bytearray(wire)
        bad[i] ^= 0x40
        dec.receive_data(bytes(bad))
        with pytest.raises(BoxStreamError, match="authenticate"):
            dec.read()


def test_reordered_boxes_are_caught() -> None:
    enc = BoxStreamEncoder(KEY, NONCE)
    first, second = enc.encode(b"one"), enc.encode(b"two")
    dec = BoxStreamDecoder(KEY, NONCE)
    dec.receive_data(second + first)
    with pytest.raises(BoxStreamError):
        dec.read()


def test_eof_without_goodbye_is_truncation() -> None:
    enc, dec = pair()
    dec.receive_data(enc.encode(b"complete box"))
    assert dec.read() == b"complete box"
    with pytest.raises(BoxStreamTruncated, match="between boxes"):
        dec.end_of_input()


def test_eof_inside_a_box_is_truncation() -> None:
    enc, dec = pair()
    wire = enc.encode(b"x" * 100)
    dec.receive_data(wire[:50])
    assert dec.read() == b""
    with pytest.raises(BoxStreamTruncated, match="inside a box"):
        dec.end_of_input()


def test_header_announcing_more_than_4096_is_refused() -> None:
    header = sodium.crypto_secretbox_easy((4097).to_bytes(2, "big") + bytes(16), NONCE, KEY)
    dec = BoxStreamDecoder(KEY, NONCE)
    dec.receive_data(header)
    with pytest.raises(BoxStreamError, match="4097 bytes"):
        dec.read()


def test_zero_length_header_that_is_not_a_goodbye_is_refused() -> None:
    header = sodium.crypto_secretbox_easy(bytes(2) + b"\x01" * 16, NONCE, KEY)
    dec = BoxStreamDecoder(KEY, NONCE)
    dec.receive_data(header)
    with pytest.raises(BoxStreamError, match="empty body"):
        dec.read()


def test_bytes_after_goodbye_are_refused_but_earlier_data_is_kept() -> None:
    enc, dec = pair()
    dec.receive_data(enc.encode(b"important") + enc.goodbye() + b"trailing")
    assert dec.read() == b"important"
    with pytest.raises(BoxStreamError, match="after the goodbye"):
        dec.read()
    with pytest.raises(LocalProtocolError):
        dec.read()


def test_sending_after_goodbye_is_a_local_error() -> None:
    enc, _ = pair()
    enc.goodbye()
    with pytest.raises(LocalProtocolError):
        enc.encode(b"late")
    with pytest.raises(LocalProtocolError):
        enc.goodbye()


def test_decoder_is_finished_after_an_error() -> None:
    dec = BoxStreamDecoder(KEY, NONCE)
    dec.receive_data(os.urandom(40))
    with pytest.raises(BoxStreamError):
        dec.read()
    with pytest.raises(LocalProtocolError):
        dec.read()


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=5000))
def test_garbage_is_an_error_or_needs_more(garbage: bytes) -> None:
    dec = BoxStreamDecoder(KEY, NONCE)
    dec.receive_data(garbage)
    try:
        out = dec.read()
    except BoxStreamError:
        return
    # Without the key no header authenticates, so only a short prefix can be pending.
    assert out == b""
    assert len(garbage) < HEADER_SIZE and dec.buffered == len(garbage)


def test_wrong_key_is_refused() -> None:
    enc = BoxStreamEncoder(KEY, NONCE)
    dec = BoxStreamDecoder(os.urandom(32), NONCE)
    dec.receive_data(enc.encode(b"secret"))
    with pytest.raises(BoxStreamError):
        dec.read()
