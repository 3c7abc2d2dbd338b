"""Local files (issue 9, section 6): the runtime directory, temporary files, the address file,
authorized_keys and the config file are trusted only when no other local user could have
planted or changed them; the config is strict.

The tests run as root: uid 0 is "you", and uid 65534 plays the other local user.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bus.__main__ as busd
from bus.broker import Broker, BrokerConfig
from bus.core.broker import Limits
from bus.errors import KeyFileError
from bus.wire import files
from bus.wire.files import LocalFileError, ensure_private_dir, replace_file
from bus.wire.identity import Identity, save_identity
from clients.bus import CannotConnect, find_address

from .brokers import OWNER, make_config, running_broker

OTHER_UID = 65534


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated user: its own XDG dirs (runtime dir not created yet), no bus address."""
    (tmp_path / "run").mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MINIBUS_ADDRESS", raising=False)
    monkeypatch.delenv("MINIBUS_NETWORK_KEY", raising=False)

    async def must_not_serve(config: BrokerConfig) -> None:
        raise AssertionError("busd accepted a configuration the test expects it to refuse")

    monkeypatch.setattr(busd, "run", must_not_serve)
    return tmp_path


def busd_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    """Run busd's ``main`` in-process up to the point where it would serve."""
    status = busd.main(["--tcp", "127.0.0.1:0", *argv])
    return status, capsys.readouterr().err.splitlines()


def plant(path: Path, how: str) -> None:
    """Make ``path`` a directory busd must refuse."""
    if how == "symlink":
        real = path.with_name(path.name + "-real")
        real.mkdir(mode=0o700)
        path.symlink_to(real)
    elif how == "foreign":
        path.mkdir(mode=0o700)
        os.chown(path, OTHER_UID, OTHER_UID)
    elif how == "0755":
        path.mkdir()
        path.chmod(0o755)
    elif how == "file":
        path.write_text("not a directory")


# -- the runtime directory -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["symlink", "foreign", "0755", "file"])
def test_busd_refuses_a_planted_runtime_dir(home: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    runtime = home / "run" / "minibus"
    plant(runtime, how)
    status, err = busd_main(capsys)
    assert status == busd.EXIT_CONFIG
    assert len(err) == 1 and err[0].startswith(f"busd: {runtime}: runtime directory")
    assert "XDG_RUNTIME_DIR" in err[0] or "chmod 700" in err[0]  # the fix is named
    assert not (home / "cfg" / "minibus" / "secret").exists()  # refused before anything is written


@pytest.mark.parametrize("how", ["symlink", "foreign", "0755"])
def test_a_given_runtime_dir_gets_the_same_checks(home: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    given = home / "mine"
    plant(given, how)
    status, err = busd_main(capsys, "--runtime-dir", str(given))
    assert status == busd.EXIT_CONFIG and len(err) == 1 and str(given) in err[0]


def test_tmp_fallback_is_checked_and_warned_about(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    fallback = home / "tmp" / f"minibus-{os.getuid()}"
    fallback.parent.mkdir()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(busd, "default_runtime_dir", lambda: fallback)
    plant(fallback, "foreign")  # another user created it first
    status, err = busd_main(capsys)
    assert status == busd.EXIT_CONFIG and len(err) == 1 and "belongs to uid 65534" in err[0]

    os.rmdir(fallback)
    served: list[BrokerConfig] = []

    async def serve(config: BrokerConfig) -> None:
        served.append(config)

    monkeypatch.setattr(busd, "run", serve)
    with caplog.at_level(logging.WARNING, logger="minibus.busd"):
        assert busd.main(["--no-tcp"]) == 0
    assert served[0].unix_path == fallback / "bus.sock"
    assert any(r.levelno == logging.WARNING and "XDG_RUNTIME_DIR is not set" in r.getMessage() for r in caplog.records)


def test_ensure_private_dir_creates_0700_and_checks_again(tmp_path: Path) -> None:
    made = tmp_path / "a" / "minibus"
    old = os.umask(0)
    try:
        ensure_private_dir(made)
    finally:
        os.umask(old)
    st = os.lstat(made)
    assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.getuid()
    ensure_private_dir(made)  # an existing good one is fine
    made.chmod(0o750)
    with pytest.raises(LocalFileError, match="must be 0700"):
        ensure_private_dir(made)


async def test_broker_refuses_a_planted_socket_dir(tmp_path: Path) -> None:
    plant(tmp_path / "run", "foreign")
    with pytest.raises(LocalFileError, match="belongs to uid 65534"):
        await Broker(make_config(tmp_path, tcp=None)).serve()
    assert list((tmp_path / "run").iterdir()) == []  # no socket, no address file


async def test_broker_writes_the_address_file_0600_without_leftovers(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        run = tmp_path / "run"
        assert os.lstat(run).st_mode & 0o777 == 0o700
        address = run / "address"
        assert address.read_text().strip() == rb.address
        assert os.lstat(address).st_mode & 0o777 == 0o600
        assert sorted(p.name for p in run.iterdir()) == ["address", "bus.sock"]


# -- temporary files -------------------------------------------------------------------------


@pytest.mark.parametrize("dangling", [False, True])
def test_temp_file_never_follows_a_planted_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dangling: bool
) -> None:
    run = tmp_path / "run"
    ensure_private_dir(run)
    target = tmp_path / "victim"
    if not dangling:
        target.write_text("precious")
    monkeypatch.setattr(files, "_random_suffix", lambda: "guessed")
    (run / ".address.guessed.tmp").symlink_to(target)  # as if the name could be guessed
    with pytest.raises(FileExistsError):
        replace_file(run / "address", b"unix:path=/evil\n")
    if dangling:
        assert not target.exists()
    else:
        assert target.read_text() == "precious"
    assert not (run / "address").exists()
    assert (run / ".address.guessed.tmp").is_symlink()  # left alone, not removed or written


def test_temp_file_names_are_random_and_replace_is_whole(tmp_path: Path) -> None:
    fd1, tmp1 = files.create_temp_file(tmp_path / "address")
    fd2, tmp2 = files.create_temp_file(tmp_path / "address")
    os.close(fd1)
    os.close(fd2)
    assert tmp1 != tmp2 and tmp1.name.startswith(".address.") and str(os.getpid()) not in tmp1.name
    assert os.lstat(tmp1).st_mode & 0o777 == 0o600
    replace_file(tmp_path / "address", b"one\n")
    replace_file(tmp_path / "address", b"two\n")
    assert (tmp_path / "address").read_bytes() == b"two\n"


def test_key_files_use_the_same_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "victim"
    target.write_text("precious")
    monkeypatch.setattr(files, "_random_suffix", lambda: "guessed")
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / ".secret.guessed.tmp").symlink_to(target)
    with pytest.raises(KeyFileError, match="cannot write the key file"):
        save_identity(tmp_path / "keys" / "secret", Identity.generate())
    assert target.read_text() == "precious"


# -- the address file, as a client reads it --------------------------------------------------


def write_address(home: Path, dir_mode: int = 0o700, file_mode: int = 0o600) -> Path:
    run = home / "run" / "minibus"
    run.mkdir(mode=0o700)
    address = run / "address"
    address.write_text(f"unix:path={run / 'bus.sock'},key={OWNER.id}\n")
    address.chmod(file_mode)
    run.chmod(dir_mode)
    return address


def test_client_reads_a_good_address_file(home: Path) -> None:
    write_address(home, file_mode=0o644)  # readable by others is fine
    assert find_address() == f"unix:path={home / 'run' / 'minibus' / 'bus.sock'},key={OWNER.id}"


@pytest.mark.parametrize(
    "dir_mode, file_mode, reason",
    [
        (0o700, 0o620, "address file is writable by group or others"),
        (0o700, 0o602, "address file is writable by group or others"),
        (0o770, 0o600, "runtime directory is writable by group or others"),
        (0o703, 0o600, "runtime directory is writable by group or others"),
    ],
)
def test_client_refuses_a_writable_address_file_or_dir(home: Path, dir_mode: int, file_mode: int, reason: str) -> None:
    address = write_address(home, dir_mode, file_mode)
    with pytest.raises(CannotConnect, match=reason) as caught:
        find_address()
    assert str(address.parent) in str(caught.value)


def test_client_refuses_a_foreign_address_file(home: Path) -> None:
    address = write_address(home)
    os.chown(address, OTHER_UID, OTHER_UID)
    with pytest.raises(CannotConnect, match="address file belongs to uid 65534"):
        find_address()


def test_client_refuses_a_foreign_or_symlinked_dir(home: Path) -> None:
    address = write_address(home)
    os.chown(address.parent, OTHER_UID, OTHER_UID)
    with pytest.raises(CannotConnect, match="runtime directory belongs to uid 65534"):
        find_address()
    os.chown(address.parent, os.getuid(), os.getgid())
    address.parent.rename(home / "elsewhere")
    address.parent.symlink_to(home / "elsewhere")
    with pytest.raises(CannotConnect, match="runtime directory is a symlink"):
        find_address()


def test_client_refuses_a_symlinked_address_file(home: Path) -> None:
    address = write_address(home)
    planted = home / "planted"
    planted.write_text(f"tcp:host=203.0.113.9,port=7420,key={Identity.generate().id}\n")
    address.unlink()
    address.symlink_to(planted)
    with pytest.raises(CannotConnect, match="address file is a symlink"):
        find_address()


def test_client_without_an_address_file_says_so(home: Path) -> None:
    with pytest.raises(CannotConnect, match="no bus address"):
        find_address()
    (home / "run" / "minibus").mkdir(mode=0o700)
    with pytest.raises(CannotConnect, match="no bus address"):
        find_address()


def test_busctl_refuses_a_planted_address_file_with_exit_3(home: Path) -> None:
    write_address(home, file_mode=0o666)
    done = subprocess.run(
        [sys.executable, "-m", "clients.busctl", "list"], env=dict(os.environ), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 3
    assert len(done.stderr.splitlines()) == 1 and "writable by group or others" in done.stderr


# -- authorized_keys and the config file ----------------------------------------------------


def authorized_keys(home: Path) -> Path:
    path = home / "cfg" / "minibus" / "authorized_keys"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{Identity.generate().id} friend\n")
    return path


@pytest.mark.parametrize("given", [False, True])
def test_group_writable_authorized_keys_is_refused(home: Path, capsys: pytest.CaptureFixture[str], given: bool) -> None:
    path = authorized_keys(home)
    path.chmod(0o664)
    status, err = busd_main(capsys, *(["--authorized-keys", str(path)] if given else []))
    assert status == busd.EXIT_CONFIG
    assert err == [f"busd: {path}: authorized_keys file is writable by group or others (mode 0664); fix it with 'chmod go-w {path}'"]


def test_foreign_authorized_keys_is_refused_and_a_readable_one_is_fine(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = authorized_keys(home)
    os.chown(path, OTHER_UID, OTHER_UID)
    status, err = busd_main(capsys)
    assert status == busd.EXIT_CONFIG and len(err) == 1 and "belongs to uid 65534" in err[0]
    os.chown(path, os.getuid(), os.getgid())
    path.chmod(0o644)  # holds no secret: others may read it
    config, _ = busd.build_config(busd.parser().parse_args([]))
    assert len(config.policy.authorized_keys) == 1


def test_a_configured_authorized_keys_must_exist(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    busd.build_config(busd.parser().parse_args([]))  # the default one may be absent
    status, err = busd_main(capsys, "--authorized-keys", str(home / "typo"))
    assert status == busd.EXIT_CONFIG and err == [f"busd: {home / 'typo'}: no such authorized_keys file"]


@pytest.mark.parametrize("how", ["group-writable", "foreign", "symlink-to-foreign"])
def test_loose_config_file_is_refused(home: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    config = home / "busd.toml"
    config.write_text("[broker]\nencrypt_unix = true\n")
    if how == "group-writable":
        config.chmod(0o664)
    elif how == "foreign":
        os.chown(config, OTHER_UID, OTHER_UID)
    else:
        real = home / "theirs.toml"
        config.rename(real)
        os.chown(real, OTHER_UID, OTHER_UID)
        config.symlink_to(real)
    status, err = busd_main(capsys, "--config", str(config))
    assert status == busd.EXIT_CONFIG and len(err) == 1 and err[0].startswith(f"busd: {config}: config file")


# -- the strict config -----------------------------------------------------------------------

CONFIG_ERRORS = [
    ("[broker]\nencrypt-unix = true\n", "unknown key 'encrypt-unix'", "did you mean 'encrypt_unix'"),
    ("[broker]\ntcp = 12\n", "[broker] tcp = 12", 'expected a string "HOST:PORT", or false'),
    ('[broker]\nencrypt_unix = "yes"\n', '[broker] encrypt_unix = "yes"', "expected true or false"),
    ("[limits]\nrelay_credit = true\n", "[limits] relay_credit = true", "expected an integer greater than 0"),
]


@pytest.mark.parametrize("text, key, expected", CONFIG_ERRORS)
def test_config_errors_are_one_line_and_exit_3(home: Path, text: str, key: str, expected: str) -> None:
    """As a real process: exit 3 and one line on stderr, never a traceback."""
    config = home / "busd.toml"
    config.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0", "--config", str(config)],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"busd: {config}: ")
    assert key in lines[0] and expected in lines[0]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("brokr = {}\n", "top level: unknown key 'brokr'"),
        ("[limits]\nrelay_credits = 1\n", "[limits]: unknown key 'relay_credits' (did you mean 'relay_credit'?)"),
        ("[limits]\nzzz = 1\n", "known keys: "),
        ("[broker]\ntcp = true\n", "[broker] tcp = true"),
        ('[broker]\ntcp = "nonsense"\n', "[broker] tcp wants HOST:PORT, got 'nonsense'"),
        ("[broker]\nunix = 5\n", "[broker] unix = 5: expected a path (string)"),
        ('[broker]\nlog_level = "loud"\n', '[broker] log_level = "loud"'),
        ('[limits]\nmax_frame = "big"\n', '[limits] max_frame = "big": expected an integer greater than 0'),
        ("[limits]\nmax_frame = 1.5\n", "[limits] max_frame = 1.5: expected an integer"),
        ("[limits]\nrelay_credit = -1\n", "[limits] relay_credit = -1"),
        ("[limits]\ninfo_bytes = 0\n", "[limits] info_bytes = 0"),
        ("[limits]\nchannel_timeout = 0.0\n", "[limits] channel_timeout = 0.0: expected a number (seconds) greater than 0"),
        ("[limits]\nkeepalive_timeout = -5\n", "[limits] keepalive_timeout = -5"),
        ("[limits]\nhandshake_timeout = inf\n", "[limits] handshake_timeout = inf"),
        ("[limits]\nhandshake_timeout = nan\n", "[limits] handshake_timeout = nan"),
        ("[limits]\nclose_timeout = false\n", "[limits] close_timeout = false"),
        ("limits = 3\n", "[limits] must be a table"),
        ("authorized_keys = 3\n", "authorized_keys = 3: expected a path"),
        ('[broker]\nkey = "a\\u0000b"\n', '[broker] key = "a\\u0000b": expected a path'),
        ('[broker]\nunix = ""\n', '[broker] unix = "": expected a path'),
        ("[broker\n", "Expected ']'"),
        ("[limits]\nrelay_credit = 1\nrelay_credit = 2\n", "Cannot overwrite a value"),
    ],
)
def test_each_config_mistake_is_named(home: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str) -> None:
    config = home / "busd.toml"
    config.write_bytes(text.encode())
    status, err = busd_main(capsys, "--config", str(config))
    assert status == busd.EXIT_CONFIG and len(err) == 1 and err[0].startswith(f"busd: {config}: "), err
    assert needle in err[0]


def test_every_numeric_field_is_a_limit_key(home: Path) -> None:
    """[limits] follows the dataclasses: every int field of Limits, every int or float
    field of BrokerConfig (not bools, not the rest), with the right type after parsing."""
    limit_fields = [f.name for f in dataclasses.fields(Limits)]
    timing = {"max_frame": int, "max_control": int, "handshake_timeout": float, "outbound_queue": int, "channel_timeout": float}
    assert set(limit_fields) <= set(busd._LIMIT_KEYS)
    assert set(timing) <= set(busd._TIMING_KEYS)
    assert not {"encrypt_unix", "write_address_file", "limits", "tcp"} & (set(busd._LIMIT_KEYS) | set(busd._TIMING_KEYS))
    wanted = {name: getattr(Limits(), name) + 1 for name in limit_fields}
    lines = ["[limits]"] + [f"{name} = {value}" for name, value in wanted.items()]
    # (sizes that still agree with each other: see bus.broker.check_settings)
    timing_values = {"max_frame": (1 << 20) + 3, "max_control": 65536 + 3, "handshake_timeout": 3, "outbound_queue": 1027, "channel_timeout": 3}
    lines += [f"{name} = {timing_values[name]}" for name in timing]
    path = home / "busd.toml"
    path.write_text("\n".join(lines) + "\n")
    config, _ = busd.build_config(busd.parser().parse_args(["--config", str(path)]))
    assert dataclasses.asdict(config.limits) == wanted
    for name, kind in timing.items():
        value = getattr(config, name)
        assert value == timing_values[name] and type(value) is kind


def test_a_good_config_still_works(home: Path) -> None:
    friend = Identity.generate()
    keys = home / "keys"
    keys.write_text(f"{friend.id}\n")
    key = home / "broker.key"
    save_identity(key, OWNER)
    path = home / "busd.toml"
    path.write_text(
        f'authorized_keys = "{keys}"\n'
        "[broker]\n"
        f'key = "{key}"\ntcp = false\nencrypt_unix = true\nlog_level = "debug"\n'
        "[limits]\nrelay_credit = 65536\nkeepalive_timeout = 30\n"
        f'[[rule]]\nname = "all"\nidentities = ["*"]\nconnect = true\n'
    )
    config, level = busd.build_config(busd.parser().parse_args(["--config", str(path)]))
    assert config.tcp is None and config.encrypt_unix is True and level == "debug"
    assert config.limits.relay_credit == 65536 and config.keepalive_timeout == 30.0
    assert config.policy.authorized_keys == frozenset({friend.id})
