"""What the broker counts for its operators: the figures behind ``busctl stats`` and ``/metrics``.

Theory of operation
-------------------
Nothing here is on a message's path.  Most figures are read when someone asks (a ``stats``
request, a Prometheus scrape) from state the broker keeps anyway: the connection table,
the name registry, the channel tables, each connection's outbound queue.  The few that
must be counted as they happen are plain integer fields bumped on objects that already
exist at that point:

* per connection, by the io layer: bytes and messages in and out (``ConnectionIo``, read
  through :class:`IoView`); when the connection ends its figures are folded into
  :attr:`BrokerStats.gone` once, so totals never go backwards;
* per broker, in :class:`BrokerStats`: completed handshakes and failed ones by reason,
  refusals by the ``[limits]`` name they cite, slow consumers cut off, and
  :class:`PluginStats` (launches, restarts and failures per installed plugin).

The dictionaries keyed by reason or limit are bounded (:data:`MAX_LABELS`): a label set
that could grow with what peers do would make every scrape larger.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from ..errors import HandshakeError, HandshakeHangup, HandshakeTimeout, IdentityRefused

__all__ = [
    "BrokerStats",
    "ConnectionIo",
    "IoView",
    "NoIo",
    "PluginCounts",
    "PluginStats",
    "MAX_LABELS",
    "HANDSHAKE_FAILURES",
    "limit_of",
]

#: Distinct reasons or limits kept per counter; any later one is counted under ``other``.
MAX_LABELS = 64
#: Why a handshake failed (the ``reason`` label), see docs/operations.md.
HANDSHAKE_FAILURES = ("timeout", "refused", "protocol", "lost", "dropped")
_LIMIT_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def limit_of(message: str) -> str:
    """The ``[limits]`` name a QuotaExceeded message begins with (``other`` if none)."""
    found = _LIMIT_RE.match(message)
    return found.group() if found else "other"


class ConnectionIo(NamedTuple):
    """One connection's traffic as its io layer counts it: frame bytes and frames (after
    box-stream decryption, before encryption), and what waits in its outbound queue."""

    bytes_in: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    messages_out: int = 0
    queued_bytes: int = 0
    queued_messages: int = 0


class IoView(Protocol):
    """What the core asks the io layer when someone wants the figures (never per message)."""

    def connection_io(self, conn_id: int) -> ConnectionIo: ...

    def handshakes_in_progress(self) -> dict[str, int]: ...


class NoIo:
    """The view without an io layer (the sans-io tests): nothing counted, nothing queued."""

    def connection_io(self, conn_id: int) -> ConnectionIo:
        return ConnectionIo()

    def handshakes_in_progress(self) -> dict[str, int]:
        return {}


@dataclass(slots=True)
class PluginCounts:
    """One installed plugin's process history since busd started."""

    #: Every start of its process (the first one and each restart).
    launches: int = 0
    #: Starts made by the restart policy after the process ended (a subset of ``launches``).
    restarts: int = 0
    #: Times the process could not be started, or ended with a non-zero status or a signal
    #: busd did not send.
    failures: int = 0


@dataclass(slots=True)
class PluginStats:
    """Counters the plugin supervisor bumps, per plugin (service file) name.

    Wiring, for the supervisor: ``stats.launched(name)`` when it starts a process (also for a
    restart), ``stats.restarted(name)`` in addition when that start is a restart, and
    ``stats.failed(name)`` when a start fails or a process ends badly.  ``stats.known(name)``
    at load time makes a plugin appear at 0 before anything happened to it.  They show as
    ``minibus_plugin_{launches,restarts,failures}_total{plugin="NAME"}`` and under ``plugins``
    in a ``stats`` reply.  Plugin names come from the operator's service files, so the label
    set is the operator's (still capped at :data:`MAX_LABELS`, then ``other``)."""

    plugins: dict[str, PluginCounts] = field(default_factory=dict)

    def known(self, name: str) -> PluginCounts:
        counts = self.plugins.get(name)
        if counts is None:
            if len(self.plugins) >= MAX_LABELS:
                name = "other"
            counts = self.plugins.setdefault(name, PluginCounts())
        return counts

    def launched(self, name: str) -> None:
        self.known(name).launches += 1

    def restarted(self, name: str) -> None:
        self.known(name).restarts += 1

    def failed(self, name: str) -> None:
        self.known(name).failures += 1


def _bump(counts: dict[str, int], label: str) -> None:
    if label not in counts and len(counts) >= MAX_LABELS:
        label = "other"
    counts[label] = counts.get(label, 0) + 1


@dataclass(slots=True)
class BrokerStats:
    """The broker's own counters (see the module's docstring)."""

    #: When the broker started (its clock: seconds since the Unix epoch).
    started: float = 0.0
    #: Connections admitted after their handshake, by transport (``unix``, ``tcp``).
    admitted: dict[str, int] = field(default_factory=dict)
    #: Handshakes completed (the peer proved its key and was let in by policy).
    handshakes: int = 0
    #: Handshakes that did not complete, by reason (:data:`HANDSHAKE_FAILURES`).
    handshake_failures: dict[str, int] = field(default_factory=dict)
    #: Refusals with ``QuotaExceeded`` (and the pre-auth caps), by the limit's name.
    refusals: dict[str, int] = field(default_factory=dict)
    #: Connections cut because their outbound queue was full.
    slow_consumer_disconnects: int = 0
    #: What connections that ended had counted (their live figures come from the io view).
    gone: ConnectionIo = ConnectionIo()
    plugins: PluginStats = field(default_factory=PluginStats)

    def handshake_failed(self, reason: str) -> None:
        _bump(self.handshake_failures, reason)

    def handshake_error(self, exc: HandshakeError) -> None:
        """Count a handshake that failed with ``exc``, under the reason its class says."""
        if isinstance(exc, HandshakeTimeout):
            reason = "timeout"
        elif isinstance(exc, IdentityRefused):
            reason = "refused"
        elif isinstance(exc, HandshakeHangup):
            reason = "lost"
        else:
            reason = "protocol"  # bytes that are no shs1 for this broker (another key, garbage)
        self.handshake_failed(reason)

    def refused(self, message: str) -> None:
        """Count a refusal; ``message`` begins with the limit's name (as QuotaExceeded's does)."""
        _bump(self.refusals, limit_of(message))

    def connection_ended(self, io: ConnectionIo) -> None:
        """Fold an ended connection's traffic into the totals (once per connection)."""
        gone = self.gone
        self.gone = ConnectionIo(
            gone.bytes_in + io.bytes_in,
            gone.bytes_out + io.bytes_out,
            gone.messages_in + io.messages_in,
            gone.messages_out + io.messages_out,
        )
