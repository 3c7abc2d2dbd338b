"""NameRegistry: D-Bus name ownership semantics, table-driven and with Hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.core.names import (
    InvalidName,
    NameFlag,
    NameRegistry,
    OwnerChanged,
    ReleaseResult,
    RequestResult,
    validate_name,
)
from bus.errors import LimitError

A, B, C = 1, 2, 3
NAME = "org.example.Echo"
F = NameFlag


@pytest.mark.parametrize("name", ["org.example.Echo", "a.b", "org.example.with-dash", "_x.y_z", "A.B9.c_d-e"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "org", ".org.example", "org.example.", "org..example", "org.9example", "org.ex ample", "org.exämple", ":1.42", "a." * 128 + "b"],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_name(name)


@given(st.text(alphabet="ab9_-.\n\u00e4 ", max_size=12) | st.sampled_from(["a." * 127 + "bc", "a." * 127 + "b", "x\n.y", "x.y\n"]))
@settings(max_examples=400)
def test_the_quick_check_of_a_name_agrees_with_the_step_by_step_one(name: str) -> None:
    """A valid name is accepted by one match of the whole name; every other goes through the
    checks that say why not.  Both decide the same for any text."""
    elements = name.split(".")
    expected = (
        0 < len(name) <= 255
        and len(elements) >= 2
        and all(e and not e[0].isdigit() and all(c.isascii() and (c.isalnum() or c in "_-") for c in e) for e in elements)
    )
    if expected:
        assert validate_name(name) == name
    else:
        with pytest.raises(InvalidName):
            validate_name(name)


# Each row: the flags of A's request (A asks first), the flags of B's request, then what B gets,
# who owns the name afterwards, and who waits.
TABLE = [
    (F.NONE, F.NONE, RequestResult.IN_QUEUE, A, [B]),
    (F.NONE, F.DO_NOT_QUEUE, RequestResult.EXISTS, A, []),
    (F.NONE, F.REPLACE_EXISTING, RequestResult.IN_QUEUE, A, [B]),
    (F.NONE, F.REPLACE_EXISTING | F.DO_NOT_QUEUE, RequestResult.EXISTS, A, []),
    (F.ALLOW_REPLACEMENT, F.NONE, RequestResult.IN_QUEUE, A, [B]),
    (F.ALLOW_REPLACEMENT, F.REPLACE_EXISTING, RequestResult.PRIMARY_OWNER, B, [A]),
    (F.ALLOW_REPLACEMENT, F.REPLACE_EXISTING | F.DO_NOT_QUEUE, RequestResult.PRIMARY_OWNER, B, [A]),
    (F.ALLOW_REPLACEMENT | F.DO_NOT_QUEUE, F.REPLACE_EXISTING, RequestResult.PRIMARY_OWNER, B, []),
    (F.ALLOW_REPLACEMENT | F.DO_NOT_QUEUE, F.DO_NOT_QUEUE, RequestResult.EXISTS, A, []),
]


@pytest.mark.parametrize(("a_flags", "b_flags", "result", "owner", "queue"), TABLE)
def test_request_table(a_flags: NameFlag, b_flags: NameFlag, result: RequestResult, owner: int, queue: list[int]) -> None:
    reg = NameRegistry()
    assert reg.request_name(A, NAME, a_flags) == (RequestResult.PRIMARY_OWNER, [OwnerChanged(NAME, None, A)])
    got, events = reg.request_name(B, NAME, b_flags)
    assert got is result
    assert reg.owner(NAME) == owner
    assert reg.queue(NAME) == queue
    assert events == ([OwnerChanged(NAME, A, B)] if owner == B else [])


def test_already_owner_updates_flags() -> None:
    reg = NameRegistry()
    reg.request_name(A, NAME)
    assert reg.request_name(A, NAME, F.ALLOW_REPLACEMENT) == (RequestResult.ALREADY_OWNER, [])
    assert reg.request_name(B, NAME, F.REPLACE_EXISTING)[0] is RequestResult.PRIMARY_OWNER


def test_queue_hand_over_in_order_when_owners_leave() -> None:
    reg = NameRegistry()
    reg.request_name(A, NAME)
    reg.request_name(B, NAME)
    reg.request_name(C, NAME)
    assert reg.queue(NAME) == [B, C]
    assert reg.remove_connection(A) == [OwnerChanged(NAME, A, B)]
    assert reg.release_name(B, NAME) == (ReleaseResult.RELEASED, [OwnerChanged(NAME, B, C)])
    assert reg.remove_connection(C) == [OwnerChanged(NAME, C, None)]
    assert reg.owner(NAME) is None and reg.names() == {}


def test_release_from_the_queue_changes_no_owner() -> None:
    reg = NameRegistry()
    reg.request_name(A, NAME)
    reg.request_name(B, NAME)
    assert reg.release_name(B, NAME) == (ReleaseResult.RELEASED, [])
    assert reg.queue(NAME) == []


def test_release_results() -> None:
    reg = NameRegistry()
    assert reg.release_name(A, NAME) == (ReleaseResult.NON_EXISTENT, [])
    reg.request_name(A, NAME)
    assert reg.release_name(B, NAME) == (ReleaseResult.NOT_OWNER, [])


def test_queued_request_with_do_not_queue_leaves_the_queue() -> None:
    reg = NameRegistry()
    reg.request_name(A, NAME)
    reg.request_name(B, NAME)
    assert reg.request_name(B, NAME, F.DO_NOT_QUEUE) == (RequestResult.EXISTS, [])
    assert reg.queue(NAME) == [] and reg.waiting_for(B) == []


def test_replaced_owner_waits_at_the_head_of_the_queue() -> None:
    reg = NameRegistry()
    reg.request_name(A, NAME, F.ALLOW_REPLACEMENT)
    reg.request_name(C, NAME)
    reg.request_name(B, NAME, F.REPLACE_EXISTING)
    assert reg.owner(NAME) == B and reg.queue(NAME) == [A, C]
    assert reg.remove_connection(B) == [OwnerChanged(NAME, B, A)]


def test_several_names_per_connection_and_cleanup_once() -> None:
    reg = NameRegistry()
    reg.request_name(A, "org.example.One")
    reg.request_name(A, "org.example.Two")
    reg.request_name(B, "org.example.Two")
    assert reg.owned_by(A) == ["org.example.One", "org.example.Two"]
    assert reg.waiting_for(B) == ["org.example.Two"]
    events = reg.remove_connection(A)
    assert events == [OwnerChanged("org.example.One", A, None), OwnerChanged("org.example.Two", A, B)]
    assert reg.remove_connection(A) == []  # a second cleanup finds nothing


def test_names_per_connection_limit() -> None:
    reg = NameRegistry(max_names_per_connection=2)
    reg.request_name(A, "org.example.One")
    reg.request_name(A, "org.example.Two")
    with pytest.raises(LimitError, match="limit 2"):
        reg.request_name(A, "org.example.Three")
    assert reg.owner("org.example.Three") is None
    reg.request_name(B, "org.example.Three")
    with pytest.raises(LimitError):
        reg.request_name(A, "org.example.Three")  # waiting counts too
    assert reg.queue("org.example.Three") == []


def test_invalid_name_is_refused_everywhere() -> None:
    reg = NameRegistry()
    with pytest.raises(InvalidName):
        reg.request_name(A, "nodots")
    with pytest.raises(InvalidName):
        reg.release_name(A, "nodots")


# -- Hypothesis: any sequence of operations keeps the registry consistent -------------------

conns = st.integers(1, 4)
names = st.sampled_from(["org.example.A", "org.example.B", "org.example.C"])
flags = st.sampled_from(list(F.__members__.values()) + [F.ALLOW_REPLACEMENT | F.DO_NOT_QUEUE, F.REPLACE_EXISTING | F.DO_NOT_QUEUE, F(7)])
ops = st.one_of(
    st.tuples(st.just("request"), conns, names, flags),
    st.tuples(st.just("release"), conns, names, st.just(F.NONE)),
    st.tuples(st.just("remove"), conns, st.just(""), st.just(F.NONE)),
)


@settings(max_examples=400, deadline=None)
@given(sequence=st.lists(ops, max_size=40))
def test_any_sequence_keeps_owners_consistent(sequence: list[tuple[str, int, str, NameFlag]]) -> None:
    reg = NameRegistry(max_names_per_connection=3)
    model: dict[str, int] = {}  # rebuilt only from the events
    for op, conn, name, fl in sequence:
        try:
            if op == "request":
                _, events = reg.request_name(conn, name, fl)
            elif op == "release":
                _, events = reg.release_name(conn, name)
            else:
                events = reg.remove_connection(conn)
        except LimitError:
            events = []
        for ev in events:
            assert model.get(ev.name) == ev.old
            assert ev.old != ev.new
            if ev.new is None:
                del model[ev.name]
            else:
                model[ev.name] = ev.new
        assert reg.names() == model
        for n in model:
            everyone = [reg.owner(n), *reg.queue(n)]
            assert len(everyone) == len(set(everyone))
        for c in range(1, 5):
            held = set(reg.owned_by(c)) | set(reg.waiting_for(c))
            assert len(held) <= 3
            assert held == {n for n in model if c == reg.owner(n) or c in reg.queue(n)}
