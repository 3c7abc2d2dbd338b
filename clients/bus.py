"""The minibus client library.

Theory of operation
-------------------
:func:`open_bus` connects (Unix socket or TCP, whichever the address lists first and
answers), runs the secret handshake against the broker key in the address, says hello, and
yields a :class:`Bus`.  A :class:`Bus` owns a nursery with one *reader* task (replies,
events and the broker's pings) and one *writer* task (the only one that sends, so a
cancelled request never leaves half a frame behind).

Requests wait for their reply under a deadline (:attr:`Bus.request_timeout`, 10 s by
default); callers may add tighter ones with ``trio.fail_after``.

When the connection drops, requests in flight fail with
:class:`~bus.errors.ConnectionLost` (none is replayed).  With ``reconnect=True`` (the
default) the bus then dials again with exponential backoff (0.1 s doubling to 5 s), says
hello again, requests its names again, and restores every watch: a watch that was open
keeps yielding, and the difference between what it knew and the broker's new snapshot
arrives as ordinary events.  So the objects a user holds keep working across a broker
restart.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from bus.errors import (
    BusError,
    ChannelRejected,
    ConnectionLost,
    FrameError,
    HandshakeError,
    RemoteProtocolError,
    RequestError,
    error_from_wire,
)
from bus.io.fdpass import FdSocketStream, UnixChannelStream
from bus.io.framed import FramedStream
from bus.io.secure import SecureStream
from bus.io.writer import FrameWriter
from bus.wire.address import Endpoint, default_runtime_dir, parse_address
from bus.wire.files import LocalFileError, check_owned_dir, read_trusted_file
from bus.wire.frames import ControlFrame, encode_control
from bus.wire.identity import Identity, PublicKey, load_or_create_identity
from bus.wire.messages import ErrorReply, Event, Reply, Request, parse_message
from bus.wire.shs import DEFAULT_NETWORK_KEY, parse_network_key

__all__ = [
    "open_bus",
    "Bus",
    "NameInfo",
    "NameEvent",
    "Watch",
    "WatchOverflow",
    "CannotConnect",
    "RequestTimeout",
    "find_address",
    "network_key_from_env",
]

from .channels import DEFAULT_WINDOW, Channel, ChannelRequest, PeerInfo, RelayStream  # noqa: E402
from .rpc import DEFAULT_MAX_MESSAGE, RPC_PROTOCOL, RpcConnection  # noqa: E402

log = logging.getLogger("minibus.client")

DEFAULT_REQUEST_TIMEOUT = 10.0
DIRECT_TIMEOUT = 5.0  # for a direct TCP channel: the opener to connect and prove itself
#: Each connection to a direct channel's listener has this long to prove the opener's key and
#: present the token; at most MAX_DIRECT_CANDIDATES are checked at once, more are closed at once.
DIRECT_CANDIDATE_TIMEOUT = 2.0
MAX_DIRECT_CANDIDATES = 16
PLAIN_RELAY_REFUSED = (
    "refused a plain relayed channel over an encrypted bus connection (TCP, or Unix with box-stream): "
    "its bytes would cross in plaintext"
)
DEFAULT_CONNECT_TIMEOUT = 10.0
WATCH_BUFFER = 1024
OUTBOUND_BUFFER = 1024
#: How often the byte counts of open direct channels are reported to the broker (seconds).
CHANNEL_REPORT_INTERVAL = 1.0


class CannotConnect(BusError):
    """No endpoint of the bus address accepted a connection and a handshake."""


class RequestTimeout(BusError):
    """The broker did not answer a request before the deadline."""


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


def network_key_from_env() -> bytes:
    text = os.environ.get("MINIBUS_NETWORK_KEY")
    return parse_network_key(text) if text else DEFAULT_NETWORK_KEY


def find_address(address: str | None = None) -> str:
    """The argument, else ``MINIBUS_ADDRESS``, else the broker's address file.

    The address file is trusted only when nobody else could have planted or changed it: its
    directory is a real directory of ours that only we may write, and the file itself (not
    followed if a symlink) is a regular file of ours or root's that only its owner may write.
    Otherwise :class:`CannotConnect` says which and why.
    """
    if address:
        return address
    env = os.environ.get("MINIBUS_ADDRESS")
    if env:
        return env
    directory = default_runtime_dir()
    path = directory / "address"
    missing = f"no bus address: pass one, set MINIBUS_ADDRESS, or start busd (no address file at {path})"
    try:
        check_owned_dir(directory, "runtime directory")
        data = read_trusted_file(path, "address file", follow_symlinks=False, max_bytes=64 * 1024)
    except FileNotFoundError:
        raise CannotConnect(missing) from None
    except LocalFileError as exc:
        raise CannotConnect(f"refusing the address file: {exc}") from None
    except OSError as exc:
        raise CannotConnect(f"{path}: cannot read the address file: {exc.strerror}") from None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CannotConnect(f"{path}: the address file is not UTF-8 text") from None


class Watch:
    """Events for names matching some patterns: the snapshot (``present``), then changes.

    Use as ``async with bus.watch([...]) as watch: async for event in watch: ...``.
    The buffer holds :data:`WATCH_BUFFER` events; a watch whose events are not consumed
    ends with :class:`WatchOverflow` rather than losing any silently.
    """

    def __init__(self, bus: Bus, patterns: tuple[str, ...]) -> None:
        self._bus = bus
        self.patterns = patterns
        # The link (connection) this watch is registered on, and its id there.
        self.link: _Link | None = None
        self.watch_id: int | None = None
        self.known: dict[str, NameInfo] = {}
        self._send, self._receive = trio.open_memory_channel[NameEvent](WATCH_BUFFER)
        self._error: BusError | None = None
        self._closed = False
        # While a resync's snapshot (after a reconnect, or after the broker said ``resync``)
        # arrives in several messages: the names it holds so far, by name, with the changes
        # that came meanwhile applied (they concern names its earlier pages held).
        self._resyncing: dict[str, NameInfo] | None = None

    # -- called by the bus (in its reader) --------------------------------------------------

    def _registered(self, link: _Link, result: dict[str, Any], resync: bool) -> None:
        if self._closed:
            self._bus._send_unwatch(link, result["watch"])
            return
        self.link = link
        self.watch_id = result["watch"]
        link.watches[result["watch"]] = self
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
        self._bus._live_watches.discard(self)
        link, watch_id = self.link, self.watch_id
        if link is not None and watch_id is not None and link.watches.pop(watch_id, None) is self:
            self._bus._send_unwatch(link, watch_id)

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
        await self._bus._start_watch(self)
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


class _Refused(Exception):
    """The broker's error event in place of the answer to hello: why it will not serve us."""

    def __init__(self, code: str, message: str) -> None:
        suffix = f" [{code}]"
        super().__init__(message if message.endswith(suffix) else message + suffix)


class _Link:
    """One live connection: the stream, its writer queue, pending requests and watches."""

    def __init__(self, framed: FramedStream, unique_id: str) -> None:
        self.framed = framed
        self.unique_id = unique_id
        assert isinstance(framed.stream, SecureStream)
        # Frames out: straight to the socket when nothing waits, else queued (bounded).
        self.send = FrameWriter(framed.stream, max_frames=OUTBOUND_BUFFER)
        self.pending: dict[int, _Pending] = {}
        self.watches: dict[int, Watch] = {}
        self.channels: dict[int, RelayStream] = {}
        self.closed = False
        self.closed_event = trio.Event()
        self.reason = "the broker closed the connection"


class _Pending:
    __slots__ = ("done", "reply", "on_result", "on_abandoned")

    def __init__(
        self, on_result: Callable[[Any], None] | None, on_abandoned: Callable[[Any], None] | None
    ) -> None:
        self.done = trio.Event()
        self.reply: Reply | ErrorReply | BusError | None = None
        # Runs in the reader, before any later message is handled (watch snapshots need it).
        self.on_result = on_result
        # Runs in the reader if the result arrives after the caller gave up (undo it).
        self.on_abandoned = on_abandoned


class Bus:
    """A connection to the bus; get one from :func:`open_bus`."""

    def __init__(
        self,
        address: str,
        identity: Identity,
        network_key: bytes,
        *,
        name: str | None,
        info: dict[str, Any] | None,
        flags: Iterable[str],
        reconnect: bool,
        request_timeout: float,
        rpc_max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.address = address
        #: The largest RPC message (argument or result) this bus's calls send or accept.
        self.rpc_max_message = rpc_max_message
        self.endpoints = parse_address(address)
        self.identity = identity
        self.network_key = network_key
        self.plugin_info = dict(info or {})
        self.reconnect = reconnect
        self.request_timeout = request_timeout
        self.requested_names: dict[str, list[str]] = {}
        if name is not None:
            self.requested_names[name] = list(flags)
        self._live_watches: set[Watch] = set()
        self._handlers: dict[
            str, tuple[Callable[[Channel], Awaitable[Any]], Callable[[ChannelRequest], str | None] | None, int]
        ] = {}
        self._nursery: trio.Nursery | None = None
        self._rpc: dict[str, RpcConnection] = {}
        # Open direct channels: (link, channel id there, counts last reported).  Weak: a channel
        # its user dropped without closing is not kept alive (nor reported) by this table.
        self._direct: weakref.WeakKeyDictionary[Channel, tuple[_Link, int, tuple[int, int] | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._rpc_locks: dict[str, trio.Lock] = {}
        self._link: _Link | None = None
        self.failure: BusError | None = None  # why the bus gave up reconnecting, if it did
        self._next_id = 1
        self._connected = trio.Event()
        self._closed = False
        self.reconnects = 0
        self.endpoint: Endpoint | None = None

    # -- public API ---------------------------------------------------------------------------

    @property
    def unique_id(self) -> str:
        if self._link is None:
            raise ConnectionLost("not connected to the bus right now")
        return self._link.unique_id

    @property
    def connected(self) -> bool:
        return self._link is not None and not self._link.closed

    async def request(self, op: str, **args: Any) -> Any:
        """Send a request and return its result; remote errors raise their RequestError class."""
        return await self._request(op, args, None)

    async def _request(
        self,
        op: str,
        args: dict[str, Any],
        on_result: Callable[[Any], None] | None = None,
        on_abandoned: Callable[[Any], None] | None = None,
    ) -> Any:
        link = self._link
        if link is None or link.closed:
            raise ConnectionLost(f"not connected to the bus{f': {self.failure}' if self.failure else ''}")
        request_id = self._next_id
        self._next_id += 1
        pending = _Pending(on_result, on_abandoned)
        link.pending[request_id] = pending
        answered = False
        try:
            try:
                link.send.send_nowait(link.framed.encode_message(Request(op, request_id, args).to_wire()))
            except trio.WouldBlock:
                raise BusError(f"{OUTBOUND_BUFFER} messages already wait to be sent; the broker is not reading") from None
            with trio.move_on_after(self.request_timeout) as scope:
                await pending.done.wait()
            if scope.cancelled_caught:
                raise RequestTimeout(f"{op}: no reply from the broker within {self.request_timeout:g} s")
            answered = True
        finally:
            if answered or pending.on_abandoned is None or link.closed:
                link.pending.pop(request_id, None)
            elif pending.reply is not None:
                # The reply came (and was applied) just before we gave up: undo it now.
                link.pending.pop(request_id, None)
                if isinstance(pending.reply, Reply):
                    pending.on_abandoned(pending.reply.result)
            else:
                # We stop waiting, but the reply may still come: let the reader undo it then.
                pending.on_result = pending.on_abandoned
        reply = pending.reply
        if isinstance(reply, BusError):
            raise reply
        if isinstance(reply, ErrorReply):
            raise error_from_wire(reply.code, reply.message)
        assert isinstance(reply, Reply)
        return reply.result

    async def request_name(self, name: str, flags: Iterable[str] = ()) -> str:
        """Ask for a well-known name; returns primary-owner, in-queue, exists or already-owner.

        The name is requested again after a reconnect (unless the answer was ``exists``).
        """
        flags = list(flags)
        result: str = await self.request("request_name", name=name, flags=flags)
        if result != "exists":
            self.requested_names[name] = flags
        return result

    async def release_name(self, name: str) -> str:
        self.requested_names.pop(name, None)
        result: str = await self.request("release_name", name=name)
        return result

    async def list_names(self, *, all: bool = False) -> list[NameInfo]:
        """Every (visible) named plugin; with ``all`` (admins only) nameless connections too.

        Long lists come in pages; this fetches them all (pages are not one atomic snapshot:
        use :meth:`watch` for that)."""
        entries: list[NameInfo] = []
        after: str | None = None
        while True:
            args: dict[str, Any] = {"all": all}
            if after is not None:
                args["after"] = after
            page = await self.request("list_names", **args)
            entries += [NameInfo.from_wire(e) for e in page["entries"]]
            after = page.get("next")
            if after is None:
                return entries

    async def resolve(self, name: str) -> NameInfo:
        return NameInfo.from_wire(await self.request("resolve", name=name))

    async def info(self, target: str) -> NameInfo:
        """Details of a connection, by well-known name or unique id (``:42``).

        Its channels may come in several pages (each reply stays under a control frame's
        size); this fetches them all."""
        entry = await self.request("info", target=target)
        while isinstance(entry, dict) and entry.get("channels_next") is not None:
            more = await self.request("info", target=target, channels_after=entry["channels_next"])
            entry["channels"] = [*entry.get("channels", []), *more.get("channels", [])]
            entry["channels_next"] = more.get("channels_next")
        return NameInfo.from_wire(entry)

    async def ping(self) -> None:
        await self.request("ping")

    def watch(self, patterns: Iterable[str] = ("*",)) -> Watch:
        return Watch(self, tuple(patterns) or ("*",))

    # -- watches ------------------------------------------------------------------------------

    async def _start_watch(self, watch: Watch) -> None:
        link = self._link
        self._live_watches.add(watch)
        try:
            await self._request(
                "watch",
                {"patterns": list(watch.patterns)},
                lambda result: watch._registered(link, result, resync=False) if link is not None else None,
                lambda result: self._send_unwatch(link, result["watch"]) if link is not None else None,
            )
        except BaseException:
            self._live_watches.discard(watch)
            raise

    def _send_unwatch(self, link: _Link, watch_id: int) -> None:
        """Drop a watch on the broker without waiting (from the reader or a closing watch)."""
        link.watches.pop(watch_id, None)
        if link.closed:
            return
        self._send_request_nowait(link, "unwatch", {"watch": watch_id})  # (lost with a dying link: so is the watch)

    # -- connection management -----------------------------------------------------------------

    async def _dial(self) -> tuple[SecureStream, Endpoint]:
        errors = []
        for ep in self.endpoints:
            try:
                transport: trio.abc.HalfCloseableStream
                if ep.transport == "unix":
                    assert ep.path is not None
                    # Unix connections can receive socket ends: the unix-fd channel route.
                    transport = await FdSocketStream.connect(ep.path)
                else:
                    assert ep.host is not None and ep.port is not None
                    transport = await trio.open_tcp_stream(ep.host, ep.port)
            except OSError as exc:
                errors.append(f"{ep.transport}: {exc.strerror or exc}")
                continue
            stream = SecureStream.client(
                transport, self.identity, ep.key, network_key=self.network_key, encrypted=ep.uses_box_stream
            )
            try:
                await stream.do_handshake()
            except HandshakeError as exc:
                errors.append(f"{ep.transport}: handshake failed: {exc}")
                continue
            return stream, ep
        raise CannotConnect("cannot connect to the bus: " + "; ".join(errors))

    async def _connect(self) -> _Link:
        stream, endpoint = await self._dial()
        framed = FramedStream(stream, receive_stream=stream.plain_transport())
        # Hello (and the names) go out before the reader and writer start: no other traffic yet.
        names = list(self.requested_names.items())
        first = names[0] if names else None
        hello: dict[str, Any] = {"info": self.plugin_info}
        if first is not None:
            hello.update(name=first[0], flags=first[1])
        try:
            with trio.fail_after(self.request_timeout):
                try:
                    await framed.send_message(Request("hello", 1, hello).to_wire())
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    # The broker may have refused us (a quota) and hung up before our hello
                    # arrived: its reason may still wait to be read.
                    send_failure: BaseException | None = exc
                else:
                    send_failure = None
                try:
                    reply = await self._await_direct_reply(framed, 1)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    if send_failure is not None:
                        raise send_failure from None
                    raise
        except _Refused as exc:
            await trio.aclose_forcefully(stream)
            raise CannotConnect(f"the broker refused the connection: {exc}") from None
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, FrameError) as exc:
            await trio.aclose_forcefully(stream)
            raise CannotConnect(f"the broker did not answer hello: {exc!r}") from exc
        if isinstance(reply, ErrorReply):
            await trio.aclose_forcefully(stream)
            raise error_from_wire(reply.code, reply.message)
        self.endpoint = endpoint
        return _Link(framed, reply.result["unique_id"])

    async def _await_direct_reply(self, framed: FramedStream, request_id: int) -> Reply | ErrorReply:
        while True:
            frame = await framed.receive_frame()
            if frame is None:
                raise trio.BrokenResourceError("the broker closed the connection during hello")
            if isinstance(frame, ControlFrame):
                message = parse_message(frame.message)
                if isinstance(message, (Reply, ErrorReply)) and message.re == request_id:
                    return message
                if isinstance(message, Event) and message.event == "error":
                    raise _Refused(str(message.fields.get("code")), str(message.fields.get("message")))

    async def _restore(self, link: _Link) -> None:
        """After (re)connecting: the remaining names and every watch of older links."""
        stale = [w for w in self._live_watches if w.link is not link and w.link is not None]
        for name, flags in list(self.requested_names.items())[1:]:
            try:
                await self.request_name(name, flags)
            except RequestError as exc:
                log.warning("could not request %s again after reconnecting: %s", name, exc)
            except BusError as exc:
                log.info("restoring names stopped: %s", exc)
                return  # the link failed too; the serve loop reconnects again
        for watch in stale:
            if watch._closed or watch not in self._live_watches:
                continue
            watch.link = None  # its old id means nothing on this connection

            def registered(result: Any, watch: Watch = watch) -> None:
                watch._registered(link, result, resync=True)

            def abandoned(result: Any) -> None:
                self._send_unwatch(link, result["watch"])

            try:
                await self._request("watch", {"patterns": list(watch.patterns)}, registered, abandoned)
            except RequestError as exc:
                watch._fail(exc)
            except BusError as exc:
                watch.link = link  # not registered; the next restore tries again
                log.info("restoring watches stopped: %s", exc)
                return

    async def _run_link(self, link: _Link) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, link)
                try:
                    await self._reader(link)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            # Leaving on purpose (cancelled: the bus is closing) or after the broker ended the
            # link: over box-stream, say goodbye (unless a frame is half-sent), then close.
            self._goodbye_nowait(link)
            await trio.aclose_forcefully(link.framed.stream)

    async def _writer(self, link: _Link) -> None:
        try:
            await link.send.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Nothing more can be sent: end the link (the reader then reports it lost).
            await trio.aclose_forcefully(link.framed.stream)

    async def _reader(self, link: _Link) -> None:
        reason = "the broker closed the connection"
        try:
            while True:
                frame = await link.framed.receive_frame()
                if frame is None:
                    break
                if frame.channel != 0:
                    relay = link.channels.get(frame.channel)
                    if relay is not None:
                        if isinstance(frame, ControlFrame):
                            relay.on_control(frame.message)
                        else:
                            relay.on_data(frame.data)
                    continue  # late frames of a channel already gone are dropped
                if not isinstance(frame, ControlFrame):
                    raise FrameError("data frame on the control channel")
                message = parse_message(frame.message)
                if isinstance(message, (Reply, ErrorReply)):
                    pending = link.pending.get(message.re)
                    if pending is not None:
                        pending.reply = message
                        if pending.on_result is not None and isinstance(message, Reply):
                            pending.on_result(message.result)
                        pending.done.set()
                elif isinstance(message, Request):
                    self._answer(link, message)
                elif message.event == "name":
                    self._route_name_event(link, message)
                elif message.event == "resync":
                    watch = link.watches.get(message.fields.get("watch", 0))
                    if watch is not None:
                        watch._begin_resync()
                elif message.event == "snapshot":
                    watch = link.watches.get(message.fields.get("watch", 0))
                    if watch is not None:
                        entries = [NameInfo.from_wire(e) for e in message.fields.get("entries", [])]
                        watch._snapshot_part(entries, bool(message.fields.get("more")))
                elif message.event == "error":
                    reason = f"{message.fields.get('code')}: {message.fields.get('message')}"
        except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError) as exc:
            reason = f"connection lost: {exc}"
        finally:
            link.reason = reason
            link.closed = True
            link.closed_event.set()
            for relay in list(link.channels.values()):
                relay.on_link_lost(reason)
            lost = ConnectionLost(reason)
            for pending in link.pending.values():
                pending.reply = lost
                pending.done.set()
            link.send.close()
            log.debug("bus connection ended: %s", reason)

    def _answer(self, link: _Link, request: Request) -> None:
        if request.op == "ping":
            reply: dict[str, Any] = Reply(request.id, {}).to_wire()
        elif request.op == "channel_request":
            answer = self._channel_request(link, request)
            if answer is None:
                return  # answered later (the tcp route)
            reply = answer
        else:
            reply = ErrorReply(request.id, "minibus.Error.UnknownOperation", f"unknown operation {request.op!r}").to_wire()
        self._send_nowait(link, reply)

    def _channel_request(self, link: _Link, request: Request) -> dict[str, Any] | None:
        """Accept (and start serving) or reject a channel someone opens to us."""
        try:
            channel = request.arg("channel", int)
            ask = ChannelRequest(
                protocol=request.arg("protocol", str),
                name=request.arg("name", str),
                opener=PeerInfo.from_wire(request.arg("opener", dict)),
                route=request.arg("route", str),
                encrypted=request.arg("encrypted", bool),
                channel=channel,
            )
        except (RequestError, KeyError, TypeError) as exc:
            return ErrorReply(request.id, "minibus.Error.BadRequest", f"channel_request: {exc}").to_wire()
        if ask.route not in ("unix-fd", "tcp") and not ask.encrypted and self._link_is_encrypted(link):
            log.warning("channel from %s: %s", ask.opener.unique_id, PLAIN_RELAY_REFUSED)
            return ErrorReply(request.id, ChannelRejected.wire_code, PLAIN_RELAY_REFUSED).to_wire()
        end = self._take_fd(link) if ask.route == "unix-fd" else None
        entry = self._handlers.get(ask.protocol)
        refusal = None
        if entry is None or self._nursery is None:
            refusal = f"no handler for protocol {ask.protocol!r}"
        elif entry[1] is not None:
            refusal = entry[1](ask)
        if ask.route == "unix-fd" and end is None:
            refusal = "the socket for the unix-fd route did not arrive"
        if refusal is not None or entry is None or self._nursery is None:
            if end is not None:
                end.close()
            return ErrorReply(request.id, ChannelRejected.wire_code, refusal or "rejected").to_wire()
        handler, _, window = entry
        if ask.route == "tcp":
            token = request.args.get("token")
            if not isinstance(token, bytes) or len(token) != 32:
                return ErrorReply(request.id, "minibus.Error.BadRequest", "channel_request: tcp route without a token").to_wire()
            # The answer (host and port) goes out once the listener is open.
            self._nursery.start_soon(self._serve_direct, link, request.id, ask, token, handler)
            return None
        transport: trio.abc.HalfCloseableStream
        if end is not None:
            transport = UnixChannelStream(end)
        else:
            transport = RelayStream(link, channel, window=window)
            link.channels[channel] = transport
        self._nursery.start_soon(self._serve_channel, transport, ask, handler, link)
        return Reply(request.id, {}).to_wire()

    @staticmethod
    def _link_is_encrypted(link: _Link) -> bool:
        """Whether our link to the broker is TCP or runs box-stream: then every channel relayed
        over it must be encrypted end to end (the broker's word that one is plain is refused)."""
        secure = link.framed.stream
        if not isinstance(secure, SecureStream):
            return False
        transport = secure.transport
        over_tcp = isinstance(transport, trio.SocketStream) and transport.socket.family in (socket.AF_INET, socket.AF_INET6)
        return secure.encrypted or over_tcp

    def _listen_host(self, link: _Link) -> str:
        """Where an opener can reach us: our address on a TCP bus connection, else loopback."""
        secure = link.framed.stream
        transport = secure.transport if isinstance(secure, SecureStream) else None
        if isinstance(transport, trio.SocketStream) and transport.socket.family in (socket.AF_INET, socket.AF_INET6):
            return str(transport.socket.getsockname()[0])
        return "127.0.0.1"

    async def _serve_direct(
        self,
        link: _Link,
        request_id: int,
        ask: ChannelRequest,
        token: bytes,
        handler: Callable[[Channel], Awaitable[Any]],
    ) -> None:
        """The tcp route's target side: listen, tell the broker where, accept the opener only.

        A connection must prove the opener's key (shs1) and then present the one-time token:
        see :meth:`_take_direct_opener`.  Nobody within :data:`DIRECT_TIMEOUT`: the broker
        forgets the channel.  The token works once: the listener closes after it is used.
        """
        host = self._listen_host(link)
        try:
            listeners = await trio.open_tcp_listeners(0, host=host)
        except OSError as exc:
            self._send_nowait(link, ErrorReply(request_id, ChannelRejected.wire_code, f"cannot listen: {exc}").to_wire())
            return
        listener = listeners[0]
        self._send_nowait(link, Reply(request_id, {"host": host, "port": listener.socket.getsockname()[1]}).to_wire())
        async with listener:
            chosen = await self._take_direct_opener(listener, ask.opener.key, token)
        if chosen is None:
            log.info("direct channel from %s: the opener never came", ask.opener.unique_id)
            self._forget_direct(link, ask.channel)
            return
        channel = self._track_direct(Channel(chosen, chosen.transport, ask.opener, ask.protocol, "tcp"), link, ask.channel)
        await self._run_handler(handler, channel)

    async def _take_direct_opener(
        self, listener: trio.SocketListener, opener_key: PublicKey, token: bytes
    ) -> SecureStream | None:
        """The first connection to ``listener`` that proves ``opener_key`` and presents
        ``token``, within :data:`DIRECT_TIMEOUT`; None if none does.

        Connections are checked concurrently, each within :data:`DIRECT_CANDIDATE_TIMEOUT`,
        so a silent or wrong one (a local process that connects first, a wrong key or token)
        holds up nobody: it is closed when its time is up or it fails.  At most
        :data:`MAX_DIRECT_CANDIDATES` are checked at once; a connection beyond that is
        closed as soon as it is accepted.  The winner stops the others (they are closed).
        """
        chosen: list[SecureStream] = []
        checking = 0

        async def check(transport: trio.SocketStream) -> None:
            nonlocal checking
            candidate = SecureStream.server(
                transport, self.identity, network_key=self.network_key, authorize=lambda key: key == opener_key
            )
            try:
                with trio.fail_after(DIRECT_CANDIDATE_TIMEOUT):
                    await candidate.do_handshake()
                    presented = b""
                    while len(presented) < len(token):
                        more = await candidate.receive_some(len(token) - len(presented))
                        if not more:
                            break
                        presented += more
                if chosen or not hmac.compare_digest(presented, token):
                    log.info("direct channel: refused a connection with a wrong or used token")
                    await trio.aclose_forcefully(candidate)
                    return
                chosen.append(candidate)
                checks.cancel_scope.cancel()  # the others (and the accept loop) stop here
            except (HandshakeError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                log.info("direct channel: refused a connection: %s", exc)
                await trio.aclose_forcefully(candidate)
            except BaseException:
                await trio.aclose_forcefully(candidate)
                raise
            finally:
                checking -= 1

        try:
            with trio.move_on_after(DIRECT_TIMEOUT):
                async with trio.open_nursery() as checks:
                    while True:
                        try:
                            transport = await listener.accept()
                        except OSError as exc:  # out of descriptors, say: retry later, without spinning
                            log.warning("direct channel: cannot accept: %s", exc)
                            await trio.sleep(0.1)
                            continue
                        if checking >= MAX_DIRECT_CANDIDATES:
                            log.info("direct channel: refused a connection: %d others are being checked", checking)
                            await trio.aclose_forcefully(transport)
                            continue
                        checking += 1
                        checks.start_soon(check, transport)
        except BaseException:
            for stream in chosen:  # cancelled from outside just as the opener got through
                await trio.aclose_forcefully(stream)
            raise
        return chosen[0] if chosen else None

    @staticmethod
    async def _run_handler(handler: Callable[[Channel], Awaitable[Any]], channel: Channel) -> None:
        """Run a channel handler; its failure ends its channel, not the plugin's bus connection.

        A handler that returns closes its channel gracefully (the peer reads the end after
        everything sent); one that fails or is cancelled aborts it (on a direct route the
        peer's reads then raise :class:`trio.BrokenResourceError`, as for a dead peer).
        """
        returned = False
        try:
            await handler(channel)
            returned = True
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("channel %r from %s ended: %s", channel.protocol, channel.peer.unique_id, exc)
        except Exception:
            log.exception("handler for channel %r from %s failed", channel.protocol, channel.peer.unique_id)
        finally:
            if returned:
                try:
                    await channel.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            else:
                await trio.aclose_forcefully(channel)

    @staticmethod
    def _send_nowait(link: _Link, message: dict[str, Any]) -> None:
        """Send without waiting; a link that is ending or hopelessly behind loses it (its
        other end notices the link, not the message)."""
        try:
            link.send.send_nowait(link.framed.encode_message(message))
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass

    def _send_request_nowait(self, link: _Link, op: str, args: dict[str, Any]) -> None:
        """A request whose answer nobody waits for (it arrives with an unknown id: dropped)."""
        request_id = self._next_id
        self._next_id += 1
        self._send_nowait(link, Request(op, request_id, args).to_wire())

    @staticmethod
    def _take_fd(link: _Link) -> socket.socket | None:
        secure = link.framed.stream
        transport = secure.transport if isinstance(secure, SecureStream) else None
        if not isinstance(transport, FdSocketStream):
            return None
        fd = transport.take_fd()
        return None if fd is None else socket.socket(fileno=fd)

    async def _serve_channel(
        self,
        relay: trio.abc.HalfCloseableStream,
        ask: ChannelRequest,
        handler: Callable[[Channel], Awaitable[Any]],
        link: _Link | None = None,
    ) -> None:
        if isinstance(relay, RelayStream):
            # The broker opens the relay when it reads our acceptance, which precedes this grant.
            relay.start()
        opener_key = ask.opener.key
        secure = SecureStream.server(
            relay,
            self.identity,
            network_key=self.network_key,
            authorize=lambda key: key == opener_key,
            encrypted=ask.encrypted,
        )
        try:
            await secure.do_handshake()
        except (HandshakeError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("channel from %s failed its handshake: %s", ask.opener.unique_id, exc)
            await trio.aclose_forcefully(secure)
            if link is not None and ask.route == "unix-fd":
                self._forget_direct(link, ask.channel)
            return
        except BaseException:
            await trio.aclose_forcefully(secure)
            raise
        channel = Channel(secure, relay, ask.opener, ask.protocol, ask.route)
        if link is not None and ask.route == "unix-fd":
            self._track_direct(channel, link, ask.channel)
        await self._run_handler(handler, channel)

    def handle_channels(
        self,
        protocol: str,
        handler: Callable[[Channel], Awaitable[Any]],
        *,
        accept: Callable[[ChannelRequest], str | None] | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        """Serve channels opened to us with this protocol label.

        ``accept`` (optional) sees each request (the opener's verified identity, unique id
        and names, the label) and returns None to accept or a reason to reject.  Each
        accepted channel runs ``handler(channel)`` in its own task; the channel is closed
        when the handler returns.  A label with no handler is rejected.  ``window`` is how
        many bytes each such channel buffers for reading (its flow-control credit).
        """
        self._handlers[protocol] = (handler, accept, window)

    async def open_channel(
        self, name: str, protocol: str = "raw", route: str = "auto", *, window: int = DEFAULT_WINDOW
    ) -> Channel:
        """Open a channel to the plugin owning ``name``; its identity is proven by shs1."""
        if route not in ("auto", "relay", "direct"):
            raise ValueError(f"route must be 'auto', 'relay' or 'direct', not {route!r}")
        link = self._link
        opened: list[trio.abc.HalfCloseableStream] = []

        def on_result(result: Any) -> None:
            if link is None or result.get("route") == "tcp":
                return  # the tcp route is dialled after the reply
            if result.get("route") == "unix-fd":
                end = self._take_fd(link)
                if end is not None:
                    opened.append(UnixChannelStream(end))
                return
            relay = RelayStream(link, result["channel"], window=window)
            link.channels[result["channel"]] = relay
            relay.start()
            opened.append(relay)

        def on_abandoned(result: Any) -> None:
            if opened:  # on_result ran before the caller gave up: close what it opened
                for stream in opened:
                    if isinstance(stream, RelayStream):
                        stream.close_nowait()
                    elif isinstance(stream, UnixChannelStream):
                        stream.socket.close()
                opened.clear()
                return
            if result.get("route") in ("tcp", "unix-fd") and link is not None:
                self._forget_direct(link, result["channel"])  # never used
            if result.get("route") == "tcp":
                return  # never dialled: the target's listener gives up at its deadline
            if result.get("route") == "unix-fd":
                end = self._take_fd(link) if link is not None else None
                if end is not None:
                    end.close()
                return
            if link is not None and not link.closed:
                try:
                    link.send.send_nowait(encode_control(result["channel"], {"close": True}))
                except (trio.WouldBlock, trio.ClosedResourceError):
                    pass

        result = await self._request(
            "open_channel", {"name": name, "protocol": protocol, "route": route}, on_result, on_abandoned
        )
        relayed = result.get("route") not in ("tcp", "unix-fd")
        if relayed and not result.get("encrypted") and link is not None and self._link_is_encrypted(link):
            for stream in opened:
                if isinstance(stream, RelayStream):
                    stream.close_nowait()  # the broker frees the channel; the target's handshake fails
            raise RemoteProtocolError(f"channel to {name}: {PLAIN_RELAY_REFUSED}")
        if result.get("route") == "tcp":
            try:
                channel = await self._dial_direct(result, protocol)
            except BaseException as exc:
                if link is not None:  # the broker forgets the channel (whatever stopped the dial)
                    self._forget_direct(link, result["channel"])
                if not isinstance(
                    exc, (OSError, HandshakeError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)
                ):
                    raise
                if route == "direct":
                    raise ChannelRejected(f"the direct connection to {name} failed: {exc!r}") from exc
                log.info("direct connection to %s failed (%r); relaying instead", name, exc)
                return await self.open_channel(name, protocol, "relay", window=window)
            assert link is not None
            return self._track_direct(channel, link, result["channel"])
        if not opened:
            raise ConnectionLost("the socket for the unix-fd route did not arrive")
        relay = opened[0]
        peer = PeerInfo.from_wire(result["peer"])
        secure = SecureStream.client(
            relay, self.identity, peer.key, network_key=self.network_key, encrypted=result["encrypted"]
        )
        try:
            await secure.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(secure)
            if link is not None and result["route"] == "unix-fd":
                self._forget_direct(link, result["channel"])
            raise
        channel = Channel(secure, relay, peer, protocol, result["route"])
        if link is not None and result["route"] == "unix-fd":
            self._track_direct(channel, link, result["channel"])
        return channel

    # -- direct channels: their byte counts for the broker (it does not see their bytes) ------

    def _track_direct(self, channel: Channel, link: _Link, channel_id: int) -> Channel:
        self._direct[channel] = (link, channel_id, None)

        def closed() -> None:
            entry = self._direct.pop(channel, None)
            if entry is not None:
                self._send_channel_report(entry[0], entry[1], channel.bytes_in, channel.bytes_out, closed=True)

        channel.on_close = closed
        return channel

    def _send_channel_report(self, link: _Link, channel_id: int, bytes_in: int, bytes_out: int, *, closed: bool) -> None:
        """Fire and forget: the broker's answer (or its error, if it forgot us) is not awaited."""
        if link.closed or link is not self._link:
            return  # the broker behind that link is gone, and with it its record of the channel
        report = {"channel": channel_id, "bytes_in": bytes_in, "bytes_out": bytes_out, "closed": closed}
        self._send_request_nowait(link, "channel_report", report)

    def _forget_direct(self, link: _Link, channel_id: int) -> None:
        """The broker may forget a direct channel that was never used (or never came)."""
        self._send_channel_report(link, channel_id, 0, 0, closed=True)

    async def _report_direct_channels(self) -> None:
        while True:
            await trio.sleep(CHANNEL_REPORT_INTERVAL)
            for channel, (link, channel_id, last) in list(self._direct.items()):
                counts = (channel.bytes_in, channel.bytes_out)
                if counts != last:
                    self._direct[channel] = (link, channel_id, counts)
                    self._send_channel_report(link, channel_id, *counts, closed=False)

    # -- RPC ----------------------------------------------------------------------------------

    async def call(self, name: str, method: str, *args: Any) -> Any:
        """Call ``method`` of the service owning ``name`` (one channel per peer, reused).

        Remote errors raise their :class:`~bus.errors.RequestError` class; no reply within
        :attr:`request_timeout` raises :class:`RequestTimeout`."""
        connection = await self._rpc_connection(name)
        with trio.move_on_after(self.request_timeout) as scope:
            return await connection.call(method, *args)
        raise RequestTimeout(f"{name}.{method}: no reply within {self.request_timeout:g} s")

    async def introspect(self, name: str) -> dict[str, Any]:
        """A service's methods (names, parameters, doc text), protocols and info."""
        connection = await self._rpc_connection(name)
        with trio.move_on_after(self.request_timeout):
            return await connection.introspect()
        raise RequestTimeout(f"{name}: no introspection reply within {self.request_timeout:g} s")

    async def _rpc_connection(self, name: str) -> RpcConnection:
        lock = self._rpc_locks.setdefault(name, trio.Lock())
        async with lock:
            connection = self._rpc.get(name)
            if connection is None or connection.closed is not None:
                if self._nursery is None:
                    raise ConnectionLost("the bus is not running")
                channel = await self.open_channel(name, RPC_PROTOCOL)
                connection = RpcConnection(channel, max_message=self.rpc_max_message)
                await self._nursery.start(connection.run)
                self._rpc[name] = connection
            return connection

    async def _dial_direct(self, result: dict[str, Any], protocol: str) -> Channel:
        """The tcp route's opener side: connect, prove ourselves, present the token."""
        peer = PeerInfo.from_wire(result["peer"])
        with trio.fail_after(DIRECT_TIMEOUT):
            transport = await trio.open_tcp_stream(result["host"], result["port"])
            secure = SecureStream.client(transport, self.identity, peer.key, network_key=self.network_key)
            try:
                await secure.do_handshake()
                await secure.send_all(result["token"])
            except BaseException:
                await trio.aclose_forcefully(secure)
                raise
        return Channel(secure, transport, peer, protocol, "tcp")

    def _route_name_event(self, link: _Link, event: Event) -> None:
        watch = link.watches.get(event.fields.get("watch", 0))
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

    async def _serve(self, first: _Link, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        link = first
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._link = link
            nursery.start_soon(self._run_link, link)
            nursery.start_soon(self._report_direct_channels)
            await self._restore(link)
            task_status.started()
            while True:
                await link.closed_event.wait()
                if not self._closed:
                    log.warning(
                        "lost the bus connection (%s)%s", link.reason, "; reconnecting" if self.reconnect else ""
                    )
                if not self.reconnect or self._closed:
                    self._give_up(ConnectionLost(f"the bus connection ended: {link.reason}"))
                    return
                try:
                    link = await self._reconnect()
                except RequestError as exc:
                    # The broker answers but refuses us (a changed policy): say so, stop trying.
                    log.warning("gave up reconnecting: %s", exc)
                    self._give_up(exc)
                    return
                ep = self.endpoint
                where = "" if ep is None else f" ({ep.path if ep.transport == 'unix' else f'{ep.host}:{ep.port}'})"
                log.warning("reconnected to the bus%s as %s", where, link.unique_id)
                self._link = link
                nursery.start_soon(self._run_link, link)
                await self._restore(link)

    def _give_up(self, error: BusError) -> None:
        self.failure = error
        for watch in list(self._live_watches):
            watch._fail(error)

    async def _reconnect(self) -> _Link:
        delay = 0.1
        while True:
            await trio.sleep(delay)
            try:
                link = await self._connect()
            except (CannotConnect, OSError) as exc:
                log.info("reconnect failed (next try in %.1f s): %s", min(delay * 2, 5.0), exc)
                delay = min(delay * 2, 5.0)
                continue
            self.reconnects += 1
            return link

    async def aclose(self) -> None:
        self._closed = True
        link = self._link
        if link is not None:
            self._goodbye_nowait(link)
            await trio.aclose_forcefully(link.framed.stream)

    @staticmethod
    def _goodbye_nowait(link: _Link) -> None:
        """We are leaving, cleanly, and may not wait: over box-stream (TCP) the goodbye goes
        out now, so the broker reads an end of stream, not a truncation (a forced close of the
        stream alone is an abort)."""
        secure = link.framed.stream
        if isinstance(secure, SecureStream):
            secure.goodbye_nowait()


@asynccontextmanager
async def open_bus(
    address: str | None = None,
    *,
    identity: Identity | None = None,
    name: str | None = None,
    info: dict[str, Any] | None = None,
    flags: Iterable[str] = (),
    network_key: bytes | None = None,
    reconnect: bool = True,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    rpc_max_message: int = DEFAULT_MAX_MESSAGE,
) -> AsyncIterator[Bus]:
    """Connect to the bus for the duration of the block.

    ``address`` defaults to ``MINIBUS_ADDRESS`` or the broker's address file; ``identity`` to
    the user's default key (created on first use); ``network_key`` to ``MINIBUS_NETWORK_KEY``
    or minibus's default.  With ``name``, the connection registers as that well-known name
    (a service plugin); without, it is a nameless client, hidden from other clients' queries.
    ``rpc_max_message`` bounds the RPC messages :meth:`Bus.call` sends and accepts (16 MiB).
    """
    bus = Bus(
        find_address(address),
        identity if identity is not None else load_or_create_identity(),
        network_key if network_key is not None else network_key_from_env(),
        name=name,
        info=info,
        flags=flags,
        reconnect=reconnect,
        request_timeout=request_timeout,
        rpc_max_message=rpc_max_message,
    )
    with trio.move_on_after(connect_timeout) as scope:
        first = await bus._connect()
    if scope.cancelled_caught:
        raise CannotConnect(f"cannot connect to the bus within {connect_timeout:g} s")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus._serve, first)
            try:
                yield bus
            finally:
                # No await here: after cancelling our own scope, an await would raise a
                # Cancelled that replaces (and so swallows) the exception leaving the block.
                bus._closed = True
                for watch in list(bus._live_watches):
                    watch._send.close()
                nursery.cancel_scope.cancel()  # _run_link closes the stream on its way out
    except BaseExceptionGroup as group:
        # The block's own exception comes out as itself, not wrapped by our nursery(s).
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from None


