"""Installed plugins with a real busd subprocess and real plugin processes: on-demand
activation (bus.call, open_channel, busctl start), one launch for concurrent openers, failed
launches with their stderr, supervision (restarts, backoff, crash loop), shutdown, reload,
misbehaving plugins, and the admin right."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from bus.wire.identity import Identity, load_identity, save_identity
from clients import ActivationFailed, open_bus

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_KEY = Identity.from_seed(b"k" * 32)
USER_KEY = Identity.from_seed(b"u" * 32)

#: A well-behaved plugin: org.example.* name from argv, counts its launches in a file.
ECHO = """
import os, sys, trio
from clients import Service, open_bus
name, launches = sys.argv[1], sys.argv[2]
with open(launches, "a") as f:
    f.write(f"{os.getpid()}\\n")
service = Service(name, description="echo for tests", version="9.9")
state = {}

@service.method
async def echo(value: object) -> object:
    return value

@service.method
async def whoami() -> object:
    return {"pid": os.getpid(), "identity": state["bus"].identity.id, "network_key": os.environ.get("MINIBUS_NETWORK_KEY")}

@service.channel("raw")
async def raw(channel):
    while data := await channel.receive_some():
        await channel.send_all(data)
    await channel.send_eof()

async def main():
    async with open_bus(name=name, info=service.info) as bus:
        state["bus"] = bus
        print("ready", name, flush=True)
        await service.serve(bus)
trio.run(main)
"""

EXIT_AT_ONCE = """
import sys
print("starting up", file=sys.stderr)
print("fatal: the frobnicator is missing", file=sys.stderr)
sys.exit(3)
"""

HANG = """
import signal, sys, trio
from clients import open_bus
signal.signal(signal.SIGTERM, signal.SIG_IGN)
async def main():
    async with open_bus(name=sys.argv[1]) as bus:
        await trio.sleep_forever()
trio.run(main)
"""

FLOOD = """
import sys
line = "x" * 5000 + "\\n"
while True:
    sys.stdout.write("flood " + line)
"""

NAMELESS = """
import sys, trio
from clients import open_bus
async def main():
    async with open_bus() as bus:
        print("connected without a name", file=sys.stderr, flush=True)
        await trio.sleep_forever()
trio.run(main)
"""

CONFIG = f"""
[limits]
activation_timeout = 9.0
restart_delay = 0.05
restart_delay_max = 0.2
crash_loop_restarts = 3
crash_loop_window = 60.0

[[rule]]
name = "plugins"
identities = ["{PLUGIN_KEY.id}"]
connect = true
own = ["org.example.*"]
see = ["*"]

[[rule]]
name = "users"
identities = ["{USER_KEY.id}"]
connect = true
see = ["org.example.*"]
open = ["org.example.*"]
"""


class Busd:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.services = tmp_path / "services"
        self.services.mkdir()
        self.env = dict(os.environ)
        self.env.update(
            XDG_RUNTIME_DIR=str(tmp_path / "run"),
            XDG_CONFIG_HOME=str(tmp_path / "cfg"),
            XDG_DATA_HOME=str(tmp_path / "data"),
            HOME=str(tmp_path / "home"),
            PYTHONPATH=str(ROOT),
        )
        for key in ("MINIBUS_ADDRESS", "MINIBUS_NETWORK_KEY", "MINIBUS_IDENTITY"):
            self.env.pop(key, None)
        (tmp_path / "run").mkdir(mode=0o700)
        self.config = tmp_path / "busd.toml"
        self.config.write_text(CONFIG)
        self.log_path = tmp_path / "busd.log"
        save_identity(tmp_path / "plugin.key", PLUGIN_KEY)
        save_identity(tmp_path / "user.key", USER_KEY)
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def script(self, name: str, text: str) -> Path:
        path = self.tmp / f"{name}.py"
        path.write_text(text)
        return path

    def install(self, name: str, script: Path, *args: str, **fields: Any) -> Path:
        lines = [f"name = {json.dumps(name)}", f"exec = {json.dumps([sys.executable, str(script), *args])}"]
        for key, value in fields.items():
            if isinstance(value, dict):  # a TOML inline table
                value_text = "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"
            else:
                value_text = json.dumps(value)
            lines.append(f"{key} = {value_text}")
        path = self.services / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def echo(self, name: str, **fields: Any) -> Path:
        """Install the echo plugin as ``name``; its launches go to the returned file."""
        launches = self.tmp / f"{name}.launches"
        self.install(name, self.script("echo", ECHO), name, str(launches), **fields)
        return launches

    def start(self, services: str | None = None, nofile: int | None = None) -> None:
        def lower_nofile() -> None:  # (in the child, before busd runs: as a login shell's ulimit)
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0", "--services", services or str(self.services), "--config", str(self.config)],
                preexec_fn=lower_nofile if nofile is not None else None,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=ROOT,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("MINIBUS_ADDRESS="), self.log()
        self.address = line.strip().split("=", 1)[1]

    def log(self) -> str:
        return self.log_path.read_text()

    def busctl(self, *args: str, identity: Path | None = None) -> subprocess.CompletedProcess[str]:
        extra = ["--identity", str(identity)] if identity else []
        return subprocess.run(
            [sys.executable, "-m", "clients.busctl", *extra, *args], env=self.env, capture_output=True, text=True, timeout=60, cwd=ROOT
        )

    def services_json(self) -> dict[str, dict[str, Any]]:
        listed = self.busctl("--json", "list", "--activatable")
        assert listed.returncode == 0, listed.stderr
        return {entry["name"]: entry for entry in json.loads(listed.stdout)}

    def wait_for(self, what: Callable[[], Any], deadline: float = 30.0) -> Any:
        """Poll until ``what`` returns something true (a generous deadline, no timing asserted)."""
        end = time.monotonic() + deadline
        while True:
            value = what()
            if value:
                return value
            assert time.monotonic() < end, f"gave up waiting; busd log:\n{self.log()[-3000:]}"
            time.sleep(0.1)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()
        return code

    async def call(self, name: str, method: str, *args: Any, identity: Identity | None = None) -> Any:
        key = identity or load_identity(Path(self.env["XDG_CONFIG_HOME"]) / "minibus" / "secret")
        async with open_bus(self.address, identity=key, reconnect=False) as bus:
            return await bus.call(name, method, *args)


@pytest.fixture
def busd(tmp_path: Path) -> Iterator[Busd]:
    b = Busd(tmp_path)
    yield b
    if b.proc is not None:
        b.stop()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_bus_call_starts_an_on_demand_plugin_once_for_concurrent_callers(busd: Busd) -> None:
    launches = busd.echo("org.example.Echo")
    busd.start()
    assert busd.services_json()["org.example.Echo"]["state"] == "not running"
    assert not launches.exists()

    async def many() -> list[Any]:
        results: list[Any] = [None] * 6
        key = load_identity(Path(busd.env["XDG_CONFIG_HOME"]) / "minibus" / "secret")
        async with open_bus(busd.address, identity=key, reconnect=False) as bus, trio.open_nursery() as nursery:

            async def one(i: int) -> None:
                results[i] = await bus.call("org.example.Echo", "echo", i)

            async def other(i: int) -> None:  # a second connection, at the same time
                results[i] = await busd.call("org.example.Echo", "echo", i)

            for i in range(3):
                nursery.start_soon(one, i)
                nursery.start_soon(other, i + 3)
        return results

    assert trio.run(many) == list(range(6))
    assert len(launches.read_text().split()) == 1  # one process for every caller
    entry = busd.services_json()["org.example.Echo"]
    assert entry["state"] == "running" and entry["launches"] == 1 and entry["owner"] is not None
    assert entry["pid"] == int(launches.read_text().split()[0])
    # Its output went to busd's log, prefixed with its name.
    assert busd.wait_for(lambda: f"org.example.Echo[{entry['pid']}] stdout: ready org.example.Echo" in busd.log())


def test_open_channel_and_busctl_start_activate(busd: Busd) -> None:
    busd.echo("org.example.Echo")
    launches_b = busd.echo("org.example.Other")
    busd.start()

    async def through_a_channel() -> bytes:
        key = load_identity(Path(busd.env["XDG_CONFIG_HOME"]) / "minibus" / "secret")
        async with open_bus(busd.address, identity=key, reconnect=False) as bus:
            channel = await bus.open_channel("org.example.Echo", "raw")
            async with channel:
                await channel.send_all(b"ping over an activated channel")
                await channel.send_eof()
                data = b""
                while chunk := await channel.receive_some():
                    data += chunk
                return data

    assert trio.run(through_a_channel) == b"ping over an activated channel"
    started = busd.busctl("start", "org.example.Other")
    assert started.returncode == 0, started.stderr
    pid = int(launches_b.read_text().split()[0])
    assert started.stdout.strip() == f"started org.example.Other (pid {pid})"
    status = busd.busctl("status", "org.example.Other")
    assert status.returncode == 0 and f"plugin pid:      {pid}" in status.stdout and "restarts:        0" in status.stdout
    assert json.loads(busd.busctl("--json", "status", "org.example.Other").stdout)["service"]["pid"] == pid
    stopped = busd.busctl("stop", "org.example.Other")
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped org.example.Other (was running)"
    assert busd.wait_for(lambda: gone(pid))
    after = busd.busctl("status", "org.example.Other")
    assert after.returncode == 0 and "not on the bus now" in after.stdout and "last exit:       killed by SIGTERM" in after.stdout


def test_the_plugin_environment_identity_and_network_key(busd: Busd) -> None:
    busd.echo("org.example.Echo", identity=str(busd.tmp / "plugin.key"), environment={"EXTRA": "1"})
    busd.start()
    me = trio.run(busd.call, "org.example.Echo", "whoami")
    assert me["identity"] == PLUGIN_KEY.id  # MINIBUS_IDENTITY honoured by the client library
    assert me["network_key"] and len(me["network_key"]) == 64


def test_a_failing_launch_reports_its_exit_status_and_stderr(busd: Busd) -> None:
    busd.install("org.example.Broken", busd.script("broken", EXIT_AT_ONCE))
    busd.start()
    with pytest.raises(ActivationFailed) as caught:
        trio.run(busd.call, "org.example.Broken", "echo", 1)
    message = caught.value.message
    assert "exited with status 3" in message and "fatal: the frobnicator is missing" in message and "starting up" in message
    called = busd.busctl("call", "org.example.Broken", "echo", "1")
    assert called.returncode == 6 and "exited with status 3" in called.stderr and len(called.stderr.splitlines()) == 1
    entry = busd.services_json()["org.example.Broken"]
    assert entry["state"] == "not running" and entry["last_exit"] == "exited with status 3"


def test_a_plugin_that_never_takes_its_name_fails_at_the_deadline_and_is_stopped(busd: Busd) -> None:
    busd.install("org.example.Shy", busd.script("shy", NAMELESS), identity=str(busd.tmp / "plugin.key"))
    busd.start()
    started = busd.busctl("start", "org.example.Shy")
    assert started.returncode == 6, started.stderr
    assert "did not take its name within 9 s" in started.stderr and "connected without a name" in started.stderr
    entry = busd.services_json()["org.example.Shy"]
    assert entry["state"] == "not running" and entry["pid"] is None and entry["launches"] == 1


def test_a_plugin_that_ignores_sigterm_is_killed_after_its_stop_timeout(busd: Busd) -> None:
    busd.install("org.example.Stubborn", busd.script("stubborn", HANG), "org.example.Stubborn", stop_timeout=1, identity=str(busd.tmp / "plugin.key"))
    busd.start()
    assert busd.busctl("start", "org.example.Stubborn").returncode == 0
    pid = busd.services_json()["org.example.Stubborn"]["pid"]
    stopped = busd.busctl("stop", "org.example.Stubborn")
    assert stopped.returncode == 0, stopped.stderr
    assert busd.wait_for(lambda: gone(pid))
    assert busd.services_json()["org.example.Stubborn"]["last_exit"] == "killed by SIGKILL"
    assert "did not stop within 1 s of SIGTERM: SIGKILL" in busd.log()


def test_a_flooding_plugin_does_not_hurt_busd(busd: Busd) -> None:
    busd.install("org.example.Flood", busd.script("flood", FLOOD), activation="always")
    busd.echo("org.example.Echo")
    busd.start()
    busd.wait_for(lambda: "[line cut]" in busd.log())
    for i in range(3):
        assert trio.run(busd.call, "org.example.Echo", "echo", i) == i  # busd keeps serving
    assert busd.busctl("list").returncode == 0
    busd.wait_for(lambda: "lines of stdout not logged" in busd.log())
    flood_lines = [line for line in busd.log().splitlines() if "org.example.Flood[" in line]
    assert flood_lines and all(len(line) < 1200 for line in flood_lines)  # cut, bounded
    pid = busd.services_json()["org.example.Flood"]["pid"]
    assert busd.stop() == 0
    assert busd.wait_for(lambda: gone(pid))


def test_always_plugins_restart_with_backoff_until_a_crash_loop_stops_them(busd: Busd) -> None:
    busd.install("org.example.Crashy", busd.script("crashy", EXIT_AT_ONCE), activation="always")
    busd.start()
    entry = busd.wait_for(lambda: (e := busd.services_json()["org.example.Crashy"])["state"] == "failed" and e)
    assert entry["restarts"] == 3 and entry["launches"] == 4  # crash_loop_restarts = 3
    assert "crash loop" in entry["failure"] and "exited with status 3" in entry["failure"]
    log = busd.log()
    # Backoff: 0.05 s doubling, capped at restart_delay_max (0.2 s).
    assert [f"restarting in {d} s" in log for d in ("0.05", "0.1", "0.2")] == [True, True, True]
    assert "stopped and marked failed: crash loop" in log
    listed = busd.busctl("list", "--activatable")
    assert "org.example.Crashy" in listed.stdout and "failed" in listed.stdout
    # An opener cannot undo the crash-loop stop: no launch, the failure says why.
    opened = busd.busctl("call", "org.example.Crashy", "echo", "1", identity=busd.tmp / "user.key")
    assert opened.returncode == 6 and "marked failed" in opened.stderr and "busctl start" in opened.stderr
    assert busd.services_json()["org.example.Crashy"]["launches"] == 4
    # The operators' figures count the same: 4 launches, 3 restarts, 4 failed runs.
    stats = busd.busctl("--json", "stats")
    assert stats.returncode == 0, stats.stderr
    plugins = json.loads(stats.stdout)["totals"]["plugins"]
    assert plugins["org.example.Crashy"] == {"launches": 4, "restarts": 3, "failures": 4}


def test_an_always_plugin_that_dies_is_restarted(busd: Busd) -> None:
    launches = busd.echo("org.example.Echo", activation="always", restart="always")
    busd.start()
    first = busd.wait_for(lambda: busd.services_json()["org.example.Echo"]["owner"] and busd.services_json()["org.example.Echo"]["pid"])
    os.kill(first, signal.SIGKILL)
    second = busd.wait_for(
        lambda: (e := busd.services_json()["org.example.Echo"])["pid"] not in (None, first) and e["owner"] and e["pid"]
    )
    entry = busd.services_json()["org.example.Echo"]
    assert entry["restarts"] == 1 and entry["last_exit"] == "killed by SIGKILL"
    assert launches.read_text().split() == [str(first), str(second)]
    assert trio.run(busd.call, "org.example.Echo", "echo", "still here") == "still here"


def test_a_plugin_an_administrator_stopped_stays_stopped(busd: Busd) -> None:
    """busctl stop holds: a reload does not start an always-on plugin again, and an opener
    does not start an on-demand one; busctl start does."""
    always = busd.echo("org.example.Always", activation="always", restart="always")
    busd.echo("org.example.Echo")
    busd.start()
    busd.wait_for(lambda: busd.services_json()["org.example.Always"]["owner"])
    assert trio.run(busd.call, "org.example.Echo", "echo", 1) == 1
    for name in ("org.example.Always", "org.example.Echo"):
        stopped = busd.busctl("stop", name)
        assert stopped.returncode == 0, stopped.stderr
    assert busd.busctl("reload").returncode == 0
    entries = busd.services_json()
    assert entries["org.example.Always"]["state"] == entries["org.example.Echo"]["state"] == "not running"
    opened = busd.busctl("call", "org.example.Echo", "echo", "1", identity=busd.tmp / "user.key")
    assert opened.returncode == 6 and "an administrator stopped it" in opened.stderr
    launched = len(always.read_text().split())
    assert busd.busctl("start", "org.example.Always").returncode == 0
    assert len(always.read_text().split()) == launched + 1
    assert trio.run(busd.call, "org.example.Always", "echo", 2) == 2


def test_shutdown_stops_every_plugin(busd: Busd) -> None:
    busd.echo("org.example.Always", activation="always")
    busd.echo("org.example.Echo")
    busd.start()
    assert trio.run(busd.call, "org.example.Echo", "echo", 1) == 1
    pids = busd.wait_for(lambda: [e["pid"] for e in busd.services_json().values() if e["pid"]] if all(e["pid"] for e in busd.services_json().values()) else None)
    assert len(pids) == 2
    assert busd.stop() == 0
    assert busd.wait_for(lambda: all(gone(pid) for pid in pids))


def test_sighup_and_busctl_reload(busd: Busd) -> None:
    busd.echo("org.example.Echo")
    busd.start()
    assert set(busd.services_json()) == {"org.example.Echo"}
    busd.echo("org.example.New")
    (busd.services / "broken.toml").write_text('name = "org.example.Broken"\nexec = ["x"]\nrestart = "sometimes"\n')
    assert busd.proc is not None
    busd.proc.send_signal(signal.SIGHUP)
    busd.wait_for(lambda: "org.example.New" in busd.services_json())
    assert set(busd.services_json()) == {"org.example.Echo", "org.example.New"}  # the bad file is reported, others kept
    assert busd.wait_for(lambda: f"{busd.services / 'broken.toml'}: restart: 'sometimes' is not one of" in busd.log())
    assert trio.run(busd.call, "org.example.New", "echo", "new") == "new"
    (busd.services / "org.example.Echo.toml").unlink()
    reloaded = busd.busctl("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert reloaded.stdout.splitlines()[0] == "1 installed plugin"
    assert "broken.toml: restart:" in reloaded.stdout
    as_json = json.loads(busd.busctl("--json", "reload").stdout)
    assert as_json["services"] == 1 and len(as_json["errors"]) == 1
    assert set(busd.services_json()) == {"org.example.New"}


def test_the_admin_right_and_the_open_right(busd: Busd) -> None:
    launches = busd.echo("org.example.Echo", identity=str(busd.tmp / "plugin.key"))
    busd.install("com.private.Thing", busd.script("echo", ECHO), "com.private.Thing", str(busd.tmp / "thing.launches"))
    busd.start()
    user = busd.tmp / "user.key"
    for verb in ("start", "stop", "restart"):
        refused = busd.busctl(verb, "org.example.Echo", identity=user)
        assert refused.returncode == 4 and "only an admin identity may" in refused.stderr, (verb, refused.stderr)
    assert busd.busctl("reload", identity=user).returncode == 4
    assert not launches.exists()
    # The open right is the right to activate: the user may call org.example.*, not more.
    assert trio.run(lambda: busd.call("org.example.Echo", "echo", "ok", identity=USER_KEY)) == "ok"
    denied = busd.busctl("call", "com.private.Thing", "echo", "1", identity=user)
    assert denied.returncode == 5  # not even visible to this identity
    assert not (busd.tmp / "thing.launches").exists()
    listed = json.loads(busd.busctl("--json", "list", "--activatable", identity=user).stdout)
    assert [e["name"] for e in listed] == ["org.example.Echo"] and "exec" not in listed[0]


def test_the_example_service_file_starts_the_echo_example(busd: Busd) -> None:
    busd.services = ROOT / "examples" / "services"  # busd --services examples/services
    busd.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + busd.env.get("PATH", "")
    busd.start()
    assert busd.services_json()["org.example.Echo"]["state"] == "not running"
    called = busd.busctl("call", "org.example.Echo", "echo", '"hello"')
    assert called.returncode == 0, called.stderr + busd.log()[-2000:]
    assert json.loads(called.stdout) == "hello"
    assert busd.services_json()["org.example.Echo"]["state"] == "running"
    # The key-value store starts on demand too, and keeps what it is given while it runs.
    assert busd.services_json()["org.example.KV"]["state"] == "not running"
    stored = busd.busctl("call", "org.example.KV", "set", '"colour"', '"green"')
    assert stored.returncode == 0, stored.stderr + busd.log()[-2000:]
    got = busd.busctl("call", "org.example.KV", "get", '"colour"')
    assert got.returncode == 0 and json.loads(got.stdout) == "green", got.stderr
    # The ticker is always on: busd started it with itself, and its events arrive.
    ticks = busd.busctl("--json", "subscribe", "org.example.Ticker", "Tick", "--count", "2")
    assert ticks.returncode == 0, ticks.stderr + busd.log()[-2000:]
    assert [json.loads(line)["member"] for line in ticks.stdout.splitlines()] == ["Tick", "Tick"]
    assert busd.services_json()["org.example.Ticker"]["state"] == "running"


def test_a_relative_services_directory_and_a_relative_program(busd: Busd) -> None:
    """``busd --services DIR`` with DIR relative to busd's working directory, and a file whose
    program is ``./echo.sh`` beside it: the program is found (relative to the file's
    directory, which is also where it runs), however busd was given the directory."""
    launches = busd.tmp / "relative.launches"
    script = busd.script("echo", ECHO)
    wrapper = busd.services / "echo.sh"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    wrapper.chmod(0o755)
    (busd.services / "org.example.Relative.toml").write_text(
        'name = "org.example.Relative"\n'
        f'exec = ["./echo.sh", "org.example.Relative", {json.dumps(str(launches))}]\n'
    )
    busd.start(services=os.path.relpath(busd.services, ROOT))  # busd runs in ROOT
    called = busd.busctl("call", "org.example.Relative", "echo", '"hi"')
    assert called.returncode == 0, called.stderr + busd.log()[-2000:]
    assert json.loads(called.stdout) == "hi"


LIMITS = """
import resource, sys, trio
from clients import open_bus
async def main():
    with open(sys.argv[2], "w") as out:
        out.write(" ".join(map(str, resource.getrlimit(resource.RLIMIT_NOFILE))))
    async with open_bus(name=sys.argv[1]):
        await trio.sleep_forever()
trio.run(main)
"""


def test_a_plugin_gets_the_open_file_limit_busd_was_given_not_the_one_it_raised(busd: Busd) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.fail(f"this machine's hard open-file limit ({hard}) leaves busd nothing to raise")
    seen = busd.tmp / "limits"
    busd.install("org.example.Limits", busd.script("limits", LIMITS), "org.example.Limits", str(seen), identity=str(busd.tmp / "plugin.key"))
    busd.start(nofile=512)
    assert "open-file limit raised from 512" in busd.wait_for(lambda: "raised from" in busd.log() and busd.log())
    started = busd.busctl("start", "org.example.Limits")
    assert started.returncode == 0, started.stderr + busd.log()[-2000:]
    soft, plugin_hard = map(int, seen.read_text().split())
    assert soft == 512 and plugin_hard == hard
