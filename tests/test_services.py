"""Service files (sans-io parser) and activation at the broker core: held openings, what they
pay, replay once the plugin takes its name, failures, admin commands."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from bus.core.activation import ServiceAction
from bus.core.broker import BrokerCore, Limits
from bus.core.policy import Policy
from bus.core.services import ServiceFileError, ServiceSpec, parse_service
from bus.supervisor import read_service_dirs
from bus.wire.identity import Identity

OWNER = Identity.generate().public_key
USER = Identity.generate().public_key
NOSY = Identity.generate().public_key

RULES = f"""
[[rule]]
name = "users"
identities = ["{USER.id}"]
connect = true
see = ["org.example.*"]
open = ["org.example.*"]

[[rule]]
name = "nosy"
identities = ["{NOSY.id}"]
connect = true
see = ["org.example.*"]
"""

GOOD = b"""
name = "org.example.Echo"
exec = ["python", "echo.py", "--flag"]
description = "echoes"
version = "1.2"
activation = "always"
restart = "never"
working_directory = "plugins"
environment = { LEVEL = "debug" }
identity = "keys/echo.key"
stop_timeout = 2
"""


def test_a_full_service_file() -> None:
    spec = parse_service(GOOD, "/etc/svc/echo.toml")
    assert spec.name == "org.example.Echo"
    assert spec.exec == ("python", "echo.py", "--flag")
    assert (spec.description, spec.version, spec.activation, spec.restart) == ("echoes", "1.2", "always", "never")
    assert spec.working_directory == "/etc/svc/plugins"
    assert spec.environment == {"LEVEL": "debug"}
    assert spec.identity == "/etc/svc/keys/echo.key"
    assert spec.stop_timeout == 2.0


def test_defaults_and_relative_program() -> None:
    spec = parse_service('name = "org.example.A"\nexec = ["./run.sh"]\n', "/srv/a.toml")
    assert (spec.activation, spec.restart, spec.stop_timeout, spec.identity) == ("on-demand", "on-failure", 5.0, None)
    assert spec.working_directory == "/srv"
    assert spec.exec == ("/srv/run.sh",)  # relative to the working directory


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('exec = ["x"]', "name"),
        ('name = "no"\nexec = ["x"]', "name"),
        ('name = "org.example.A"', "exec"),
        ('name = "org.example.A"\nexec = "python -c 1"', "exec"),
        ('name = "org.example.A"\nexec = []', "exec"),
        ('name = "org.example.A"\nexec = ["x"]\nactivation = "sometimes"', "activation"),
        ('name = "org.example.A"\nexec = ["x"]\nrestart = "maybe"', "restart"),
        ('name = "org.example.A"\nexec = ["x"]\nenvironment = { A = 1 }', "environment"),
        ('name = "org.example.A"\nexec = ["x"]\nstop_timeout = -1', "stop_timeout"),
        ('name = "org.example.A"\nexec = ["x"]\nstop_timeout = true', "stop_timeout"),
        ('name = "org.example.A"\nexec = ["x"]\nidentity = 3', "identity"),
        ('name = "org.example.A"\nexec = ["x"]\ndescription = 3', "description"),
        ('name = "org.example.A"\nexec = ["x"]\nexecc = ["y"]', "execc"),
        ("name = ", ""),
    ],
)
def test_a_bad_field_is_one_line_naming_file_and_field(text: str, field: str) -> None:
    with pytest.raises(ServiceFileError) as caught:
        parse_service(text.encode(), "/svc/a.toml")
    assert caught.value.field == field
    message = str(caught.value)
    assert message.startswith(f"/svc/a.toml: {field + ': ' if field else ''}") and "\n" not in message


def test_not_utf8_and_too_large() -> None:
    with pytest.raises(ServiceFileError, match="UTF-8"):
        parse_service(b"\xff\xfe", "/svc/a.toml")
    with pytest.raises(ServiceFileError, match="larger"):
        parse_service(b"#" * (65 * 1024), "/svc/a.toml")


def test_reading_directories(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a.toml").write_text('name = "org.example.A"\nexec = ["x"]\n')
    (first / "bad.toml").write_text('name = "org.example.B"\nexec = ["x"]\nrestart = 1\n')
    (second / "a.toml").write_text('name = "org.example.A"\nexec = ["y"]\n')
    (second / "c.toml").write_text('name = "org.example.C"\nexec = ["z"]\n')
    (second / "notes.txt").write_text("not a service file")
    loose = second / "loose.toml"
    loose.write_text('name = "org.example.D"\nexec = ["z"]\n')
    loose.chmod(0o666)
    specs, errors = read_service_dirs([(first, True), (second, True), (tmp_path / "absent", False), (tmp_path / "gone", True)])
    assert sorted(specs) == ["org.example.A", "org.example.C"]
    assert specs["org.example.A"].exec == ("x",)  # the earlier directory wins
    assert len(errors) == 4
    assert any("bad.toml: restart:" in e for e in errors)
    assert any(str(second / "a.toml") in e and "already defined" in e for e in errors)
    assert any("loose.toml" in e and "writable by group or others" in e for e in errors)
    assert any("gone: no such service directory" in e for e in errors)


# -- the core ----------------------------------------------------------------------------------


class Harness:
    def __init__(self, limits: Limits | None = None) -> None:
        self.core = BrokerCore(Policy.from_mapping(OWNER, tomllib.loads(RULES)), limits)
        self.core.set_services({"org.example.Echo": ServiceSpec("org.example.Echo", ("x",), "/svc/echo.toml")})
        self.sent: dict[int, list[dict[str, Any]]] = {}
        self.actions: list[ServiceAction] = []
        self._ids = 0

    def connect(self, key: Any = OWNER, name: str | None = None) -> int:
        conn = self.core.connect(key, "tcp")
        self.sent[conn.id] = []
        self.send(conn.id, "hello", **({"name": name} if name else {}))
        return conn.id

    def deliver(self, out: list[Any]) -> None:
        for item in out:
            if isinstance(item, ServiceAction):
                self.actions.append(item)
            elif type(item) is tuple:
                self.sent[item[0]].append(item[1])

    def send(self, conn: int, op: str, **args: Any) -> int:
        self._ids += 1
        self.deliver(self.core.receive(conn, {"op": op, "id": self._ids, **args}))
        return self._ids

    def reply(self, conn: int, request_id: int) -> dict[str, Any] | None:
        replies = [m for m in self.sent[conn] if m.get("re") == request_id]
        assert len(replies) <= 1
        return replies[0] if replies else None


def test_openings_are_held_until_the_plugin_takes_its_name() -> None:
    h = Harness()
    a, b = h.connect(USER), h.connect(USER)
    first = h.send(a, "open_channel", name="org.example.Echo", protocol="rpc", route="relay")
    second = h.send(b, "open_channel", name="org.example.Echo", protocol="rpc", route="relay")
    assert h.reply(a, first) is None and h.reply(b, second) is None  # held
    assert h.actions == [ServiceAction("activate", "org.example.Echo")]  # one launch for both
    assert h.core.connections[a].pending_budget.used == 1
    plugin = h.connect(OWNER, name="org.example.Echo")
    assert ServiceAction("owned", "org.example.Echo") in h.actions
    asks = [m for m in h.sent[plugin] if m.get("op") == "channel_request"]
    assert len(asks) == 2  # both replayed to the new owner
    assert h.core.services.held == {}
    for ask in asks:
        h.deliver(h.core.receive(plugin, {"re": ask["id"], "result": {}}))
    assert "result" in (h.reply(a, first) or {}) and "result" in (h.reply(b, second) or {})


def test_a_failed_activation_answers_every_held_opening() -> None:
    h = Harness()
    a = h.connect(USER)
    request = h.send(a, "open_channel", name="org.example.Echo")
    h.deliver(h.core.activation_failed("org.example.Echo", "exited with status 3; last lines of its stderr: boom"))
    reply = h.reply(a, request)
    assert reply is not None and reply["error"]["code"] == "minibus.Error.ActivationFailed"
    assert "exited with status 3" in reply["error"]["message"] and "boom" in reply["error"]["message"]
    assert h.core.connections[a].pending_budget.used == 0
    h.send(a, "open_channel", name="org.example.Echo")
    assert h.actions.count(ServiceAction("activate", "org.example.Echo")) == 2  # a new launch


def test_held_openings_are_charged_and_bounded() -> None:
    h = Harness(Limits(pending_opens_per_connection=2, pending_opens_per_target=4))
    a = h.connect(USER)
    for _ in range(2):
        h.send(a, "open_channel", name="org.example.Echo")
    refused = h.reply(a, h.send(a, "open_channel", name="org.example.Echo"))
    assert refused is not None and refused["error"]["code"] == "minibus.Error.QuotaExceeded"
    assert "pending_opens_per_connection" in refused["error"]["message"]
    # The name's own room is shared fairly: one identity cannot hold all of it.
    b = h.connect(USER)
    unfair = h.reply(b, h.send(b, "open_channel", name="org.example.Echo"))
    assert unfair is not None and "pending_opens_per_target" in unfair["error"]["message"]
    h.deliver(h.core.disconnect(a))
    assert "org.example.Echo" not in h.core.services.held
    assert h.core.services.budget("org.example.Echo").used == 0  # released exactly once
    h.send(b, "open_channel", name="org.example.Echo")
    assert h.core.services.budget("org.example.Echo").used == 1


def test_who_may_activate() -> None:
    h = Harness()
    nosy = h.connect(NOSY)
    denied = h.reply(nosy, h.send(nosy, "open_channel", name="org.example.Echo"))
    assert denied is not None and denied["error"]["code"] == "minibus.Error.AccessDenied"
    assert h.actions == []  # no launch for someone without the open right
    user = h.connect(USER)
    for op in ("start_service", "stop_service", "restart_service"):
        refused = h.reply(user, h.send(user, op, name="org.example.Echo"))
        assert refused is not None and refused["error"]["code"] == "minibus.Error.AccessDenied", op
    refused = h.reply(user, h.send(user, "reload_services"))
    assert refused is not None and refused["error"]["code"] == "minibus.Error.AccessDenied"
    admin = h.connect(OWNER)
    request = h.send(admin, "start_service", name="org.example.Echo")
    assert h.reply(admin, request) is None and h.actions[-1] == ServiceAction("start", "org.example.Echo", admin, request)
    h.deliver(h.core.service_reply(admin, request, {"pid": 7}))
    assert (h.reply(admin, request) or {}).get("result") == {"pid": 7}
    missing = h.reply(admin, h.send(admin, "start_service", name="org.example.Missing"))
    assert missing is not None and missing["error"]["code"] == "minibus.Error.NameNotFound"


def test_listing_shows_what_the_asker_may_see() -> None:
    h = Harness()
    h.core.set_services(
        {
            "org.example.Echo": ServiceSpec("org.example.Echo", ("x",), "/svc/echo.toml", description="echoes", version="1"),
            "com.hidden.Thing": ServiceSpec("com.hidden.Thing", ("y",), "/svc/thing.toml"),
        }
    )
    user, admin = h.connect(USER), h.connect(OWNER)
    listed = (h.reply(user, h.send(user, "list_services")) or {})["result"]
    assert [e["name"] for e in listed["entries"]] == ["org.example.Echo"] and listed["next"] is None
    entry = listed["entries"][0]
    assert (entry["state"], entry["description"], entry["version"], entry["owner"]) == ("not running", "echoes", "1", None)
    assert "exec" not in entry and "file" not in entry  # details are for admins
    full = (h.reply(admin, h.send(admin, "list_services")) or {})["result"]["entries"]
    assert [e["name"] for e in full] == ["com.hidden.Thing", "org.example.Echo"] and full[1]["exec"] == ["x"]
    hidden = h.reply(user, h.send(user, "service_status", name="com.hidden.Thing"))
    assert hidden is not None and hidden["error"]["code"] == "minibus.Error.NameNotFound"


def test_a_removed_service_file_fails_its_held_openings() -> None:
    h = Harness()
    a = h.connect(USER)
    request = h.send(a, "open_channel", name="org.example.Echo")
    gone, out = h.core.set_services({})
    h.deliver(out)
    assert gone == ["org.example.Echo"]
    reply = h.reply(a, request)
    assert reply is not None and reply["error"]["code"] == "minibus.Error.NameNotFound"
