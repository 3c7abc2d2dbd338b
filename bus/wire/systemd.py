"""What systemd tells busd in its environment, and what busd tells systemd back (sans-io).

Theory of operation
-------------------
systemd's service protocols are environment variables going in and short datagrams going
out; this module reads and writes both without touching a socket, so every rule is a pure
function with its tests (the sockets themselves are in :mod:`bus.io.systemd`).

**Socket activation** (``sd_listen_fds(3)``): ``LISTEN_PID`` names the process the
descriptors are for, ``LISTEN_FDS`` how many there are (they start at descriptor 3), and
``LISTEN_FDNAMES`` optionally names them, colon-separated (``FileDescriptorName=`` in a
socket unit, ``--fdname`` for ``systemd-socket-activate``).  As in ``sd_listen_fds``:
no ``LISTEN_PID``, or one that is not ours (the variables were inherited from a parent),
means no descriptors; a ``LISTEN_PID`` or ``LISTEN_FDS`` that is not a number, a count
that is not positive, or names that do not match the count are an error.  busd stops on
that error (exit 3) rather than run without the sockets it was started to serve.

**Notification** (``sd_notify(3)``): one datagram of newline-separated ``KEY=VALUE``
lines (``READY=1``, ``STATUS=...``, ``STOPPING=1``, ``WATCHDOG=1``) sent to the
``NOTIFY_SOCKET`` path; a leading ``@`` means a Linux abstract address.  The watchdog
(``sd_watchdog_enabled(3)``) is on when ``WATCHDOG_USEC`` is set and ``WATCHDOG_PID`` is
unset or ours; busd pings at half the interval, as systemd recommends.

**Journal** (``systemd.exec(5)``): ``JOURNAL_STREAM`` is ``DEVICE:INODE`` of the stream
systemd connected to stdout and stderr; when stderr is still that stream, a log line may
start with ``<N>``, a syslog priority, which journald strips and files the line under.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import SocketActivationError
from .address import Endpoint

__all__ = [
    "LISTEN_FDS_START",
    "LISTEN_VARIABLES",
    "WATCHDOG_VARIABLES",
    "ListenFd",
    "parse_listen_fds",
    "parse_notify_socket",
    "parse_watchdog",
    "notify_message",
    "status_line",
    "parse_journal_stream",
    "syslog_priority",
]

#: The first descriptor systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3
#: The socket activation variables, removed from the environment once read so that
#: processes busd starts do not take them for their own.
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: Notification variables, likewise removed once read (a plugin busd starts is not busd).
WATCHDOG_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
#: ``LISTEN_FDS`` above this is refused (systemd passes a handful; this bounds the work).
MAX_LISTEN_FDS = 256
#: A ``STATUS=`` text longer than this is cut (systemd shows one line of it).
MAX_STATUS_CHARS = 512


@dataclass(frozen=True, slots=True)
class ListenFd:
    """One descriptor systemd passed: its number and name (systemd's default name when
    none was given: ``unknown``)."""

    fd: int
    name: str


def _number(value: str, variable: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise SocketActivationError(f"{variable}={value!r} is not a number (set by systemd socket activation)")
    return int(text)


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> tuple[ListenFd, ...]:
    """The descriptors passed to process ``pid`` (see the module's docstring); raises
    :class:`SocketActivationError` for variables that cannot be what systemd sets."""
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        return ()
    if _number(pid_text, "LISTEN_PID") != pid:
        return ()  # meant for another process (inherited): not ours to use
    count_text = environ.get("LISTEN_FDS")
    if count_text is None:
        return ()
    count = _number(count_text, "LISTEN_FDS")
    if not 0 < count <= MAX_LISTEN_FDS:
        raise SocketActivationError(f"LISTEN_FDS={count_text!r}: expected 1 to {MAX_LISTEN_FDS} descriptors")
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is None:
        names = ["unknown"] * count
    else:
        names = names_text.split(":")
        if len(names) != count:
            raise SocketActivationError(
                f"LISTEN_FDNAMES={names_text!r} names {len(names)} descriptors but LISTEN_FDS={count}"
            )
    return tuple(ListenFd(LISTEN_FDS_START + i, name) for i, name in enumerate(names))


def parse_notify_socket(value: str) -> str | bytes:
    """The address to send notifications to: a path, or (``@name``) an abstract address as
    ``bytes`` starting with a NUL; raises :class:`SocketActivationError` for anything else."""
    if value.startswith("/") and "\0" not in value:
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    raise SocketActivationError(f"NOTIFY_SOCKET={value!r}: expected an absolute path or an @abstract name")


def parse_watchdog(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when the
    watchdog is off or is another process's; raises :class:`SocketActivationError` for values
    systemd would not set."""
    usec_text = environ.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    watched = environ.get("WATCHDOG_PID")
    if watched is not None and _number(watched, "WATCHDOG_PID") != pid:
        return None
    usec = _number(usec_text, "WATCHDOG_USEC")
    if usec == 0:
        raise SocketActivationError(f"WATCHDOG_USEC={usec_text!r}: expected microseconds greater than 0")
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_STATUS_CHARS else line[: MAX_STATUS_CHARS - 3] + "..."


def notify_message(
    *, ready: bool = False, stopping: bool = False, watchdog: bool = False, status: str | None = None
) -> bytes:
    """One notification datagram: the flags given, then ``STATUS=`` (on one line, cut to
    ``MAX_STATUS_CHARS``: a newline in it would start a new assignment)."""
    lines = []
    if ready:
        lines.append("READY=1")
    if stopping:
        lines.append("STOPPING=1")
    if watchdog:
        lines.append("WATCHDOG=1")
    if status is not None:
        lines.append("STATUS=" + _one_line(status))
    if not lines:
        raise ValueError("a notification needs at least one field")
    return ("\n".join(lines) + "\n").encode()


def status_line(endpoints: list[Endpoint], connections: int) -> str:
    """busd's ``STATUS=`` text: its connections and where it listens (no keys: short)."""
    places = []
    for ep in endpoints:
        if ep.transport == "unix":
            places.append(ep.path or "?")
        else:
            host = ep.host or "?"
            places.append(f"[{host}]:{ep.port}" if ":" in host else f"{host}:{ep.port}")
    count = f"{connections} connection{'' if connections == 1 else 's'}"
    return f"{count}; listening on {', '.join(places)}"


def parse_journal_stream(value: str | None) -> tuple[int, int] | None:
    """``JOURNAL_STREAM`` as (device, inode), or None when absent or malformed."""
    if not value:
        return None
    device, sep, inode = value.partition(":")
    if not sep or not (device.isascii() and device.isdigit() and inode.isascii() and inode.isdigit()):
        return None
    return int(device), int(inode)


def syslog_priority(levelno: int) -> int:
    """The syslog priority (``<N>`` prefix) journald files a log record of ``levelno`` under."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7
