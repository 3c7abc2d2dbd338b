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

import fnmatch
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cbor2

from ..errors import (
    AccessDenied,
    BadRequest,
    ChannelRejected,
    NameNotFound,
    QuotaExceeded,
    RequestError,
    UnknownOperation,
)
from ..wire.identity import PublicKey
from ..wire.messages import ErrorReply, Event, MalformedRequest, Reply, Request, parse_message
from .channels import ChannelTable, RelayChannel
from .names import NameFlag, NameRegistry, OwnerChanged, validate_name
from .policy import Policy

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
]

#: Protocol labels: short, printable, no spaces (like an SSH subsystem name).
CHANNEL_PROTOCOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")


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

@dataclass(slots=True)
class DirectChannel:
    """A channel whose bytes bypass the broker (unix-fd or tcp), as its ends report it.

    The broker only negotiated it; each end reports its byte counts with
    ``channel_report`` (about once a second while they change, and when it closes), and the
    record goes when either end reports it closed or leaves the bus."""

    a: tuple[int, int]  # (opener, its channel id)
    b: tuple[int, int]  # (target, its channel id)
    protocol: str
    route: str
    counts: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # half -> (in, out)


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


Outgoing = tuple[int, dict[str, Any]] | ChannelMessage | WithFd | DropFd

_DEFERRED = object()

FLAG_NAMES = {
    "allow-replacement": NameFlag.ALLOW_REPLACEMENT,
    "replace-existing": NameFlag.REPLACE_EXISTING,
    "do-not-queue": NameFlag.DO_NOT_QUEUE,
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-broker limits; every one is configurable (see docs/broker.md)."""

    connections_per_identity: int = 64
    names_per_connection: int = 64
    watches_per_connection: int = 32
    patterns_per_watch: int = 32
    pattern_length: int = 255
    info_bytes: int = 16 * 1024
    #: Lists and snapshots are cut into messages of about this many bytes (well under the
    #: 64 KiB control-frame limit; one entry is at most ``info_bytes`` plus ~300 bytes).
    reply_bytes: int = 40 * 1024
    channels_per_connection: int = 256
    #: Bytes the broker holds at most per relayed channel and direction.
    relay_credit: int = 512 * 1024


@dataclass(slots=True)
class Connection:
    id: int
    key: PublicKey
    transport: str
    pid: int | None
    uid: int | None
    connected_since: float
    admin: bool
    registered: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    watches: dict[int, re.Pattern[str]] = field(default_factory=dict)
    next_watch: int = 1
    next_request: int = 1  # ids of the broker's own requests to this connection

    @property
    def unique_id(self) -> str:
        return f":{self.id}"


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
        self._per_identity: dict[str, int] = {}
        self.channels = ChannelTable(cap=self.limits.relay_credit, channels_per_connection=self.limits.channels_per_connection)
        # Channel openings waiting for the target's answer, by (target conn, request id).
        self.pending_opens: dict[tuple[int, int], PendingOpen] = {}
        # Channels negotiated for a direct route, by both halves.
        self.direct: dict[tuple[int, int], DirectChannel] = {}
        #: Whether the io layer can pass descriptors (false when Unix connections are encrypted).
        self.fd_passing = True
        #: Whether Unix connections run box-stream too: then every channel is encrypted end to end.
        self.encrypt_unix = False

    # -- lifecycle ---------------------------------------------------------------------------

    def connect(self, key: PublicKey, transport: str, pid: int | None = None, uid: int | None = None) -> Connection:
        """Admit an authenticated connection; raises :class:`QuotaExceeded` over the limit."""
        count = self._per_identity.get(key.id, 0)
        if count >= self.limits.connections_per_identity:
            raise QuotaExceeded(
                f"{key.id} already has {count} connections (limit {self.limits.connections_per_identity})"
            )
        conn = Connection(
            id=self._next_id,
            key=key,
            transport=transport,
            pid=pid,
            uid=uid,
            connected_since=self._clock(),
            admin=self.policy.is_admin(key),
        )
        self._next_id += 1  # never reused while the broker runs
        self._per_identity[key.id] = count + 1
        self.connections[conn.id] = conn
        return conn

    def disconnect(self, conn_id: int) -> list[Outgoing]:
        """Forget a connection; its names pass on and watchers hear of it.  Idempotent."""
        conn = self.connections.get(conn_id)
        if conn is None:
            return []
        conn.watches.clear()  # it hears nothing more, not even of its own departure
        out = self._notify(self.names.remove_connection(conn_id))
        for ch in self.channels.forget_connection(conn_id):
            other = ch.b if ch.a[0] == conn_id else ch.a
            out.append(ChannelMessage(other[0], other[1], {"reset": f"{conn.unique_id} disconnected"}))
        for half in [h for h in self.direct if h[0] == conn_id]:
            self._forget_direct(half)
        for key, pend in list(self.pending_opens.items()):
            if pend.target == conn_id and pend.route == "unix-fd":
                out.append(DropFd(key))
            if pend.target == conn_id and pend.opener == 0:
                del self.pending_opens[key]
            elif pend.target == conn_id:
                del self.pending_opens[key]
                err = ChannelRejected(f"{conn.unique_id} left before answering the channel request")
                out.append((pend.opener, ErrorReply.from_error(pend.opener_request, err).to_wire()))
            elif pend.opener == conn_id:
                pend.opener = 0  # the answer, if any, will be undone
                out.append(ChannelMessage(pend.target, pend.b[1], {"reset": f"{conn.unique_id} disconnected"}))
        del self.connections[conn_id]
        left = self._per_identity[conn.key.id] - 1
        if left:
            self._per_identity[conn.key.id] = left
        else:
            del self._per_identity[conn.key.id]
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
                raise UnknownOperation(f"unknown operation {message.op!r}")
            if not conn.registered and message.op not in ("hello", "ping"):
                raise BadRequest(f"{message.op}: send hello first")
            result = handler(self, conn, message, out)
        except RequestError as exc:
            return [(conn_id, ErrorReply.from_error(message.id, exc).to_wire())]
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
        pend = self.pending_opens.pop((conn_id, reply.re), None)
        if pend is None:
            return []  # a ping's answer, or one that came after the deadline (reset below)
        target = self.connections[conn_id]
        key = (conn_id, reply.re)
        if isinstance(reply, ErrorReply):
            drop: list[Outgoing] = [DropFd(key)] if pend.route == "unix-fd" else []
            if pend.opener == 0:
                return drop
            err = ChannelRejected(f"{target.unique_id} rejected the channel: {reply.message}")
            return [(pend.opener, ErrorReply.from_error(pend.opener_request, err).to_wire()), *drop]
        if pend.route == "tcp":
            if pend.opener == 0 or pend.opener not in self.connections:
                return []  # the target's listener gives up at its own deadline
            answer = reply.result if isinstance(reply.result, dict) else {}
            host, port = answer.get("host"), answer.get("port")
            if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                err = ChannelRejected(f"{target.unique_id} accepted without a usable host and port")
                return [(pend.opener, ErrorReply.from_error(pend.opener_request, err).to_wire())]
            self._add_direct(pend)
            opened = self._opened(pend, target, True, host=host, port=port, token=pend.token)
            return [(pend.opener, opened)]
        if pend.route == "unix-fd":
            if pend.opener == 0 or pend.opener not in self.connections:
                return [DropFd(key)]  # the target's end closes with the opener gone: it sees EOF
            self._add_direct(pend)
            return [WithFd(pend.opener, self._opened(pend, target, False), key, create=False)]
        if pend.opener == 0 or pend.opener not in self.connections:
            # The opener left meanwhile: the target accepted a channel nobody holds.
            return [ChannelMessage(target.id, pend.b[1], {"reset": "the opener left"})]
        opener = self.connections[pend.opener]
        try:
            ch = self.channels.open(pend.a, pend.b, pend.protocol)
        except QuotaExceeded as exc:
            return [
                (opener.id, ErrorReply.from_error(pend.opener_request, exc).to_wire()),
                ChannelMessage(target.id, pend.b[1], {"reset": str(exc)}),
            ]
        return [(opener.id, self._opened(pend, target, pend.encrypted)), *self.initial_credit(ch)]

    def _opened(self, pend: PendingOpen, target: Connection, encrypted: bool, **route_fields: Any) -> dict[str, Any]:
        """The opener's reply: its channel id, the route, and who is at the other end."""
        result = {
            "channel": pend.a[1],
            "route": pend.route,
            "encrypted": encrypted,
            "peer": self._peer(target),
            "protocol": pend.protocol,
            **route_fields,
        }
        return Reply(pend.opener_request, result).to_wire()

    def expire_open(self, target_id: int, request_id: int, seconds: float) -> list[Outgoing]:
        """The target did not answer in time: the opener gets an error; a late yes is reset."""
        pend = self.pending_opens.pop((target_id, request_id), None)
        if pend is None:
            return []
        # Keep a tombstone so a late acceptance gets its channel reset, not ignored.
        self.pending_opens[(target_id, request_id)] = PendingOpen(
            0, 0, target_id, request_id, pend.protocol, pend.encrypted, pend.a, pend.b, pend.route
        )
        drop: list[Outgoing] = [DropFd((target_id, request_id))] if pend.route == "unix-fd" else []
        if pend.opener == 0:
            return drop
        target = self.connections.get(target_id)
        who = target.unique_id if target else f":{target_id}"
        err = ChannelRejected(f"{who} did not answer the channel request within {seconds:g} s")
        return [(pend.opener, ErrorReply.from_error(pend.opener_request, err).to_wire()), *drop]

    # -- direct channels (their ends report them) ------------------------------------------------

    def _direct_count(self, conn_id: int) -> int:
        return sum(1 for half in self.direct if half[0] == conn_id)

    def _add_direct(self, pend: PendingOpen) -> None:
        record = DirectChannel(pend.a, pend.b, pend.protocol, pend.route)
        self.direct[pend.a] = self.direct[pend.b] = record

    def _forget_direct(self, half: tuple[int, int]) -> None:
        record = self.direct.pop(half, None)
        if record is not None:
            for other in (record.a, record.b):
                self.direct.pop(other, None)

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
        if req.arg("closed", bool, False):
            self._forget_direct(half)
        else:
            record.counts[half] = counts
        return {}

    # -- relayed channels (the io layer moves the bytes) ------------------------------------------

    def initial_credit(self, ch: RelayChannel) -> list[Outgoing]:
        """Each side may send ``relay_credit`` bytes to start with."""
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
        # Info is repeated in every list and event about this connection: keep it small.
        size = len(cbor2.dumps(normalized))
        if size > self.limits.info_bytes:
            raise QuotaExceeded(f"hello: info is {size} bytes, over the {self.limits.info_bytes}-byte limit")
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
            if everything or self.policy.may_see(conn.key, name).allowed:
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
        page: list[dict[str, Any]] = []
        used = 0
        page_label = ""
        for _, label, entry in keyed[start:]:
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
        if owner is None or not (conn.admin or self.policy.may_see(conn.key, name).allowed):
            raise NameNotFound(f"no connection owns {name!r}")
        return self._entry(name, owner)

    def _info(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        target = req.arg("target", str)
        target_id = parse_unique_id(target)
        if target_id is None:
            name = validate_name(target)
            target_id = self.names.owner(name)
            if target_id is None or not (conn.admin or self.policy.may_see(conn.key, name).allowed):
                raise NameNotFound(f"no connection owns {name!r}")
        other = self.connections.get(target_id)
        visible_names = [] if other is None else self._visible_names(conn, other)
        if other is None or not (conn.admin or other is conn or visible_names):
            # Nameless connections are hidden from everyone but admins and themselves.
            raise NameNotFound(f"no visible connection {target!r}")
        entry = self._entry(visible_names[0] if visible_names else None, other.id)
        entry["names"] = visible_names
        intimate = conn.admin or other is conn
        entry["queued_for"] = self.names.waiting_for(other.id) if intimate else []
        entry["channels"] = self._channels_of(other) if intimate else []
        return entry

    def _channels_of(self, conn: Connection) -> list[dict[str, Any]]:
        listed = []
        for ch in sorted(self.channels.of_connection(conn.id), key=lambda c: c.id):
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
        for half, record in sorted((hr for hr in self.direct.items() if hr[0][0] == conn.id), key=lambda hr: hr[0][1]):
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
        return listed

    def _watch(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """``{watch, snapshot, more}``; with ``more``, ``snapshot`` events follow at once
        (before any change), the last with ``more: false``."""
        patterns = req.arg("patterns", list, ["*"]) or ["*"]
        if not all(isinstance(p, str) for p in patterns):
            raise BadRequest("watch: 'patterns' must be a list of strings")
        if len(patterns) > self.limits.patterns_per_watch:
            raise QuotaExceeded(f"watch: at most {self.limits.patterns_per_watch} patterns")
        if any(len(p) > self.limits.pattern_length for p in patterns):
            raise QuotaExceeded(f"watch: a pattern is at most {self.limits.pattern_length} characters")
        if len(conn.watches) >= self.limits.watches_per_connection:
            raise QuotaExceeded(f"at most {self.limits.watches_per_connection} watches per connection")
        # One compiled expression per watch, owned by the watch (no process-wide cache).
        compiled = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
        watch_id = conn.next_watch
        conn.next_watch += 1
        conn.watches[watch_id] = compiled
        chunks: list[list[dict[str, Any]]] = [[]]
        used = 0
        for name, owner in sorted(self.names.names().items()):
            if self._matches(conn, compiled, name):
                entry = self._entry(name, owner)
                size = len(cbor2.dumps(entry))
                if chunks[-1] and used + size > self.limits.reply_bytes:
                    chunks.append([])
                    used = 0
                chunks[-1].append(entry)
                used += size
        for i, chunk in enumerate(chunks[1:], 1):
            fields = {"watch": watch_id, "entries": chunk, "more": i < len(chunks) - 1}
            out.append((conn.id, Event("snapshot", fields).to_wire()))
        return {"watch": watch_id, "snapshot": chunks[0], "more": len(chunks) > 1}

    def _unwatch(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        watch_id = req.arg("watch", int)
        if conn.watches.pop(watch_id, None) is None:
            raise BadRequest(f"unwatch: no watch {watch_id}")
        return {}

    def _open_channel(self, conn: Connection, req: Request, out: list[Outgoing]) -> Any:
        """Ask the target; the opener's reply comes when the target answers (or never does)."""
        name = validate_name(req.arg("name", str))
        protocol = req.arg("protocol", str, "raw")
        route = req.arg("route", str, "auto")
        if not CHANNEL_PROTOCOL_RE.match(protocol):
            raise BadRequest(f"open_channel: protocol {protocol!r} is not a valid label")
        if route not in ("relay", "auto", "direct"):
            raise BadRequest(f"open_channel: route {route!r} is not one of relay, auto, direct")
        target_id = self.names.owner(name)
        if target_id is None or not (conn.admin or self.policy.may_see(conn.key, name).allowed):
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
        for c in (conn, target):
            self.channels.check_quota(c.id, also=self._direct_count(c.id))
        a = (conn.id, self.channels.allocate(conn.id))
        b = (target.id, self.channels.allocate(target.id))
        request_id = self.next_request_id(target)
        self.pending_opens[(target.id, request_id)] = PendingOpen(
            conn.id, req.id, target.id, request_id, protocol, encrypted and chosen == "relay", a, b, chosen
        )
        ask = {
            "channel": b[1],
            "protocol": protocol,
            "route": chosen,
            "encrypted": encrypted and chosen == "relay",
            "name": name,
            "opener": self._peer(conn),
        }
        if chosen == "tcp":
            ask["token"] = self.pending_opens[(target.id, request_id)].token = os.urandom(32)
        message = Request("channel_request", request_id, ask).to_wire()
        if chosen == "unix-fd":
            out.append(WithFd(target.id, message, (target.id, request_id), create=True))
        else:
            out.append((target.id, message))
        return _DEFERRED

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
    }

    # -- helpers -----------------------------------------------------------------------------

    def _flags(self, req: Request) -> NameFlag:
        names = req.arg("flags", list, [])
        flags = NameFlag.NONE
        for name in names:
            if not isinstance(name, str) or name not in FLAG_NAMES:
                raise BadRequest(f"{req.op}: unknown flag {name!r} (known: {', '.join(FLAG_NAMES)})")
            flags |= FLAG_NAMES[name]
        return flags

    def _request_name(self, conn: Connection, name: str, flags: NameFlag, out: list[Outgoing]) -> str:
        validate_name(name)
        self.policy.may_own(conn.key, name).check()
        result, events = self.names.request_name(conn.id, name, flags)
        out.extend(self._notify(events))
        return result.value

    def _visible_names(self, viewer: Connection, other: Connection) -> list[str]:
        return [
            n
            for n in self.names.owned_by(other.id)
            if viewer.admin or viewer is other or self.policy.may_see(viewer.key, n).allowed
        ]

    def _matches(self, watcher: Connection, compiled: re.Pattern[str], name: str) -> bool:
        return (watcher.admin or self.policy.may_see(watcher.key, name).allowed) and compiled.match(name) is not None

    def _peer(self, conn: Connection) -> dict[str, Any]:
        return {"unique_id": conn.unique_id, "identity": conn.key.id, "names": self.names.owned_by(conn.id)}

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
        out: list[Outgoing] = []
        for change in changes:
            if change.old is None:
                kind = "connected"
            elif change.new is None:
                kind = "disconnected"
            else:
                kind = "owner-changed"
            owner = self._entry(change.name, change.new) if change.new is not None else None
            old = self.connections.get(change.old) if change.old is not None else None
            # One message object per watch id: watchers with equal ids share it, so the io
            # layer can encode it once for all of them.
            shared: dict[int, dict[str, Any]] = {}
            for watcher in self.connections.values():
                for watch_id, patterns in watcher.watches.items():
                    if not self._matches(watcher, patterns, change.name):
                        continue
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
                    out.append((watcher.id, message))
        return out
