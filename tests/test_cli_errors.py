"""The errors users see (issue 10): busctl and busd as real processes, given bad input.

Whatever the input, a failure is one line on stderr and a documented exit code, never a
traceback; a connection refused for a quota shows the broker's reason; a clean exit of a TCP
client leaves no truncation in busd's log (while a real truncation still does).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from bus.wire.identity import Identity, load_identity, save_identity
from clients import open_bus

from .brokers import OWNER, start_broker
from .test_cli import _kill, start_service

#: An Ed25519 public key that is no point on the curve (the handshake cannot use it).
NOT_A_POINT = "@AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAI=.ed25519"
TRUNCATED = "without a goodbye (truncated)"


def _env(root: Path) -> dict[str, str]:
    e = dict(os.environ)
    e.update(XDG_RUNTIME_DIR=str(root / "run"), XDG_CONFIG_HOME=str(root / "cfg"), HOME=str(root / "home"))
    e.pop("MINIBUS_ADDRESS", None)
    e.pop("MINIBUS_NETWORK_KEY", None)
    (root / "run").mkdir(mode=0o700, exist_ok=True)
    return e


class Busd:
    """A busd process on any free TCP port, logging to a file (a pipe nobody reads would fill)."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log_path = log
        with log.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0", *args],
                env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("MINIBUS_ADDRESS="), (line, log.read_text())
        self.address = line.strip().split("=", 1)[1]
        self.unix, self.tcp = self.address.split(";")
        self.port = self.tcp.split("port=")[1].split(",")[0]

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> str:
        """SIGTERM; returns everything it logged."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=15)
        return self.log()


class Bus(Busd):
    """One busd for the whole module (the bad inputs never change it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = _env(root)
        super().__init__(self.env, root / "busd.log")
        files = root / "files"
        files.mkdir()
        self.corrupt_key = files / "corrupt"
        self.corrupt_key.write_text('# not a key\n{"curve": "ed25519", "private": "nope.ed25519"}\n')
        self.corrupt_key.chmod(0o600)
        self.loose_key = files / "loose"
        save_identity(self.loose_key, Identity.generate())
        self.loose_key.chmod(0o644)


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    b = Bus(tmp_path_factory.mktemp("bus"))
    yield b
    b.stop()


def _busctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.busctl", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_error(result: subprocess.CompletedProcess[str], prog: str, code: int, *words: str) -> None:
    where = f"{result.args[3:]}: rc={result.returncode} stderr={result.stderr!r}"
    assert "Traceback" not in result.stderr, where
    assert "internal error" not in result.stderr, where
    assert result.returncode == code, where
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), where
    for word in words:
        assert word in lines[0], where


# Every verb that connects, with arguments that are fine in themselves.
CONNECTING = [
    ["list"],
    ["status", "org.example.Echo"],
    ["monitor", "org.example.*"],
    ["wait", "org.example.Echo"],
    ["call", "org.example.Echo", "echo", "1"],
    ["introspect", "org.example.Echo"],
    ["open", "org.example.Echo"],
]
BAD_ADDRESSES = {
    "host:port": ("127.0.0.1:7420", "is not key=value"),
    "garbage": ("garbage", "has no transport"),
    "bad base64": ("tcp:host=127.0.0.1,port=1,key=@abc.ed25519", "bad base64"),
}


@pytest.mark.parametrize("verb", CONNECTING, ids=lambda v: v[0])
@pytest.mark.parametrize("address", list(BAD_ADDRESSES))
def test_every_verb_with_a_bad_address_is_a_usage_error(bus: Bus, verb: list[str], address: str) -> None:
    text, words = BAD_ADDRESSES[address]
    before = _busctl(bus.env, "--address", text, *verb)  # the option before the verb ...
    _one_line_error(before, "busctl", 2, "bad bus address (--address)", words)
    after = _busctl(dict(bus.env, MINIBUS_ADDRESS=text), *verb)  # ... or from the environment
    _one_line_error(after, "busctl", 2, "bad bus address (MINIBUS_ADDRESS)", words)


@pytest.mark.parametrize("verb", CONNECTING, ids=lambda v: v[0])
def test_every_verb_with_bad_keys(bus: Bus, verb: list[str]) -> None:
    # The broker's key in the address is no curve point: the address is wrong.
    not_a_point = f"tcp:host=127.0.0.1,port={bus.port},key={NOT_A_POINT}"
    _one_line_error(_busctl(bus.env, *verb, "--address", not_a_point), "busctl", 2, "not a valid Ed25519 point")
    # Our own key file: corrupt, readable by others.
    _one_line_error(_busctl(bus.env, "--identity", str(bus.corrupt_key), *verb), "busctl", 1, "corrupt secret file")
    _one_line_error(_busctl(bus.env, *verb, "--identity", str(bus.loose_key)), "busctl", 1, "chmod 600")
    # The network key, from the option or the environment.
    _one_line_error(_busctl(bus.env, *verb, "--network-key", "zz"), "busctl", 2, "--network-key")
    _one_line_error(_busctl(dict(bus.env, MINIBUS_NETWORK_KEY="12"), *verb), "busctl", 2, "MINIBUS_NETWORK_KEY")


BAD_ARGS = [
    # (arguments, exit code, words in the message)
    ([], 2, ["required: VERB"]),
    (["frobnicate"], 2, ["invalid choice"]),
    (["list", "--bogus"], 2, ["unrecognized arguments"]),
    (["list", "extra"], 2, ["unrecognized arguments"]),
    (["list", "--timeout", "0"], 2, ["not a positive number"]),
    (["--timeout", "nan", "list"], 2, ["not a positive number"]),
    (["--timeout", "soon", "list"], 2, ["not a positive number"]),
    (["status"], 2, ["required"]),
    (["status", "bad..name"], 2, ["bad name"]),
    (["status", ":abc"], 2, ["bad unique id"]),
    (["status", ":999999"], 5, ["no visible connection"]),
    (["status", "org.example.Missing"], 5, ["no connection"]),
    (["monitor", "bad[pattern"], 2, ["bad pattern", "never closed"]),
    (["monitor", "org.*", "[z-a]"], 2, ["bad pattern"]),
    (["wait"], 2, ["required"]),
    (["wait", "no-dots"], 2, ["bad name"]),
    (["wait", "org.example.Never", "--timeout", "0.5"], 5, ["did not appear"]),
    (["call", "org.example.Echo"], 2, ["required: METHOD"]),
    (["call", "org.example.Echo", "echo", "not json"], 2, ["is not JSON"]),
    (["call", "1.bad", "echo"], 2, ["bad name"]),
    (["call", "org.example.Missing", "echo", "1"], 5, ["no connection"]),
    (["introspect"], 2, ["required"]),
    (["introspect", "org..x"], 2, ["bad name"]),
    (["introspect", "org.example.Missing"], 5, ["no connection"]),
    (["open"], 2, ["required"]),
    (["open", "org.example.Echo", "--route", "teleport"], 2, ["invalid choice"]),
    (["open", "org.example.Echo", "--protocol", "no spaces"], 2, ["bad protocol label"]),
    (["open", "org.example.Echo", "--protocol", ""], 2, ["bad protocol label"]),
    (["open", "org.example.Echo", "--json"], 2, ["drop --json"]),
    (["open", "org.example.Missing"], 5, ["no connection"]),
    (["id", "extra"], 2, ["unrecognized arguments"]),
    (["--identity", "/nonexistent/key", "id"], 1, ["no such key file"]),
    (["keygen"], 2, ["required: FILE"]),
    (["keygen", "/dev/null"], 1, ["already exists"]),
    (["keygen", "/proc/self/nope/key"], 1, ["/proc/self/nope"]),
]


@pytest.mark.parametrize(("args", "code", "words"), BAD_ARGS, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_arguments_for_every_verb(bus: Bus, args: list[str], code: int, words: list[str]) -> None:
    _one_line_error(_busctl(bus.env, *args), "busctl", code, *words)


def test_bad_local_config_for_busctl(bus: Bus, tmp_path: Path) -> None:
    # No address anywhere, and an address file that someone else could have written.
    empty = dict(bus.env, XDG_RUNTIME_DIR=str(tmp_path / "elsewhere"))
    _one_line_error(_busctl(empty, "list"), "busctl", 3, "no bus address")
    run = tmp_path / "loose"
    (run / "minibus").mkdir(parents=True, mode=0o700)
    run.chmod(0o700)
    (run / "minibus" / "address").write_text(bus.address + "\n")
    (run / "minibus" / "address").chmod(0o666)
    _one_line_error(_busctl(dict(bus.env, XDG_RUNTIME_DIR=str(run)), "list"), "busctl", 3, "refusing the address file")
    # Nothing listening where the address points.
    gone = bus.unix.replace("bus.sock", "nothing.sock")
    _one_line_error(_busctl(bus.env, "list", "--address", gone), "busctl", 3, "cannot connect")


def test_global_options_go_before_or_after_the_verb(bus: Bus) -> None:
    before = _busctl(bus.env, "--json", "--timeout", "5", "list")
    after = _busctl(bus.env, "list", "--json", "--timeout", "5")
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert before.stdout.strip() == after.stdout.strip() == "[]"
    # Given on both sides, the one after the verb wins.
    both = _busctl(bus.env, "--address", "garbage", "list", "--address", bus.tcp)
    assert both.returncode == 0, both.stderr
    for prog in ("clients.busctl", "bus"):
        shown = subprocess.run([sys.executable, "-m", prog, "--version"], capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0 and shown.stdout.strip().endswith("(minibus) 0.1.0"), shown


def _sigint_as_usual() -> None:
    """For a child that gets SIGINT: a runner that started us in the background ignores it,
    and so would the child (busctl keeps an ignored signal ignored, as shells do)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30  # a guard against hanging, not a timing assertion
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_signals_end_busctl_with_their_exit_codes(bus: Bus) -> None:
    def stopped(sig: signal.Signals, *args: str) -> int:
        started = bus.log().count("started over")
        proc = subprocess.Popen(
            [sys.executable, "-m", "clients.busctl", *args],
            env=bus.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_usual,
        )
        _wait_for(lambda: bus.log().count("started over") > started)  # connected
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
        assert "Traceback" not in err and err == "", err
        return proc.returncode

    assert stopped(signal.SIGINT, "wait", "org.example.Never", "--timeout", "60") == 130
    assert stopped(signal.SIGTERM, "wait", "org.example.Never", "--timeout", "60") == 143
    assert stopped(signal.SIGTERM, "monitor") == 0
    assert stopped(signal.SIGINT, "monitor") == 0


# -- busd --------------------------------------------------------------------------------------


def _busd(env: dict[str, str], root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bus", "--runtime-dir", str(root / "busd-run"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


BAD_CONFIGS = {
    "tcp is a number": ("[broker]\ntcp = 12\n", "expected a string"),
    "tcp is no address": ('[broker]\ntcp = "x"\n', "wants HOST:PORT"),
    "unknown key": ("[broker]\nencrypt-unix = true\n", "did you mean 'encrypt_unix'"),
    "not TOML": ("this is not toml", "Expected"),
    "bad limit": ("[limits]\nmax_frame = -1\n", "greater than 0"),
    "bad rule": ('[[rule]]\nname = "r"\nidentities = ["nope"]\n', "not an ed25519 identity"),
    "bad network key": ('[broker]\nnetwork_key = "zz"\n', "64 hex digits"),
    "missing key file": ('[broker]\nkey = "/nonexistent/key"\n', "no such key file"),
}


@pytest.mark.parametrize("config", list(BAD_CONFIGS))
def test_busd_with_a_bad_config(bus: Bus, tmp_path: Path, config: str) -> None:
    text, words = BAD_CONFIGS[config]
    path = tmp_path / "busd.toml"
    path.write_text(text)
    _one_line_error(_busd(bus.env, tmp_path, "--no-tcp", "--config", str(path)), "busd", 3, words)


def test_busd_with_bad_arguments_and_keys(bus: Bus, tmp_path: Path) -> None:
    _one_line_error(_busd(bus.env, tmp_path, "--bogus"), "busd", 2, "unrecognized arguments")
    _one_line_error(_busd(bus.env, tmp_path, "--log-level", "loud"), "busd", 2, "invalid choice")
    _one_line_error(_busd(bus.env, tmp_path, "--tcp", "nonsense"), "busd", 3, "wants HOST:PORT")
    _one_line_error(_busd(bus.env, tmp_path, "--tcp", "127.0.0.1:0", "--no-tcp"), "busd", 2, "not allowed with")
    _one_line_error(_busd(bus.env, tmp_path, "--no-tcp", "--key", str(bus.corrupt_key)), "busd", 3, "corrupt secret file")
    _one_line_error(_busd(bus.env, tmp_path, "--no-tcp", "--key", str(bus.loose_key)), "busd", 3, "chmod 600")
    _one_line_error(_busd(bus.env, tmp_path, "--no-tcp", "--network-key", "zz"), "busd", 3, "64 hex digits")
    _one_line_error(_busd(bus.env, tmp_path, "--tcp", "nosuchhost.invalid:0"), "busd", 3, "nosuchhost.invalid:0", "--no-tcp")


def test_busd_port_in_use_names_the_address_and_the_fix(bus: Bus, tmp_path: Path) -> None:
    taken = f"127.0.0.1:{bus.port}"
    result = _busd(bus.env, tmp_path, "--tcp", taken)
    _one_line_error(result, "busd", 3, f"cannot listen on TCP {taken}", "already in use", "--tcp 127.0.0.1:0", "--no-tcp")


# -- what the broker says reaches the user; clean exits are clean ------------------------------------


async def test_a_quota_refusal_shows_the_brokers_reason(tmp_path: Path) -> None:
    env = _env(tmp_path)
    config = tmp_path / "busd.toml"
    config.write_text("[limits]\nconnections_per_identity = 1\n")
    busd = Busd(env, tmp_path / "busd.log", "--config", str(config))
    try:
        me = load_identity(Path(env["XDG_CONFIG_HOME"]) / "minibus" / "secret")
        async with open_bus(busd.address, identity=me, reconnect=False):  # the one connection allowed
            for endpoint in (busd.unix, busd.tcp):  # over Unix (plain) and TCP (box-stream)
                result = await trio.run_process(
                    [sys.executable, "-m", "clients.busctl", "--address", endpoint, "list"],
                    env=env, capture_stdout=True, capture_stderr=True, check=False,
                )
                stderr = result.stderr.decode()
                assert result.returncode == 3, stderr
                assert stderr.count("\n") == 1 and "Traceback" not in stderr
                assert "the broker refused the connection: connections_per_identity reached" in stderr, stderr
                assert "Broken pipe" not in stderr and "did not answer hello" not in stderr
    finally:
        log = busd.stop()
    assert "connections_per_identity reached" in log


def test_clean_tcp_exits_leave_no_truncation_in_the_log(tmp_path: Path) -> None:
    env = _env(tmp_path)
    busd = Busd(env, tmp_path / "busd.log")
    tcp = busd.tcp
    service, unique_id = start_service(env, "org.example.Here")
    try:
        assert _busctl(env, "--address", tcp, "list").returncode == 0
        assert _busctl(env, "--address", tcp, "status", "org.example.Here").returncode == 0
        assert _busctl(env, "--address", tcp, "wait", "org.example.Here").returncode == 0
        assert _busctl(env, "--address", tcp, "status", "org.example.Missing").returncode == 5  # an error exit
        for sig in (signal.SIGINT, signal.SIGTERM):  # interrupted: still a clean close
            monitor = subprocess.Popen(
                [sys.executable, "-m", "clients.busctl", "--address", tcp, "monitor", "org.example.*"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_usual,
            )
            assert monitor.stdout is not None
            assert unique_id in monitor.stdout.readline()
            monitor.send_signal(sig)
            assert monitor.wait(timeout=15) == 0
            monitor.stdout.close()
            monitor.stderr and monitor.stderr.close()
        # A real truncation (a client killed: no goodbye) is still reported as one.
        killed = subprocess.Popen(
            [sys.executable, "-m", "clients.busctl", "--address", tcp, "monitor", "org.example.*"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert killed.stdout is not None
        assert unique_id in killed.stdout.readline()
        _kill(killed)
        _wait_for(lambda: TRUNCATED in busd.log())
    finally:
        _kill(service)
        log = busd.stop()
    ended = [line for line in log.splitlines() if "ended:" in line]
    assert len(ended) >= 8, log  # 4 busctl runs, 2 monitors, the killed one, the service
    assert sum(TRUNCATED in line for line in ended) == 1, log  # the killed monitor's, only
    # Starts and ends at the same level, with a timestamp.
    started = [line for line in log.splitlines() if "started over" in line]
    assert len(started) == len(ended), log
    assert all(line[:4].isdigit() and " busd: INFO " in line for line in started + ended), log


def test_a_refused_identity_is_logged_once(tmp_path: Path) -> None:
    env = _env(tmp_path)
    busd = Busd(env, tmp_path / "busd.log")
    stranger = tmp_path / "stranger"
    save_identity(stranger, Identity.generate())
    try:
        refused = _busctl(env, "--identity", str(stranger), "list")  # tries Unix, then TCP
        _one_line_error(refused, "busctl", 3, "refused our identity")
    finally:
        log = busd.stop()
    assert sum("may not connect" in line for line in log.splitlines()) == 1, log
    assert "handshake failed" not in log, log


async def test_the_client_library_warns_when_it_loses_and_regains_the_broker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "minibus.client")
    async with trio.open_nursery() as nursery:
        first = await start_broker(nursery, tmp_path)
        async with open_bus(first.unix_address, identity=OWNER) as bus:
            await first.stop()
            second = await start_broker(nursery, tmp_path)  # the same socket and key
            with trio.fail_after(30):  # a guard against hanging, not a timing assertion
                while not (bus.reconnects and bus.connected):
                    await trio.sleep(0.01)
            again = bus.unique_id
        await second.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # (leaving cleanly at the end is no loss)
    assert warnings[0].startswith("lost the bus connection") and "broker shutting down" in warnings[0]
    assert warnings[0].endswith("; reconnecting")
    assert warnings[1].startswith("reconnected to the bus (") and warnings[1].endswith(f" as {again}")
