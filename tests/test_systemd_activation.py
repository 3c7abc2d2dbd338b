"""busd started by systemd's own tools: socket activation with the real
``systemd-socket-activate`` (Debian's systemd package), notifications read from a real
``NOTIFY_SOCKET``, real busctl and client-library processes connecting through the sockets
busd was handed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bus.wire.identity import Identity, save_identity

ROOT = Path(__file__).resolve().parent.parent
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
DEADLINE = 30.0  # seconds any one step may take before the test gives up (never asserted)
O_CLOEXEC = 0o2000000


@pytest.fixture
def identity() -> Identity:
    return Identity.generate()


@pytest.fixture
def env(tmp_path: Path, identity: Identity) -> dict[str, str]:
    """An isolated user: its own XDG directories and a key (the broker's and busctl's)."""
    e = dict(os.environ)
    for name in ("MINIBUS_ADDRESS", "MINIBUS_NETWORK_KEY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        e.pop(name, None)
    e |= {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HOME": str(tmp_path)}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    (tmp_path / "run" / "minibus").mkdir(mode=0o700, parents=True)  # what DirectoryMode=0700 makes
    save_identity(tmp_path / "cfg" / "minibus" / "secret", identity)
    return e


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """The service manager's notification socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(DEADLINE)
    yield sock
    sock.close()


def receive_until(manager: socket.socket, wanted: Callable[[bytes], bool]) -> list[bytes]:
    """Notifications up to and including the first one ``wanted`` accepts."""
    seen = []
    while True:
        message = manager.recv(4096)
        seen.append(message)
        if wanted(message):
            return seen


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def socket_activate(
    env: dict[str, str], tmp_path: Path, listen: list[str], fdnames: str | None, *busd_args: str, **extra: str
) -> subprocess.Popen[str]:
    """``systemd-socket-activate -l ... python -m bus ...``; returns once it listens (it
    starts busd on the first connection).  It passes the child only the variables given
    with -E (and PATH, HOME, ...): the test's environment goes through that way."""
    command = [SOCKET_ACTIVATE]
    for address in listen:
        command += ["-l", address]
    if fdnames is not None:
        command.append(f"--fdname={fdnames}")
    for name in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "HOME", "PYTHONPATH"):
        command += ["-E", f"{name}={env[name]}"]
    for name, value in extra.items():
        command += ["-E", f"{name}={value}"]
    command += [sys.executable, "-m", "bus", *busd_args]
    stderr = open(tmp_path / "stderr", "w")
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
    stderr.close()
    wait_for(lambda: stderr_of(tmp_path).count("Listening on") == len(listen) or proc.poll() is not None, "the sockets")
    assert proc.poll() is None, stderr_of(tmp_path)
    return proc


def stderr_of(tmp_path: Path) -> str:
    return (tmp_path / "stderr").read_text()


def busctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.busctl", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE
    )


SERVICE = """
import sys, trio
from clients import open_bus
async def main():
    async with open_bus(sys.argv[1], name=sys.argv[2]) as bus:
        print(bus.unique_id, flush=True)
        await trio.sleep_forever()
trio.run(main)
"""


def stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=DEADLINE)
    if proc.stdout is not None:
        proc.stdout.close()
    return code


def test_activated_unix_and_tcp_serve_clients_and_notify(
    env: dict[str, str], tmp_path: Path, identity: Identity, manager: socket.socket
) -> None:
    run = tmp_path / "run" / "minibus"
    path, port = run / "bus.sock", free_port()
    proc = socket_activate(
        env, tmp_path, [str(path), f"127.0.0.1:{port}"], "unix:tcp",
        NOTIFY_SOCKET=manager.getsockname(), WATCHDOG_USEC="200000",
    )  # fmt: skip
    service = None
    try:
        unix = f"unix:path={path},key={identity.id}"
        tcp = f"tcp:host=127.0.0.1,port={port},key={identity.id}"
        # The first client connects before busd runs (systemd-socket-activate starts it on
        # that connection): the kernel holds the connection until busd accepts it.
        first = busctl(env, "--address", unix, "list", "--all", "--json")
        assert first.returncode == 0, first.stderr
        assert '"transport": "unix"' in first.stdout  # busctl's own connection, listed
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"MINIBUS_ADDRESS={unix};{tcp}"
        assert (run / "address").read_text().strip() == f"{unix};{tcp}"  # where clients look
        [ready] = receive_until(manager, lambda m: b"READY=1" in m)  # the first notification
        assert ready == f"READY=1\nSTATUS=0 connections; listening on {path}, 127.0.0.1:{port}\n".encode()
        # Once READY=1 is in, both activated sockets serve: a plugin over TCP, busctl over Unix.
        service = subprocess.Popen(
            [sys.executable, "-c", SERVICE, tcp, "org.example.Activated"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert service.stdout is not None and service.stdout.readline().startswith(":")
        listed = busctl(env, "--address", unix, "list")
        assert listed.returncode == 0 and "org.example.Activated" in listed.stdout, listed.stderr
        listed = busctl(env, "--address", tcp, "list")  # and busctl over TCP
        assert listed.returncode == 0 and "org.example.Activated" in listed.stdout, listed.stderr
        # STATUS= follows the connections; WATCHDOG=1 keeps coming (WATCHDOG_USEC set).
        receive_until(manager, lambda m: b"STATUS=1 connection;" in m)
        pings = [m for m in receive_until(manager, lambda m: b"WATCHDOG=1" in m) if b"WATCHDOG=1" in m]
        pings += receive_until(manager, lambda m: b"WATCHDOG=1" in m)[-1:]
        assert len(pings) == 2
        # The adopted sockets are close-on-exec: processes busd starts do not inherit them.
        for fd in (3, 4):
            flags = Path(f"/proc/{proc.pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
            assert int(flags, 8) & O_CLOEXEC
        service.terminate()
        service.wait(timeout=DEADLINE)
        receive_until(manager, lambda m: b"STATUS=0 connections;" in m)
        proc.send_signal(signal.SIGTERM)
        stopping = receive_until(manager, lambda m: b"STOPPING=1" in m)[-1]
        assert stopping == b"STOPPING=1\nSTATUS=shutting down\n"
        assert proc.wait(timeout=DEADLINE) == 0
        # systemd's socket outlives busd: busd does not remove it, nor the address file that
        # leads clients to it (their first connection starts busd again).
        assert path.exists()
        assert (run / "address").read_text().strip() == f"{unix};{tcp}"
        log = stderr_of(tmp_path)
        assert "socket activation: descriptor 3 (unix): unix " + str(path) in log
        assert f"socket activation: descriptor 4 (tcp): tcp 127.0.0.1:{port}" in log
        assert "Traceback" not in log
    finally:
        if service is not None:
            service.kill()
            service.wait()
            service.stdout and service.stdout.close()
        proc.kill()
        stop(proc)


def test_only_the_kinds_received_are_not_bound(env: dict[str, str], tmp_path: Path, identity: Identity) -> None:
    """A Unix socket from systemd and no TCP one: busd binds its configured TCP address itself,
    and no Unix socket of its own (not even at an explicit --unix)."""
    path, other = tmp_path / "run" / "minibus" / "bus.sock", tmp_path / "run" / "minibus" / "own.sock"
    # Any name but "unix" and "tcp" is only logged (the example unit names both "minibus").
    proc = socket_activate(env, tmp_path, [str(path)], "minibus", "--unix", str(other), "--tcp", "127.0.0.1:0")
    try:
        unix = f"unix:path={path},key={identity.id}"
        assert busctl(env, "--address", unix, "list").returncode == 0  # starts busd (no NOTIFY_SOCKET: none sent)
        assert proc.stdout is not None
        address = proc.stdout.readline().strip().removeprefix("MINIBUS_ADDRESS=")
        assert address.startswith(unix + ";tcp:host=127.0.0.1,port=")
        tcp = address.split(";")[1]
        listed = busctl(env, "--address", tcp, "list")
        assert listed.returncode == 0, listed.stderr
        assert not other.exists()
        assert busctl(env, "list").returncode == 0  # through the address file beside the socket
        assert stop(proc) == 0
        assert path.exists()
    finally:
        proc.kill()
        stop(proc)


def test_listen_variables_for_another_process_are_ignored(env: dict[str, str], tmp_path: Path) -> None:
    """LISTEN_PID not ours (inherited from a parent): busd binds its own sockets as usual.
    An unusable NOTIFY_SOCKET is logged and busd runs on."""
    env |= {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "unix:tcp", "NOTIFY_SOCKET": "relative/notify"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("MINIBUS_ADDRESS=unix:path=")
        own = tmp_path / "run" / "minibus" / "bus.sock"
        assert own.exists()
        assert busctl(env, "list").returncode == 0
        assert stop(proc) == 0
        assert not own.exists()  # its own socket: removed on the way out
        log = proc.stderr.read()
        assert "NOTIFY_SOCKET='relative/notify': expected an absolute path or an @abstract name: not notifying systemd" in log
        assert "socket activation" not in log and "Traceback" not in log
    finally:
        proc.kill()
        stop(proc)
        proc.stderr and proc.stderr.close()


SHELL_ACTIVATION = 'export LISTEN_PID=$$ LISTEN_FDS="$1" LISTEN_FDNAMES="$2"; [ -n "$2" ] || unset LISTEN_FDNAMES; {}exec "$0" -m bus'


@pytest.mark.parametrize(
    ("fds", "names", "redirect", "error"),
    [
        ("many", "", "", "LISTEN_FDS='many' is not a number (set by systemd socket activation)"),
        ("0", "", "", "LISTEN_FDS='0': expected 1 to 256 descriptors"),
        ("2", "unix", "", "LISTEN_FDNAMES='unix' names 1 descriptors but LISTEN_FDS=2"),
        ("1", "", "", "socket activation: descriptor 3 (unknown): Bad file descriptor (LISTEN_FDS names more descriptors than were passed)"),
        ("1", "unix", "exec 3</dev/null; ", "socket activation: descriptor 3 (unix): not a socket"),
    ],
)
def test_bad_activation_variables_stop_busd(
    env: dict[str, str], fds: str, names: str, redirect: str, error: str
) -> None:
    """LISTEN_PID is ours but the rest is not what systemd sets: one line, exit 3 (config)."""
    result = subprocess.run(
        ["sh", "-c", SHELL_ACTIVATION.format(redirect), sys.executable, fds, names],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    assert (result.returncode, result.stderr, result.stdout) == (3, f"busd: {error}\n", "")


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--fdname=tcp"], "socket activation: descriptor 3 (tcp): named 'tcp' but it is a unix socket"),
        (["--datagram"], "socket activation: descriptor 3 (unknown): not a stream socket (use ListenStream=)"),
        (["--seqpacket"], "socket activation: descriptor 3 (unknown): not a stream socket (use ListenStream=)"),
    ],
)
def test_sockets_busd_cannot_serve_stop_it(env: dict[str, str], tmp_path: Path, options: list[str], error: str) -> None:
    path = tmp_path / "run" / "minibus" / "bus.sock"
    command = [SOCKET_ACTIVATE, "-l", str(path), *options, "-E", f"PYTHONPATH={env['PYTHONPATH']}"]
    for name in ("XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        command += ["-E", f"{name}={env[name]}"]
    proc = subprocess.Popen(
        [*command, sys.executable, "-m", "bus", "--no-tcp"], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("Listening on")
        kind = socket.SOCK_DGRAM if "--datagram" in options else socket.SOCK_SEQPACKET if "--seqpacket" in options else socket.SOCK_STREAM
        with socket.socket(socket.AF_UNIX, kind) as client:  # the first contact starts busd
            client.connect(str(path))
            client.send(b"x")
            assert proc.wait(timeout=DEADLINE) == 3
        busd_lines = [line for line in proc.stderr.read().splitlines() if line.startswith("busd:")]
        assert busd_lines == [f"busd: {error}"]
    finally:
        proc.kill()
        proc.wait()
        proc.stderr and proc.stderr.close()


def test_log_lines_go_to_the_journal_with_their_priority(env: dict[str, str], tmp_path: Path) -> None:
    """When stderr is the stream systemd named in JOURNAL_STREAM, each line starts with its
    syslog priority (journald files it under that, and adds the timestamp itself)."""
    with open(tmp_path / "journal", "w") as journal:
        st = os.fstat(journal.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        env["NOTIFY_SOCKET"] = "not-a-path"  # for a warning
        proc = subprocess.Popen(
            [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=journal, text=True,
        )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("MINIBUS_ADDRESS=")
        assert stop(proc) == 0
    finally:
        proc.kill()
        stop(proc)
    lines = (tmp_path / "journal").read_text().splitlines()
    assert any(line.startswith("<6>INFO listening: unix:path=") for line in lines), lines
    assert "<4>WARNING NOTIFY_SOCKET='not-a-path': expected an absolute path or an @abstract name: not notifying systemd" in lines
    assert all(line[:3] in ("<3>", "<4>", "<6>") for line in lines), lines


def test_example_units_pass_systemd_analyze(tmp_path: Path, env: dict[str, str]) -> None:
    """examples/systemd/ as systemd itself reads them: no unknown key, no bad value.  Only
    ExecStart= changes: verify wants the command to exist, and busd here is where pip put it."""
    busd = shutil.which("busd") or str(Path(sys.executable).parent / "busd")
    assert Path(busd).exists(), "busd is not installed (pip install -e .)"
    for unit in ("minibus.socket", "minibus.service"):
        text = (ROOT / "examples" / "systemd" / unit).read_text()
        assert unit == "minibus.socket" or "\nExecStart=busd\n" in text
        (tmp_path / unit).write_text(text.replace("\nExecStart=busd\n", f"\nExecStart={busd}\n"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--user", str(tmp_path / "minibus.socket"), str(tmp_path / "minibus.service")],
        env=env, capture_output=True, text=True, timeout=DEADLINE,
    )  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
