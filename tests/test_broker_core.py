"""BrokerCore (sans-io): registration, names, queries, watches, spoofing, bad requests."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from bus.core.broker import BrokerCore, Limits, flatten
from bus.core.policy import Policy
from bus.errors import FrameError, QuotaExceeded
from bus.wire.identity import Identity

OWNER = Identity.generate().public_key
PLUGIN = Identity.generate().public_key
VIEWER = Identity.generate().public_key

RULES = f"""
[[rule]]
name = "plugin"
identities = ["{PLUGIN.id}"]
connect = true
own = ["org.example.*"]
see = ["org.example.*"]

[[rule]]
name = "viewer"
identities = ["{VIEWER.id}"]
connect = true
see = ["org.example.Public*"]
"""


class Harness:
    def __init__(self, limits: Limits | None = None) -> None:
        self.core = BrokerCore(Policy.from_mapping(OWNER, tomllib.loads(RULES)), limits, clock=lambda: 1000.0)
        self.sent: dict[int, list[dict[str, Any]]] = {}
        self._ids = 0

    def connect(self, key: Any = OWNER, transport: str = "unix") -> int:
        conn = self.core.connect(key, transport, pid=123, uid=1000)
        self.sent[conn.id] = []
        return conn.id

    def deliver(self, out: list[Any]) -> None:
        for conn_id, msg in flatten(out):
            self.sent[conn_id].append(msg)

    def request(self, conn: int, op: str, **args: Any) -> dict[str, Any]:
        self._ids += 1
        self.deliver(self.core.receive(conn, {"op": op, "id": self._ids, **args}))
        replies = [m for m in self.sent[conn] if m.get("re") == self._ids]
        assert len(replies) == 1, "every request gets exactly one reply"
        return replies[0]

    def ok(self, conn: int, op: str, **args: Any) -> Any:
        reply = self.request(conn, op, **args)
        assert "result" in reply, reply
        return reply["result"]

    def error(self, conn: int, op: str, **args: Any) -> tuple[str, str]:
        reply = self.request(conn, op, **args)
        assert "error" in reply, reply
        return reply["error"]["code"], reply["error"]["message"]

    def events(self, conn: int) -> list[dict[str, Any]]:
        evs = [m for m in self.sent[conn] if "event" in m]
        self.sent[conn] = [m for m in self.sent[conn] if "event" not in m]
        return evs

    def disconnect(self, conn: int) -> None:
        self.deliver(self.core.disconnect(conn))


def test_hello_registers_with_unique_ids_never_reused() -> None:
    h = Harness()
    a = h.connect()
    first = h.ok(a, "hello", info={"description": "A", "version": "1"})
    assert first == {"unique_id": f":{a}", "identity": OWNER.id}
    h.disconnect(a)
    b = h.connect()
    assert h.ok(b, "hello")["unique_id"] != first["unique_id"]


def test_requests_before_hello_are_refused_but_the_connection_stays() -> None:
    h = Harness()
    a = h.connect()
    assert h.error(a, "list_names")[0] == "minibus.Error.BadRequest"
    assert h.ok(a, "ping") == {}
    assert h.ok(a, "hello")["unique_id"] == f":{a}"
    assert h.error(a, "hello")[0] == "minibus.Error.BadRequest"


def test_unknown_operations_and_malformed_requests_get_error_replies() -> None:
    h = Harness()
    a = h.connect()
    h.ok(a, "hello")
    assert h.error(a, "frobnicate")[0] == "minibus.Error.UnknownOperation"
    assert h.error(a, "request_name")[0] == "minibus.Error.BadRequest"  # missing name
    assert h.error(a, "request_name", name=5)[0] == "minibus.Error.BadRequest"
    assert h.error(a, "request_name", name="org.example.X", flags=["fly"])[0] == "minibus.Error.BadRequest"
    assert h.error(a, "request_name", name="bad name")[0] == "minibus.Error.InvalidName"
    out = h.core.receive(a, {"op": 7, "id": 99})
    assert out[0][1]["re"] == 99 and out[0][1]["error"]["code"] == "minibus.Error.BadRequest"
    with pytest.raises(FrameError):
        h.core.receive(a, {"op": "ping"})  # no id: nothing to reply to
    with pytest.raises(FrameError):
        h.core.receive(a, {"nonsense": True})


def test_spoofing_fields_in_hello_change_nothing() -> None:
    h = Harness()
    victim = h.connect(PLUGIN)
    h.ok(victim, "hello", name="org.example.Echo")
    attacker = h.connect(OWNER)
    result = h.ok(attacker, "hello", identity=PLUGIN.id, unique_id=f":{victim}", name="org.example.Other")
    assert result["identity"] == OWNER.id and result["unique_id"] == f":{attacker}"
    entry = h.ok(attacker, "resolve", name="org.example.Other")
    assert entry["identity"] == OWNER.id and entry["unique_id"] == f":{attacker}"
    assert h.ok(attacker, "resolve", name="org.example.Echo")["identity"] == PLUGIN.id


def test_policy_denial_names_the_rule() -> None:
    h = Harness()
    p = h.connect(PLUGIN)
    h.ok(p, "hello")
    code, message = h.error(p, "request_name", name="com.other.Thing")
    assert code == "minibus.Error.AccessDenied"
    assert "may not own 'com.other.Thing'" in message and "plugin" in message
    code, message = h.error(p, "list_names", all=True)
    assert code == "minibus.Error.AccessDenied" and "admin" in message


def test_queries_hide_nameless_connections_except_from_admins() -> None:
    h = Harness()
    named = h.connect(PLUGIN)
    h.ok(named, "hello", name="org.example.Echo", info={"description": "echo", "version": "2", "metadata": {"k": 1}})
    nameless = h.connect(VIEWER)
    h.ok(nameless, "hello")
    admin = h.connect(OWNER)
    h.ok(admin, "hello")
    listed = h.ok(named, "list_names")["entries"]
    assert [e["name"] for e in listed] == ["org.example.Echo"]
    entry = listed[0]
    assert entry["unique_id"] == f":{named}" and entry["identity"] == PLUGIN.id
    assert entry["info"] == {"description": "echo", "version": "2", "metadata": {"k": 1}}
    assert entry["transport"] == "unix" and entry["pid"] == 123 and entry["uid"] == 1000
    assert entry["connected_since"] == 1000.0
    assert h.error(named, "info", target=f":{nameless}")[0] == "minibus.Error.NameNotFound"
    everything = h.ok(admin, "list_names", all=True)["entries"]
    assert {e["unique_id"] for e in everything} == {f":{named}", f":{nameless}", f":{admin}"}
    assert h.ok(admin, "info", target=f":{nameless}")["names"] == []
    assert h.ok(nameless, "info", target=f":{nameless}")["unique_id"] == f":{nameless}"  # itself


def test_see_rules_filter_queries() -> None:
    h = Harness()
    p = h.connect(PLUGIN)
    h.ok(p, "hello", name="org.example.Private")
    h.ok(p, "request_name", name="org.example.PublicNews")
    v = h.connect(VIEWER)
    h.ok(v, "hello")
    assert [e["name"] for e in h.ok(v, "list_names")["entries"]] == ["org.example.PublicNews"]
    assert h.error(v, "resolve", name="org.example.Private")[0] == "minibus.Error.NameNotFound"
    assert h.ok(v, "info", target="org.example.PublicNews")["names"] == ["org.example.PublicNews"]


def test_watch_snapshot_then_deltas_in_order() -> None:
    h = Harness()
    w = h.connect()
    h.ok(w, "hello")
    a = h.connect(PLUGIN)
    h.ok(a, "hello", name="org.example.A", flags=["allow-replacement"])
    result = h.ok(w, "watch", patterns=["org.example.*"])
    assert [e["name"] for e in result["snapshot"]] == ["org.example.A"]
    wid = result["watch"]
    b = h.connect(PLUGIN)
    h.ok(b, "hello", name="org.example.B")
    h.ok(b, "request_name", name="org.example.A", flags=["replace-existing"])
    h.disconnect(b)
    kinds = [(e["kind"], e["name"], e["owner"]["unique_id"] if e["owner"] else None, e["old_owner"]) for e in h.events(w)]
    assert kinds == [
        ("connected", "org.example.B", f":{b}", None),
        ("owner-changed", "org.example.A", f":{b}", f":{a}"),
        ("owner-changed", "org.example.A", f":{a}", f":{b}"),  # names are released in sorted order
        ("disconnected", "org.example.B", None, f":{b}"),
    ]
    assert all(e["watch"] == wid for e in h.sent[w] if "event" in e)
    h.ok(w, "unwatch", watch=wid)
    h.disconnect(a)
    assert h.events(w) == []
    assert h.error(w, "unwatch", watch=wid)[0] == "minibus.Error.BadRequest"


def test_watch_patterns_filter_and_several_watches() -> None:
    h = Harness()
    w = h.connect()
    h.ok(w, "hello")
    one = h.ok(w, "watch", patterns=["org.example.A"])["watch"]
    two = h.ok(w, "watch", patterns=["org.example.*"])["watch"]
    p = h.connect(PLUGIN)
    h.ok(p, "hello", name="org.example.B")
    h.ok(p, "request_name", name="org.example.A")
    got = [(e["watch"], e["name"]) for e in h.events(w)]
    assert got == [(two, "org.example.B"), (one, "org.example.A"), (two, "org.example.A")]


def test_limits() -> None:
    h = Harness(Limits(connections_per_identity=2, watches_per_connection=1, names_per_connection=1))
    a = h.connect(PLUGIN)
    h.connect(PLUGIN)
    with pytest.raises(QuotaExceeded):
        h.core.connect(PLUGIN, "tcp")
    h.ok(a, "hello", name="org.example.One")
    assert h.error(a, "request_name", name="org.example.Two")[0] == "minibus.Error.QuotaExceeded"
    h.ok(a, "watch", patterns=["*"])
    assert h.error(a, "watch", patterns=["*"])[0] == "minibus.Error.QuotaExceeded"
    h.disconnect(a)
    h.connect(PLUGIN)  # the slot freed


def test_disconnect_is_idempotent_and_hands_names_over() -> None:
    h = Harness()
    w = h.connect()
    h.ok(w, "hello")
    h.ok(w, "watch", patterns=["*"])
    a, b = h.connect(PLUGIN), h.connect(PLUGIN)
    h.ok(a, "hello", name="org.example.Svc")
    h.ok(b, "hello", name="org.example.Svc")
    assert h.ok(b, "info", target=f":{b}")["queued_for"] == ["org.example.Svc"]
    h.events(w)
    h.disconnect(a)
    h.disconnect(a)
    assert [(e["kind"], e["owner"]["unique_id"]) for e in h.events(w)] == [("owner-changed", f":{b}")]


def test_hello_info_is_typed_and_bounded() -> None:
    h = Harness(Limits(info_bytes=1000))
    a = h.connect()
    assert h.error(a, "hello", info={"description": [True] * 100})[0] == "minibus.Error.BadRequest"
    assert h.error(a, "hello", info={"version": 3})[0] == "minibus.Error.BadRequest"
    assert h.error(a, "hello", info={"metadata": [1]})[0] == "minibus.Error.BadRequest"
    assert h.error(a, "hello", info={"description": "x" * 2000})[0] == "minibus.Error.QuotaExceeded"
    assert h.ok(a, "hello", info={"description": "fine", "metadata": {"k": 1, 2: "mixed keys"}})


@pytest.mark.parametrize("char", ["x", "\u00e9", "\u20ac", "\U0001f600"])
def test_hello_info_at_the_size_limit(char: str) -> None:
    """Around ``info_bytes`` (short infos are not encoded to be measured: none over the limit
    may pass that way), with one- to four-byte characters, in the description or the version."""
    import cbor2

    limit = 200
    for n in range(0, limit):
        for info in ({"description": char * n}, {"version": char * n}, {"description": char * (n // 2), "version": char * (n - n // 2)}):
            h = Harness(Limits(info_bytes=limit))
            a = h.connect()
            normalized = {"description": info.get("description", ""), "version": info.get("version", ""), "metadata": {}}
            if len(cbor2.dumps(normalized)) > limit:
                assert h.error(a, "hello", info=info)[0] == "minibus.Error.QuotaExceeded", (char, n, info)
            else:
                assert h.ok(a, "hello", info=info)["unique_id"] == f":{a}"


def test_odd_arguments_get_bad_request_not_a_crash() -> None:
    h = Harness()
    a = h.connect()
    h.ok(a, "hello")
    assert h.error(a, "request_name", name="org.example.X", flags=[["x"]])[0] == "minibus.Error.BadRequest"
    assert h.error(a, "request_name", name="org.example.X", flags=[{}])[0] == "minibus.Error.BadRequest"
    for target in (":\u00b2", ":\u0663", ":" + "9" * 40):
        assert h.error(a, "info", target=target)[0] in ("minibus.Error.InvalidName", "minibus.Error.NameNotFound")
    assert h.error(a, "watch", patterns=["x" * 300])[0] == "minibus.Error.QuotaExceeded"
    assert h.error(a, "watch", patterns=[1])[0] == "minibus.Error.BadRequest"


def test_long_lists_come_in_pages() -> None:
    h = Harness(Limits(reply_bytes=2000, names_per_connection=200))
    p = h.connect(PLUGIN)
    h.ok(p, "hello", info={"description": "d" * 200})
    names = [f"org.example.N{i:03}" for i in range(60)]
    for n in names:
        h.ok(p, "request_name", name=n)
    admin = h.connect()
    h.ok(admin, "hello")
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = h.ok(admin, "list_names", **({"after": after} if after else {}))
        seen += [e["name"] for e in page["entries"]]
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert seen == names and pages > 3
    # with all=True the nameless admin itself comes last, after the names
    everything, after = [], None
    while True:
        page = h.ok(admin, "list_names", all=True, **({"after": after} if after else {}))
        everything += [e["name"] or e["unique_id"] for e in page["entries"]]
        after = page["next"]
        if after is None:
            break
    assert everything == names + [f":{admin}"]


def test_large_snapshots_arrive_in_parts_merged_with_changes() -> None:
    """Pages after the first come from pump_watches (as the watcher's queue drains); a change
    to a name a page already showed is sent at once, one to a name still to come is left to
    its page: the watcher sees every name exactly once, in its current state."""
    h = Harness(Limits(reply_bytes=2000, names_per_connection=200))
    p = h.connect(PLUGIN)
    h.ok(p, "hello", info={"description": "d" * 200})
    for i in range(40):
        h.ok(p, "request_name", name=f"org.example.N{i:03}")
    w = h.connect()
    h.ok(w, "hello")
    h._ids += 1
    out = h.core.receive(w, {"op": "watch", "id": h._ids, "patterns": ["org.example.*"]})
    assert len(out) == 1  # just the reply: the rest is paced
    result = out[0][1]["result"]
    assert result["more"] is True and w in h.core.pumping
    first = [e["name"] for e in result["snapshot"]]
    assert first[0] == "org.example.N000"
    # A change to a name already shown is an event; one to a name still to come is not.
    h.deliver(h.core.receive(p, {"op": "release_name", "id": 900, "name": "org.example.N000"}))
    h.deliver(h.core.receive(p, {"op": "release_name", "id": 901, "name": "org.example.N039"}))
    events = [m for m in h.sent[w] if m.get("event") == "name"]
    assert [(e["name"], e["kind"]) for e in events] == [("org.example.N000", "disconnected")]
    names = list(first)
    while w in h.core.pumping:
        for conn_id, message in h.core.pump_watches(w):
            assert conn_id == w and message["event"] == "snapshot"
            names += [e["name"] for e in message["entries"]]
    assert names == [f"org.example.N{i:03}" for i in range(39)]  # N039 left before its page
    assert h.core.pump_watches(w) == []


def test_budgets_are_made_when_first_used_and_still_hold_their_limits() -> None:
    """A connect (and a hello with a name) makes no budget; the first watch makes the watch
    budgets (the connection's and its identity's), which count and refuse as ever; the
    identity's budgets outlive none of its connections."""
    h = Harness(Limits(watches_per_connection=2, watches_per_identity=3))
    a = h.connect()
    h.ok(a, "hello", name="org.example.Lazy")
    conn = h.core.connections[a]
    account = conn.account
    made = lambda holder: sorted(n for n in holder.__slots__ if n.startswith("_") and n.endswith(("budget", "watches", "subscriptions", "channels", "pending", "relay")) and getattr(holder, n) is not None)  # noqa: E731
    assert made(conn) == [] and made(account) == []
    h.ok(a, "watch", patterns=["org.example.*"])
    assert made(conn) == ["_watch_budget"] and made(account) == ["_watches"]
    assert conn.watch_budget.used == 1 and account.watches.used == 1
    assert conn.watch_budget.owner == f":{a}" and account.watches.owner == conn.key.id
    h.ok(a, "watch", patterns=["org.other.*"])
    assert h.error(a, "watch", patterns=["org.third.*"])[0] == "minibus.Error.QuotaExceeded"
    b = h.connect()
    h.ok(b, "hello")
    assert h.core.connections[b].account is account
    h.ok(b, "watch", patterns=["org.b.*"])
    code, message = h.error(b, "watch", patterns=["org.c.*"])
    assert code == "minibus.Error.QuotaExceeded" and "watches_per_identity" in message
    h.disconnect(a)
    assert account.watches.used == 1
    h.disconnect(b)
    assert conn.key.id not in h.core.accounts
