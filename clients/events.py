"""Events between plugins, the client's side: subscriptions and emitting.

Theory of operation
-------------------
The broker sends each connection one ``event`` message per event, however many of its
subscriptions match; :class:`Events` hands it to every local :class:`Subscription` whose
patterns match (the same globs the broker uses), in the order they arrive.  What could not
be delivered is never lost silently: each subscription yields a :class:`Gap` instead, with a
count and a reason --

* ``overflow``: the broker's queue for us was full (it said so with a ``gap`` event);
* ``slow consumer``: this subscription's own buffer (:data:`SUBSCRIPTION_BUFFER` items) was
  full, because its consumer does not keep up;
* ``link down``: the connection to the broker was lost and made again; events emitted
  meanwhile were not counted by anyone (``missed`` is None).

Subscriptions are registered again after a reconnect, like watches.

Emitting comes in two kinds.  :meth:`Events.emit` waits for the broker's answer (to how many
connections it queued the event).  :meth:`Events.publish` is one-way, like a D-Bus signal or
a NATS publish: it sends a *quiet* emit and returns once the event is in the connection's
outbound queue (it waits only for room there), so an emitter can send event after event
without a round trip each.  The broker answers a quiet emit only when it refuses it, with an
``emit_refused`` event; the refusal is logged and raised by the next ``publish``, as a socket
reports an earlier send's failure.
"""

from __future__ import annotations

import collections
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import trio

from bus.core.glob import GlobSet, compile_glob
from bus.errors import BusError, ConnectionLost, RequestError, error_from_wire
from bus.wire.frames import EmitFrames, encode_control
from bus.wire.messages import Event as WireEvent

from .link import BusConnection, Link

__all__ = ["Event", "Gap", "Subscription", "Events", "SUBSCRIPTION_BUFFER"]

log = logging.getLogger("minibus.client")

#: Items (events and gaps) one subscription buffers for its consumer.
SUBSCRIPTION_BUFFER = 1000
#: Kinds of event (source, member) whose matching subscriptions are remembered.
ROUTE_CACHE = 256
#: Payload types CBOR encodes without tags (ints: within 64 bits, below), as the frame
#: encoder's own check of a message has them.
_PLAIN_SCALARS = frozenset({bytes, str, bool, float, type(None)})
_INT_MIN, _INT_MAX = -(1 << 64), (1 << 64) - 1
_reschedule = trio.lowlevel.reschedule
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_ABORTED = trio.lowlevel.Abort.SUCCEEDED
_NO_KIND = object()  # equal to no source or member
_NO_BUFFER: collections.deque[Any] = collections.deque(maxlen=0)  # (see Events._on_events)
_NO_WAITERS: collections.deque[trio.lowlevel.Task] = collections.deque(maxlen=0)


@dataclass(frozen=True, slots=True)
class Event:
    """One event, as the broker stamped it."""

    source: str  # a well-known name its sender owns, or the sender's unique id
    member: str
    payload: Any
    sender: str  # the sender's unique id
    identity: str  # the sender's verified key

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "member": self.member, "payload": self.payload, "sender": self.sender, "identity": self.identity}


class _EventDraft:
    """An :class:`Event` being built, on the subscriber's hot path (one per event per
    connection), in under half the time of its setters and a fifth of its ``__init__`` (a
    frozen dataclass sets each field through ``object.__setattr__``): the same slots, in the
    same order, set as plain attributes; then it becomes an Event (``__class__`` assignment,
    which Python allows between classes of one layout, and checks).  Nothing else ever holds
    a draft."""

    __slots__ = Event.__slots__


@dataclass(frozen=True, slots=True)
class Gap:
    """Events this subscription did not get: ``missed`` of them (None: not counted), and why."""

    missed: int | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"gap": True, "missed": self.missed, "reason": self.reason}


class Subscription:
    """Events whose source and member match two patterns, then more, as an async iterator
    (``async with bus.subscribe("org.example.*", "New*") as events: async for e in events``);
    it yields :class:`Event` and, where some were missed, :class:`Gap` items."""

    def __init__(self, events: Events, source_pattern: str, member_pattern: str) -> None:
        self._events = events
        self.source_pattern = source_pattern
        self.member_pattern = member_pattern
        self._source = GlobSet((compile_glob(source_pattern),))
        self._member = GlobSet((compile_glob(member_pattern),))
        self.link: Link | None = None
        self.subscription_id: int | None = None
        # Items for the consumer (at most SUBSCRIPTION_BUFFER), and the tasks waiting for
        # one (in the order they came): a deque each cost a fraction of a memory channel per
        # item, and the reader tests the waiters in C (a parking lot's test is a Python call).
        self._buffer: collections.deque[Event | Gap] = collections.deque()
        self._waiters: collections.deque[trio.lowlevel.Task] = collections.deque()
        self._ended = False  # no more items will come (unsubscribed, or the bus closed)
        self._closed = False
        # The gap owed for what the consumer's full buffer could not take, not yet announced
        # (None: nothing owed): see _owe.
        self._owed: Gap | None = None

    def matches(self, source: str, member: str) -> bool:
        return self._member.match(member) and self._source.match(source)

    # -- called by the events (in the link's reader) ----------------------------------------

    def _registered(self, link: Link, result: dict[str, Any]) -> None:
        if self._closed:
            self._events.send_unsubscribe(link, result["subscription"])
            return
        self.link = link
        self.subscription_id = result["subscription"]
        self._events.on_link(link)[result["subscription"]] = self
        self._events.routes_changed()

    def _put(self, item: Event | Gap) -> None:
        buffer = self._buffer
        if self._owed is not None or self._closed or len(buffer) >= SUBSCRIPTION_BUFFER:
            if self._closed:
                return
            if self._owed is not None:
                if len(buffer) >= SUBSCRIPTION_BUFFER:
                    self._owe(item)
                    return
                buffer.append(self._owed)
                self._owed = None
            if len(buffer) >= SUBSCRIPTION_BUFFER:
                self._owe(item)
                return
        buffer.append(item)
        if self._waiters:
            # One consumer is woken per item; in a burst, the first item wakes it and it
            # takes the rest of the burst in the same turn (the others find no waiter).
            trio.lowlevel.reschedule(self._waiters.popleft())

    def _owe(self, item: Event | Gap) -> None:
        """``item`` did not fit the full buffer: it joins the gap owed, which comes before the
        next item that fits.  An event counts one (``slow consumer``); a gap adds its count,
        and one not counted (``missed`` None: a link that went down) makes the owed gap
        uncounted; the broker's or the link's reason says more than ``slow consumer`` and is
        kept.  So nothing is dropped unsaid, and no count is claimed that was not made."""
        if type(item) is Gap:
            missed, reason = item.missed, item.reason
        else:
            missed, reason = 1, "slow consumer"
        owed = self._owed
        if owed is None:
            self._owed = Gap(missed, reason)
            return
        total = None if owed.missed is None or missed is None else owed.missed + missed
        self._owed = Gap(total, owed.reason if owed.reason != "slow consumer" else reason)

    def _forget(self) -> None:
        self._closed = True
        self._end()
        self._events.live.discard(self)
        link, sub_id = self.link, self.subscription_id
        self._events.routes_changed()
        if link is not None and sub_id is not None and self._events.on_link(link).pop(sub_id, None) is self:
            self._events.send_unsubscribe(link, sub_id)

    # -- the user's side --------------------------------------------------------------------

    async def __aenter__(self) -> Subscription:
        await self._events.start(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._forget()
        await trio.lowlevel.checkpoint()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event | Gap:
        # What is buffered already is handed over without a scheduler pass each time (one
        # per item would cost as much as the item): every call can be cancelled (before it
        # takes anything), and a call that leaves a multiple of 16 items lets the other
        # tasks run -- one in at most 16 calls on this subscription (a consumer of k takes up
        # to 16k items between them, as before), since nothing is added between two
        # scheduling points.  (One that leaves none does not: the next call waits, which
        # lets them run; a burst of 16 would otherwise cost two passes.)
        buffer = self._buffer
        if buffer:
            await _checkpoint_if_cancelled()
            item = buffer.popleft()
            if not len(buffer) & 15 and buffer:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return item
        while not buffer:
            if self._ended:
                raise StopAsyncIteration
            # Until an item comes or the end (a ParkingLot's park, for this one use; here,
            # not in a coroutine of its own, which would be one more to resume per wake-up):
            # cancellable, and nothing was taken yet.
            task = _current_task()
            waiters = self._waiters
            waiters.append(task)

            def abort(_: Any, waiters: collections.deque[trio.lowlevel.Task] = waiters, task: Any = task) -> trio.lowlevel.Abort:
                waiters.remove(task)  # (it is there: woken tasks are taken out first)
                return _ABORTED

            await _wait_task_rescheduled(abort)
        return buffer.popleft()

    def _end(self) -> None:
        """No more items: the consumer gets what is buffered, then the end."""
        self._ended = True
        waiters = self._waiters
        while waiters:
            trio.lowlevel.reschedule(waiters.popleft())


class Events:
    """Subscriptions and emitting on one :class:`~clients.link.BusConnection`."""

    def __init__(self, connection: BusConnection) -> None:
        self._connection = connection
        self.live: set[Subscription] = set()
        self._by_link: weakref.WeakKeyDictionary[Link, dict[int, Subscription]] = weakref.WeakKeyDictionary()
        connection.raw_event_handlers["event"] = self._on_events
        connection.event_handlers["gap"] = self._on_gap
        connection.event_handlers["emit_refused"] = self._on_refused
        self._refused: RequestError | None = None  # a quiet emit's refusal, not raised yet
        self._published = 0
        self._emit_frames = EmitFrames()  # (publish's frames with a byte-string payload)
        # Which subscriptions an event of (source, member) goes to, on ``_routes_link``: worked
        # out once per kind (at most ROUTE_CACHE kinds), forgotten when a subscription comes
        # or goes or the link changes.
        self._routes: dict[str, dict[str, list[Subscription]]] = {}  # by source, then member
        self._route_count = 0  # kinds in _routes
        self._routes_link: Link | None = None

    def routes_changed(self) -> None:
        self._routes.clear()
        self._route_count = 0

    def on_link(self, link: Link) -> dict[int, Subscription]:
        table = self._by_link.get(link)
        if table is None:
            table = self._by_link[link] = {}
        return table

    def subscribe(self, source_pattern: str = "*", member_pattern: str = "*") -> Subscription:
        return Subscription(self, source_pattern, member_pattern)

    async def start(self, sub: Subscription) -> None:
        link = self._connection.link
        self.live.add(sub)
        try:
            await self._connection.request(
                "subscribe",
                {"source": sub.source_pattern, "member": sub.member_pattern},
                lambda result: sub._registered(link, result) if link is not None else None,
                lambda result: self.send_unsubscribe(link, result["subscription"]) if link is not None else None,
            )
        except BaseException:
            self.live.discard(sub)
            raise

    def send_unsubscribe(self, link: Link, sub_id: int) -> None:
        self.on_link(link).pop(sub_id, None)
        self.routes_changed()
        if not link.closed:
            self._connection.send_request_nowait(link, "unsubscribe", {"subscription": sub_id})

    async def emit(
        self, member: str, payload: Any = None, *, source: str | None = None, destination: str | None = None
    ) -> int:
        """Emit an event; returns to how many connections the broker queued it."""
        args: dict[str, Any] = {"member": member, "payload": payload}
        if source is not None:
            args["source"] = source
        if destination is not None:
            args["destination"] = destination
        result = await self._connection.request("emit", args)
        return int(result.get("delivered", 0)) if isinstance(result, dict) else 0

    async def publish(
        self, member: str, payload: Any = None, *, source: str | None = None, destination: str | None = None
    ) -> None:
        """Emit an event without waiting for the broker (see the module's notes).  Raises the
        refusal of an earlier ``publish`` if one came since the last call."""
        refused, self._refused = self._refused, None
        if refused is not None:
            raise refused
        connection = self._connection
        link = connection.link
        if link is None or link.closed:
            raise ConnectionLost(f"not connected to the bus{f': {connection.failure}' if connection.failure else ''}")
        kind = type(payload)
        names = type(member) is str and (source is None or type(source) is str) and (destination is None or type(destination) is str)
        if kind is bytes and names:
            # The same bytes as below, with the names encoded once per kind (see EmitFrames).
            frame = self._emit_frames.encode(member, source, destination, payload, connection.take_request_id(), link.framed.max_control)
        else:
            # The request as Request(...).to_wire() makes it (the arguments, then op and id),
            # built in place: one is made per event.
            message: dict[str, Any] = {"member": member, "payload": payload, "quiet": True}
            if source is not None:
                message["source"] = source
            if destination is not None:
                message["destination"] = destination
            message["op"] = "emit"
            message["id"] = connection.take_request_id()
            # Text names and a scalar payload are plain CBOR by their types alone: the walk
            # over the message that proves it (the encoder's, for any other payload) is skipped.
            plain = names and (kind in _PLAIN_SCALARS or (kind is int and _INT_MIN <= payload <= _INT_MAX))
            frame = encode_control(0, message, link.framed.max_control, checked=plain)
        self._published += 1
        try:
            # The frame goes to the writer task, which sends what was queued in one write
            # when this task yields: every 16th call does (a scheduler pass each time would
            # halve an emitter's rate), and any other wait of the caller's does too.  Every
            # call can be cancelled.
            await trio.lowlevel.checkpoint_if_cancelled()
            send = link.send
            if not send.put_later_nowait(frame):
                await send.put_later(frame)  # (the queue is full: wait for room)
            if not self._published & 15:
                await trio.lowlevel.cancel_shielded_checkpoint()
        except trio.ClosedResourceError:
            raise ConnectionLost(f"the link to the bus closed: {link.reason or 'connection lost'}") from None

    # -- in the reader ------------------------------------------------------------------------

    def _on_refused(self, link: Link, message: WireEvent) -> None:
        fields = message.fields
        error = error_from_wire(str(fields.get("code", "")), str(fields.get("message", "")))
        log.warning("an event published earlier was refused: %s", error)
        self._refused = error

    def _on_events(self, link: Link, run: list[dict[Any, Any]], start: int) -> int:
        """The events at ``run[start]`` and after it, while they are events (see
        BusConnection.raw_event_handlers: the maps as they came, read, never kept): each to
        the subscriptions it matches; returns the index of the first message not taken."""
        if link is not self._routes_link:
            self.routes_changed()
            self._routes_link = link
        routes = self._routes  # (cleared in place when routes change: the same dict)
        # The last event's kind and route (no subscription comes or goes during a run): an
        # event of an equal kind takes the same route.
        last_source: object = _NO_KIND
        last_member: object = _NO_KIND
        last_route: list[Subscription] = []
        limit = SUBSCRIPTION_BUFFER
        # When the last kind goes to one subscription, open and owed no gap (most often): its
        # buffer, its waiting consumers, and how many more items the buffer takes (nothing
        # else adds to it during a run); else room is 0 and each event takes the loop below.
        room = 0
        buffer, waiters = _NO_BUFFER, _NO_WAITERS  # (never used while room is 0)
        for i in range(start, len(run)):
            message = run[i]
            try:
                # (Subscripts: cheaper than .get calls, and busd sends every field.)
                kind = message["event"]
                source = message["source"]
                member = message["member"]
                payload = message["payload"]
                sender = message["sender"]
                identity = message["identity"]
            except KeyError:
                if message.get("event") != "event" or "op" in message or "re" in message:
                    return i  # (not an event: the link's dispatch takes it)
                source, member, payload = message.get("source"), message.get("member"), message.get("payload")
                sender, identity = message.get("sender", ""), message.get("identity", "")
            else:
                # An event has no "op" or "re" (parse_message's rule): a map of the six keys
                # above alone has room for neither.
                if kind != "event" or (len(message) != 6 and ("op" in message or "re" in message)):
                    return i  # (not an event: the link's dispatch takes it)
            if member != last_member or source != last_source:
                # Not the last event's kind (most events of a run are; the last kind's names
                # are text, and what the CBOR decoder makes of anything else is never equal
                # to text): the route, by source then member (two lookups, cheaper than
                # hashing a fresh (source, member) tuple), for names that are text.
                if type(source) is not str or type(member) is not str:
                    continue
                by_member = routes.get(source)
                known = by_member.get(member) if by_member is not None else None
                last_route = known if known is not None else self._route(link, source, member)
                last_source, last_member = source, member
                room = 0
                if len(last_route) == 1:
                    only = last_route[0]
                    if only._owed is None and not only._closed:
                        buffer, waiters = only._buffer, only._waiters
                        room = limit - len(buffer)
            if not last_route:
                continue
            event: Any = _EventDraft()
            event.source = source
            event.member = member
            event.payload = payload
            if type(sender) is not str or type(identity) is not str:
                sender, identity = str(sender), str(identity)
            event.sender = sender
            event.identity = identity
            event.__class__ = Event
            if room > 0:
                room -= 1
                buffer.append(event)
                if waiters:
                    _reschedule(waiters.popleft())
                continue
            for sub in last_route:
                # Subscription._put's common case in this loop (it runs once per event per
                # subscription): room in the buffer, nothing dropped, not closed.
                items = sub._buffer
                if sub._owed is not None or sub._closed or len(items) >= limit:
                    sub._put(event)
                    continue
                items.append(event)
                if sub._waiters:
                    _reschedule(sub._waiters.popleft())
        return len(run)

    def _route(self, link: Link, source: str, member: str) -> list[Subscription]:
        """Work out (and remember, up to ROUTE_CACHE kinds) which subscriptions take events
        of ``(source, member)`` on ``link``."""
        route = [sub for sub in self.on_link(link).values() if sub.matches(source, member)]
        if self._route_count >= ROUTE_CACHE:
            self.routes_changed()
        self._routes.setdefault(source, {})[member] = route
        self._route_count += 1
        return route

    def _on_gap(self, link: Link, message: WireEvent) -> None:
        sub = self.on_link(link).get(message.fields.get("subscription", 0))
        missed = message.fields.get("missed")
        if sub is not None:
            sub._put(Gap(missed if isinstance(missed, int) else None, str(message.fields.get("reason", "overflow"))))

    # -- across reconnects ----------------------------------------------------------------------

    async def restore(self, link: Link) -> None:
        """After a reconnect: register every subscription again, each told of the gap."""
        for sub in [s for s in self.live if s.link is not link and s.link is not None]:
            if sub._closed:
                continue
            sub.link = None
            sub._put(Gap(None, "link down"))

            def registered(result: Any, sub: Subscription = sub) -> None:
                sub._registered(link, result)

            def abandoned(result: Any) -> None:
                self.send_unsubscribe(link, result["subscription"])

            try:
                await self._connection.request(
                    "subscribe", {"source": sub.source_pattern, "member": sub.member_pattern}, registered, abandoned
                )
            except RequestError as exc:
                log.warning("could not subscribe again after reconnecting: %s", exc)
                sub._forget()
            except BusError as exc:
                sub.link = link  # not registered; the next restore tries again
                log.info("restoring subscriptions stopped: %s", exc)
                return

    def close_all_nowait(self) -> None:
        for sub in list(self.live):
            sub._end()
