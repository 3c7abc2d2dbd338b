"""Relayed channels: the routing table and credit accounting of the broker (sans-io).

Theory of operation
-------------------
A relayed channel joins two connections, each of which knows it by its own channel id
(``(conn, channel)`` is a *half*).  Bytes flow in two independent directions; each is a
:class:`Direction` with a bounded buffer and two credit counters:

* ``src_credit`` -- bytes the sender may still send to the broker.  The broker grants it so
  that ``buffered + src_credit <= cap`` always holds: whatever the peers do, the broker never
  holds more than ``cap`` bytes per direction.  A sender that sends beyond its credit gets
  the channel reset.
* ``dst_window`` -- bytes the receiver said it can take (its own credit grants).  The broker
  writes no more than that to the receiver.

As the broker writes buffered bytes to the receiver, it returns the same amount of credit to
the sender, so credit flows end to end and a slow reader slows its writer instead of
filling the broker.  An end-of-file travels behind the buffered bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import QuotaExceeded

__all__ = ["Direction", "RelayChannel", "ChannelTable", "CreditExceeded", "DEFAULT_RELAY_CAP"]

DEFAULT_RELAY_CAP = 512 * 1024


class CreditExceeded(Exception):
    """A sender sent more than its credit: the channel must be reset."""


@dataclass(slots=True)
class Direction:
    cap: int
    buffer: bytearray = field(default_factory=bytearray)
    src_credit: int = 0
    dst_window: int = 0
    eof_received: bool = False  # the sender sent EOF (or closed)
    close: bool = False  # ... and it was a full close: the channel ends once this arrives
    eof_sent: bool = False  # the EOF went on to the receiver
    discard: bool = False  # the receiver closed: what is still sent this way is dropped
    credit_due: int = 0  # credit earned by the sender, not yet granted (sent in batches)
    bytes_total: int = 0

    def grant_initial(self) -> int:
        """The credit the sender starts with."""
        self.src_credit = self.cap
        return self.cap

    def push(self, data: bytes) -> None:
        if self.discard:
            return  # sent before the sender learned that the receiver closed
        if self.eof_received:
            raise CreditExceeded("data after end-of-file")
        if len(data) > self.src_credit:
            raise CreditExceeded(f"sent {len(data)} bytes with {self.src_credit} bytes of credit")
        self.src_credit -= len(data)
        self.buffer += data
        self.bytes_total += len(data)

    def forward(self, data: bytes) -> bool:
        """The fast path: account for ``data`` going straight on to the receiver.

        Only when nothing is buffered ahead of it and both the sender's credit and the
        receiver's window cover it; otherwise returns False and changes nothing (use
        :meth:`push`, which also reports the errors).
        """
        n = len(data)
        if self.buffer or self.discard or self.eof_received or n > self.src_credit or n > self.dst_window:
            return False
        self.dst_window -= n
        self.bytes_total += n
        self.credit_due += n
        return True

    def ready(self) -> int:
        """Bytes that may be written to the receiver now."""
        return min(len(self.buffer), self.dst_window)

    def take(self, limit: int) -> tuple[bytes, int]:
        """Up to ``limit`` bytes for the receiver, and the credit to return to the sender."""
        n = min(limit, self.ready())
        chunk = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.dst_window -= n
        self.src_credit += n
        assert len(self.buffer) + self.src_credit <= self.cap
        return chunk, n


@dataclass(slots=True)
class RelayChannel:
    id: int
    a: tuple[int, int]  # (connection, channel id on it): the opener
    b: tuple[int, int]  # the target
    protocol: str
    a_to_b: Direction
    b_to_a: Direction

    def other(self, half: tuple[int, int]) -> tuple[int, int]:
        return self.b if half == self.a else self.a

    def outgoing(self, half: tuple[int, int]) -> Direction:
        """The direction in which ``half`` sends."""
        return self.a_to_b if half == self.a else self.b_to_a

    def incoming(self, half: tuple[int, int]) -> Direction:
        """The direction in which ``half`` receives."""
        return self.b_to_a if half == self.a else self.a_to_b


class ChannelTable:
    """Every relayed channel on one broker, indexed by both halves."""

    def __init__(self, *, cap: int = DEFAULT_RELAY_CAP, channels_per_connection: int = 256) -> None:
        self.cap = cap
        self.channels_per_connection = channels_per_connection
        self._by_half: dict[tuple[int, int], RelayChannel] = {}
        self._next_channel: dict[int, int] = {}
        self._count: dict[int, int] = {}
        self._next_id = 1

    def check_quota(self, conn: int) -> None:
        if self._count.get(conn, 0) >= self.channels_per_connection:
            raise QuotaExceeded(f"connection :{conn} already has {self.channels_per_connection} channels open")

    def allocate(self, conn: int) -> int:
        """A fresh channel id on a connection (never 0, never reused on that connection)."""
        channel = self._next_channel.get(conn, 1)
        self._next_channel[conn] = channel + 1
        return channel

    def open(self, a: tuple[int, int], b: tuple[int, int], protocol: str) -> RelayChannel:
        for conn, _ in (a, b):
            self.check_quota(conn)
        ch = RelayChannel(self._next_id, a, b, protocol, Direction(self.cap), Direction(self.cap))
        self._next_id += 1
        self._by_half[a] = ch
        self._by_half[b] = ch
        for conn, _ in (a, b):
            self._count[conn] = self._count.get(conn, 0) + 1
        return ch

    def get(self, half: tuple[int, int]) -> RelayChannel | None:
        return self._by_half.get(half)

    def close(self, ch: RelayChannel) -> None:
        for half in (ch.a, ch.b):
            if self._by_half.pop(half, None) is not None:
                self._count[half[0]] -= 1
                if not self._count[half[0]]:
                    del self._count[half[0]]

    def of_connection(self, conn: int) -> list[RelayChannel]:
        seen: dict[int, RelayChannel] = {}
        for (c, _), ch in self._by_half.items():
            if c == conn:
                seen[ch.id] = ch
        return list(seen.values())

    def forget_connection(self, conn: int) -> list[RelayChannel]:
        """Close every channel of a connection that left; returns them (to reset the peers)."""
        closed = self.of_connection(conn)
        for ch in closed:
            self.close(ch)
        self._next_channel.pop(conn, None)
        return closed

    def __len__(self) -> int:
        return len(self._by_half) // 2
