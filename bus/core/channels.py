"""Relayed channels: the routing table and credit accounting of the broker (sans-io).

Theory of operation
-------------------
A relayed channel joins two connections, each of which knows it by its own channel id
(``(conn, channel)`` is a *half*).  Bytes flow in two independent directions; each is a
:class:`Direction` with a bounded buffer and two credit counters:

* ``src_credit`` -- bytes the sender may still send to the broker.  The broker grants it so
  that ``buffered + src_credit + credit_due <= cap`` always holds: whatever the peers do, the
  broker never holds more than ``cap`` bytes per direction.  A sender that sends beyond its
  credit gets the channel reset.
* ``dst_window`` -- bytes the receiver said it can take (its own credit grants).  The broker
  writes no more than that to the receiver.
* ``credit_due`` -- bytes written on to the receiver whose credit the sender has not got back
  yet.  The broker returns it in batches (:meth:`Direction.release_credit`), at least every
  ``cap // 2`` bytes: a sender that keeps a quarter of its credit in hand never waits for a
  batch that does not come.

So credit flows end to end and a slow reader slows its writer instead of filling the
broker.  An end-of-file travels behind the buffered bytes.  Empty data frames carry nothing
and are dropped (passed on, they would read as an end-of-file).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .accounting import Budget, Charge

__all__ = ["Direction", "RelayChannel", "ChannelTable", "CreditExceeded", "DEFAULT_RELAY_CAP"]

DEFAULT_RELAY_CAP = 512 * 1024
#: Pieces smaller than this are joined in the buffer (into a ``bytearray``); bigger ones are
#: kept as the ``bytes`` they came in and handed on as they are, with no copy.  (A piece kept
#: on its own costs an object and a slot in the deque, about 40 bytes, which is under 1% of
#: one this big: what the buffer holds stays within what it accounts for.)
KEEP_WHOLE = 4096


class CreditExceeded(Exception):
    """A sender sent more than its credit: the channel must be reset."""


@dataclass(slots=True)
class Direction:
    cap: int
    #: The bytes held for the receiver, in order: big pieces as they came (``bytes``, handed
    #: on without a copy when they fit), small ones joined (``bytearray``, see KEEP_WHOLE).
    buffer: deque[bytes | bytearray] = field(default_factory=deque)
    buffered: int = 0  # bytes in ``buffer``
    src_credit: int = 0
    dst_window: int = 0
    eof_received: bool = False  # the sender sent EOF (or closed)
    close: bool = False  # ... and it was a full close: the channel ends once this arrives
    eof_sent: bool = False  # the EOF went on to the receiver
    discard: bool = False  # the receiver closed: what is still sent this way is dropped
    credit_due: int = 0  # credit earned by the sender, not yet granted (sent in batches)
    bytes_total: int = 0

    @property
    def credit_batch(self) -> int:
        """Credit goes back to the sender once this much is due."""
        return max(1, self.cap // 2)

    def grant_initial(self) -> int:
        """The credit the sender starts with."""
        self.src_credit = self.cap
        return self.cap

    def push(self, data: bytes | memoryview) -> None:
        if self.discard:
            return  # sent before the sender learned that the receiver closed
        if self.eof_received:
            raise CreditExceeded("data after end-of-file")
        if len(data) > self.src_credit:
            raise CreditExceeded(f"sent {len(data)} bytes with {self.src_credit} bytes of credit")
        n = len(data)
        self.src_credit -= n
        buffer = self.buffer
        if n >= KEEP_WHOLE:
            buffer.append(data if type(data) is bytes else bytes(data))
        elif buffer and type(buffer[-1]) is bytearray and len(buffer[-1]) < KEEP_WHOLE * 16:
            buffer[-1] += data
        else:
            buffer.append(bytearray(data))
        self.buffered += n
        self.bytes_total += n

    def forward(self, n: int) -> bool:
        """The fast path: account for ``n`` bytes of data going straight on to the receiver.

        Only when nothing is buffered ahead of them and both the sender's credit and the
        receiver's window cover them; otherwise returns False and changes nothing (use
        :meth:`push`, which also reports the errors).
        """
        if self.buffer or self.discard or self.eof_received or n > self.src_credit or n > self.dst_window:
            return False
        self.src_credit -= n
        self.dst_window -= n
        self.bytes_total += n
        self.credit_due += n
        return True

    def ready(self) -> int:
        """Bytes that may be written to the receiver now."""
        return min(self.buffered, self.dst_window)

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes for the receiver (their credit becomes due to the sender).

        A piece that fits whole goes out as it came (no copy); one bigger than what may go
        is cut, and pieces smaller than that are joined."""
        n = min(limit, self.buffered, self.dst_window)
        buffer = self.buffer
        first = buffer[0]
        size = len(first)
        if size == n:
            buffer.popleft()
            chunk = first if type(first) is bytes else bytes(first)
        elif size > n:
            chunk = bytes(first[:n])
            if isinstance(first, bytearray):
                del first[:n]  # (O(1): a bytearray moves its start)
            else:
                # The rest, copied once into a bytearray: later cuts of it cost nothing more
                # (cutting a bytes again per take copied the rest each time: a receiver
                # granting a byte at a time made a 512 KiB copy per grant).
                buffer[0] = bytearray(memoryview(first)[n:])
        else:
            pieces = []
            left = n
            while left:
                piece = buffer[0]
                if len(piece) <= left:
                    pieces.append(buffer.popleft())
                    left -= len(piece)
                else:
                    pieces.append(piece[:left])
                    if isinstance(piece, bytearray):
                        del piece[:left]
                    else:
                        buffer[0] = bytearray(memoryview(piece)[left:])  # (as above)
                    left = 0
            chunk = b"".join(pieces)
        self.buffered -= n
        self.dst_window -= n
        self.credit_due += n
        assert self.buffered + self.src_credit + self.credit_due <= self.cap
        return chunk

    def clear(self) -> None:
        """Drop what is buffered (the receiver closed, or the channel is gone)."""
        self.buffer.clear()
        self.buffered = 0

    def release_credit(self) -> int:
        """The credit due, now that it is being sent back (0 if less than a batch is due)."""
        due = self.credit_due
        if due < self.credit_batch:
            return 0
        self.credit_due = 0
        self.src_credit += due
        return due


@dataclass(slots=True)
class RelayChannel:
    id: int
    a: tuple[int, int]  # (connection, channel id on it): the opener
    b: tuple[int, int]  # the target
    protocol: str
    a_to_b: Direction
    b_to_a: Direction
    charges: list[Charge] = field(default_factory=list)
    #: The budget relay space is charged to (the opener's identity), when it grows.
    payer: Budget | None = None

    def other(self, half: tuple[int, int]) -> tuple[int, int]:
        return self.b if half == self.a else self.a

    def outgoing(self, half: tuple[int, int]) -> Direction:
        """The direction in which ``half`` sends."""
        return self.a_to_b if half == self.a else self.b_to_a

    def incoming(self, half: tuple[int, int]) -> Direction:
        """The direction in which ``half`` receives."""
        return self.b_to_a if half == self.a else self.a_to_b


class ChannelTable:
    """Every relayed channel on one broker, indexed by both halves and by connection.

    Quotas are not kept here: each channel holds the :class:`~bus.core.accounting.Charge`
    objects that paid for it (``charges``), released exactly once when it closes."""

    def __init__(self) -> None:
        #: Each channel by both halves (read-only outside this class: the broker's per-frame
        #: lookup, without a method call).
        self.by_half: dict[tuple[int, int], RelayChannel] = {}
        self._by_conn: dict[int, dict[int, RelayChannel]] = {}
        self._next_channel: dict[int, int] = {}
        self._next_id = 1

    def allocate(self, conn: int) -> int:
        """A fresh channel id on a connection (never 0, never reused on that connection)."""
        channel = self._next_channel.get(conn, 1)
        self._next_channel[conn] = channel + 1
        return channel

    def open(
        self,
        a: tuple[int, int],
        b: tuple[int, int],
        protocol: str,
        cap: int = DEFAULT_RELAY_CAP,
        charges: tuple[Charge, ...] = (),
        payer: Budget | None = None,
    ) -> RelayChannel:
        ch = RelayChannel(self._next_id, a, b, protocol, Direction(cap), Direction(cap), list(charges), payer)
        self._next_id += 1
        self.by_half[a] = ch
        self.by_half[b] = ch
        for conn, _ in (a, b):
            self._by_conn.setdefault(conn, {})[ch.id] = ch
        return ch

    def get(self, half: tuple[int, int]) -> RelayChannel | None:
        return self.by_half.get(half)

    def close(self, ch: RelayChannel) -> None:
        """Forget a channel and release what it was charged (idempotent)."""
        for half in (ch.a, ch.b):
            if self.by_half.pop(half, None) is not None:
                mine = self._by_conn.get(half[0])
                if mine is not None:
                    mine.pop(ch.id, None)
                    if not mine:
                        del self._by_conn[half[0]]
        charges, ch.charges = ch.charges, []
        for charge in charges:
            charge.release()
        # What was buffered is freed with the channel.
        ch.a_to_b.clear()
        ch.b_to_a.clear()

    def of_connection(self, conn: int) -> list[RelayChannel]:
        return list(self._by_conn.get(conn, {}).values())

    def forget_connection(self, conn: int) -> list[RelayChannel]:
        """Close every channel of a connection that left; returns them (to reset the peers)."""
        closed = self.of_connection(conn)
        for ch in closed:
            self.close(ch)
        self._next_channel.pop(conn, None)
        return closed

    def __len__(self) -> int:
        return len(self.by_half) // 2
