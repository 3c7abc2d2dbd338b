"""systemd at busd's edges: the listening sockets it passes, and the notifications it reads.

Theory of operation
-------------------
The rules live in :mod:`bus.wire.systemd` (sans-io); this module does the system calls.

:func:`adopt_listen_fds` reads ``LISTEN_*`` once, at start, removes the variables from the
environment (processes busd starts must not take busd's descriptors for theirs), and turns
each descriptor into a socket: it must be a listening stream socket, on a Unix path or on
TCP (IPv4 or IPv6); which of the two is read from the socket itself, never from its name.
A name of ``unix`` or ``tcp`` (``FileDescriptorName=``) is checked against the socket; any
other name is only shown in the log.  Each adopted descriptor is marked close-on-exec.
Anything unusable is an :class:`~bus.errors.SocketActivationError` naming the descriptor.

:class:`SystemdNotifier` sends ``sd_notify`` datagrams from a Unix datagram socket of its
own, connected to ``NOTIFY_SOCKET`` on first use (so a full receiver makes the send wait,
for at most ``NOTIFY_TIMEOUT``, instead of failing at once).  Notifying is advisory: no
failure ever stops busd.  The first failure is logged as a warning, later ones at debug
level until a notification gets through again; a notification that cannot be sent is
dropped (the next status or watchdog ping replaces it).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import sys
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import TextIO

import trio

from ..errors import SocketActivationError
from ..wire.address import Endpoint
from ..wire.identity import PublicKey
from ..wire.systemd import (
    LISTEN_VARIABLES,
    WATCHDOG_VARIABLES,
    ListenFd,
    notify_message,
    parse_journal_stream,
    parse_listen_fds,
    parse_notify_socket,
    parse_watchdog,
    syslog_priority,
)

__all__ = ["InheritedListener", "adopt_listen_fds", "SystemdNotifier", "use_journal_priorities"]

log = logging.getLogger("minibus.systemd")

#: Seconds a notification may wait for room in systemd's socket before it is dropped.
NOTIFY_TIMEOUT = 1.0
#: How often the status line is refreshed (sent only when it changed).
STATUS_INTERVAL = 1.0


@dataclass
class InheritedListener:
    """A listening socket systemd passed, ready for the broker to accept on."""

    sock: socket.socket
    kind: str  # "unix" or "tcp"
    name: str  # from LISTEN_FDNAMES
    path: str | None = None
    host: str | None = None
    port: int | None = None

    def endpoint(self, key: PublicKey, *, encrypt_unix: bool = False) -> Endpoint:
        """The address alternative clients reach this socket by."""
        if self.kind == "unix":
            return Endpoint("unix", key, path=self.path, encrypted=encrypt_unix)
        return Endpoint("tcp", key, host=self.host, port=self.port)

    def __str__(self) -> str:
        where = self.path if self.kind == "unix" else f"{self.host}:{self.port}"
        return f"descriptor {self.sock.fileno()} ({self.name}): {self.kind} {where}"


def _adopt(item: ListenFd) -> InheritedListener:
    where = f"socket activation: descriptor {item.fd} ({item.name})"
    try:
        mode = os.fstat(item.fd).st_mode
    except OSError as exc:
        raise SocketActivationError(f"{where}: {exc.strerror} (LISTEN_FDS names more descriptors than were passed)") from None
    if not stat.S_ISSOCK(mode):
        raise SocketActivationError(f"{where}: not a socket")
    sock = socket.socket(fileno=item.fd)
    try:
        sock.set_inheritable(False)  # FD_CLOEXEC: not passed on to processes busd starts
        if sock.type != socket.SOCK_STREAM:
            raise SocketActivationError(f"{where}: not a stream socket (use ListenStream=)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise SocketActivationError(f"{where}: not a listening socket (busd needs Accept=no)")
        listener = InheritedListener(sock, "", item.name)
        if sock.family == socket.AF_UNIX:
            path = sock.getsockname()
            if not isinstance(path, str) or not path.startswith("/"):
                raise SocketActivationError(f"{where}: an abstract or unnamed Unix socket; busd needs a path (clients connect by path)")
            listener.kind, listener.path = "unix", path
        elif sock.family in (socket.AF_INET, socket.AF_INET6):
            host, port = sock.getsockname()[:2]
            listener.kind, listener.host, listener.port = "tcp", host, port
        else:
            raise SocketActivationError(f"{where}: address family {sock.family!r} is neither Unix nor TCP")
        if item.name in ("unix", "tcp") and item.name != listener.kind:
            raise SocketActivationError(f"{where}: named {item.name!r} but it is a {listener.kind} socket")
        return listener
    except BaseException:
        sock.close()
        raise


def adopt_listen_fds(environ: MutableMapping[str, str] | None = None) -> list[InheritedListener]:
    """The listening sockets systemd passed to this process (none when it passed none, or
    when ``LISTEN_PID`` is another process's), with the ``LISTEN_*`` variables removed from
    ``environ`` (``os.environ`` by default) whatever the outcome."""
    env = os.environ if environ is None else environ
    try:
        plan = parse_listen_fds(env, os.getpid())
    finally:
        for variable in LISTEN_VARIABLES:
            env.pop(variable, None)
    adopted: list[InheritedListener] = []
    try:
        for item in plan:
            adopted.append(_adopt(item))
    except BaseException:
        for listener in adopted:
            listener.sock.close()
        raise
    return adopted


class SystemdNotifier:
    """Tells the service manager how busd is doing (``sd_notify``); does nothing when busd
    was not started with ``NOTIFY_SOCKET``."""

    def __init__(self, address: str | bytes | None = None, watchdog_interval: float | None = None) -> None:
        self.address = address
        #: Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None.
        self.watchdog_interval = watchdog_interval if address is not None else None
        self._sock: socket.socket | None = None
        self._failing = False
        self._stopping = False
        self._ready_owed = False  # READY=1 was asked for and not sent yet

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> SystemdNotifier:
        """A notifier for ``NOTIFY_SOCKET`` and ``WATCHDOG_*`` in ``environ`` (``os.environ``
        by default), which loses these variables.  Unusable values are logged, never fatal."""
        env = os.environ if environ is None else environ
        address: str | bytes | None = None
        interval: float | None = None
        try:
            text = env.get("NOTIFY_SOCKET")
            if text:
                try:
                    address = parse_notify_socket(text)
                except SocketActivationError as exc:
                    log.warning("%s: not notifying systemd", exc)
            try:
                interval = parse_watchdog(env, os.getpid())
            except SocketActivationError as exc:
                log.warning("%s: no watchdog pings", exc)
        finally:
            for variable in WATCHDOG_VARIABLES:
                env.pop(variable, None)
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def notify(
        self, *, ready: bool = False, stopping: bool = False, watchdog: bool = False, status: str | None = None
    ) -> bool:
        """Send one notification; True when it was sent (never raises for a failed send)."""
        if self.address is None:
            return False
        ready = ready or self._ready_owed  # a READY=1 that did not get through goes again
        data = notify_message(ready=ready, stopping=stopping, watchdog=watchdog, status=status)
        self._ready_owed = ready
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                try:
                    sock.setblocking(False)
                    sock.connect(self.address)  # a Unix datagram connect never waits
                except BaseException:
                    sock.close()
                    raise
                self._sock = sock
            with trio.move_on_after(NOTIFY_TIMEOUT):
                while True:
                    try:
                        self._sock.send(data)
                        break
                    except BlockingIOError:  # the manager's queue is full: wait for room
                        await trio.lowlevel.wait_writable(self._sock)
                self._sent()
                self._ready_owed = False
                return True
            self._failed(f"NOTIFY_SOCKET stayed full for {NOTIFY_TIMEOUT:g} s")
        except OSError as exc:
            self.close()  # connect again next time (the manager may have come back)
            self._failed(f"cannot send to NOTIFY_SOCKET={self._shown()}: {exc.strerror or exc}")
        return False

    def _shown(self) -> str:
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode(errors="replace")
        return str(self.address)

    def _failed(self, why: str) -> None:
        if self._failing:
            log.debug("systemd notification dropped: %s", why)
        else:
            log.warning("systemd notification dropped: %s (further failures are logged at debug level)", why)
        self._failing = True

    def _sent(self) -> None:
        if self._failing:
            log.info("systemd notifications get through again")
        self._failing = False

    async def stopping(self, status: str = "shutting down") -> None:
        """``STOPPING=1``; the status line is no longer refreshed after it."""
        self._stopping = True
        await self.notify(stopping=True, status=status)

    async def keep_informed(self, status: Callable[[], str]) -> None:
        """Ping the watchdog every ``watchdog_interval`` and send ``status()`` whenever it
        changes (looked at every ``STATUS_INTERVAL``), until cancelled.  The pings come from
        busd's event loop, so a loop that stalls stops them and systemd notices."""
        if self.address is None:
            return
        last_status: str | None = None
        next_ping = trio.current_time()
        while True:
            now = trio.current_time()
            ping = self.watchdog_interval is not None and now >= next_ping
            text = None if self._stopping else status()
            changed = text is not None and text != last_status
            if ping or changed or (self._ready_owed and not self._stopping):
                await self.notify(watchdog=ping, status=text if changed else None)
                last_status = text if changed else last_status
            if ping and self.watchdog_interval is not None:
                next_ping = now + self.watchdog_interval
            wake = now + STATUS_INTERVAL
            if self.watchdog_interval is not None:
                wake = min(wake, next_ping)
            await trio.sleep_until(wake)

    def close(self) -> None:
        """Close the notification socket (not while a notification is being sent)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class _JournalFormatter(logging.Formatter):
    """Each line prefixed with its record's syslog priority, ``<N>``, which journald reads."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def use_journal_priorities(
    logger: logging.Logger, environ: MutableMapping[str, str] | None = None, stream: TextIO | None = None
) -> bool:
    """When ``stream`` (stderr) is the journal stream systemd set up (``JOURNAL_STREAM``),
    give ``logger``'s handlers a format journald files by priority, without the timestamp
    journald adds anyway; True when it did."""
    env = os.environ if environ is None else environ
    ids = parse_journal_stream(env.get("JOURNAL_STREAM"))
    if ids is None:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    if (st.st_dev, st.st_ino) != ids:
        return False  # stderr was redirected elsewhere since
    for handler in logger.handlers:
        handler.setFormatter(_JournalFormatter("%(levelname)s %(message)s"))
    return True
