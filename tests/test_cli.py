"""busd and busctl as real processes, in an isolated environment (their own XDG dirs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any
from collections.abc import Iterator
from pathlib import Path

import pytest

from bus.__main__ import build_config, parser
from bus.wire.identity import Identity, save_identity

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    e["XDG_CONFIG_HOME"] = str(tmp_path / "cfg")
    e["HOME"] = str(tmp_path / "home")
    e.pop("MINIBUS_ADDRESS", None)
    e.pop("MINIBUS_NETWORK_KEY", None)
    (tmp_path / "run").mkdir(mode=0o700)
    return e


def start_busd(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("MINIBUS_ADDRESS="), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line.strip().split("=", 1)[1]


@pytest.fixture
def busd(env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc, address = start_busd(env)
    yield proc, address
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    proc.stdout and proc.stdout.close()
    proc.stderr and proc.stderr.close()


def busctl(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.busctl", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


SERVICE = """
import sys, trio
from clients import open_bus
async def main():
    async with open_bus(name=sys.argv[1], info={"description": "test service", "version": "3.1"}) as bus:
        print(bus.unique_id, flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


def start_service(env: dict[str, str], name: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVICE, name], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_defaults_are_the_documented_ones(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config, level = build_config(parser().parse_args([]))
    assert config.tcp == ("127.0.0.1", 7420)
    assert config.unix_path == Path(env["XDG_RUNTIME_DIR"]) / "minibus" / "bus.sock"
    assert config.address_file == Path(env["XDG_RUNTIME_DIR"]) / "minibus" / "address"
    assert (Path(env["XDG_CONFIG_HOME"]) / "minibus" / "secret").exists()  # created on first run
    assert level == "info"


def test_busd_prints_address_writes_file_and_cleans_up(env: dict[str, str]) -> None:
    proc, address = start_busd(env)
    run = Path(env["XDG_RUNTIME_DIR"]) / "minibus"
    assert (run / "address").read_text().strip() == address
    assert (run / "bus.sock").exists()
    key = Identity.from_secret_file((Path(env["XDG_CONFIG_HOME"]) / "minibus" / "secret").read_text())
    assert key.id in address
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 0
    assert not (run / "address").exists() and not (run / "bus.sock").exists()
    proc.stdout and proc.stdout.close()
    proc.stderr and proc.stderr.close()


def test_second_busd_is_refused(env: dict[str, str], busd: tuple[subprocess.Popen[str], str]) -> None:
    second = subprocess.run([sys.executable, "-m", "bus", "--no-tcp"], env=env, capture_output=True, text=True, timeout=30)
    assert second.returncode == 4
    assert "already listening" in second.stderr


def test_stale_socket_after_sigkill_is_replaced(env: dict[str, str]) -> None:
    proc, _ = start_busd(env)
    _kill(proc)
    assert (Path(env["XDG_RUNTIME_DIR"]) / "minibus" / "bus.sock").exists()  # left behind
    again, _ = start_busd(env)
    assert busctl(env, "list").returncode == 0
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=15) == 0
    again.stdout and again.stdout.close()
    again.stderr and again.stderr.close()


def test_busctl_list_status_wait_json(env: dict[str, str], busd: tuple[subprocess.Popen[str], str]) -> None:
    service, unique_id = start_service(env, "org.example.Echo")
    try:
        listed = busctl(env, "list")
        assert listed.returncode == 0, listed.stderr
        assert "org.example.Echo" in listed.stdout and "test service" in listed.stdout
        data = json.loads(busctl(env, "--json", "list").stdout)
        assert data[0]["name"] == "org.example.Echo" and data[0]["unique_id"] == unique_id
        assert data[0]["pid"] == service.pid
        status = busctl(env, "status", "org.example.Echo")
        assert status.returncode == 0 and "version:         3.1" in status.stdout
        by_id = json.loads(busctl(env, "--json", "status", unique_id).stdout)
        assert by_id["names"] == ["org.example.Echo"]
        waited = busctl(env, "wait", "org.example.Echo")
        assert waited.returncode == 0 and waited.stdout.strip() == unique_id
    finally:
        _kill(service)


def test_busctl_wait_until_the_name_appears(env: dict[str, str], busd: tuple[subprocess.Popen[str], str]) -> None:
    waiter = subprocess.Popen(
        [sys.executable, "-m", "clients.busctl", "--timeout", "20", "wait", "org.example.Late"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    service, unique_id = start_service(env, "org.example.Late")
    try:
        out, err = waiter.communicate(timeout=25)
        assert waiter.returncode == 0, err
        assert out.strip() == unique_id
    finally:
        _kill(service)


def test_monitor_sees_a_sigkilled_plugin_leave(env: dict[str, str], busd: tuple[subprocess.Popen[str], str]) -> None:
    monitor = subprocess.Popen(
        [sys.executable, "-m", "clients.busctl", "--json", "monitor", "org.example.*"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert monitor.stdout is not None
    try:
        time.sleep(0.5)
        service, unique_id = start_service(env, "org.example.Doomed")
        first = json.loads(monitor.stdout.readline())
        assert (first["kind"], first["name"], first["owner"]["unique_id"]) == ("connected", "org.example.Doomed", unique_id)
        _kill(service)
        second = json.loads(monitor.stdout.readline())
        assert (second["kind"], second["name"], second["old_owner"]) == ("disconnected", "org.example.Doomed", unique_id)
    finally:
        monitor.send_signal(signal.SIGINT)
        assert monitor.wait(timeout=15) == 0
        monitor.stdout.close()
        monitor.stderr and monitor.stderr.close()


def test_exit_codes(env: dict[str, str], tmp_path: Path, busd: tuple[subprocess.Popen[str], str]) -> None:
    assert busctl(env, "frobnicate").returncode == 2  # usage
    assert busctl(env, "--timeout", "-1", "list").returncode == 2
    not_found = busctl(env, "status", "org.example.Missing")
    assert not_found.returncode == 5 and not_found.stderr.startswith("busctl: ") and len(not_found.stderr.splitlines()) == 1
    assert busctl(env, "--timeout", "1", "wait", "org.example.Never").returncode == 5
    stranger = tmp_path / "stranger"
    save_identity(stranger, Identity.generate())
    refused = busctl(env, "--identity", str(stranger), "list")
    assert refused.returncode == 3 and "refused our identity" in refused.stderr
    nobody = dict(env, MINIBUS_ADDRESS=busd[1].replace("bus.sock", "nothing.sock").split(";")[0])
    assert busctl(nobody, "list").returncode == 3
    empty = dict(env, XDG_RUNTIME_DIR=str(tmp_path / "elsewhere"))
    no_address = busctl(empty, "list")
    assert no_address.returncode == 3 and "no bus address" in no_address.stderr


def test_denied_exit_code(env: dict[str, str], tmp_path: Path) -> None:
    plugin = Identity.generate()
    key = tmp_path / "plugin"
    save_identity(key, plugin)
    config = tmp_path / "busd.toml"
    config.write_text(f'[[rule]]\nname = "plugins"\nidentities = ["{plugin.id}"]\nconnect = true\nsee = ["*"]\n')
    proc, _ = start_busd(env, "--config", str(config))
    try:
        denied = busctl(env, "--identity", str(key), "list", "--all")
        assert denied.returncode == 4 and "admin" in denied.stderr
        assert busctl(env, "--identity", str(key), "list").returncode == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        proc.stdout and proc.stdout.close()
        proc.stderr and proc.stderr.close()


def test_id_and_keygen(env: dict[str, str], tmp_path: Path) -> None:
    target = tmp_path / "keys" / "new"
    made = busctl(env, "keygen", str(target))
    assert made.returncode == 0
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    shown = busctl(env, "--identity", str(target), "id")
    assert shown.stdout.strip() == made.stdout.strip()
    again = busctl(env, "keygen", str(target))
    assert again.returncode == 1 and "already exists" in again.stderr
    target.chmod(0o644)
    loose = busctl(env, "--identity", str(target), "id")
    assert loose.returncode == 1 and "chmod 600" in loose.stderr


def test_help_lists_every_verb_and_exit_code() -> None:
    result = subprocess.run([sys.executable, "-m", "clients.busctl", "--help"], capture_output=True, text=True, timeout=30)
    for word in ("list", "status", "monitor", "wait", "id", "keygen", "--json", "--timeout", "exit codes", "MINIBUS_ADDRESS"):
        assert word in result.stdout


def test_busd_sigterm_tells_clients(env: dict[str, str]) -> None:
    proc, _ = start_busd(env)
    monitor = subprocess.Popen(
        [sys.executable, "-m", "clients.busctl", "monitor"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    _, err = monitor.communicate(timeout=15)
    assert monitor.returncode == 1
    assert "broker shutting down" in err
    for p in (proc,):
        p.stdout and p.stdout.close()
        p.stderr and p.stderr.close()


def _start_example(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "ready" in line or "registered" in line, (line, proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    proc.stdout and proc.stdout.close()
    proc.stderr and proc.stderr.close()


def _kill(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL: no goodbye of any kind; then reap it and close its pipes."""
    proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _open_echoing(env: dict[str, str], route: str, line: bytes) -> subprocess.Popen[bytes]:
    """``busctl open`` to the echo service, kept open once a line came back."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.busctl", "open", "org.example.Echo", "--route", route],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line)
    proc.stdin.flush()
    assert proc.stdout.readline() == line
    return proc


def test_call_introspect_open_and_status_channels(env: dict[str, str], tmp_path: Path, busd: tuple[subprocess.Popen[str], str]) -> None:
    echo = _start_example(env, str(ROOT / "examples" / "echo_service.py"))
    try:
        called = busctl(env, "call", "org.example.Echo", "echo", '{"a": [1, 2, "x"]}')
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout) == {"a": [1, 2, "x"]}
        assert busctl(env, "call", "org.example.Echo", "echo", "not json").returncode == 2
        missing = busctl(env, "call", "org.example.Echo", "nope")
        assert missing.returncode == 6 and "no method 'nope'" in missing.stderr
        assert busctl(env, "call", "org.example.Nobody", "echo", "1").returncode == 5
        described = busctl(env, "introspect", "org.example.Echo")
        assert described.returncode == 0 and "echo(value: object)" in described.stdout
        assert "Return the value unchanged." in described.stdout
        assert json.loads(busctl(env, "--json", "introspect", "org.example.Echo").stdout)["protocols"] == ["raw", "rpc"]
        data = os.urandom(300_000)
        source = tmp_path / "blob"
        source.write_bytes(data)
        with source.open("rb") as stdin:
            piped = subprocess.run(
                [sys.executable, "-m", "clients.busctl", "open", "org.example.Echo"], env=env, stdin=stdin, capture_output=True, timeout=30
            )
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout == data
        rejected = subprocess.run(
            [sys.executable, "-m", "clients.busctl", "open", "org.example.Echo", "--protocol", "ssh"],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )
        assert rejected.returncode == 6 and "no handler for protocol 'ssh'" in rejected.stderr
        # status shows a live channel with its byte counts
        holder = _open_echoing(env, "relay", b"ping\n")
        status = busctl(env, "status", "org.example.Echo")
        assert "channel:" in status.stdout and "raw via relay" in status.stdout and "bytes in" in status.stdout
        # A direct (unix-fd) channel: the broker lists it with the counts its ends report.
        direct = _open_echoing(env, "direct", b"pong\n")
        deadline = time.monotonic() + 15
        while "raw via unix-fd" not in status.stdout or "5 bytes in, 5 bytes out (as its end last reported)" not in status.stdout:
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.2)
            status = busctl(env, "status", "org.example.Echo")
        for pipe in (holder, direct):
            assert pipe.stdin is not None and pipe.stdout is not None
            pipe.stdin.close()
            assert pipe.wait(timeout=15) == 0
            pipe.stdout.close()
        status = busctl(env, "status", "org.example.Echo")
        deadline = time.monotonic() + 15
        while "channel:" in status.stdout:  # both ends closed: the broker forgets both channels
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.2)
            status = busctl(env, "status", "org.example.Echo")
    finally:
        _stop(echo)


def test_kv_store_and_chat_examples(env: dict[str, str], busd: tuple[subprocess.Popen[str], str]) -> None:
    kv = _start_example(env, str(ROOT / "examples" / "kv_store.py"), "serve")
    chat = _start_example(env, str(ROOT / "examples" / "chat_room.py"), "serve")
    members: list[subprocess.Popen[bytes]] = []
    try:
        run = lambda *a: subprocess.run([sys.executable, str(ROOT / "examples" / "kv_store.py"), *a], env=env, capture_output=True, text=True, timeout=30)  # noqa: E731
        assert run("set", "colour", "blue").returncode == 0
        assert run("get", "colour").stdout.strip() == "blue"
        assert run("keys").stdout.split() == ["colour"]
        nokey = run("get", "shape")
        assert nokey.returncode == 1 and "no key 'shape'" in nokey.stderr
        assert json.loads(busctl(env, "call", "org.example.KV", "get", '"colour"').stdout) == "blue"
        def join(*nick: str) -> subprocess.Popen[bytes]:
            member = subprocess.Popen(
                [sys.executable, str(ROOT / "examples" / "chat_room.py"), "join", *nick],
                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            members.append(member)
            assert member.stdout is not None
            arrival = member.stdout.readline()  # its own
            assert arrival.startswith(f"* {nick[0]} (:".encode() if nick else b"* :") and arrival.endswith(b" joined\n")
            return member

        alice = join("alice")
        bob = join()  # no nickname: shown by its unique id
        assert alice.stdout is not None and bob.stdout is not None and alice.stdin is not None and bob.stdin is not None
        assert b"joined" in alice.stdout.readline()  # bob's arrival
        alice.stdin.write(b"hello room\n")
        alice.stdin.flush()
        assert bob.stdout.readline() == b"<alice> hello room\n"  # the nickname, not alice's unique id
        bob.stdin.write(b"hi\n")
        bob.stdin.flush()
        assert alice.stdout.readline() == b"<alice> hello room\n"  # (her own line comes back too)
        mine, theirs = alice.stdout.readline().split(b"> ")
        assert mine.startswith(b"<:") and mine[2:].isdigit() and theirs == b"hi\n"
        assert len(json.loads(busctl(env, "call", "org.example.Chat", "members").stdout)) == 2
    finally:
        for m in members:
            _kill(m)
        _stop(kv)
        _stop(chat)


def test_examples_run_against_busd(env: dict[str, str], busd: tuple[subprocess.Popen[str], str]) -> None:
    watcher = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "watch.py"), "org.example.*"], env=env, stdout=subprocess.PIPE, text=True
    )
    service = subprocess.Popen([sys.executable, str(ROOT / "examples" / "echo_service.py")], env=env, stdout=subprocess.PIPE, text=True)
    assert watcher.stdout is not None and service.stdout is not None
    try:
        assert "org.example.Echo registered as :" in service.stdout.readline()
        line = watcher.stdout.readline()
        assert line.split()[:2] in (["connected", "org.example.Echo"], ["present", "org.example.Echo"])
        listed = json.loads(busctl(env, "--json", "list").stdout)
        assert [e["name"] for e in listed] == ["org.example.Echo"]  # the nameless watcher is hidden
        service.send_signal(signal.SIGINT)
        assert service.wait(timeout=15) == 0
        assert watcher.stdout.readline().split()[:2] == ["disconnected", "org.example.Echo"]
    finally:
        for p in (service, watcher):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                p.wait(timeout=15)
            p.stdout and p.stdout.close()


def test_authorized_keys_file_lets_a_key_in(env: dict[str, str], tmp_path: Path) -> None:
    friend = Identity.generate()
    key = tmp_path / "friend"
    save_identity(key, friend)
    proc, _ = start_busd(env)
    try:
        assert busctl(env, "--identity", str(key), "list").returncode == 3  # unknown: refused
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        proc.stdout and proc.stdout.close()
        proc.stderr and proc.stderr.close()
    (Path(env["XDG_CONFIG_HOME"]) / "minibus" / "authorized_keys").write_text(f"# friends\n{friend.id} laptop\n")
    proc, _ = start_busd(env)
    try:
        allowed = busctl(env, "--identity", str(key), "list", "--all")
        assert allowed.returncode == 0, allowed.stderr  # every right, admin included
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        proc.stdout and proc.stdout.close()
        proc.stderr and proc.stderr.close()


def test_hostile_plugin_info_cannot_break_busctl(env: dict[str, str], busd: tuple[subprocess.Popen[str], str]) -> None:
    script = """
import trio
from clients import open_bus
async def main():
    info = {"description": "evil\\x1b[2J\\x07", "metadata": {1: "int key", "s": b"\\x00bytes"}}
    async with open_bus(name="org.example.Evil", info=info):
        print("up", flush=True)
        await trio.sleep_forever()
trio.run(main)
"""
    evil = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert evil.stdout is not None
    try:
        assert evil.stdout.readline().strip() == "up"
        listed = busctl(env, "list")
        assert listed.returncode == 0 and "\x1b" not in listed.stdout and "evil\\x1b[2J\\x07" in listed.stdout
        as_json = busctl(env, "--json", "list")
        assert as_json.returncode == 0
        assert json.loads(as_json.stdout)[0]["info"]["metadata"] == {"1": "int key", "s": b"\x00bytes".hex()}
        status = busctl(env, "status", "org.example.Evil")
        assert status.returncode == 0 and "\x1b" not in status.stdout
    finally:
        _kill(evil)


@pytest.mark.parametrize("route", ["relay", "direct"])
async def test_target_killed_mid_transfer_breaks_the_other_end(
    env: dict[str, str], busd: tuple[subprocess.Popen[str], str], route: str
) -> None:
    import trio

    from bus.wire.identity import load_identity
    from clients import open_bus

    identity = load_identity(Path(env["XDG_CONFIG_HOME"]) / "minibus" / "secret")
    echo = _start_example(env, str(ROOT / "examples" / "echo_service.py"))
    try:
        async with open_bus(busd[1], identity=identity, reconnect=False) as bus:
            ch = await bus.open_channel("org.example.Echo", route=route)
            await ch.send_all(b"before the kill")
            got = b""
            with trio.fail_after(10):
                while len(got) < len(b"before the kill"):
                    got += await ch.receive_some()
            echo.kill()  # SIGKILL, mid-transfer: no goodbye of any kind
            echo.wait()
            ended = None
            with trio.fail_after(5):  # a guard against hanging, not a timing assertion
                try:
                    while True:
                        await ch.send_all(b"x" * 4096)
                        data = await ch.receive_some()
                        if data == b"":
                            ended = "eof"
                            break
                except trio.BrokenResourceError as exc:
                    ended = str(exc)
            assert ended is not None
            if route == "relay":
                assert "disconnected" in ended
                me = await bus.info(bus.unique_id)
                assert me.channels == ()  # the broker freed the channel and its buffers
            await trio.aclose_forcefully(ch)
    finally:
        _stop(echo)


def test_event_examples_run_against_busd(env: dict[str, str], busd: tuple[subprocess.Popen[str], str]) -> None:
    """examples/watch_events.py hears what examples/ticker.py emits; introspect lists the event."""
    listener = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "watch_events.py"), "org.example.*", "Tick", "--count", "2"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None
    ticker = None
    try:
        assert listener.stdout.readline().startswith("listening for Tick from org.example.*")
        ticker = _start_example(env, str(ROOT / "examples" / "ticker.py"), "--interval", "0.2")
        described = busctl(env, "introspect", "org.example.Ticker").stdout
        assert "event Tick" in described and "Once a second" in described
        lines = [listener.stdout.readline() for _ in range(2)]
        assert all(line.startswith("org.example.Ticker Tick {'n': ") for line in lines), lines
        assert listener.wait(timeout=15) == 0
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
        listener.stdout.close()
        if ticker is not None:
            _stop(ticker)
