"""Names and watches: owning well-known names, querying the registry, watching it.

Theory of operation
-------------------
:class:`Names` asks the broker for names and information over the link's requests, and
keeps what must survive a reconnect: the names requested (the first one goes with hello,
see :mod:`clients.link`; :meth:`Names.restore` requests every other one still wanted, and
releases the hello's if it was released after the hello was made) and every open
:class:`Watch`.  A watch is registered on one link under the id the broker gave it;
the broker's ``name``, ``resync`` and ``snapshot`` events for that id reach it through the
link's reader.  After a reconnect every watch is registered again and the difference between
what it knew and the broker's new snapshot arrives as ordinary events, so a watch that was
open keeps yielding across a broker restart.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import trio

from bus.errors import BusError, RequestError
from bus.wire.messages import Event

from .link import BusConnection, Link

__all__ = ["NameEvent", "NameInfo", "Names", "Watch", "WatchOverflow", "WATCH_BUFFER"]

log = logging.getLogger("minibus.client")

WATCH_BUFFER = 1024


class WatchOverflow(BusError):
    """A watch's events were not consumed and its buffer filled up; the watch ended."""


@dataclass(frozen=True, slots=True)
class NameInfo:
    """A connection as the broker reports it (``name`` is None for a nameless one)."""

    name: str | None
    unique_id: str
    identity: str
    info: dict[str, Any]
    connected_since: float
    transport: str
    pid: int | None
    uid: int | None
    names: tuple[str, ...] = ()
    queued_for: tuple[str, ...] = ()
    channels: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_wire(cls, entry: dict[str, Any]) -> NameInfo:
        return cls(
            name=entry.get("name"),
            unique_id=entry["unique_id"],
            identity=entry["identity"],
            info=entry.get("info") or {},
            connected_since=entry.get("connected_since", 0.0),
            transport=entry.get("transport", ""),
            pid=entry.get("pid"),
            uid=entry.get("uid"),
            names=tuple(entry.get("names", ())),
            queued_for=tuple(entry.get("queued_for", ())),
            channels=tuple(entry.get("channels", ())),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unique_id": self.unique_id,
            "identity": self.identity,
            "info": self.info,
            "connected_since": self.connected_since,
            "transport": self.transport,
            "pid": self.pid,
            "uid": self.uid,
            **({"names": list(self.names), "queued_for": list(self.queued_for)} if self.names or self.queued_for else {}),
            **({"channels": list(self.channels)} if self.channels else {}),
        }


@dataclass(frozen=True, slots=True)
class NameEvent:
    """``present`` (in the snapshot), ``connected``, ``disconnected`` or ``owner-changed``."""

    kind: str
    name: str
    owner: NameInfo | None
    old_owner: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "owner": self.owner.to_json() if self.owner else None,
            "old_owner": self.old_owner,
        }


class Watch:
    """Events for names matching some patterns: the snapshot (``present``), then changes.

    Use as ``async with bus.watch([...]) as watch: async for event in watch: ...``.
    The buffer holds :data:`WATCH_BUFFER` events; a watch whose events are not consumed
    ends with :class:`WatchOverflow` rather than losing any silently.
    """

    def __init__(self, names: Names, patterns: tuple[str, ...]) -> None:
        self._names = names
        self.patterns = patterns
        # The link (connection) this watch is registered on, and its id there.
        self.link: Link | None = None
        self.watch_id: int | None = None
        self.known: dict[str, NameInfo] = {}
        self._send, self._receive = trio.open_memory_channel[NameEvent](WATCH_BUFFER)
        self._error: BusError | None = None
        self._closed = False
        # While a resync's snapshot (after a reconnect, or after the broker said ``resync``)
        # arrives in several messages: the names it holds so far, by name, with the changes
        # that came meanwhile applied (they concern names its earlier pages held).
        self._resyncing: dict[str, NameInfo] | None = None

    # -- called by the names (in the link's reader) -----------------------------------------

    def _registered(self, link: Link, result: dict[str, Any], resync: bool) -> None:
        if self._closed:
            self._names.send_unwatch(link, result["watch"])
            return
        self.link = link
        self.watch_id = result["watch"]
        self._names.watches_on(link)[result["watch"]] = self
        self._snapshot_part([NameInfo.from_wire(e) for e in result.get("snapshot", [])], bool(result.get("more")), resync)

    def _snapshot_part(self, entries: list[NameInfo], more: bool, resync: bool | None = None) -> None:
        if resync is None:
            resync = self._resyncing is not None
        if resync:
            if self._resyncing is None:
                self._resyncing = {}
            self._resyncing.update((e.name, e) for e in entries if e.name is not None)
            if not more:
                complete, self._resyncing = self._resyncing, None
                self._resync(list(complete.values()))
            return
        for info in entries:
            self._push(NameEvent("present", info.name or "", info))

    def _begin_resync(self) -> None:
        """The broker could not send some changes (our queue was full): a fresh snapshot
        follows, and what differs from what we knew is reported as ordinary events."""
        self._resyncing = {}

    def _change(self, event: NameEvent) -> None:
        if self._resyncing is not None:
            if event.owner is None:
                self._resyncing.pop(event.name, None)
            else:
                self._resyncing[event.name] = event.owner
            return
        self._push(event)

    def _push(self, event: NameEvent) -> None:
        if self._closed:
            return
        if event.owner is None:
            self.known.pop(event.name, None)
        else:
            self.known[event.name] = event.owner
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._fail(WatchOverflow(f"watch {list(self.patterns)}: {WATCH_BUFFER} events were not consumed"))
        except trio.ClosedResourceError:
            pass

    def _fail(self, error: BusError) -> None:
        """End the watch with ``error`` for its consumer, and drop it on the broker."""
        if self._closed:
            return
        self._error = error
        self._forget()

    def _forget(self) -> None:
        self._closed = True
        self._send.close()
        self._names.live_watches.discard(self)
        link, watch_id = self.link, self.watch_id
        if link is not None and watch_id is not None and self._names.watches_on(link).pop(watch_id, None) is self:
            self._names.send_unwatch(link, watch_id)

    def _resync(self, snapshot: list[NameInfo]) -> None:
        """After a reconnect: report the difference between what we knew and the new snapshot."""
        fresh = {e.name: e for e in snapshot if e.name is not None}
        for name in sorted(set(self.known) - set(fresh)):
            self._push(NameEvent("disconnected", name, None, self.known[name].unique_id))
        for name in sorted(fresh):
            old = self.known.get(name)
            if old is None:
                self._push(NameEvent("connected", name, fresh[name]))
            elif (old.unique_id, old.connected_since) != (fresh[name].unique_id, fresh[name].connected_since):
                # Unique ids restart with a new broker: a new connection shows in connected_since.
                self._push(NameEvent("owner-changed", name, fresh[name], old.unique_id))

    # -- the user's side --------------------------------------------------------------------

    async def __aenter__(self) -> Watch:
        await self._names.start_watch(self)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._forget()
        await trio.lowlevel.checkpoint()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> NameEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None


class Names:
    """Well-known names and watches on one :class:`~clients.link.BusConnection`."""

    def __init__(self, connection: BusConnection) -> None:
        self._connection = connection
        self.live_watches: set[Watch] = set()
        # The watches registered on each link, by the id the broker gave them there.  Weak: a
        # link that ended takes its table with it.
        self._by_link: weakref.WeakKeyDictionary[Link, dict[int, Watch]] = weakref.WeakKeyDictionary()
        connection.event_handlers["name"] = self._on_name
        connection.event_handlers["resync"] = self._on_resync
        connection.event_handlers["snapshot"] = self._on_snapshot

    def watches_on(self, link: Link) -> dict[int, Watch]:
        table = self._by_link.get(link)
        if table is None:
            table = self._by_link[link] = {}
        return table

    # -- names ----------------------------------------------------------------------------------

    async def request_name(self, name: str, flags: Iterable[str] = ()) -> str:
        flags = list(flags)
        result: str = await self._connection.request("request_name", {"name": name, "flags": flags})
        if result != "exists":
            self._connection.requested_names[name] = flags
        return result

    async def release_name(self, name: str) -> str:
        self._connection.requested_names.pop(name, None)
        result: str = await self._connection.request("release_name", {"name": name})
        return result

    async def list_names(self, *, all: bool = False) -> list[NameInfo]:
        entries: list[NameInfo] = []
        after: str | None = None
        while True:
            args: dict[str, Any] = {"all": all}
            if after is not None:
                args["after"] = after
            page = await self._connection.request("list_names", args)
            entries += [NameInfo.from_wire(e) for e in page["entries"]]
            after = page.get("next")
            if after is None:
                return entries

    async def resolve(self, name: str) -> NameInfo:
        return NameInfo.from_wire(await self._connection.request("resolve", {"name": name}))

    async def info(self, target: str) -> NameInfo:
        request = self._connection.request
        entry = await request("info", {"target": target})
        while isinstance(entry, dict) and entry.get("channels_next") is not None:
            more = await request("info", {"target": target, "channels_after": entry["channels_next"]})
            entry["channels"] = [*entry.get("channels", []), *more.get("channels", [])]
            entry["channels_next"] = more.get("channels_next")
        return NameInfo.from_wire(entry)

    async def stats(self) -> dict[str, Any]:
        """The broker's figures: ``{totals, connections}`` (docs/protocol.md, ``stats``).

        ``connections`` holds every connection's row for an admin identity, only this
        connection's own otherwise; long lists come in pages, fetched here one after another
        (the totals are those of the first page: the pages are not one atomic snapshot)."""
        request = self._connection.request
        reply = await request("stats", {})
        totals, rows = reply["totals"], list(reply["connections"])
        while reply.get("next") is not None:
            reply = await request("stats", {"after": reply["next"]})
            rows += reply["connections"]
        return {"totals": totals, "connections": rows}

    # -- watches --------------------------------------------------------------------------------

    def watch(self, patterns: Iterable[str] = ("*",)) -> Watch:
        return Watch(self, tuple(patterns) or ("*",))

    async def start_watch(self, watch: Watch) -> None:
        link = self._connection.link
        self.live_watches.add(watch)
        try:
            await self._connection.request(
                "watch",
                {"patterns": list(watch.patterns)},
                lambda result: watch._registered(link, result, resync=False) if link is not None else None,
                lambda result: self.send_unwatch(link, result["watch"]) if link is not None else None,
            )
        except BaseException:
            self.live_watches.discard(watch)
            raise

    def send_unwatch(self, link: Link, watch_id: int) -> None:
        """Drop a watch on the broker without waiting (from the reader or a closing watch)."""
        self.watches_on(link).pop(watch_id, None)
        if link.closed:
            return
        self._connection.send_request_nowait(link, "unwatch", {"watch": watch_id})  # (lost with a dying link: so is the watch)

    def _on_name(self, link: Link, event: Event) -> None:
        watch = self.watches_on(link).get(event.fields.get("watch", 0))
        if watch is None:
            return
        owner = event.fields.get("owner")
        watch._change(
            NameEvent(
                kind=event.fields.get("kind", ""),
                name=event.fields.get("name", ""),
                owner=NameInfo.from_wire(owner) if owner else None,
                old_owner=event.fields.get("old_owner"),
            )
        )

    def _on_resync(self, link: Link, event: Event) -> None:
        watch = self.watches_on(link).get(event.fields.get("watch", 0))
        if watch is not None:
            watch._begin_resync()

    def _on_snapshot(self, link: Link, event: Event) -> None:
        watch = self.watches_on(link).get(event.fields.get("watch", 0))
        if watch is not None:
            entries = [NameInfo.from_wire(e) for e in event.fields.get("entries", [])]
            watch._snapshot_part(entries, bool(event.fields.get("more")))

    # -- across reconnects ----------------------------------------------------------------------

    async def restore(self, link: Link) -> None:
        """After (re)connecting: the remaining names and every watch of older links."""
        stale = [w for w in self.live_watches if w.link is not link and w.link is not None]
        wanted = self._connection.requested_names
        taken = link.hello_name  # (the hello asked for it: made before a release that came after)
        if taken is not None and taken not in wanted:
            try:
                await self._connection.request("release_name", {"name": taken})
            except RequestError as exc:
                log.warning("could not release %s after reconnecting: %s", taken, exc)
            except BusError as exc:
                log.info("restoring names stopped: %s", exc)
                return  # the link failed too; the serve loop reconnects again
        for name in list(wanted):
            # (Each as wanted now: the user may release one while those before it are asked
            # for.  The answer is not written back to the wanted names: a release the user
            # sent while this request waited stands.)
            flags = wanted.get(name)
            if flags is None or name == taken:
                continue
            try:
                await self._connection.request("request_name", {"name": name, "flags": flags})
            except RequestError as exc:
                log.warning("could not request %s again after reconnecting: %s", name, exc)
            except BusError as exc:
                log.info("restoring names stopped: %s", exc)
                return  # the link failed too; the serve loop reconnects again
        for watch in stale:
            if watch._closed or watch not in self.live_watches:
                continue
            watch.link = None  # its old id means nothing on this connection

            def registered(result: Any, watch: Watch = watch) -> None:
                watch._registered(link, result, resync=True)

            def abandoned(result: Any) -> None:
                self.send_unwatch(link, result["watch"])

            try:
                await self._connection.request("watch", {"patterns": list(watch.patterns)}, registered, abandoned)
            except RequestError as exc:
                watch._fail(exc)
            except BusError as exc:
                watch.link = link  # not registered; the next restore tries again
                log.info("restoring watches stopped: %s", exc)
                return

    def fail_all(self, error: BusError) -> None:
        """The bus gave up reconnecting: every watch ends with ``error``."""
        for watch in list(self.live_watches):
            watch._fail(error)

    def close_all_nowait(self) -> None:
        """The bus is closing: every watch's consumer sees its end (no await)."""
        for watch in list(self.live_watches):
            watch._send.close()
