"""systemd's environment and notifications: the sans-io rules, then the notifier and the
journal format on real sockets and files (busd under systemd-socket-activate is in
test_systemd_activation.py)."""

from __future__ import annotations

import io
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
import trio.testing

from bus.errors import SocketActivationError, BusError
from bus.io import systemd as sd_io
from bus.io.systemd import SystemdNotifier, adopt_listen_fds, use_journal_priorities
from bus.wire.address import Endpoint
from bus.wire.identity import Identity
from bus.wire.systemd import (
    MAX_STATUS_CHARS,
    ListenFd,
    notify_message,
    parse_journal_stream,
    parse_listen_fds,
    parse_notify_socket,
    parse_watchdog,
    status_line,
    syslog_priority,
)

PID = 4242


# -- LISTEN_* (sd_listen_fds) ------------------------------------------------------------------


def test_listen_fds_for_us_start_at_three_with_their_names() -> None:
    env = {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "unix:tcp"}
    assert parse_listen_fds(env, PID) == (ListenFd(3, "unix"), ListenFd(4, "tcp"))


def test_listen_fds_without_names_are_unknown() -> None:
    assert parse_listen_fds({"LISTEN_PID": str(PID), "LISTEN_FDS": "1"}, PID) == (ListenFd(3, "unknown"),)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"LISTEN_FDS": "2"},  # no LISTEN_PID: not activated
        {"LISTEN_PID": "1", "LISTEN_FDS": "2"},  # another process's (inherited)
        {"LISTEN_PID": "1", "LISTEN_FDS": "garbage"},  # another process's: not even looked at
        {"LISTEN_PID": str(PID)},  # no LISTEN_FDS
    ],
)
def test_no_descriptors_for_us(env: dict[str, str]) -> None:
    assert parse_listen_fds(env, PID) == ()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "me", "LISTEN_FDS": "1"}, "LISTEN_PID='me' is not a number"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a number"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a number"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, "LISTEN_FDS='0': expected 1 to 256 descriptors"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "100000"}, "LISTEN_FDS='100000': expected 1 to 256 descriptors"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "unix"}, "LISTEN_FDNAMES='unix' names 1 descriptors but LISTEN_FDS=2"),
    ],
)
def test_listen_variables_systemd_would_never_set_are_an_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(SocketActivationError) as info:
        parse_listen_fds(env, PID)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, BusError) and "\n" not in str(info.value)


_values = st.one_of(st.none(), st.text(max_size=12), st.integers(-3, 300).map(str), st.just(str(PID)))


@given(pid=_values, fds=_values, names=_values)
def test_any_listen_variables_give_a_plan_or_an_activation_error(pid: str | None, fds: str | None, names: str | None) -> None:
    env = {k: v for k, v in (("LISTEN_PID", pid), ("LISTEN_FDS", fds), ("LISTEN_FDNAMES", names)) if v is not None}
    try:
        plan = parse_listen_fds(env, PID)
    except SocketActivationError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    if plan:
        assert pid is not None and int(pid) == PID and fds is not None and int(fds) == len(plan)
        assert [item.fd for item in plan] == list(range(3, 3 + len(plan)))
        assert names is None or names.split(":") == [item.name for item in plan]


def test_adopting_removes_the_variables_whoever_they_were_for() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "unix:tcp", "HOME": "/h"}
    assert adopt_listen_fds(env) == []
    assert env == {"HOME": "/h"}  # processes busd starts do not inherit them
    bad = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x", "LISTEN_FDNAMES": "a"}
    with pytest.raises(SocketActivationError, match="LISTEN_FDS='x'"):
        adopt_listen_fds(bad)
    assert bad == {}


# -- NOTIFY_SOCKET, WATCHDOG_* (sd_notify, sd_watchdog_enabled) ----------------------------------


def test_notify_socket_is_a_path_or_an_abstract_name() -> None:
    assert parse_notify_socket("/run/user/1000/systemd/notify") == "/run/user/1000/systemd/notify"
    assert parse_notify_socket("@/org/freedesktop/systemd1/notify/42") == b"\0/org/freedesktop/systemd1/notify/42"
    for bad in ("relative/path", "@", "", "/a\0b"):
        with pytest.raises(SocketActivationError, match="NOTIFY_SOCKET="):
            parse_notify_socket(bad)


def test_watchdog_pings_at_half_the_interval_when_it_is_ours() -> None:
    assert parse_watchdog({}, PID) is None
    assert parse_watchdog({"WATCHDOG_USEC": "30000000"}, PID) == 15.0
    assert parse_watchdog({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID)}, PID) == 15.0
    assert parse_watchdog({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, PID) is None
    for bad in ({"WATCHDOG_USEC": "30s"}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "1", "WATCHDOG_PID": "x"}):
        with pytest.raises(SocketActivationError, match="WATCHDOG_"):
            parse_watchdog(bad, PID)


def test_notify_messages() -> None:
    assert notify_message(ready=True, status="up") == b"READY=1\nSTATUS=up\n"
    assert notify_message(stopping=True) == b"STOPPING=1\n"
    assert notify_message(watchdog=True) == b"WATCHDOG=1\n"
    # A newline in the status would start another assignment: it stays on one line.
    assert notify_message(status="a\nWATCHDOG=1") == b"STATUS=a WATCHDOG=1\n"
    long = notify_message(status="x" * 5000)
    assert len(long) == len("STATUS=\n") + MAX_STATUS_CHARS and long.endswith(b"...\n")
    with pytest.raises(ValueError):
        notify_message()


def test_status_line() -> None:
    key = Identity.from_seed(b"k" * 32).public_key
    endpoints = [
        Endpoint("unix", key, path="/run/user/1000/minibus/bus.sock"),
        Endpoint("tcp", key, host="127.0.0.1", port=7420),
        Endpoint("tcp", key, host="::1", port=7421),
    ]
    assert status_line(endpoints, 1) == "1 connection; listening on /run/user/1000/minibus/bus.sock, 127.0.0.1:7420, [::1]:7421"
    assert status_line(endpoints[:1], 0).startswith("0 connections; ")


def test_from_environ_takes_the_variables_and_never_fails() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()), "HOME": "/h"}
    notifier = SystemdNotifier.from_environ(env)
    assert (notifier.address, notifier.watchdog_interval) == (b"\0x", 1.0)
    assert env == {"HOME": "/h"}
    others = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert others.enabled and others.watchdog_interval is None
    bad = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "not/absolute", "WATCHDOG_USEC": "1"})
    assert not bad.enabled and bad.watchdog_interval is None
    assert not SystemdNotifier.from_environ({}).enabled


# -- the notifier on real sockets ----------------------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    """The service manager's end: a Unix datagram socket bound in a temporary directory."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


async def receive(sock: socket.socket) -> bytes:
    with trio.fail_after(10):
        while True:
            try:
                return sock.recv(4096)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)


async def test_notifications_reach_a_path(manager: socket.socket) -> None:
    notifier = SystemdNotifier(manager.getsockname())
    try:
        assert await notifier.notify(ready=True, status="serving")
        assert await receive(manager) == b"READY=1\nSTATUS=serving\n"
        await notifier.stopping()
        assert await receive(manager) == b"STOPPING=1\nSTATUS=shutting down\n"
    finally:
        notifier.close()


async def test_notifications_reach_an_abstract_address() -> None:
    name = f"minibus-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        manager.setblocking(False)
        notifier = SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        try:
            assert await notifier.notify(ready=True)
            assert await receive(manager) == b"READY=1\n"
        finally:
            notifier.close()


async def test_keep_informed_pings_and_reports_changes(manager: socket.socket) -> None:
    notifier = SystemdNotifier(manager.getsockname(), watchdog_interval=0.05)
    connections = [0]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.keep_informed, lambda: f"{connections[0]} connections")
            assert await receive(manager) == b"WATCHDOG=1\nSTATUS=0 connections\n"
            assert await receive(manager) == b"WATCHDOG=1\n"  # the status did not change
            connections[0] = 3
            while (message := await receive(manager)) == b"WATCHDOG=1\n":
                pass
            assert message.endswith(b"STATUS=3 connections\n")
            await notifier.stopping()
            assert await receive(manager) == b"STOPPING=1\nSTATUS=shutting down\n"
            connections[0] = 4  # no status after STOPPING=1, only pings
            for _ in range(3):
                assert await receive(manager) == b"WATCHDOG=1\n"
            nursery.cancel_scope.cancel()
    finally:
        notifier.close()


async def test_a_missing_manager_is_logged_once_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier(str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.DEBUG, logger="minibus.systemd"):
        for _ in range(3):
            assert not await notifier.notify(watchdog=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nobody-listens" in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2
    # The manager appears (or comes back): notifications get through again.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "nobody-listens"))
        manager.setblocking(False)
        with caplog.at_level(logging.INFO, logger="minibus.systemd"):
            assert await notifier.notify(ready=True)
        assert await receive(manager) == b"READY=1\n"
        assert "get through again" in caplog.records[-1].getMessage()
    notifier.close()


async def test_a_ready_that_did_not_get_through_goes_with_the_next_notification(tmp_path: Path) -> None:
    """READY=1 is sent once; if the manager was not there then, the next notification (a
    status or a ping from keep_informed) carries it, until one gets through."""
    path = tmp_path / "late-manager"
    notifier = SystemdNotifier(str(path))
    assert not await notifier.notify(ready=True, status="listening")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        manager.setblocking(False)
        assert await notifier.notify(watchdog=True)
        assert await receive(manager) == b"READY=1\nWATCHDOG=1\n"
        assert await notifier.notify(watchdog=True)
        assert await receive(manager) == b"WATCHDOG=1\n"  # once through, not again
    notifier.close()


def test_a_manager_that_stops_reading_costs_at_most_the_timeout(
    manager: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    """A full queue makes a notification wait NOTIFY_TIMEOUT (trio's clock, jumped here), then
    it is dropped with a warning: busd is never held up for longer."""
    notifier = SystemdNotifier(manager.getsockname())
    clock = trio.testing.MockClock(autojump_threshold=0)
    results: list[bool] = []

    async def fill() -> None:
        with trio.fail_after(10 * sd_io.NOTIFY_TIMEOUT * 1000):
            while not results or results[-1]:
                results.append(await notifier.notify(watchdog=True))

    try:
        with caplog.at_level(logging.WARNING, logger="minibus.systemd"):
            trio.run(fill, clock=clock)
    finally:
        notifier.close()
    assert results[-1] is False and len(results) > 1
    assert "stayed full" in caplog.records[-1].getMessage()
    queued = 0
    while True:
        try:
            manager.recv(64)
        except BlockingIOError:
            break
        queued += 1
    assert queued == len(results) - 1  # every notification sent but the dropped one


# -- journal ---------------------------------------------------------------------------------------


def test_log_lines_carry_their_priority_when_stderr_is_the_journal(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w+") as stream:
        st = os.fstat(stream.fileno())
        logger = logging.getLogger("minibus.test-journal")
        logger.propagate = False
        handler = logging.StreamHandler(stream)
        logger.addHandler(handler)
        try:
            assert not use_journal_priorities(logger, {}, stream)
            assert not use_journal_priorities(logger, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, stream)
            assert use_journal_priorities(logger, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream)
            logger.warning("careful")
            logger.error("two\nlines")
        finally:
            logger.removeHandler(handler)
        stream.seek(0)
        assert stream.read().splitlines() == ["<4>WARNING careful", "<3>ERROR two", "<3>lines"]
    assert parse_journal_stream("8:12345") == (8, 12345)
    assert parse_journal_stream("8-12345") is None and parse_journal_stream(None) is None
    assert [syslog_priority(level) for level in (50, 40, 30, 20, 10)] == [2, 3, 4, 6, 7]
    assert not use_journal_priorities(logging.getLogger("x"), {"JOURNAL_STREAM": "1:2"}, io.StringIO())
