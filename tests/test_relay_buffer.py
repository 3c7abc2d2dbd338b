"""The broker's relay buffer (bus.core.channels.Direction), held to a plain bytearray model."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.core.channels import KEEP_WHOLE, CreditExceeded, Direction

CAP = 512 * 1024

sizes = st.one_of(st.integers(1, 64), st.integers(65, KEEP_WHOLE - 1), st.integers(KEEP_WHOLE, 64 * 1024))
steps = st.lists(
    st.one_of(
        st.tuples(st.just("push"), sizes, st.sampled_from([bytes, memoryview])),
        st.tuples(st.just("grant"), st.integers(1, 200_000), st.just(None)),
        st.tuples(st.just("take"), st.integers(1, 64 * 1024), st.just(None)),
        st.tuples(st.just("release"), st.just(0), st.just(None)),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(steps=steps)
def test_the_buffer_passes_on_exactly_what_came_and_holds_what_it_accounts(steps: list[tuple[str, int, Any]]) -> None:
    """Whatever the pushes (small pieces joined, big ones kept whole, views copied), grants
    and takes: the bytes taken are the bytes pushed, in order, cut as a bytearray would cut
    them; ``buffered`` is what is held; the cap is never passed; and the pieces held cost at
    most two objects per KEEP_WHOLE bytes (what the buffer holds stays near what it accounts)."""
    d = Direction(CAP)
    d.grant_initial()
    model = bytearray()
    sent = bytearray()
    taken = bytearray()
    counter = 0
    for op, n, kind in steps:
        if op == "push":
            data = bytes((counter + i) % 251 for i in range(n))
            counter += n
            if n > d.src_credit:
                with pytest.raises(CreditExceeded):
                    d.push(kind(data))
                continue
            d.push(kind(data))
            model += data
            sent += data
        elif op == "grant":
            d.dst_window += n
        elif op == "take":
            if not d.ready():
                continue
            expect = min(n, len(model), d.dst_window)
            chunk = d.take(n)
            assert type(chunk) is bytes and chunk == bytes(model[:expect])
            del model[:expect]
            taken += chunk
        else:
            d.release_credit()
        assert d.buffered == len(model) == sum(len(piece) for piece in d.buffer)
        assert d.buffered + d.src_credit + d.credit_due <= d.cap
        assert len(d.buffer) <= 2 * (d.buffered // KEEP_WHOLE) + 2
        assert all(piece for piece in d.buffer)  # (no empty pieces kept)
    assert bytes(taken) + bytes(model) == bytes(sent)


def test_a_big_piece_that_fits_goes_on_as_it_came() -> None:
    """No copy on the relay's common path: a frame's bytes pushed whole come out as the same
    object when the receiver's window takes them whole; a view pushed is copied once."""
    d = Direction(CAP)
    d.grant_initial()
    d.dst_window = CAP
    piece = bytes(range(256)) * 256
    d.push(piece)
    assert d.take(64 * 1024) is piece
    view = memoryview(bytearray(piece))
    d.push(view)
    view[:1] = b"X"  # (the reader's buffer reused: what was pushed is the broker's own copy)
    assert d.take(64 * 1024) == piece


def test_clear_drops_what_is_held() -> None:
    d = Direction(CAP)
    d.grant_initial()
    d.push(b"x" * 10_000)
    d.push(b"y" * 10)
    d.clear()
    assert d.buffered == 0 and not d.buffer and d.ready() == 0


def test_a_big_piece_cut_again_and_again_is_copied_once() -> None:
    """A receiver granting a byte at a time: the first cut of a big piece copies its rest
    once, into a piece the later cuts take from without copying it again (cutting a bytes
    per grant copied the whole rest each time)."""
    d = Direction(cap=1 << 20)
    d.src_credit = 1 << 20
    piece = bytes(range(256)) * 2048  # 512 KiB
    d.push(piece)
    out = []
    for _ in range(3):
        d.dst_window += 1
        out.append(d.take(65536))
    rest = d.buffer[0]
    assert b"".join(out) == piece[:3] and type(rest) is bytearray and rest == piece[3:]
    d.dst_window += 1
    assert d.take(65536) == piece[3:4] and d.buffer[0] is rest  # (the same piece, cut in place)
    assert d.buffered == len(piece) - 4 == len(rest)
