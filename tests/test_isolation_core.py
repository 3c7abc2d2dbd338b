"""Isolation in the sans-io core: every message the core builds is sendable, charges are
released exactly once, the glob matcher agrees with the shell's, and names are filtered."""

from __future__ import annotations

import fnmatch
import resource
import string
import tomllib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus.__main__ import raise_fd_limit
from bus.core.accounting import Budget, Charge
from bus.core.broker import BrokerCore, ChannelMessage, DropFd, Limits, WithFd, flatten
from bus.core.glob import GlobError, compile_glob
from bus.core.policy import Policy
from bus.errors import QuotaExceeded
from bus.wire.frames import DEFAULT_MAX_CONTROL, encode_control
from bus.wire.identity import Identity

OWNER = Identity.from_seed(b"O" * 32).public_key
PLUGIN = Identity.from_seed(b"P" * 32).public_key
VIEWER = Identity.from_seed(b"V" * 32).public_key

RULES = f"""
[[rule]]
name = "plugin"
identities = ["{PLUGIN.id}"]
connect = true
own = ["org.example.*", "org.hidden.*"]
see = ["org.example.*"]
open = ["org.example.*"]

[[rule]]
name = "viewer"
identities = ["{VIEWER.id}"]
connect = true
see = ["org.example.*"]
open = ["org.example.*"]
"""


def new_core(limits: Limits | None = None) -> BrokerCore:
    return BrokerCore(Policy.from_mapping(OWNER, tomllib.loads(RULES)), limits, clock=lambda: 1.0)


def sendable(out: list[Any]) -> None:
    """Every message the core produced encodes into one control frame of the default size."""
    for item in flatten(out):
        if isinstance(item, DropFd):
            continue
        if isinstance(item, ChannelMessage):
            encode_control(item.channel, item.body, DEFAULT_MAX_CONTROL)
        elif isinstance(item, WithFd):
            encode_control(0, item.message, DEFAULT_MAX_CONTROL)
        else:
            encode_control(0, item[1], DEFAULT_MAX_CONTROL)


def deep(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {"k": leaf}
    return leaf


LONG = "org.example." + "n" * 240
names = st.sampled_from(["org.example.A", "org.example.B", "org.hidden.C", LONG[:250] + "1", LONG[:250] + "2"])
huge_text = st.sampled_from(["", "x", "y" * 70000, "é" * 40000])
ops = st.one_of(
    st.tuples(st.just("hello"), st.integers(0, 30), st.sampled_from([0, 8000, 16000, 17000]), st.sampled_from([None, "org.example.A", LONG[:255]])),
    st.tuples(st.just("request_name"), names),
    st.tuples(st.just("release_name"), names),
    st.tuples(st.just("watch"), st.lists(st.sampled_from(["*", "org.*", "*e*x*", "[a-", "?" * 255, "org.example.[AB]"]), max_size=40)),
    st.tuples(st.just("open_channel"), names, st.sampled_from(["relay", "auto", "direct"])),
    st.tuples(st.just("answer"), huge_text, st.sampled_from(["ok", "error", "badhost", "goodhost"])),
    st.tuples(st.just("info"), st.sampled_from(["org.example.A", ":1", ":2", ":3", ":4"]), st.integers(0, 300)),
    st.tuples(st.just("list"), st.booleans()),
    st.tuples(st.just("junk"), huge_text),
    st.tuples(st.just("room"), st.booleans()),
    st.tuples(st.just("pump"), st.integers(1, 4)),
    st.tuples(st.just("leave"), st.integers(1, 4)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(script=st.lists(st.tuples(st.integers(0, 3), ops), max_size=40))
def test_every_message_the_core_builds_is_sendable(script: list[tuple[int, tuple[Any, ...]]]) -> None:
    core = new_core(Limits(info_depth=8))
    room = {"ok": True}
    core.has_room = lambda conn_id: room["ok"]
    conns = [core.connect(key, "unix" if i % 2 else "tcp").id for i, key in enumerate((OWNER, PLUGIN, VIEWER, PLUGIN))]
    asked: list[tuple[int, dict[str, Any]]] = []  # requests the core sent (channel_request)
    rid = 100

    def run(conn: int, message: dict[str, Any]) -> None:
        if conn not in core.connections:
            return
        out = core.receive(conn, message)
        sendable(out)
        for item in out:
            if isinstance(item, tuple) and item[1].get("op") == "channel_request":
                asked.append((item[0], item[1]))
            if isinstance(item, WithFd) and item.message.get("op") == "channel_request":
                asked.append((item.conn, item.message))

    for who, op in script:
        conn = conns[who]
        rid += 1
        kind = op[0]
        if kind == "hello":
            info = {"description": "d", "metadata": deep(op[1], "m" * op[2])}
            run(conn, {"op": "hello", "id": rid, "info": info, "name": op[3]})
        elif kind in ("request_name", "release_name"):
            run(conn, {"op": kind, "id": rid, "name": op[1]})
        elif kind == "watch":
            run(conn, {"op": "watch", "id": rid, "patterns": op[1]})
        elif kind == "open_channel":
            run(conn, {"op": "open_channel", "id": rid, "name": op[1], "route": op[2], "protocol": "p" * 64})
        elif kind == "answer" and asked:
            target, request = asked.pop(0)
            if op[2] == "error":
                reply: dict[str, Any] = {"re": request["id"], "error": {"code": "x" * 300, "message": op[1]}}
            elif op[2] == "badhost":
                reply = {"re": request["id"], "result": {"host": op[1] or "h" * 60000, "port": 9}}
            elif op[2] == "goodhost":
                reply = {"re": request["id"], "result": {"host": "127.0.0.1", "port": 9}}
            else:
                reply = {"re": request["id"], "result": {}}
            run(target, reply)
        elif kind == "info":
            run(conn, {"op": "info", "id": rid, "target": op[1], "channels_after": op[2]})
        elif kind == "list":
            run(conn, {"op": "list_names", "id": rid, "all": op[1]})
        elif kind == "junk":
            run(conn, {"op": op[1] or "nothing", "id": rid, "flags": [op[1]]})
            run(conn, {"op": "request_name", "id": rid + 1000, "name": op[1], "flags": [op[1]]})
        elif kind == "room":
            room["ok"] = op[1]
        elif kind == "pump":
            sendable(core.pump_watches(conns[op[1] - 1]))
        elif kind == "leave":
            sendable(core.disconnect(conns[op[1] - 1]))
        for target_id, request_id in list(core.pending_opens):
            if rid % 7 == 0:
                sendable(core.expire_open(target_id, request_id, 5.0))
    # Whatever happened, when everyone leaves, every charge has been given back.
    for conn in conns:
        sendable(core.disconnect(conn))
    assert core.accounts == {} and core.pending_opens == {} and core.direct == {} and len(core.channels) == 0


def test_charges_are_all_or_nothing_and_released_once() -> None:
    mine = Budget("a", "me", 2)
    theirs = Budget("b", "you", 1)
    charge = Charge.take(1, own=(mine,), shared=(theirs,), actor="x")
    with pytest.raises(QuotaExceeded, match="b reached"):
        Charge.take(1, own=(mine,), shared=(theirs,), actor="y")
    assert mine.used == 1  # nothing taken by the refused charge
    charge.release()
    charge.release()
    assert mine.used == 0 and theirs.used == 0 and theirs.held_by("x") == 0


def test_a_spender_gets_at_most_a_fair_share_of_someone_elses_budget() -> None:
    target = Budget("channels_per_target", ":1", 16)
    greedy = []
    with pytest.raises(QuotaExceeded, match="fair share"):
        while True:
            greedy.append(Charge.take(1, shared=(target,), actor="greedy"))
    assert len(greedy) == 8
    others = [Charge.take(1, shared=(target,), actor="other") for _ in range(4)]
    assert target.free == 4 and len(others) == 4


def test_channel_peers_show_only_the_names_the_viewer_may_see() -> None:
    core = new_core()
    plugin = core.connect(PLUGIN, "unix").id
    viewer = core.connect(VIEWER, "unix").id
    core.receive(plugin, {"op": "hello", "id": 1, "name": "org.example.Svc"})
    core.receive(plugin, {"op": "request_name", "id": 2, "name": "org.hidden.Secret"})
    core.receive(viewer, {"op": "hello", "id": 1})
    out = core.receive(viewer, {"op": "open_channel", "id": 2, "name": "org.example.Svc", "route": "relay"})
    (target, request), = [item for item in out if isinstance(item, tuple)]
    assert request["opener"]["names"] == []
    out = core.receive(plugin, {"re": request["id"], "result": {}})
    reply = next(m for c, m in (i for i in out if isinstance(i, tuple)) if c == viewer)
    assert reply["result"]["peer"]["names"] == ["org.example.Svc"]  # not org.hidden.Secret


@given(
    pattern=st.text(alphabet="ab.*?[]!-", max_size=12),
    name=st.text(alphabet="ab.-", max_size=12),
)
@settings(max_examples=2000, deadline=None)
def test_glob_agrees_with_fnmatch(pattern: str, name: str) -> None:
    try:
        glob = compile_glob(pattern)
    except GlobError:
        return  # an unclosed '[' or a backwards range: refused, where fnmatch guesses
    assert glob.match(name) == fnmatch.fnmatchcase(name, pattern), (pattern, name)


def test_glob_refuses_what_fnmatch_would_guess_at() -> None:
    for bad in ("bad[pattern", "[", "a[!"):
        with pytest.raises(GlobError, match="never closed"):
            compile_glob(bad)
    with pytest.raises(GlobError, match="backwards"):
        compile_glob("[z-a]")
    assert compile_glob("org.example.*").match("org.example.Echo")
    assert not compile_glob("*a*a*a*a*a*a*a*a*b").match("a" * 250)
    assert compile_glob("?" * 3).match("abc") and not compile_glob("???").match("ab")
    assert set(string.ascii_letters) <= set("".join(c for c in string.ascii_letters if compile_glob("[a-zA-Z]").match(c)))


def test_busd_raises_its_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard > 256, "this machine's hard limit leaves nothing to raise"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        old, new = raise_fd_limit()
        assert old == 256 and new > 256
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (new, hard)
        if hard != resource.RLIM_INFINITY:
            assert new == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("depth", [8])
def test_worst_case_state_every_reply_and_event_is_sendable(depth: int) -> None:
    """Everything at its limit at once: info as deep and as big as allowed, 64 names of 255
    characters, watchers of everything, channels; every list, info, snapshot and event fits."""
    limits = Limits(info_depth=depth)
    core = new_core(limits)
    admin = core.connect(OWNER, "unix").id
    watcher_out = core.receive(admin, {"op": "hello", "id": 1})
    sendable(watcher_out)
    sendable(core.receive(admin, {"op": "watch", "id": 2, "patterns": ["*"]}))
    plugin = core.connect(PLUGIN, "tcp").id
    leaf = "m" * (limits.info_bytes - 200 - 2 * depth)
    out = core.receive(plugin, {"op": "hello", "id": 1, "info": {"description": "", "version": "", "metadata": deep(depth - 1, leaf)}})
    assert "result" in out[0][1], out[0][1]
    sendable(out)
    for i in range(limits.names_per_connection):
        name = f"org.example.{'n' * 238}{i:03}"
        out = core.receive(plugin, {"op": "request_name", "id": 10 + i, "name": name})
        assert "result" in out[0][1]
        sendable(out)
    for i in range(200):
        out = core.receive(plugin, {"op": "open_channel", "id": 500 + i, "name": "org.example." + "n" * 238 + "000", "route": "relay"})
        sendable(out)
    for op in (
        {"op": "list_names", "id": 900, "all": True},
        {"op": "info", "id": 901, "target": f":{plugin}"},
        {"op": "resolve", "id": 902, "name": "org.example." + "n" * 238 + "063"},
        {"op": "watch", "id": 903, "patterns": ["org.*"]},
    ):
        sendable(core.receive(admin, op))
    while admin in core.pumping:
        sendable(core.pump_watches(admin))
    sendable(core.disconnect(plugin))
    # One level deeper than the limit is refused where it enters.
    again = core.connect(PLUGIN, "tcp").id
    out = core.receive(again, {"op": "hello", "id": 1, "info": {"metadata": deep(depth, "m")}})
    assert out[0][1]["error"]["code"] == QuotaExceeded.wire_code


def test_however_many_spenders_join_an_eighth_stays_for_newcomers() -> None:
    target = Budget("pending_opens_per_target", ":1", 64)
    held = []
    for n in range(40):  # forty greedy identities, each taking all it may
        while True:
            try:
                held.append(Charge.take(1, shared=(target,), actor=f"greedy{n}"))
            except QuotaExceeded:
                break
        if target.free <= 64 // 8:
            break
    assert target.free >= 64 // 8 - 1
    newcomer = Charge.take(1, shared=(target,), actor="newcomer")  # still gets in
    assert newcomer


@given(
    patterns=st.lists(st.text(alphabet="ab.*?[]!-", max_size=14), min_size=1, max_size=4),
    name=st.text(alphabet="ab.-", max_size=14),
)
@settings(max_examples=2000, deadline=None)
def test_glob_sets_with_complex_patterns_agree_with_fnmatch(patterns: list[str], name: str) -> None:
    from bus.core.glob import GlobSet

    try:
        globs = tuple(compile_glob(p) for p in patterns)
    except GlobError:
        return
    assert GlobSet(globs).match(name) == any(fnmatch.fnmatchcase(name, p) for p in patterns), (patterns, name)


def test_complex_watches_are_counted_and_plain_ones_are_not() -> None:
    from bus.core.glob import GlobSet

    assert GlobSet((compile_glob("*[!b]?b*"),)).complex == 1
    assert GlobSet((compile_glob("org.example.*"), compile_glob("*a*a*b"), compile_glob("?rg.*"))).complex == 0
    core = new_core(Limits(complex_watches_per_connection=2))
    conn = core.connect(PLUGIN, "unix").id
    core.receive(conn, {"op": "hello", "id": 1})
    for i in range(5):  # plain watches: not counted
        assert "result" in core.receive(conn, {"op": "watch", "id": 10 + i, "patterns": ["org.*", "*x*y*"]})[0][1]
    replies = [core.receive(conn, {"op": "watch", "id": 20 + i, "patterns": ["*[!b]?b*"]})[0][1] for i in range(3)]
    assert ["result" in r for r in replies] == [True, True, False]
    assert "complex_watches_per_connection" in replies[2]["error"]["message"]
    core.receive(conn, {"op": "unwatch", "id": 30, "watch": replies[0]["result"]["watch"]})
    assert "result" in core.receive(conn, {"op": "watch", "id": 31, "patterns": ["*[!b]?b*"]})[0][1]


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"max_frame": 1}, "max_frame"),
        ({"max_control": 10}, "max_control"),
        ({"outbound_bytes": 4096}, "outbound_bytes"),
        ({"outbound_queue": 1}, "outbound_queue"),
        ({"limits": Limits(info_bytes=60_000)}, "reply_bytes"),
        ({"limits": Limits(info_depth=30)}, "info_depth"),
    ],
)
def test_settings_that_contradict_each_other_are_refused(overrides: dict[str, Any], named: str, tmp_path: Any) -> None:
    from bus.broker import Broker, check_settings

    from .brokers import make_config

    config = make_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=named):
        check_settings(config)
    with pytest.raises(ValueError, match=named):
        Broker(config)
    check_settings(make_config(tmp_path))  # the defaults agree
