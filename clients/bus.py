"""The minibus client library: :func:`open_bus` and the :class:`Bus` it yields.

Theory of operation
-------------------
:func:`open_bus` connects (Unix socket or TCP, whichever the address lists first and
answers), runs the secret handshake against the broker key in the address, says hello, and
yields a :class:`Bus`.  A :class:`Bus` is a small facade over one module per capability:

* :mod:`clients.link`: the link (connect, hello, requests with deadlines, the reader and
  writer tasks, reconnection with backoff);
* :mod:`clients.names`: well-known names, queries and watches (restored after a reconnect);
* :mod:`clients.channel_routes` (over :mod:`clients.channels`): channels opened from and to
  us over the relay, unix-fd and tcp routes, and direct channels' reports;
* :mod:`clients.rpc`: calls to services over channels.

Requests wait for their reply under a deadline (:attr:`Bus.request_timeout`, 10 s by
default); callers may add tighter ones with ``trio.fail_after``.

When the connection drops, requests in flight fail with
:class:`~bus.errors.ConnectionLost` (none is replayed).  With ``reconnect=True`` (the
default) the bus then dials again with exponential backoff (0.1 s doubling to 5 s), says
hello again, requests its names again (the names it still wants: one released while it
reconnected, after the new hello asked for it, is released again once connected), and
restores every watch: a watch that was open
keeps yielding, and the difference between what it knew and the broker's new snapshot
arrives as ordinary events.  So the objects a user holds keep working across a broker
restart.

The tunables of each capability live in its module (``clients.channel_routes.DIRECT_TIMEOUT``,
say): set them there; the copies re-exported here are for reading.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import trio

from bus.errors import BusError, ConnectionLost
from bus.io.secure import SecureStream
from bus.wire.address import Endpoint
from bus.wire.identity import Identity

# Names importable from here before the library was split into modules stay importable (the
# ``X as X`` form marks a re-export); the tunables are read where they live.
from .channel_routes import CHANNEL_REPORT_INTERVAL as CHANNEL_REPORT_INTERVAL
from .channel_routes import DIRECT_CANDIDATE_TIMEOUT as DIRECT_CANDIDATE_TIMEOUT
from .channel_routes import DIRECT_TIMEOUT as DIRECT_TIMEOUT
from .channel_routes import MAX_DIRECT_CANDIDATES as MAX_DIRECT_CANDIDATES
from .channel_routes import PLAIN_RELAY_REFUSED as PLAIN_RELAY_REFUSED
from .channel_routes import ChannelRoutes
from .channels import DEFAULT_WINDOW as DEFAULT_WINDOW
from .channels import Channel as Channel
from .channels import ChannelRequest as ChannelRequest
from .channels import PeerInfo as PeerInfo
from .channels import RelayStream as RelayStream
from .events import Event as Event
from .events import Events
from .services import ServiceInfo as ServiceInfo
from .services import Services
from .events import Gap as Gap
from .events import Subscription as Subscription
from .link import DEFAULT_CONNECT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT
from .link import DEFAULT_REQUEST_TIMEOUT as DEFAULT_REQUEST_TIMEOUT
from .link import OUTBOUND_BUFFER as OUTBOUND_BUFFER
from .link import BusConnection, Link, dial_at_once
from .link import identity_from_env as identity_from_env
from .link import CannotConnect as CannotConnect
from .link import RequestTimeout as RequestTimeout
from .link import _Pending as _Pending
from .link import _Refused as _Refused
from .link import find_address as find_address
from .link import network_key_from_env as network_key_from_env
from .names import WATCH_BUFFER as WATCH_BUFFER
from .names import NameEvent as NameEvent
from .names import NameInfo as NameInfo
from .names import Names
from .names import Watch as Watch
from .names import WatchOverflow as WatchOverflow
from .rpc import DEFAULT_MAX_MESSAGE as DEFAULT_MAX_MESSAGE
from .rpc import RPC_PROTOCOL as RPC_PROTOCOL
from .rpc import RpcCalls
from .rpc import RpcConnection as RpcConnection

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

_Link = Link  # the old name of a live connection


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
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._connection = BusConnection(
            address,
            identity,
            network_key,
            name=name,
            info=info,
            flags=flags,
            reconnect=reconnect,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
        )
        self._rpc_max_message = rpc_max_message
        self._names_made: Names | None = None
        self._events_made: Events | None = None
        self._rpc_made: RpcCalls | None = None
        self._services_made: Services | None = None
        # Channels others open to us are answered from the start: the routes are made before
        # the bus is handed out, while the broker answers hello (see OpenBus).  The other
        # capabilities are made when first used: what they handle (name changes, events,
        # calls' replies) comes only once they asked for it, and a short-lived bus pays for
        # none of them.
        self._routes: ChannelRoutes
        self._connection.meanwhile = self._make_routes

    def _make_routes(self) -> None:
        self._routes = ChannelRoutes(self._connection)
        self._connection.restore = self._restore

    @property
    def _names(self) -> Names:
        names = self._names_made
        if names is None:
            names = self._names_made = Names(self._connection)
            self._connection.on_give_up = names.fail_all
        return names

    @property
    def _events(self) -> Events:
        events = self._events_made
        if events is None:
            events = self._events_made = Events(self._connection)
        return events

    @property
    def _rpc_calls(self) -> RpcCalls:
        calls = self._rpc_made
        if calls is None:
            calls = self._rpc_made = RpcCalls(self._connection, self._routes.open_channel, max_message=self._rpc_max_message)
        return calls

    @property
    def _services(self) -> Services:
        services = self._services_made
        if services is None:
            services = self._services_made = Services(self._connection)
        return services

    async def _restore(self, link: Link) -> None:
        # (Names asks again for the wanted names the hello did not ask for, and lets go of
        # the hello's if it is no longer wanted: only it does either.)
        wanted = self._connection.requested_names
        if self._names_made is not None or len(wanted) > 1 or (link.hello_name is not None and link.hello_name not in wanted):
            await self._names.restore(link)
        if self._events_made is not None:
            await self._events_made.restore(link)

    # -- the connection -----------------------------------------------------------------------

    @property
    def address(self) -> str:
        return self._connection.address

    @property
    def endpoints(self) -> list[Endpoint]:
        return self._connection.endpoints

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint of the address the bus is (or was last) connected through."""
        return self._connection.endpoint

    @property
    def identity(self) -> Identity:
        return self._connection.identity

    @property
    def network_key(self) -> bytes:
        return self._connection.network_key

    @property
    def plugin_info(self) -> dict[str, Any]:
        return self._connection.plugin_info

    @property
    def requested_names(self) -> dict[str, list[str]]:
        return self._connection.requested_names

    @property
    def reconnect(self) -> bool:
        return self._connection.reconnect

    @reconnect.setter
    def reconnect(self, value: bool) -> None:
        self._connection.reconnect = value

    @property
    def request_timeout(self) -> float:
        return self._connection.request_timeout

    @request_timeout.setter
    def request_timeout(self, value: float) -> None:
        self._connection.request_timeout = value

    @property
    def rpc_max_message(self) -> int:
        """The largest RPC message (argument or result) this bus's calls send or accept."""
        calls = self._rpc_made
        return self._rpc_max_message if calls is None else calls.max_message

    @rpc_max_message.setter
    def rpc_max_message(self, value: int) -> None:
        self._rpc_max_message = value
        if self._rpc_made is not None:
            self._rpc_made.max_message = value

    @property
    def failure(self) -> BusError | None:
        """Why the bus gave up reconnecting, if it did."""
        return self._connection.failure

    @property
    def reconnects(self) -> int:
        return self._connection.reconnects

    @property
    def _link(self) -> Link | None:
        return self._connection.link

    @property
    def unique_id(self) -> str:
        link = self._connection.link
        if link is None:
            raise ConnectionLost("not connected to the bus right now")
        return link.unique_id

    @property
    def connected(self) -> bool:
        link = self._connection.link
        return link is not None and not link.closed

    async def request(self, op: str, **args: Any) -> Any:
        """Send a request and return its result; remote errors raise their RequestError class."""
        return await self._connection.request(op, args)

    async def ping(self) -> None:
        await self.request("ping")

    async def aclose(self) -> None:
        await self._connection.aclose()

    # -- names and watches ----------------------------------------------------------------------

    async def request_name(self, name: str, flags: Iterable[str] = ()) -> str:
        """Ask for a well-known name; returns primary-owner, in-queue, exists or already-owner.

        The name is requested again after a reconnect (unless the answer was ``exists``).
        """
        return await self._names.request_name(name, flags)

    async def release_name(self, name: str) -> str:
        return await self._names.release_name(name)

    async def list_names(self, *, all: bool = False) -> list[NameInfo]:
        """Every (visible) named plugin; with ``all`` (admins only) nameless connections too.

        Long lists come in pages; this fetches them all (pages are not one atomic snapshot:
        use :meth:`watch` for that)."""
        return await self._names.list_names(all=all)

    async def resolve(self, name: str) -> NameInfo:
        return await self._names.resolve(name)

    async def info(self, target: str) -> NameInfo:
        """Details of a connection, by well-known name or unique id (``:42``).

        Its channels may come in several pages (each reply stays under a control frame's
        size); this fetches them all."""
        return await self._names.info(target)

    async def stats(self) -> dict[str, Any]:
        """The broker's figures, as ``busctl stats`` shows them: ``{totals, connections}``.

        Every connection's row for an admin identity; only this connection's own otherwise."""
        return await self._names.stats()

    def watch(self, patterns: Iterable[str] = ("*",)) -> Watch:
        return self._names.watch(patterns)

    # -- events -------------------------------------------------------------------------------

    def subscribe(self, source_pattern: str = "*", member_pattern: str = "*") -> Subscription:
        """Events whose source and member match (shell globs, as for watches): use as
        ``async with bus.subscribe(...) as events: async for item in events`` -- each item is
        an :class:`~clients.events.Event` or, where some were missed, a
        :class:`~clients.events.Gap` with the count and the reason.  Restored after a
        reconnect (with a gap for the time the link was down)."""
        return self._events.subscribe(source_pattern, member_pattern)

    async def emit(self, member: str, payload: Any = None, *, source: str | None = None, destination: str | None = None) -> int:
        """Emit an event as ``source`` (a name this connection owns, or by default its unique
        id); returns to how many connections the broker queued it."""
        return await self._events.emit(member, payload, source=source, destination=destination)

    def publish(
        self, member: str, payload: Any = None, *, source: str | None = None, destination: str | None = None
    ) -> Coroutine[Any, Any, None]:
        """Emit an event one-way (like a D-Bus signal or a NATS publish): no round trip,
        ``await bus.publish(...)`` returns once the event is queued to be sent.  A refusal
        (say, ``source`` is not ours) is logged and raised by the next ``publish``.  Use
        :meth:`emit` to wait for the broker's answer.  (A plain function returning the
        coroutine to await, one fewer to step through per event; marked
        ``returns_coroutine``, as ``RpcConnection.call`` is.)"""
        return self._events.publish(member, payload, source=source, destination=destination)

    publish.returns_coroutine = True  # type: ignore[attr-defined]

    # -- installed plugins (service files) -----------------------------------------------------

    async def list_services(self) -> list[ServiceInfo]:
        """The installed plugins this connection may see, running or not (every page)."""
        return await self._services.list()

    async def service_status(self, name: str) -> ServiceInfo:
        """One installed plugin: its state, pid, restarts and last exit."""
        return await self._services.status(name)

    async def start_service(self, name: str) -> dict[str, Any]:
        """Start an installed plugin and wait until it owns its name (admin only)."""
        return await self._services.command("start", name)

    async def stop_service(self, name: str) -> dict[str, Any]:
        """Stop an installed plugin: SIGTERM, then SIGKILL after its stop_timeout (admin only)."""
        return await self._services.command("stop", name)

    async def restart_service(self, name: str) -> dict[str, Any]:
        """Stop, then start an installed plugin, waiting until it owns its name (admin only)."""
        return await self._services.command("restart", name)

    async def reload_services(self) -> dict[str, Any]:
        """Make the broker read its service files again: ``{services, errors}`` (admin only)."""
        return await self._services.command("reload")

    # -- channels -------------------------------------------------------------------------------

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
        self._routes.handle_channels(protocol, handler, accept=accept, window=window)

    async def open_channel(
        self, name: str, protocol: str = "raw", route: str = "auto", *, window: int = DEFAULT_WINDOW
    ) -> Channel:
        """Open a channel to the plugin owning ``name``; its identity is proven by shs1."""
        return await self._routes.open_channel(name, protocol, route, window=window)

    # -- RPC ------------------------------------------------------------------------------------

    def call(self, name: str, method: str, *args: Any) -> Coroutine[Any, Any, Any]:
        """Call ``method`` of the service owning ``name`` (one channel per peer, reused):
        ``await bus.call(...)`` returns its result.

        Remote errors raise their :class:`~bus.errors.RequestError` class; no reply within
        :attr:`request_timeout` raises :class:`RequestTimeout`.  (A plain function returning
        the coroutine to await, one fewer to step through per call; marked
        ``returns_coroutine``, as ``RpcConnection.call`` is.)"""
        return self._rpc_calls.call(name, method, *args)

    call.returns_coroutine = True  # type: ignore[attr-defined]

    async def introspect(self, name: str) -> dict[str, Any]:
        """A service's methods (names, parameters, doc text), protocols and info."""
        return await self._rpc_calls.introspect(name)


def open_bus(
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
) -> OpenBus:
    """Connect to the bus for the duration of the block (``async with open_bus(...) as bus``).

    ``address`` defaults to ``MINIBUS_ADDRESS`` or the broker's address file; ``identity`` to
    the key file named by ``MINIBUS_IDENTITY``, else the user's default key (created on first use); ``network_key`` to ``MINIBUS_NETWORK_KEY``
    or minibus's default.  With ``name``, the connection registers as that well-known name
    (a service plugin); without, it is a nameless client, hidden from other clients' queries.
    ``rpc_max_message`` bounds the RPC messages :meth:`Bus.call` sends and accepts (16 MiB).
    Nothing is read or dialled before the block is entered.
    """
    return OpenBus(
        address, identity, name, info, flags, network_key, reconnect, request_timeout, connect_timeout, rpc_max_message
    )


def _same_exception(seen: BaseException, raised: BaseException | None) -> bool:
    """Whether ``seen`` (in a nursery's group) is ``raised``: itself, or for a group the copy
    a cancel scope makes of it on its way out (same type, message and exceptions)."""
    if seen is raised:
        return True
    if not (isinstance(seen, BaseExceptionGroup) and isinstance(raised, BaseExceptionGroup)):
        return False
    return (
        type(seen) is type(raised)
        and seen.message == raised.message
        and len(seen.exceptions) == len(raised.exceptions)
        and all(_same_exception(a, b) for a, b in zip(seen.exceptions, raised.exceptions))
    )


class OpenBus:
    """What :func:`open_bus` returns: an async context manager, for one ``async with``.

    Entering connects and yields the :class:`Bus`; its tasks run in a nursery of its own until
    the block is left.  (A class rather than a generator-based context manager: a connect
    that does little pays for no generator and no extra frame at each of its waits.)"""

    __slots__ = ("_args", "_bus", "_nursery_manager", "_nursery")

    def __init__(
        self,
        address: str | None,
        identity: Identity | None,
        name: str | None,
        info: dict[str, Any] | None,
        flags: Iterable[str],
        network_key: bytes | None,
        reconnect: bool,
        request_timeout: float,
        connect_timeout: float,
        rpc_max_message: int,
    ) -> None:
        self._args = (address, identity, name, info, flags, network_key, reconnect, request_timeout, connect_timeout, rpc_max_message)
        self._bus: Bus | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> Bus:
        if self._bus is not None:
            raise RuntimeError("open_bus(...) is for one async with; call open_bus again for another")
        address, identity, name, info, flags, network_key, reconnect, request_timeout, connect_timeout, rpc_max_message = self._args
        address = find_address(address)
        # A Unix socket is connected first, at once: the broker accepts it and starts its
        # handshake while the bus is made (the two sides take turns: what one does while the
        # other works costs no time).
        dialled = dial_at_once(address) if 0 < connect_timeout < math.inf else None
        try:
            bus = self._bus = Bus(
                address,
                identity if identity is not None else identity_from_env(),
                network_key if network_key is not None else network_key_from_env(),
                name=name,
                info=info,
                flags=flags,
                reconnect=reconnect,
                request_timeout=request_timeout,
                rpc_max_message=rpc_max_message,
                connect_timeout=connect_timeout,
            )
        except BaseException:
            if dialled is not None:
                dialled.close_nowait()
            raise
        connection = bus._connection
        connection.dialled = dialled
        manager = self._nursery_manager = trio.open_nursery()
        nursery = self._nursery = await manager.__aenter__()
        # The connect runs in the bus's nursery, whose scope holds connect_timeout's deadline
        # until it is done (no scope of its own: one scope fewer per connect).  No task runs
        # in the nursery yet.
        scope = nursery.cancel_scope
        scope.deadline = trio.current_time() + connection.connect_timeout
        try:
            first = await connection.connect_in_scope()
            if scope.cancel_called:  # (the deadline passed as the last step ended)
                stream = first.framed.stream
                if not (isinstance(stream, SecureStream) and stream.close_nowait()):
                    await trio.aclose_forcefully(stream)
                raise connection.connect_timed_out()
        except trio.Cancelled as cancelled:
            # The deadline's (the nursery's scope takes it: CannotConnect says what the connect
            # waited for), else an outer scope's (it goes on).
            connection.detach()  # (no cycle left to the bus that never was)
            try:
                caught = await manager.__aexit__(type(cancelled), cancelled, cancelled.__traceback__)
            except BaseExceptionGroup as group:
                # The nursery wraps the body's Cancelled it does not take: an outer scope's
                # cancellation comes out as itself, as it would without the nursery.
                if len(group.exceptions) == 1 and group.exceptions[0] is cancelled:
                    raise cancelled from None
                raise
            if caught:
                raise connection.connect_timed_out() from None
            raise
        except BaseException:
            # (Left as it was entered, with no task: the error comes out as itself.)
            connection.detach()
            await manager.__aexit__(None, None, None)
            raise
        scope.deadline = math.inf
        if connection.meanwhile is not None:  # (not run during hello: made now)
            connection.meanwhile = None
            bus._make_routes()
        try:
            connection.start(nursery, first)
        except BaseException as error:  # (the nursery entered is left, whatever happened)
            nursery.cancel_scope.cancel()
            if not await manager.__aexit__(type(error), error, error.__traceback__):
                raise
        # (No restore: a bus just made holds no watch, subscription or second name.)
        return bus

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        bus, manager, nursery = self._bus, self._nursery_manager, self._nursery
        assert bus is not None and manager is not None and nursery is not None
        connection = bus._connection
        try:
            # No await before the nursery's exit: after cancelling our own scope, an await
            # would raise a Cancelled that replaces (and so swallows) the block's exception.
            # Should a step fail (a socket end that will not close, a KeyboardInterrupt), the
            # nursery is still left, with that error as the block's.
            failed: BaseException | None = None
            try:
                connection.closed = True
                link = connection.link
                if link is not None:
                    # Queued frames are dropped, as a cancelled writer drops them; a writer
                    # that was never needed is never started, and one that has not run yet
                    # ends at its first step, not by cancellation (which costs trio a good
                    # deal more: a short-lived bus pays it).
                    link.send.close()
                if bus._names_made is not None:
                    bus._names_made.close_all_nowait()
                if bus._events_made is not None:
                    bus._events_made.close_all_nowait()
                # The link's task closes the stream on its way out.  One that has not run yet
                # (the only task: the bus was left without waiting) is not cancelled (trio's
                # cancel costs more than the flag it reads): the link is ended and its stream
                # closed here and now, so the broker sees the end at once, and the task
                # returns at its first step.
                if connection.serving or len(nursery.child_tasks) > 1:
                    nursery.cancel_scope.cancel()
                elif link is not None:
                    connection.end_unread_now(link)
            except BaseException as error:
                failed = error
                nursery.cancel_scope.cancel()
                exc_type, exc, tb = type(error), error, error.__traceback__
            try:
                left = bool(await manager.__aexit__(exc_type, exc, tb))
            except BaseExceptionGroup as group:
                # The block's own exception comes out as itself, not wrapped by our nursery
                # (only our nursery's layer is taken off: a group the block raised stays one).
                inner: BaseException = group
                while not _same_exception(inner, exc) and isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
                    inner = inner.exceptions[0]
                if inner is group:
                    raise
                if _same_exception(inner, exc):
                    if failed is not None:
                        raise failed from None
                    return False  # (it goes on as it was)
                raise inner from None
            if failed is not None:
                raise failed
            return left
        finally:
            # Its tasks have ended: no handler or hook runs again.  Untied from them, the bus
            # and its link are freed by reference counting (see BusConnection.detach).
            connection.detach()
