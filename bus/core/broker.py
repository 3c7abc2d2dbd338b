"""The broker's decisions: connections, names, queries and watches (sans-io).

Theory of operation
-------------------
:class:`BrokerCore` is the whole control plane of the broker as a state machine.  The trio
layer (``bus.broker``) authenticates a connection, then calls :meth:`BrokerCore.connect`,
feeds every decoded control message to :meth:`BrokerCore.receive`, and calls
:meth:`BrokerCore.disconnect` exactly once when the connection ends.  Each call returns the
messages to send, as ``(connection id, message)`` pairs, in the order they must be sent.

Because one call produces a watch's snapshot *and* registers the watch, and every later
change is emitted by a later call, a watcher sees the snapshot and then every change, with
no gap and no duplicate, as long as each connection's messages are sent in order (the trio
layer keeps one ordered queue per connection).

The broker stamps everything: identities, unique ids and names in replies and events come
from this table, never from what a client claims.  Arguments a request does not define are
ignored, so a client that sends ``identity`` or ``unique_id`` in its hello changes nothing.
"""

from __future__ import annotations

import bisect
import os
import re
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import cbor2

from ..errors import (
    AccessDenied,
    ActivationFailed,
    BadRequest,
    ChannelRejected,
    NameNotFound,
    QuotaExceeded,
    RequestError,
    UnknownOperation,
)
from ..wire.frames import MAX_CBOR_DEPTH
from ..wire.identity import PublicKey
from ..wire.messages import ErrorReply, Event, MalformedRequest, Reply, Request, parse_message
from .accounting import Budget, Charge
from .activation import HeldRequest, ServiceAction, ServiceTable
from .channels import ChannelTable, Direction, RelayChannel
from .glob import GlobError, GlobSet, compile_glob
from .names import NameFlag, NameRegistry, OwnerChanged, validate_name
from .policy import Policy
from .services import ServiceSpec
from .stats import BrokerStats, ConnectionIo, IoView, NoIo

__all__ = [
    "Limits",
    "Connection",
    "BrokerCore",
    "Outgoing",
    "ChannelMessage",
    "WithFd",
    "DropFd",
    "FLAG_NAMES",
    "PendingOpen",
    "CHANNEL_PROTOCOL_RE",
    "bound_text",
    "RELAY_MIN_CREDIT",
]

#: Protocol labels: short, printable, no spaces (like an SSH subsystem name).
CHANNEL_PROTOCOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
#: A host a target gives for the tcp route: a DNS name or an IP literal, nothing else.
_HOST_RE = re.compile(r"[A-Za-z0-9._:%\[\]-]{1,255}\Z")
#: A relayed channel starts with this much credit per direction (less if ``relay_credit``
#: is smaller) and is refused when its opener's identity cannot pay for that; the cap then
#: doubles, up to ``relay_credit``, each time the receiver has taken half of it, as long as
#: the identity's ``relay_bytes_per_identity`` has room (like a TCP window opening up).
RELAY_MIN_CREDIT = 64 * 1024
#: Late acceptances remembered per target after their opener gave up (oldest forgotten first).
_TOMBSTONES_PER_TARGET = 64
#: Policy answers to "may this key see this name" remembered at most (see BrokerCore._sees).
_ROUTE_MEMO = 1024  # kinds of event (source, member) whose receivers are remembered
_ROUTE_ENTRIES = 1 << 16  # ... and receivers listed for them all together, at most
_SEE_MEMO = 8192
#: Names one snapshot page looks at, at most (bounds the matching work of one page).
_NAMES_PER_PAGE = 256
#: Bytes a name event takes beyond its owner entry (an upper bound).
_EVENT_OVERHEAD = 512
#: An event's member: an identifier, like a D-Bus signal name.
_MEMBER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")


def bound_text(value: object, limit: int) -> str:
    """A reason or message from a peer, cut to ``limit`` characters where it enters.

    Anything but a string becomes ``"(no reason given)"``: a peer's structure is never
    turned into text (its ``repr`` could be as large and as slow as the peer likes)."""
    if not isinstance(value, str):
        return "(no reason given)"
    if len(value) <= limit:
        return value
    return value[: max(0, limit - 1)] + "\u2026"


def _depth(value: object, limit: int) -> int:
    """Nesting depth of a plain CBOR value (1 for a scalar), counting no further than ``limit + 1``."""
    stack: list[tuple[object, int]] = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    return deepest


#: How deep an event's payload may nest (a scalar is 1).
EVENT_DEPTH = 16


def _payload_size(payload: object) -> int:
    """An event payload's encoded size in bytes (at most 8 over, for text and bytes, which are
    not encoded again); raises :class:`QuotaExceeded` when it nests deeper than EVENT_DEPTH."""
    kind = type(payload)
    if kind is bytes:
        return len(payload) + 9  # type: ignore[arg-type]
    if kind is str:
        return len(payload.encode("utf-8", "surrogatepass")) + 9  # type: ignore[attr-defined]
    if _depth(payload, EVENT_DEPTH) > EVENT_DEPTH:
        raise QuotaExceeded(f"event_bytes: the payload is nested deeper than {EVENT_DEPTH} levels")
    return len(cbor2.dumps(payload))


@dataclass(slots=True)
class PendingOpen:
    opener: int
    opener_request: int
    target: int
    target_request: int
    protocol: str
    encrypted: bool
    a: tuple[int, int]  # (opener, its channel id)
    b: tuple[int, int]  # (target, its channel id)
    route: str = "relay"
    token: bytes = b""
    #: Paid by the opener while the target decides: its pending slots and the target's.
    pending_charge: Charge = field(default_factory=Charge)
    #: Paid by the opener for the channel itself; moves to the channel once it is open.
    channel_charge: Charge = field(default_factory=Charge)
    #: Relay buffer space for both directions, from the opener's identity (relay route).
    relay_charge: Charge = field(default_factory=Charge)
    relay_cap: int = 0

    def release(self) -> None:
        for charge in (self.pending_charge, self.channel_charge, self.relay_charge):
            charge.release()

@dataclass(slots=True)
class DirectChannel:
    """A channel whose bytes bypass the broker (unix-fd or tcp), as its ends report it.

    The broker only negotiated it; each end reports its byte counts with
    ``channel_report`` (about once a second while they change, and when it closes), and the
    record goes when both ends have reported it closed, or either leaves the bus."""

    a: tuple[int, int]  # (opener, its channel id)
    b: tuple[int, int]  # (target, its channel id)
    protocol: str
    route: str
    counts: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # half -> (in, out)
    charge: Charge = field(default_factory=Charge)
    #: The ends that reported it closed: the record (and what it was charged) goes when both
    #: have, or when either leaves the bus (one end's word cannot free the other's budget).
    closed: set[tuple[int, int]] = field(default_factory=set)


class ChannelMessage(NamedTuple):
    """A CONTROL frame on a channel (not channel 0): credit, eof, close or reset."""

    conn: int
    channel: int
    body: dict[str, Any]


class WithFd(NamedTuple):
    """A control message that carries one end of a socketpair (the unix-fd route).

    ``create``: the io layer makes the pair, attaches one end here, keeps the other under
    ``key``; otherwise it attaches the end kept under ``key``."""

    conn: int
    message: dict[str, Any]
    key: tuple[int, int]
    create: bool


class DropFd(NamedTuple):
    """The socket end kept under ``key`` is not needed any more: close it."""

    key: tuple[int, int]


class FanOut(NamedTuple):
    """One message for several connections (an event): the io layer encodes it once.

    ``payer`` is the emitter's identity: the bytes it occupies in each receiver's queue count
    against that identity's share of the queue (see :attr:`BrokerCore.room_for_event`)."""

    conns: list[int]  # (read only: it may be the route's own list)
    message: dict[str, Any]
    payer: str


class _Route(NamedTuple):
    """Who gets one kind of event: the subscribing connections, and for each (at the same
    index) its subscriptions that match; ``named``: its source is a well-known name (a
    subscriber must be allowed to see it), not the emitter's unique id.  Never changed once
    made (a FanOut may hold its ``conns``): a subscription coming or going makes a new one."""

    conns: list[int]
    matching: list[list[Subscription]]
    named: bool

    def with_subscriptions(self, i: int, subs: list[Subscription]) -> _Route:
        """This route with ``subs`` as its ``i``-th connection's subscriptions (without that
        connection if there are none): a new route, its ``conns`` this one's while it keeps
        them all."""
        if subs:
            matching = self.matching.copy()
            matching[i] = subs
            return _Route(self.conns, matching, self.named)
        return _Route(self.conns[:i] + self.conns[i + 1 :], self.matching[:i] + self.matching[i + 1 :], self.named)


Outgoing = tuple[int, dict[str, Any]] | ChannelMessage | WithFd | DropFd | FanOut | ServiceAction


def flatten(out: list[Outgoing]) -> list[Outgoing]:
    """``out`` with each :class:`FanOut` spelled out as one ``(conn, message)`` per receiver."""
    flat: list[Outgoing] = []
    for item in out:
        if isinstance(item, FanOut):
            flat.extend((conn, item.message) for conn in item.conns)
        else:
            flat.append(item)
    return flat

_new_tuple = tuple.__new__
_DEFERRED = object()
_QUIET = object()  # a request answered by nothing (a quiet emit that was done)

FLAG_NAMES = {
    "allow-replacement": NameFlag.ALLOW_REPLACEMENT,
    "replace-existing": NameFlag.REPLACE_EXISTING,
    "do-not-queue": NameFlag.DO_NOT_QUEUE,
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-broker limits; every one is configurable in ``[limits]`` (see docs/broker.md).

    ``*_per_connection`` and ``*_per_identity`` budgets are paid by whoever asks;
    ``*_per_target`` budgets belong to a target but are spent by its openers, each of
    which may hold at most a fair share of what is left (see :mod:`bus.core.accounting`)."""

    connections_per_identity: int = 64
    names_per_connection: int = 64
    names_per_identity: int = 512
    watches_per_connection: int = 32
    watches_per_identity: int = 256
    patterns_per_watch: int = 32
    pattern_length: int = 255
    #: Characters of all the patterns of one watch together (bounds matching CPU per change).
    pattern_chars_per_watch: int = 1024
    #: Watches with a *complex* pattern (``?`` or a set between two stars), whose matching
    #: costs a pass of Python code over each name rather than a string search.
    complex_watches_per_connection: int = 4
    complex_watches_per_identity: int = 16
    info_bytes: int = 16 * 1024
    #: Nesting depth of a plugin's ``info.metadata`` (so every message repeating it stays
    #: well inside the CBOR profile's depth limit).
    info_depth: int = 8
    #: Lists and snapshots are cut into messages of about this many bytes (well under the
    #: 64 KiB control-frame limit; one entry is at most ``info_bytes`` plus ~300 bytes).
    reply_bytes: int = 40 * 1024
    #: The largest control message the broker builds (an ``info`` reply is paged to fit).
    message_bytes: int = 60 * 1024
    #: Reasons and host names from peers are cut to this many characters where they enter.
    reason_chars: int = 256
    #: Channels a connection opens (relayed and direct, pending ones included).
    channels_per_connection: int = 256
    channels_per_identity: int = 1024
    #: Channels a connection may be the target of, shared fairly among its openers.
    channels_per_target: int = 1024
    #: Channel openings waiting for a target's answer.
    pending_opens_per_connection: int = 32
    pending_opens_per_identity: int = 64
    pending_opens_per_target: int = 64
    #: Event subscriptions (``subscribe``), paid by the subscriber.
    subscriptions_per_connection: int = 32
    subscriptions_per_identity: int = 256
    #: An event's payload, as CBOR (it is repeated to every subscriber that matches).
    event_bytes: int = 32 * 1024
    #: Bytes the broker holds at most per relayed channel and direction.
    relay_credit: int = 512 * 1024
    #: Relay buffer space (both directions of every relayed channel it opened) per identity.
    relay_bytes_per_identity: int = 32 * 1024 * 1024


@dataclass(slots=True)
class Watch:
    id: int
    globs: GlobSet
    charge: Charge
    #: While a snapshot is being sent: the last name sent (changes to names after it are left
    #: to the pages still to come); None once the watch is live.
    cursor: str | None = None
    #: Changes were not sent (the watcher's queue was full): a resync is owed.
    resync: bool = False

    def matches(self, name: str) -> bool:
        return self.globs.match(name)


@dataclass(slots=True)
class Subscription:
    """Events a connection asked for: source and member patterns (as watches have)."""

    id: int
    source: GlobSet
    member: GlobSet
    charge: Charge
    #: Events that matched but could not be queued (no room): announced by a ``gap`` event
    #: before the next one this connection gets, or as soon as it has room.
    missed: int = 0

    def matches(self, source: str, member: str) -> bool:
        return self.member.match(member) and self.source.match(source)


class _LazyBudget:
    """A :class:`~bus.core.accounting.Budget` made when first used: most connections (and
    identities) never take from most of theirs, and a connect that makes none is cheaper.
    Its owner text is the holder's ``budget_owner``, its size the holder's ``limits``' setting
    of the same name; it lives in the holder's slot named ``_`` + the attribute's name."""

    __slots__ = ("limit_name", "slot")

    def __init__(self, limit_name: str) -> None:
        self.limit_name = limit_name
        self.slot = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, holder: Any, kind: type | None = None) -> Budget:
        budget: Budget | None = getattr(holder, self.slot)
        if budget is None:
            budget = Budget(self.limit_name, holder.budget_owner, getattr(holder.limits, self.limit_name))
            setattr(holder, self.slot, budget)
        return budget


@dataclass(slots=True)
class Account:
    """What one identity holds across all its connections (its budgets made when first used)."""

    key: str
    limits: Limits
    connections: set[int] = field(default_factory=set)
    _watches: Budget | None = field(default=None, repr=False)
    _complex_watches: Budget | None = field(default=None, repr=False)
    _subscriptions: Budget | None = field(default=None, repr=False)
    _channels: Budget | None = field(default=None, repr=False)
    _pending: Budget | None = field(default=None, repr=False)
    _relay: Budget | None = field(default=None, repr=False)

    watches = _LazyBudget("watches_per_identity")
    complex_watches = _LazyBudget("complex_watches_per_identity")
    subscriptions = _LazyBudget("subscriptions_per_identity")
    channels = _LazyBudget("channels_per_identity")
    pending = _LazyBudget("pending_opens_per_identity")
    relay = _LazyBudget("relay_bytes_per_identity")

    @classmethod
    def new(cls, key: str, limits: Limits) -> Account:
        return cls(key, limits)

    @property
    def budget_owner(self) -> str:
        return self.key


@dataclass(slots=True)
class Connection:
    id: int
    key: PublicKey
    transport: str
    pid: int | None
    uid: int | None
    connected_since: float
    admin: bool
    account: Account
    limits: Limits
    registered: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    watches: dict[int, Watch] = field(default_factory=dict)
    next_watch: int = 1
    subscriptions: dict[int, Subscription] = field(default_factory=dict)
    next_subscription: int = 1
    gaps_owed: bool = False  # a subscription of it missed events: ``gap`` events are owed
    next_request: int = 1  # ids of the broker's own requests to this connection
    # Its budgets (made when first used, see _LazyBudget).
    _watch_budget: Budget | None = field(default=None, init=False, repr=False)
    _complex_watch_budget: Budget | None = field(default=None, init=False, repr=False)
    _subscription_budget: Budget | None = field(default=None, init=False, repr=False)
    _channel_budget: Budget | None = field(default=None, init=False, repr=False)
    _pending_budget: Budget | None = field(default=None, init=False, repr=False)
    _target_budget: Budget | None = field(default=None, init=False, repr=False)
    _incoming_budget: Budget | None = field(default=None, init=False, repr=False)
    # Openings to it whose opener gave up (made when first needed: most never have one).
    tombstones: deque[tuple[int, int]] | None = None
    _unique_id: str = field(init=False, repr=False)

    watch_budget = _LazyBudget("watches_per_connection")
    complex_watch_budget = _LazyBudget("complex_watches_per_connection")
    subscription_budget = _LazyBudget("subscriptions_per_connection")
    channel_budget = _LazyBudget("channels_per_connection")  # channels it opens
    pending_budget = _LazyBudget("pending_opens_per_connection")  # openings it waits for
    target_budget = _LazyBudget("channels_per_target")  # channels others open to it (shared)
    incoming_budget = _LazyBudget("pending_opens_per_target")  # openings to it awaiting its answer (shared)

    def __post_init__(self) -> None:
        self._unique_id = f":{self.id}"

    @property
    def budget_owner(self) -> str:
        return self._unique_id

    @property
    def unique_id(self) -> str:
        return self._unique_id


def parse_unique_id(text: str) -> int | None:
    digits = text[1:]
    if text.startswith(":") and digits.isascii() and digits.isdigit() and len(digits) <= 18:
        return int(digits)
    return None


class BrokerCore:
    def __init__(self, policy: Policy, limits: Limits | None = None, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.limits = limits or Limits()
        self._clock = clock
        self.names = NameRegistry(max_names_per_connection=self.limits.names_per_connection)
        self.connections: dict[int, Connection] = {}
        self._next_id = 1
        self.accounts: dict[str, Account] = {}
        self.channels = ChannelTable()
        # Channel openings waiting for the target's answer, by (target conn, request id),
        # and the keys of those each connection takes part in (as opener or target).
        self.pending_opens: dict[tuple[int, int], PendingOpen] = {}
        self._pending_by_conn: dict[int, set[tuple[int, int]]] = {}
        # Channels negotiated for a direct route, by both halves, and the halves per connection.
        self.direct: dict[tuple[int, int], DirectChannel] = {}
        self._direct_by_conn: dict[int, set[tuple[int, int]]] = {}
        # Connections with at least one watch (the only ones a name change is checked for),
        # and with at least one event subscription (the only ones an event is checked for).
        self._watchers: set[int] = set()
        self._subscribers: set[int] = set()
        #: Connections whose watches have snapshot pages or a resync to send: the io layer
        #: calls :meth:`pump_watches` for them while they have room.
        self.pumping: set[int] = set()
        #: Those that joined :attr:`pumping` since the io layer last took this set: it looks
        #: at these after handling a message, and at the others only when their queue drains
        #: (so connections stuck with nothing taken cost no one else's messages anything).
        self.pumping_fresh: set[int] = set()
        #: How many bytes a connection's outbound queue may still take of traffic it did not
        #: ask for (watch changes, channel requests): 0 or less is none.  The io layer sets
        #: this; without one, always plenty.
        self.room_for: Callable[[int], int] = lambda conn_id: 1 << 30
        #: How many bytes of events from one identity a connection's queue may still take:
        #: ``room_for`` and that identity's fair share of the room (each identity with events
        #: queued there, and one more, get equal shares; see docs/events.md).  The io layer
        #: sets this; without one, ``room_for``.
        self.room_for_event: Callable[[int, str], int] = lambda conn_id, payer: self.room_for(conn_id)
        #: Of the connections ``conn_ids``, those with less than ``needed`` bytes of
        #: ``room_for_event`` for ``payer`` (in any order; mostly none): asked once per emit,
        #: so the io layer can answer for every receiver in one call.  Without one, each is
        #: asked of ``room_for_event``.
        self.short_of_room: Callable[[list[int], str, int], Collection[int]] = self._short_of_room
        #: Connections with ``gaps_owed`` (an emit none of whose receivers is here, and each
        #: of which has room, takes its route as it is).
        self._owing_gaps: set[int] = set()
        self._see_memo: dict[tuple[str, str, str], bool] = {}
        # Who gets an event, by (source, member): each subscribing connection whose
        # subscriptions match and that may see the source, with those subscriptions.  Made on
        # the first event of a kind; a subscription that comes or goes changes the kinds it
        # matches (see _route_subscribed); all are forgotten when a subscriber leaves and
        # when full (at most _ROUTE_MEMO kinds, _ROUTE_ENTRIES receivers), so no peer can
        # grow it.
        self._routes: dict[tuple[str, str], _Route] = {}
        self._route_entries = 0  # receivers listed in _routes, all kinds together
        # Every owned name, sorted (for snapshot pages); rebuilt after a change of owners.
        self._sorted_names: list[str] | None = None
        #: Whether the io layer can pass descriptors (false when Unix connections are encrypted).
        self.fd_passing = True
        #: Whether Unix connections run box-stream too: then every channel is encrypted end to end.
        self.encrypt_unix = False
        #: Installed plugins (service files), their states, and requests held for them.
        self.services = ServiceTable(self.limits.pending_opens_per_target)
        #: The operators' counters (``stats`` requests, ``/metrics``); see :mod:`bus.core.stats`.
        self.stats = BrokerStats(started=clock())
        #: Where per-connection traffic and queue figures come from (the io layer sets it).
        self.io_view: IoView = NoIo()

    # -- lifecycle ---------------------------------------------------------------------------

    def connect(self, key: PublicKey, transport: str, pid: int | None = None, uid: int | None = None) -> Connection:
        """Admit an authenticated connection; raises :class:`QuotaExceeded` over the limit."""
        account = self.accounts.get(key.id)
        count = len(account.connections) if account is not None else 0
        if count >= self.limits.connections_per_identity:
            self.stats.refused("connections_per_identity")
            raise QuotaExceeded(
                f"connections_per_identity reached: {key.id} already has {count} connections "
                f"(limit {self.limits.connections_per_identity})"
            )
        if account is None:
            account = self.accounts[key.id] = Account.new(key.id, self.limits)
        conn = Connection(
            id=self._next_id,
            key=key,
            transport=transport,
            pid=pid,
            uid=uid,
            connected_since=self._clock(),
            admin=self.policy.is_admin(key),
            account=account,
            limits=self.limits,
        )
        self._next_id += 1  # never reused while the broker runs
        account.connections.add(conn.id)
        self.connections[conn.id] = conn
        self.stats.admitted[transport] = self.stats.admitted.get(transport, 0) + 1
        return conn

    def disconnect(self, conn_id: int) -> list[Outgoing]:
        """Forget a connection; its names pass on and watchers hear of it.  Idempotent.

        Costs what the connection held, not what the broker holds: every table it appears
        in is indexed by connection."""
        conn = self.connections.get(conn_id)
        if conn is None:
            return []
        if conn.watches:
            for watch in conn.watches.values():
                watch.charge.release()
            conn.watches.clear()  # it hears nothing more, not even of its own departure
        self._watchers.discard(conn_id)
        if conn.subscriptions:
            for sub in conn.subscriptions.values():
                sub.charge.release()
            conn.subscriptions.clear()
        if conn_id in self._subscribers:
            self._subscribers.discard(conn_id)
            self._routes.clear()  # (worked out again as events come: a subscriber leaving
            self._route_entries = 0  # costs its next emits, and it a handshake to come back)
        self.pumping.discard(conn_id)
        self.pumping_fresh.discard(conn_id)
        self._owing_gaps.discard(conn_id)
        self.services.drop_connection(conn_id)
        out = self._notify(self.names.remove_connection(conn_id))
        for ch in self.channels.forget_connection(conn_id):
            other = ch.b if ch.a[0] == conn_id else ch.a
            out.append(ChannelMessage(other[0], other[1], {"reset": f"{conn.unique_id} disconnected"}))
        direct = self._direct_by_conn.get(conn_id)
        if direct:
            for half in list(direct):
                self._forget_direct(half)
        for key in list(self._pending_by_conn.get(conn_id, ())):
            pend = self.pending_opens.get(key)
            if pend is None:
                continue
            if pend.target == conn_id and pend.route == "unix-fd":
                out.append(DropFd(key))
            if pend.target == conn_id:
                self._drop_pending(key)
                if pend.opener:
                    err = ChannelRejected(f"{conn.unique_id} left before answering the channel request")
                    out.append((pend.opener, ErrorReply.from_error(pend.opener_request, err).to_wire()))
            elif pend.opener == conn_id:
                out.extend(self._make_tombstone(key, pend))
                out.append(ChannelMessage(pend.target, pend.b[1], {"reset": f"{conn.unique_id} disconnected"}))
        self._pending_by_conn.pop(conn_id, None)
        del self.connections[conn_id]
        account = conn.account
        account.connections.discard(conn_id)
        if not account.connections:
            del self.accounts[conn.key.id]
        return out

    # -- messages ----------------------------------------------------------------------------

    def receive(self, conn_id: int, body: dict[Any, Any]) -> list[Outgoing]:
        """Handle one control message from a connection.

        Raises :class:`~bus.errors.FrameError` only for a message that is no message at all
        (the caller closes that connection); every request gets exactly one reply.
        """
        try:
            message = parse_message(body)
        except MalformedRequest as exc:
            if exc.request_id is None:
                raise
            return [(conn_id, ErrorReply(exc.request_id, BadRequest.wire_code, str(exc)).to_wire())]
        if isinstance(message, (Reply, ErrorReply)):
            return self._reply_from(conn_id, message)
        if not isinstance(message, Request):
            return []  # no client events are defined
        conn = self.connections[conn_id]
        out: list[Outgoing] = []
        try:
            handler = self._handlers.get(message.op)
            if handler is None:
                raise UnknownOperation(f"unknown operation {bound_text(message.op, 64)!r}")
            if not conn.registered and message.op not in ("hello", "ping"):
                raise BadRequest(f"{message.op}: send hello first")
            result = handler(self, conn, message, out)
        except RequestError as exc:
            if isinstance(exc, QuotaExceeded):
                self.stats.refused(exc.message)
            if message.op == "emit" and message.args.get("quiet") is True:
                # A quiet emit has no reply; a refused one is told by an event (its id
                # lets the client match it), and what it did not do costs nobody else.
                refused = ErrorReply.from_error(message.id, exc)
                fields = {"id": message.id, "code": refused.code, "message": refused.message}
                return [(conn_id, Event("emit_refused", fields).to_wire())]
            return [(conn_id, ErrorReply.from_error(message.id, exc).to_wire())]
        if result is _QUIET:
            return out
        if result is _DEFERRED:
            return out  # answered later (a channel opening waits for its target)
        # The reply goes before the events the request caused (the requester learns first).
        return [(conn_id, Reply(message.id, result).to_wire()), *out]

    # -- the broker's own requests and their answers -------------------------------------------

    def next_request_id(self, conn: Connection) -> int:
        request_id = conn.next_request
        conn.next_request += 1
        return request_id

    def ping(self, conn_id: int) -> list[Outgoing]:
        conn = self.connections[conn_id]
        return [(conn_id, Request("ping", self.next_request_id(conn), {}).to_wire())]

    def _reply_from(self, conn_id: int, reply: Reply | ErrorReply) -> list[Outgoing]:
        key = (conn_id, reply.re)
        pend = self.pending_opens.get(key)
        if pend is None:
            return []  # a ping's answer, or one that came after the deadline (reset below)
        # What pays for the channel itself goes to the channel (or is released below); only
        # the pending slots are given back now.
        kept = (pend.channel_charge, pend.relay_charge)
        pend.channel_charge, pend.relay_charge = Charge(), Charge()
        self._drop_pending(key)
        try:
            return self._answered(pend, key, reply, *kept)
        finally:
            for charge in kept:
                charge.release()  # a no-op for the charges the new channel took over

    def _answered(
        self, pend: PendingOpen, key: tuple[int, int], reply: Reply | ErrorReply, channel_charge: Charge, relay_charge: Charge
    ) -> list[Outgoing]:
        target = self.connections[key[0]]
        if isinstance(reply, ErrorReply):
            drop: list[Outgoing] = [DropFd(key)] if pend.route == "unix-fd" else []
            if pend.opener == 0:
                return drop
            reason = bound_text(reply.message, self.limits.reason_chars)
            err = ChannelRejected(f"{target.unique_id} rejected the channel: {reason}")
            return [(pend.opener, ErrorReply.from_error(pend.opener_request, err).to_wire()), *drop]
        if pend.route == "tcp":
            if pend.opener == 0 or pend.opener not in self.connections:
                return []  # the target's listener gives up at its own deadline
            answer = reply.result if isinstance(reply.result, dict) else {}
            host, port = answer.get("host"), answer.get("port")
            if (
                not isinstance(host, str)
                or not _HOST_RE.match(host)
                or not isinstance(port, int)
                or isinstance(port, bool)
                or not 0 < port < 65536
            ):
                err = ChannelRejected(f"{target.unique_id} accepted without a usable host and port")
                return [(pend.opener, ErrorReply.from_error(pend.opener_request, err).to_wire())]
            self._add_direct(pend, channel_charge)
            opened = self._opened(pend, target, True, host=host, port=port, token=pend.token)
            return [(pend.opener, opened)]
        if pend.route == "unix-fd":
            if pend.opener == 0 or pend.opener not in self.connections:
                return [DropFd(key)]  # the target's end closes with the opener gone: it sees EOF
            self._add_direct(pend, channel_charge)
            return [WithFd(pend.opener, self._opened(pend, target, False), key, create=False)]
        if pend.opener == 0 or pend.opener not in self.connections:
            # The opener left meanwhile: the target accepted a channel nobody holds.
            return [ChannelMessage(target.id, pend.b[1], {"reset": "the opener left"})]
        opener = self.connections[pend.opener]
        ch = self.channels.open(pend.a, pend.b, pend.protocol, pend.relay_cap, (channel_charge.move(), relay_charge.move()), opener.account.relay)
        return [(opener.id, self._opened(pend, target, pend.encrypted)), *self.initial_credit(ch)]

    def _opened(self, pend: PendingOpen, target: Connection, encrypted: bool, **route_fields: Any) -> dict[str, Any]:
        """The opener's reply: its channel id, the route, and who is at the other end."""
        opener = self.connections[pend.opener]
        result = {
            "channel": pend.a[1],
            "route": pend.route,
            "encrypted": encrypted,
            "peer": self._peer(target, opener),
            "protocol": pend.protocol,
            **route_fields,
        }
        return Reply(pend.opener_request, result).to_wire()

    def expire_open(self, target_id: int, request_id: int, seconds: float) -> list[Outgoing]:
        """The target did not answer in time: the opener gets an error; a late yes is reset."""
        key = (target_id, request_id)
        pend = self.pending_opens.get(key)
        if pend is None or pend.opener == 0:
            return []
        opener_id, opener_request = pend.opener, pend.opener_request
        # Keep a tombstone so a late acceptance gets its channel reset, not ignored.
        out = self._make_tombstone(key, pend)
        target = self.connections.get(target_id)
        who = target.unique_id if target else f":{target_id}"
        err = ChannelRejected(f"{who} did not answer the channel request within {seconds:g} s")
        return [(opener_id, ErrorReply.from_error(opener_request, err).to_wire()), *out]

    # -- pending openings ----------------------------------------------------------------------

    def _add_pending(self, key: tuple[int, int], pend: PendingOpen) -> None:
        self.pending_opens[key] = pend
        self._pending_by_conn.setdefault(pend.opener, set()).add(key)
        self._pending_by_conn.setdefault(pend.target, set()).add(key)

    def _unindex(self, conn_id: int, key: tuple[int, int]) -> None:
        keys = self._pending_by_conn.get(conn_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._pending_by_conn[conn_id]

    def _drop_pending(self, key: tuple[int, int]) -> PendingOpen | None:
        """Forget an opening (answered, or its target left) and release what it held."""
        pend = self.pending_opens.pop(key, None)
        if pend is not None:
            pend.release()
            self._unindex(pend.target, key)
            if pend.opener:
                self._unindex(pend.opener, key)
        return pend

    def _make_tombstone(self, key: tuple[int, int], pend: PendingOpen) -> list[Outgoing]:
        """The opener gave up or left: keep just enough to reset a late acceptance.

        The opener's charges are released now; a target keeps at most
        ``_TOMBSTONES_PER_TARGET`` of these (the oldest are forgotten: a very late yes then
        only costs the target its own channel end)."""
        pend.release()
        self._unindex(pend.opener, key)
        pend.opener = 0
        target = self.connections.get(pend.target)
        if target is not None:
            if target.tombstones is None:
                target.tombstones = deque()
            target.tombstones.append(key)
            while len(target.tombstones) > _TOMBSTONES_PER_TARGET:
                old = target.tombstones.popleft()
                stale = self.pending_opens.get(old)
                if stale is not None and stale.opener == 0:
                    self._drop_pending(old)
        return [DropFd(key)] if pend.route == "unix-fd" else []

    # -- direct channels (their ends report them) ------------------------------------------------

    def _add_direct(self, pend: PendingOpen, charge: Charge) -> None:
        record = DirectChannel(pend.a, pend.b, pend.protocol, pend.route, charge=charge.move())
        self.direct[pend.a] = self.direct[pend.b] = record
        for half in (pend.a, pend.b):
            self._direct_by_conn.setdefault(half[0], set()).add(half)

    def _forget_direct(self, half: tuple[int, int]) -> None:
        record = self.direct.pop(half, None)
        if record is None:
            return
        record.charge.release()
        for other in (record.a, record.b):
            self.direct.pop(other, None)
            halves = self._direct_by_conn.get(other[0])
            if halves is not None:
                halves.discard(other)
                if not halves:
                    del self._direct_by_conn[other[0]]

    def _channel_report(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """A direct channel's end reports its byte counts (and whether it closed)."""
        channel = req.arg("channel", int)
        counts = (req.arg("bytes_in", int), req.arg("bytes_out", int))
        if min(counts) < 0:
            raise BadRequest("channel_report: byte counts cannot be negative")
        half = (conn.id, channel)
        record = self.direct.get(half)
        if record is None:
            raise BadRequest(f"channel_report: this connection has no direct channel {channel}")
        record.counts[half] = counts
        if req.arg("closed", bool, False):
            record.closed.add(half)
            if len(record.closed) == 2:
                self._forget_direct(half)
        return {}

    # -- relayed channels (the io layer moves the bytes) ------------------------------------------

    def grow_relay(self, ch: RelayChannel, direction: Direction) -> int:
        """More room for a direction whose receiver keeps up: its cap doubles (up to
        ``relay_credit``) if the opener's identity can pay; returns the extra credit."""
        extra = min(direction.cap, self.limits.relay_credit - direction.cap)
        payer = ch.payer
        if extra <= 0 or payer is None or payer.free < extra or not ch.charges:
            return 0
        ch.charges.append(Charge.take(extra, own=(payer,)))
        direction.cap += extra
        direction.src_credit += extra
        return extra

    def initial_credit(self, ch: RelayChannel) -> list[Outgoing]:
        """Each side may send as much as its direction's cap to start with."""
        return [ChannelMessage(half[0], half[1], {"credit": ch.outgoing(half).grant_initial()}) for half in (ch.a, ch.b)]

    # -- requests ----------------------------------------------------------------------------

    def _hello(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        if conn.registered:
            raise BadRequest("hello: already registered")
        info = req.arg("info", dict, {}, optional=True)
        name = req.arg("name", str, None, optional=True)
        flags = self._flags(req)
        description, version = info.get("description", ""), info.get("version", "")
        metadata = info.get("metadata", {})
        if not isinstance(description, str) or not isinstance(version, str) or not isinstance(metadata, dict):
            raise BadRequest("hello: info is {description: text, version: text, metadata: map}")
        normalized = {"description": description, "version": version, "metadata": metadata}
        # Info is repeated in every list and event about this connection: keep it small and
        # shallow, so every message that repeats it can be sent to whoever asks.
        # (An empty map is one level: no walk for it.)
        depth = _depth(metadata, self.limits.info_depth) if metadata else 1
        if depth > self.limits.info_depth:
            raise QuotaExceeded(f"info_depth: hello: info.metadata is nested deeper than {self.limits.info_depth} levels")
        # (An info with no metadata whose texts are short is surely within the limit: its
        # encoding takes at most 49 bytes and 4 per character.  Only others are measured.)
        if metadata or 64 + 4 * (len(description) + len(version)) > self.limits.info_bytes:
            size = len(cbor2.dumps(normalized))
            if size > self.limits.info_bytes:
                raise QuotaExceeded(f"info_bytes: hello: info is {size} bytes, over the {self.limits.info_bytes}-byte limit")
        conn.info = normalized
        result: dict[str, Any] = {"unique_id": conn.unique_id, "identity": conn.key.id}
        if name is not None:
            result["name_result"] = self._request_name(conn, name, flags, out)
        conn.registered = True
        return result

    def _ping(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        return {}

    def _request_name_op(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        return self._request_name(conn, req.arg("name", str), self._flags(req), out)

    def _release_name(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        result, events = self.names.release_name(conn.id, req.arg("name", str))
        out.extend(self._notify(events))
        return result.value

    def _list_names(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """One page of the list: ``{entries, next}``; ask again with ``after=next`` for more.

        Named entries come sorted by name, then (``all``) nameless ones by unique id; the
        cursor is the last name or unique id of the page."""
        everything = req.arg("all", bool, False)
        after = req.arg("after", str, None, optional=True)
        if everything and not conn.admin:
            raise AccessDenied(f"{conn.key.id} may not list all connections: only an admin identity may")
        keyed: list[tuple[tuple[int, str, int], str, dict[str, Any]]] = []
        for name, owner in sorted(self.names.names().items()):
            if everything or self._sees(conn.key, name):
                keyed.append(((0, name, 0), name, self._entry(name, owner)))
        if everything:
            for c in sorted(self.connections.values(), key=lambda c: c.id):
                if c.registered and not self.names.owned_by(c.id):
                    keyed.append(((1, "", c.id), c.unique_id, self._entry(None, c.id)))
        start = 0
        if after is not None:
            uid = parse_unique_id(after)
            cursor = (1, "", uid) if uid is not None else (0, after, 0)
            start = next((i for i, (k, _, _) in enumerate(keyed) if k > cursor), len(keyed))
        return self._page((label, entry) for _, label, entry in keyed[start:])

    def _page(self, labelled: Iterable[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        """``{entries, next}``: the entries that fit ``reply_bytes`` (at least one), and the
        label of the last one as the cursor when more follow (else None).  The entries are
        made as the page needs them: ``labelled`` may be a generator."""
        page: list[dict[str, Any]] = []
        used = 0
        page_label = ""
        for label, entry in labelled:
            size = len(cbor2.dumps(entry))
            if page and used + size > self.limits.reply_bytes:
                return {"entries": page, "next": page_label}
            page.append(entry)
            used += size
            page_label = label
        return {"entries": page, "next": None}

    def _resolve(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        name = validate_name(req.arg("name", str))
        owner = self.names.owner(name)
        if owner is None or not (conn.admin or self._sees(conn.key, name)):
            raise NameNotFound(f"no connection owns {name!r}")
        return self._entry(name, owner)

    def _info(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """Who a connection is; for an admin or itself also its queue places and channels.

        Channels come in pages that keep the reply within ``message_bytes``: ask again with
        ``channels_after`` set to ``channels_next`` for the rest."""
        target = req.arg("target", str)
        after = req.arg("channels_after", int, 0, optional=True)
        target_id = parse_unique_id(target)
        if target_id is None:
            name = validate_name(target)
            target_id = self.names.owner(name)
            if target_id is None or not (conn.admin or self._sees(conn.key, name)):
                raise NameNotFound(f"no connection owns {name!r}")
        other = self.connections.get(target_id)
        visible_names = [] if other is None else self._visible_names(conn, other)
        if other is None or not (conn.admin or other is conn or visible_names):
            # Nameless connections are hidden from everyone but admins and themselves.
            raise NameNotFound(f"no visible connection {bound_text(target, 64)!r}")
        entry = self._entry(visible_names[0] if visible_names else None, other.id)
        entry["names"] = visible_names
        intimate = conn.admin or other is conn
        entry["queued_for"] = self.names.waiting_for(other.id) if intimate else []
        entry["channels"] = []
        entry["channels_next"] = None
        if intimate:
            room = self.limits.message_bytes - len(cbor2.dumps(entry)) - 64
            listed = entry["channels"]
            for item in self._channels_of(other):
                if item["channel"] <= after:
                    continue
                size = len(cbor2.dumps(item))
                if size > room and listed:
                    entry["channels_next"] = listed[-1]["channel"]
                    break
                listed.append(item)
                room -= size
        return entry

    def _channels_of(self, conn: Connection) -> list[dict[str, Any]]:
        """Every channel of ``conn``, relayed and direct, by its channel id there."""
        listed: list[dict[str, Any]] = []
        for ch in self.channels.of_connection(conn.id):
            half = ch.a if ch.a[0] == conn.id else ch.b
            peer = ch.other(half)
            listed.append(
                {
                    "channel": half[1],
                    "protocol": ch.protocol,
                    "route": "relay",
                    "opened_by": "self" if half == ch.a else "peer",
                    "peer": f":{peer[0]}",
                    "bytes_out": ch.outgoing(half).bytes_total,
                    "bytes_in": ch.incoming(half).bytes_total,
                }
            )
        # (A connection is at most one end of each direct channel: no channels to itself.)
        for half in self._direct_by_conn.get(conn.id, ()):
            record = self.direct[half]
            peer = record.b if half == record.a else record.a
            reported = record.counts.get(half)
            entry: dict[str, Any] = {
                "channel": half[1],
                "protocol": record.protocol,
                "route": record.route,
                "opened_by": "self" if half == record.a else "peer",
                "peer": f":{peer[0]}",
                "reported": reported is not None,
            }
            if reported is not None:
                entry["bytes_in"], entry["bytes_out"] = reported
            listed.append(entry)
        listed.sort(key=lambda item: item["channel"])
        return listed

    def _watch(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """``{watch, snapshot, more}``; with ``more``, ``snapshot`` events follow (before any
        change to a name they still hold), the last with ``more: false``.

        The pages after the first go out only while the watcher's queue has room (see
        :meth:`pump_watches`), so no snapshot is one oversized burst."""
        patterns = req.arg("patterns", list, ["*"]) or ["*"]
        limits = self.limits
        if not all(isinstance(p, str) for p in patterns):
            raise BadRequest("watch: 'patterns' must be a list of strings")
        if len(patterns) > limits.patterns_per_watch:
            raise QuotaExceeded(f"patterns_per_watch: a watch has at most {limits.patterns_per_watch} patterns")
        if any(len(p) > limits.pattern_length for p in patterns):
            raise QuotaExceeded(f"pattern_length: a pattern is at most {limits.pattern_length} characters")
        if sum(len(p) for p in patterns) > limits.pattern_chars_per_watch:
            raise QuotaExceeded(f"pattern_chars_per_watch: a watch's patterns have at most {limits.pattern_chars_per_watch} characters")
        try:
            globs = GlobSet(tuple(compile_glob(p) for p in patterns))
        except GlobError as exc:
            raise BadRequest(f"watch: {exc}") from None
        charge = self._pattern_charge(conn, (conn.watch_budget, conn.account.watches), bool(globs.complex))
        watch_id = conn.next_watch
        conn.next_watch += 1
        watch = conn.watches[watch_id] = Watch(watch_id, globs, charge, cursor="")
        self._watchers.add(conn.id)
        entries, more = self._snapshot_page(conn, watch)
        if more:
            self._owes_pumping(conn.id)
        return {"watch": watch_id, "snapshot": entries, "more": more}

    def _snapshot_page(self, conn: Connection, watch: Watch) -> tuple[list[dict[str, Any]], bool]:
        """The next page of a watch's snapshot (names after its cursor); moves the cursor.

        A page holds at most ``reply_bytes`` of entries and looks at no more than
        ``_NAMES_PER_PAGE`` names, so the work one page costs is bounded whatever the patterns
        and however many names there are (a page may then hold nothing and say ``more``)."""
        if self._sorted_names is None:
            self._sorted_names = sorted(self.names.names())
        names = self._sorted_names
        cursor = watch.cursor or ""
        start = bisect.bisect_right(names, cursor) if cursor else 0
        page: list[dict[str, Any]] = []
        used = 0
        for name in names[start : start + _NAMES_PER_PAGE]:
            owner = self.names.owner(name)
            if owner is None or not self._matches(conn, watch, name):
                cursor = name
                continue
            entry = self._entry(name, owner)
            size = len(cbor2.dumps(entry))
            if page and used + size > self.limits.reply_bytes:
                watch.cursor = cursor
                return page, True
            page.append(entry)
            used += size
            cursor = name
        if start + _NAMES_PER_PAGE < len(names):
            watch.cursor = cursor
            return page, True
        watch.cursor = None  # live from now on
        return page, False

    def _owes_pumping(self, conn_id: int) -> None:
        """``conn_id`` has watch pages, a resync or a gap to be sent as it has room."""
        self.pumping.add(conn_id)
        self.pumping_fresh.add(conn_id)

    def pump_watches(self, conn_id: int) -> list[Outgoing]:
        """The next message a watch of ``conn_id`` owes: a ``resync`` event and the first page
        of its fresh snapshot, or the next ``snapshot`` page; one watch per call, in turn.  The
        io layer calls this while the connection has room; ``conn_id`` leaves :attr:`pumping`
        once nothing is owed."""
        conn = self.connections.get(conn_id)
        if conn is None:
            self.pumping.discard(conn_id)
            return []
        out: list[Outgoing] = []
        owing = [w for w in conn.watches.values() if w.resync or w.cursor is not None]
        if owing:
            watch = owing[0]
            if watch.resync:
                # Changes were lost to a full queue: start over with a fresh snapshot; the
                # client compares it with what it knew and reports the difference.
                watch.resync = False
                watch.cursor = ""
                out.append((conn_id, Event("resync", {"watch": watch.id}).to_wire()))
            entries, more = self._snapshot_page(conn, watch)
            out.append((conn_id, Event("snapshot", {"watch": watch.id, "entries": entries, "more": more}).to_wire()))
            if more:
                # Round robin: this watch goes behind the others that owe something.
                del conn.watches[watch.id]
                conn.watches[watch.id] = watch
        out.extend(self._gaps(conn))
        if not any(w.resync or w.cursor is not None for w in conn.watches.values()):
            self.pumping.discard(conn_id)
        return out

    @staticmethod
    def _pattern_charge(conn: Connection, budgets: tuple[Budget, Budget], complex_patterns: bool) -> Charge:
        """What a watch or a subscription pays: one of ``budgets``, and one complex-pattern
        slot too when its patterns need the automaton (all or nothing)."""
        charge = Charge.take(1, own=budgets)
        if complex_patterns:
            try:
                charge.add(Charge.take(1, own=(conn.complex_watch_budget, conn.account.complex_watches)))
            except QuotaExceeded:
                charge.release()
                raise
        return charge

    def _unwatch(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        watch_id = req.arg("watch", int)
        watch = conn.watches.pop(watch_id, None)
        if watch is None:
            raise BadRequest(f"unwatch: no watch {watch_id}")
        watch.charge.release()
        if not conn.watches:
            self._watchers.discard(conn.id)
        return {}

    def _open_channel(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """Ask the target; the opener's reply comes when the target answers (or never does).

        The opener pays: a pending slot of its own and (as a fair share) of the target's while
        the target decides, a channel slot of its own and of the target's, and for a relayed
        channel the relay buffer space of both directions.  A target whose queue is full of
        what it has not read is not asked at all: the opener is refused."""
        name = validate_name(req.arg("name", str))
        protocol = req.arg("protocol", str, "raw")
        route = req.arg("route", str, "auto")
        if not CHANNEL_PROTOCOL_RE.match(protocol):
            raise BadRequest(f"open_channel: protocol {bound_text(protocol, 64)!r} is not a valid label")
        if route not in ("relay", "auto", "direct"):
            raise BadRequest(f"open_channel: route {bound_text(route, 16)!r} is not one of relay, auto, direct")
        target_id = self.names.owner(name)
        if target_id is None and name in self.services.specs and (conn.admin or self._sees(conn.key, name)):
            self.policy.may_open(conn.key, name).check()
            return self._hold_open(conn, req, name, out)  # an installed plugin starts on demand
        if target_id is None or not (conn.admin or self._sees(conn.key, name)):
            raise NameNotFound(f"no connection owns {name!r}")
        self.policy.may_open(conn.key, name).check()
        if target_id == conn.id:
            raise BadRequest(f"open_channel: {name!r} is this connection itself")
        target = self.connections[target_id]
        encrypted = conn.transport == "tcp" or target.transport == "tcp" or self.encrypt_unix
        local = conn.transport == "unix" and target.transport == "unix" and self.fd_passing
        if route == "relay":
            chosen = "relay"
        elif local:
            chosen = "unix-fd"  # both on the Unix socket: a passed socketpair
        else:
            chosen = "tcp"  # the target listens, the opener dials it with a one-time token
        if self.room_for(target.id) <= 0:
            raise QuotaExceeded(
                f"outbound_bytes: {target.unique_id} is not reading what the broker sends it; channel request not sent"
            )
        actor = conn.key.id
        pending_charge = Charge.take(
            1, own=(conn.pending_budget, conn.account.pending), shared=(target.incoming_budget,), actor=actor
        )
        channel_charge = Charge()
        try:
            channel_charge = Charge.take(
                1, own=(conn.channel_budget, conn.account.channels), shared=(target.target_budget,), actor=actor
            )
            relay_charge, relay_cap = Charge(), 0
            if chosen == "relay":
                relay_cap = min(RELAY_MIN_CREDIT, self.limits.relay_credit)
                relay_charge = Charge.take(2 * relay_cap, own=(conn.account.relay,))
        except QuotaExceeded:
            pending_charge.release()
            channel_charge.release()
            raise
        a = (conn.id, self.channels.allocate(conn.id))
        b = (target.id, self.channels.allocate(target.id))
        request_id = self.next_request_id(target)
        relayed_encrypted = encrypted and chosen == "relay"
        pend = PendingOpen(
            conn.id,
            req.id,
            target.id,
            request_id,
            protocol,
            relayed_encrypted,
            a,
            b,
            chosen,
            pending_charge=pending_charge,
            channel_charge=channel_charge,
            relay_charge=relay_charge,
            relay_cap=relay_cap,
        )
        self._add_pending((target.id, request_id), pend)
        ask = {
            "channel": b[1],
            "protocol": protocol,
            "route": chosen,
            # Whether the opener runs box-stream on this channel: always on the tcp route.
            "encrypted": relayed_encrypted or chosen == "tcp",
            "name": name,
            "opener": self._peer(conn, target),
        }
        if chosen == "tcp":
            ask["token"] = pend.token = os.urandom(32)
        message = Request("channel_request", request_id, ask).to_wire()
        if chosen == "unix-fd":
            out.append(WithFd(target.id, message, (target.id, request_id), create=True))
        else:
            out.append((target.id, message))
        return _DEFERRED

    # -- events -------------------------------------------------------------------------------

    def _subscribe(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """``{subscription}``: events whose source and member match the patterns follow as
        ``event`` messages (at most one per event and connection, whatever number of its
        subscriptions match: the client hands it to each)."""
        patterns = {part: req.arg(part, str, "*") for part in ("source", "member")}
        for part, pattern in patterns.items():
            if len(pattern) > self.limits.pattern_length:
                raise QuotaExceeded(f"pattern_length: a {part} pattern is at most {self.limits.pattern_length} characters")
        try:
            source, member = (GlobSet((compile_glob(patterns[part]),)) for part in ("source", "member"))
        except GlobError as exc:
            raise BadRequest(f"subscribe: {exc}") from None
        charge = self._pattern_charge(
            conn, (conn.subscription_budget, conn.account.subscriptions), bool(source.complex or member.complex)
        )
        sub_id = conn.next_subscription
        conn.next_subscription += 1
        conn.subscriptions[sub_id] = Subscription(sub_id, source, member, charge)
        self._subscribers.add(conn.id)
        self._route_subscribed(conn, conn.subscriptions[sub_id])
        return {"subscription": sub_id}

    def _unsubscribe(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        sub_id = req.arg("subscription", int)
        sub = conn.subscriptions.pop(sub_id, None)
        if sub is None:
            raise BadRequest(f"unsubscribe: no subscription {sub_id}")
        self._route_unsubscribed(conn.id, sub)
        sub.charge.release()
        if not conn.subscriptions:
            self._subscribers.discard(conn.id)
        return {}

    def _emit(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """``{delivered: n}``: the event went to n connections (queued for them, in order);
        with ``quiet: true``, no reply at all (a refusal comes as an ``emit_refused`` event).

        The source is the emitter's unique id, or a well-known name it owns as primary owner
        and policy lets it emit as; the broker stamps the sender and its identity.  A
        subscriber that has no room for it (in its queue, or in the emitter identity's share
        of it) misses the event and is told so (``gap``) before the next one it gets: it is
        never cut for traffic it did not ask for, and the emitter is never slowed."""
        args = req.args
        member = args.get("member")
        unique_id = conn.unique_id
        source = args.get("source", unique_id)
        route = self._routes.get((source, member)) if type(member) is str and type(source) is str else None
        # (A kind of event with a route was checked already: its member is an identifier.)
        if route is None and (type(member) is not str or not _MEMBER_RE.match(member)):
            if not isinstance(member, str):
                req.arg("member", str)  # raises the usual BadRequest
            raise BadRequest(f"emit: member {bound_text(member, 64)!r} is not an identifier (letters, digits, '_')")
        quiet = args.get("quiet", False)
        if type(quiet) is not bool:
            raise BadRequest("emit: argument 'quiet' must be bool")
        payer = conn.key.id
        if source != unique_id:
            # Owned names are valid well-known names (never unique ids): owning it is the
            # quick test, the others only tell why not.
            if type(source) is not str:
                req.arg("source", str)
            if self.names.owner(source) != conn.id:
                if parse_unique_id(source) is not None:
                    raise AccessDenied(f"{conn.unique_id} may emit as its own unique id only, not as {bound_text(source, 32)}")
                validate_name(source)
                raise AccessDenied(f"{conn.unique_id} does not own {source!r}: only its primary owner may emit as it")
            # (_policy_allows, its memo read here first: this runs once per emit)
            if not (self._see_memo.get(("emit", payer, source)) or self._policy_allows("emit", conn.key, source)):
                self.policy.may_emit(conn.key, source).check()  # raises, with the reason
        payload = args.get("payload")
        size = len(payload) + 9 if type(payload) is bytes else _payload_size(payload)  # (_payload_size's first case inline)
        if size > self.limits.event_bytes:
            raise QuotaExceeded(f"event_bytes: the payload is {size} bytes, over the {self.limits.event_bytes}-byte limit")
        destination = args.get("destination")
        if destination is not None:
            if type(destination) is not str:
                req.arg("destination", str)
            dest_id = parse_unique_id(destination)
            if dest_id is None:
                dest_id = self.names.owner(validate_name(destination))
            if dest_id is None or dest_id not in self.connections:
                raise NameNotFound(f"no connection {bound_text(destination, 64)!r} to send the event to")
        if not self._subscribers:
            return _QUIET if quiet else {"delivered": 0}  # nobody listens: it costs nothing more
        if route is None:
            route = self._route(source, cast(str, member), named=source != unique_id)
        needed = size + _EVENT_OVERHEAD
        conns = route.conns
        if destination is not None:
            conns = [dest_id] if dest_id in conns else []
        # Who has no room for it (in its queue, or in payer's share of it), asked once for all.
        short = self.short_of_room(conns, payer, needed) if conns else ()
        receivers: list[int]
        owing = self._owing_gaps
        # Which receivers are owed a gap: asked only of this route (a C loop over it), so a
        # stuck subscriber elsewhere on the bus costs this emit nothing.
        owed = owing.intersection(conns) if owing and conns else ()
        if not short and not owed:
            # (the common case: each receiver gets it, nobody is owed a gap).  The route's own
            # list, not a copy: a FanOut's receivers are read, never changed, and the io layer
            # knows the next event of the same route by it (Broker's event runs).
            receivers = conns
        else:
            # Only the receivers short of room or owed a gap take Python steps of their own;
            # the others are kept as the route lists them (in order).
            if short:
                short = set(short)
                receivers = [conn_id for conn_id in conns if conn_id not in short]
                # (One pass over the route, whatever the number short: looking each up in
                # it would cost a pass each, quadratic when many subscribers are stuck.)
                connections = self.connections
                for sub_conn_id, matching in zip(route.conns, route.matching):
                    if sub_conn_id in short:
                        for sub in matching:
                            sub.missed += 1
                        connections[sub_conn_id].gaps_owed = True
                        owing.add(sub_conn_id)
                        self._owes_pumping(sub_conn_id)
            else:
                receivers = conns.copy()
            for sub_conn_id in owed:
                if sub_conn_id not in short:
                    # (before this event, in ``out``: its gap reaches it first)
                    out.extend(self._gaps(self.connections[sub_conn_id]))
        if receivers:
            message = {"source": source, "member": member, "payload": payload, "sender": unique_id, "identity": payer, "event": "event"}
            out.append(_new_tuple(FanOut, (receivers, message, payer)))  # (FanOut(...), without its Python-level __new__)
        return _QUIET if quiet else {"delivered": len(receivers)}

    def _short_of_room(self, conn_ids: list[int], payer: str, needed: int) -> list[int]:
        """The default :attr:`short_of_room`: each connection asked of ``room_for_event``."""
        room_for_event = self.room_for_event
        return [conn_id for conn_id in conn_ids if room_for_event(conn_id, payer) < needed]

    def _route(self, source: str, member: str, named: bool) -> _Route:
        """Who gets an event of ``source`` and ``member`` (see ``_routes``), worked out and kept."""
        route = self._work_out_route(source, member, named)
        if len(self._routes) >= _ROUTE_MEMO or self._route_entries + len(route.conns) > _ROUTE_ENTRIES:
            self._routes.clear()
        if len(route.conns) <= _ROUTE_ENTRIES:
            if not self._routes:
                self._route_entries = 0
            self._routes[(source, member)] = route
            self._route_entries += len(route.conns)
        return route

    def _route_subscribed(self, conn: Connection, sub: Subscription) -> None:
        """The kept routes after ``conn`` subscribed with ``sub``: each kind it matches (and
        may see) gets it in a new route, the others stay as they are.  (Forgetting them all,
        as busd did, let a peer that subscribes and unsubscribes in a loop make every emit of
        everyone else work its route out again, a pass over every subscription on the bus:
        now that peer's own request pays, one pass over the kept kinds.)"""
        routes = self._routes
        for key, route in list(routes.items()):
            source, member = key
            if not sub.matches(source, member) or (route.named and not (conn.admin or self._sees(conn.key, source))):
                continue
            conns = route.conns
            if conn.id in conns:
                i = conns.index(conn.id)
                routes[key] = route.with_subscriptions(i, [*route.matching[i], sub])
            elif self._route_entries >= _ROUTE_ENTRIES:
                routes.clear()  # (full: they are worked out again as events come)
                self._route_entries = 0
                return
            else:
                routes[key] = _Route([*conns, conn.id], [*route.matching, [sub]], route.named)
                self._route_entries += 1

    def _route_unsubscribed(self, conn_id: int, sub: Subscription) -> None:
        """The kept routes after ``sub`` of ``conn_id`` went: each kind it was in gets a new
        route without it (and without the connection, if no other subscription of it matches)."""
        routes = self._routes
        for key, route in list(routes.items()):
            if not sub.matches(*key):
                continue
            conns = route.conns
            if conn_id not in conns:
                continue  # (it may not see this source)
            i = conns.index(conn_id)
            subs = [s for s in route.matching[i] if s is not sub]
            routes[key] = route.with_subscriptions(i, subs)
            if not subs:
                self._route_entries -= 1

    def _work_out_route(self, source: str, member: str, named: bool) -> _Route:
        """Who gets an event of ``source`` and ``member``: a pass over every subscription."""
        route = _Route([], [], named)
        for sub_conn_id in self._subscribers:
            subscriber = self.connections[sub_conn_id]
            matching = [s for s in subscriber.subscriptions.values() if s.matches(source, member)]
            if not matching:
                continue
            if named and not (subscriber.admin or self._sees(subscriber.key, source)):
                continue
            route.conns.append(sub_conn_id)
            route.matching.append(matching)
        return route

    def _gaps(self, conn: Connection) -> list[Outgoing]:
        """``gap`` events for the subscriptions of ``conn`` that missed events."""
        gaps: list[Outgoing] = []
        conn.gaps_owed = False
        self._owing_gaps.discard(conn.id)
        for sub in conn.subscriptions.values():
            if sub.missed:
                fields = {"subscription": sub.id, "missed": sub.missed, "reason": "overflow"}
                gaps.append((conn.id, Event("gap", fields).to_wire()))
                sub.missed = 0
        return gaps

    # -- installed plugins (service files, activation) ---------------------------------------

    def set_services(self, specs: dict[str, ServiceSpec]) -> tuple[list[str], list[Outgoing]]:
        """Take the service files read at start or on reload; returns the names that are gone
        (the supervisor stops their plugins) and the errors for openings held for them."""
        gone = self.services.replace(specs)
        out: list[Outgoing] = []
        for name in gone:
            err = NameNotFound(f"{name!r} is no longer an installed plugin (its service file is gone)")
            for item in self.services.release(name):
                out.append((item.conn, ErrorReply.from_error(item.request.id, err).to_wire()))
        return gone, out

    def _hold_open(self, conn: Connection, req: Request, name: str, out: list[Outgoing]) -> Any:
        """Hold an opening to an activatable name nobody owns, until its plugin takes it.

        Charged as a pending opening: a pending slot of the opener (connection and identity)
        and a fair share of the name's ``pending_opens_per_target``."""
        charge = Charge.take(
            1,
            own=(conn.pending_budget, conn.account.pending),
            shared=(self.services.budget(name),),
            actor=conn.key.id,
        )
        if self.services.hold(HeldRequest(conn.id, req, name, charge)):
            out.append(ServiceAction("activate", name))
        return _DEFERRED

    def _activated(self, changes: list[OwnerChanged]) -> list[Outgoing]:
        """Names of installed plugins that got an owner: replay what was held for them."""
        out: list[Outgoing] = []
        for change in changes:
            if change.new is None or change.name not in self.services.specs:
                continue
            out.append(ServiceAction("owned", change.name))
            for item in self.services.release(change.name):
                opener = self.connections.get(item.conn)
                if opener is None:
                    continue
                try:
                    self._open_channel(opener, item.request, out)
                except RequestError as exc:
                    out.append((item.conn, ErrorReply.from_error(item.request.id, exc).to_wire()))
        return out

    def activation_failed(self, name: str, why: str) -> list[Outgoing]:
        """The plugin of ``name`` did not start, or did not take its name in time: every
        opening held for it gets :class:`~bus.errors.ActivationFailed` with ``why``."""
        err = ActivationFailed(f"cannot activate {name!r}: {why}")
        return [
            (item.conn, ErrorReply.from_error(item.request.id, err).to_wire())
            for item in self.services.release(name)
            if item.conn in self.connections
        ]

    def service_reply(self, conn_id: int, request_id: int, result: Any = None, error: RequestError | None = None) -> list[Outgoing]:
        """The supervisor's answer to an admin command (a result, or an error)."""
        item = self.services.commands.pop((conn_id, request_id), None)
        if item is None:
            return []  # its connection left meanwhile
        item.charge.release()
        if error is not None:
            return [(conn_id, ErrorReply.from_error(request_id, error).to_wire())]
        return [(conn_id, Reply(request_id, result if result is not None else {}).to_wire())]

    def _service_entry(self, conn: Connection, name: str) -> dict[str, Any]:
        spec = self.services.specs[name]
        entry = spec.to_wire(details=conn.admin)
        entry.update(self.services.state(name).to_wire())
        owner = self.names.owner(name)
        entry["owner"] = f":{owner}" if owner is not None else None
        return entry

    def _visible_service(self, conn: Connection, req: Request) -> str:
        name = validate_name(req.arg("name", str))
        if name not in self.services.specs or not (conn.admin or self._sees(conn.key, name)):
            raise NameNotFound(f"no installed plugin {name!r}")
        return name

    def _list_services(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """One page of the installed plugins the asker may see: ``{entries, next}``, sorted by
        name; ask again with ``after=next`` for more."""
        after = req.arg("after", str, None, optional=True)
        return self._page(
            (name, self._service_entry(conn, name))
            for name in sorted(self.services.specs)
            if (after is None or name > after) and (conn.admin or self._sees(conn.key, name))
        )

    def _service_status(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        return self._service_entry(conn, self._visible_service(conn, req))

    def _service_command(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """start, stop, restart (an installed plugin) and reload (the service files): admin
        only; the supervisor carries them out and answers (:meth:`service_reply`)."""
        verb = req.op.split("_")[0]
        if not conn.admin:
            raise AccessDenied(f"{conn.key.id} may not {verb} installed plugins: only an admin identity may")
        name = "" if req.op == "reload_services" else self._visible_service(conn, req)
        key = (conn.id, req.id)
        if key in self.services.commands:
            raise BadRequest(f"{req.op}: request id {req.id} is still waiting for its answer")
        charge = Charge.take(1, own=(conn.pending_budget, conn.account.pending))
        self.services.commands[key] = HeldRequest(conn.id, req, name, charge)
        out.append(ServiceAction(verb, name, conn.id, req.id))
        return _DEFERRED
    # -- figures for operators (``stats``, and the metrics endpoint) ---------------------------

    def stats_totals(self) -> dict[str, Any]:
        """The broker's totals, read now (see :mod:`bus.core.stats` and docs/operations.md).

        Costs a pass over the connections and the direct channels: for a scrape or a
        ``stats`` request, never per message."""
        stats, io_view = self.stats, self.io_view
        by_transport = dict.fromkeys(("unix", "tcp"), 0)
        watches = subscriptions = queued_bytes = queued_messages = queued_max = 0
        live = [0, 0, 0, 0]
        for conn in self.connections.values():
            by_transport[conn.transport] = by_transport.get(conn.transport, 0) + 1
            watches += len(conn.watches)
            subscriptions += len(conn.subscriptions)
            io = io_view.connection_io(conn.id)
            live[0] += io.bytes_in
            live[1] += io.bytes_out
            live[2] += io.messages_in
            live[3] += io.messages_out
            queued_bytes += io.queued_bytes
            queued_messages += io.queued_messages
            queued_max = max(queued_max, io.queued_bytes)
        channels = {"relay": len(self.channels), "unix-fd": 0, "tcp": 0}
        for half, record in self.direct.items():
            if half == record.a:
                channels[record.route] = channels.get(record.route, 0) + 1
        gone = stats.gone
        return {
            "started": stats.started,
            "connections": by_transport,
            "connections_admitted": {k: stats.admitted.get(k, 0) for k in sorted({"unix", "tcp", *stats.admitted})},
            "handshakes": stats.handshakes,
            "handshakes_in_progress": {"unix": 0, "tcp": 0, **io_view.handshakes_in_progress()},
            "handshake_failures": dict(stats.handshake_failures),
            "names": len(self.names.names()),
            "watches": watches,
            "subscriptions": subscriptions,
            "channels": channels,
            "channels_pending": sum(1 for pend in self.pending_opens.values() if pend.opener),
            "bytes_in": gone.bytes_in + live[0],
            "bytes_out": gone.bytes_out + live[1],
            "messages_in": gone.messages_in + live[2],
            "messages_out": gone.messages_out + live[3],
            "queued_bytes": queued_bytes,
            "queued_messages": queued_messages,
            "queued_bytes_max": queued_max,
            "slow_consumer_disconnects": stats.slow_consumer_disconnects,
            "refusals": dict(stats.refusals),
            "plugins": {
                name: {"launches": c.launches, "restarts": c.restarts, "failures": c.failures}
                for name, c in stats.plugins.plugins.items()
            },
        }

    def _connection_row(self, conn: Connection) -> dict[str, Any]:
        """One connection's figures, as ``stats`` lists them (like NATS's ``connz``)."""
        io: ConnectionIo = self.io_view.connection_io(conn.id)
        owned = self.names.owned_by(conn.id)
        return {
            "unique_id": conn.unique_id,
            "identity": conn.key.id,
            "transport": conn.transport,
            "name": owned[0] if owned else None,
            "names": len(owned),
            "connected_since": conn.connected_since,
            "bytes_in": io.bytes_in,
            "bytes_out": io.bytes_out,
            "messages_in": io.messages_in,
            "messages_out": io.messages_out,
            "queued_bytes": io.queued_bytes,
            "queued_messages": io.queued_messages,
            "channels": len(self.channels.of_connection(conn.id)) + len(self._direct_by_conn.get(conn.id, ())),
            "watches": len(conn.watches),
            "subscriptions": len(conn.subscriptions),
        }

    def _stats(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """``{totals, connections, next}``: the broker's totals, and per-connection figures:
        every connection's for an admin (by unique id, paged within ``message_bytes``: ask
        again with ``after`` set to ``next``), only the asker's own for anyone else."""
        after = req.arg("after", int, 0, optional=True)
        totals = self.stats_totals()
        if not conn.admin:
            # Plugin names are names: only those this connection may see (as list_services).
            totals["plugins"] = {name: counts for name, counts in totals["plugins"].items() if self._sees(conn.key, name)}
        if conn.admin:
            others = sorted(c for c in self.connections if c > after)
        else:
            others = [conn.id] if conn.id > after else []
        rows: list[dict[str, Any]] = []
        room = self.limits.message_bytes - len(cbor2.dumps(totals)) - 128
        following: int | None = None
        for index, conn_id in enumerate(others):
            row = self._connection_row(self.connections[conn_id])
            size = len(cbor2.dumps(row))
            if size > room and rows:
                following = others[index - 1]
                break
            rows.append(row)
            room -= size
        return {"totals": totals, "connections": rows, "next": following}

    _handlers: dict[str, Callable[[BrokerCore, Connection, Request, list[Outgoing]], Any]] = {
        "hello": _hello,
        "ping": _ping,
        "request_name": _request_name_op,
        "release_name": _release_name,
        "list_names": _list_names,
        "resolve": _resolve,
        "info": _info,
        "watch": _watch,
        "unwatch": _unwatch,
        "open_channel": _open_channel,
        "channel_report": _channel_report,
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "emit": _emit,
        "list_services": _list_services,
        "service_status": _service_status,
        "start_service": _service_command,
        "stop_service": _service_command,
        "restart_service": _service_command,
        "reload_services": _service_command,
        "stats": _stats,
    }

    # -- helpers -----------------------------------------------------------------------------

    def _flags(self, req: Request) -> NameFlag:
        names = req.arg("flags", list, [])
        if not names:
            return NameFlag.NONE
        flags = NameFlag.NONE
        for name in names:
            if not isinstance(name, str) or name not in FLAG_NAMES:
                raise BadRequest(f"{req.op}: unknown flag {bound_text(name, 32)!r} (known: {', '.join(FLAG_NAMES)})")
            flags |= FLAG_NAMES[name]
        return flags

    def _request_name(self, conn: Connection, name: str, flags: NameFlag, out: list[Outgoing]) -> str:
        validate_name(name)
        self.policy.may_own(conn.key, name).check()
        names = self.names
        if name not in names.held_by(conn.id):
            held_by = names.held_by
            held = 0
            for other in conn.account.connections:
                held += len(held_by(other))
            if held >= self.limits.names_per_identity:
                raise QuotaExceeded(
                    f"names_per_identity reached: {conn.key.id} owns or waits for {held} names "
                    f"(limit {self.limits.names_per_identity})"
                )
        result, events = names.request_name(conn.id, name, flags, validated=True)
        out.extend(self._notify(events))
        return result.value

    def _sees(self, key: PublicKey, name: str) -> bool:
        """``policy.may_see``, remembered: it is asked for every watcher or subscriber on every
        change or event.  The policy does not change while the broker runs; the memo holds at
        most ``_SEE_MEMO`` answers (it starts over when full), so no peer can grow it."""
        return self._policy_allows("see", key, name)

    def _policy_allows(self, action: str, key: PublicKey, name: str) -> bool:
        """Whether the policy allows ``action`` (see, emit) on ``name`` to ``key``, remembered."""
        memo_key = (action, key.id, name)
        allowed = self._see_memo.get(memo_key)
        if allowed is None:
            if len(self._see_memo) >= _SEE_MEMO:
                self._see_memo.clear()
            allowed = self._see_memo[memo_key] = self.policy.may(action, key, name).allowed
        return allowed

    def _visible_names(self, viewer: Connection, other: Connection) -> list[str]:
        return [
            n
            for n in self.names.owned_by(other.id)
            if viewer.admin or viewer is other or self._sees(viewer.key, n)
        ]

    def _matches(self, watcher: Connection, watch: Watch, name: str) -> bool:
        return (watcher.admin or self._sees(watcher.key, name)) and watch.matches(name)

    def _peer(self, conn: Connection, viewer: Connection) -> dict[str, Any]:
        """The other end of a channel as ``viewer`` may see it (names filtered by ``see``)."""
        return {"unique_id": conn.unique_id, "identity": conn.key.id, "names": self._visible_names(viewer, conn)}

    def _entry(self, name: str | None, conn_id: int) -> dict[str, Any]:
        c = self.connections[conn_id]
        return {
            "name": name,
            "unique_id": c.unique_id,
            "identity": c.key.id,
            "info": c.info,
            "connected_since": c.connected_since,
            "transport": c.transport,
            "pid": c.pid,
            "uid": c.uid,
        }

    def _notify(self, changes: list[OwnerChanged]) -> list[Outgoing]:
        """Name events for every watch that matches, within the room each watcher has.

        A watcher whose queue cannot take them loses no event silently: each watch that has
        no room left stops sending changes and owes a resync (a fresh snapshot once it has
        room), so a peer that churns names costs the watchers a bounded queue, never their
        connection.  Room is counted in bytes across every change and watch of this call.  A
        watch still sending its snapshot skips changes to names its next pages will show."""
        out: list[Outgoing] = []
        if not changes:
            return out
        self._sorted_names = None  # owners changed
        if self.services.specs:
            out.extend(self._activated(changes))
        if not self._watchers:
            return out
        room: dict[int, int] = {}
        for change in changes:
            if change.old is None:
                kind = "connected"
            elif change.new is None:
                kind = "disconnected"
            else:
                kind = "owner-changed"
            owner = self._entry(change.name, change.new) if change.new is not None else None
            old = self.connections.get(change.old) if change.old is not None else None
            size = _EVENT_OVERHEAD + (len(cbor2.dumps(owner)) if owner is not None else 0)
            # One message object per watch id: watchers with equal ids share it, so the io
            # layer can encode it once for all of them.
            shared: dict[int, dict[str, Any]] = {}
            for watcher_id in self._watchers:
                watcher = self.connections[watcher_id]
                for watch_id, watch in watcher.watches.items():
                    if watch.resync or (watch.cursor is not None and change.name > watch.cursor):
                        continue
                    if not self._matches(watcher, watch, change.name):
                        continue
                    left = room.get(watcher_id)
                    if left is None:
                        left = self.room_for(watcher_id)
                    if left < size:
                        watch.resync = True
                        self._owes_pumping(watcher_id)
                        room[watcher_id] = left
                        continue
                    room[watcher_id] = left - size
                    message = shared.get(watch_id)
                    if message is None:
                        fields = {
                            "watch": watch_id,
                            "kind": kind,
                            "name": change.name,
                            "owner": owner,
                            "old_owner": f":{change.old}" if change.old is not None else None,
                            "old_identity": old.key.id if old is not None else None,
                        }
                        message = shared[watch_id] = Event("name", fields).to_wire()
                    out.append((watcher_id, message))
        return out
