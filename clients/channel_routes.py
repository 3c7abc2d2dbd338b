"""Opening and serving channels over their three routes, and reporting direct ones.

Theory of operation
-------------------
:class:`ChannelRoutes` opens channels (``open_channel``) and answers the broker's
``channel_request`` for channels others open to us (``handle_channels`` says which labels
we serve).  The broker picks the route:

* **relay**: a :class:`~clients.channels.RelayStream` multiplexed over our link, registered
  in :attr:`~clients.link.Link.channels` so the link's reader feeds it;
* **unix-fd**: one end of a socketpair, passed with the broker's message over our Unix
  link (:class:`~bus.io.fdpass.UnixChannelStream`);
* **tcp**: the target listens on an ephemeral port and accepts only a connection that
  proves the opener's key and presents the broker's one-time token; the opener dials it.
  A failed dial falls back to the relay unless ``route="direct"`` was asked for.

Every channel then runs its own shs1 handshake (opener as client).  The broker does not see
the bytes of a direct channel (unix-fd or tcp), so both ends report their byte counts every
:data:`CHANNEL_REPORT_INTERVAL` seconds and once when it closes; a direct channel that was
never used is reported closed at once, so the broker forgets it.
"""

from __future__ import annotations

import hmac
import logging
import socket
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from bus.errors import ChannelRejected, ConnectionLost, HandshakeError, RemoteProtocolError, RequestError
from bus.io.fdpass import FdSocketStream, UnixChannelStream
from bus.io.secure import SecureStream
from bus.wire.frames import encode_control
from bus.wire.identity import PublicKey
from bus.wire.messages import ErrorReply, Reply, Request

from .channels import DEFAULT_WINDOW, Channel, ChannelRequest, PeerInfo, RelayStream
from .link import BusConnection, Link

__all__ = ["ChannelRoutes", "Handler", "AcceptCheck"]

log = logging.getLogger("minibus.client")

DIRECT_TIMEOUT = 5.0  # for a direct TCP channel: the opener to connect and prove itself
#: Each connection to a direct channel's listener has this long to prove the opener's key and
#: present the token; at most MAX_DIRECT_CANDIDATES are checked at once, more are closed at once.
DIRECT_CANDIDATE_TIMEOUT = 2.0
MAX_DIRECT_CANDIDATES = 16
PLAIN_RELAY_REFUSED = (
    "refused a plain relayed channel over an encrypted bus connection (TCP, or Unix with box-stream): "
    "its bytes would cross in plaintext"
)
#: A channel request for a protocol with no handler yet, in a link's first seconds, waits this
#: long from the link's start for one (a plugin started on demand gets the requests held for
#: its name right after its hello, before its code had a chance to register its handlers).
HANDLER_GRACE = 2.0
#: How often the byte counts of open direct channels are reported to the broker (seconds).
CHANNEL_REPORT_INTERVAL = 1.0

Handler = Callable[[Channel], Awaitable[Any]]
#: Sees a channel request; returns None to accept it or a reason to reject it.
AcceptCheck = Callable[[ChannelRequest], "str | None"]


class ChannelRoutes:
    """Channels opened from and to one :class:`~clients.link.BusConnection`."""

    def __init__(self, connection: BusConnection) -> None:
        self._connection = connection
        self._handlers: dict[str, tuple[Handler, AcceptCheck | None, int]] = {}
        # Set when a handler is added (made when a request first waits for one).
        self._handler_waited: trio.Event | None = None
        # Open direct channels (made with the first: most buses never open one).
        self._direct_made: weakref.WeakKeyDictionary[Channel, tuple[Link, int, tuple[int, int] | None]] | None = None
        connection.request_handlers["channel_request"] = self._channel_request
        self._reporting = False  # the reporting task runs (started with the first direct channel)

    # -- the target's side ------------------------------------------------------------------------

    def handle_channels(
        self, protocol: str, handler: Handler, *, accept: AcceptCheck | None = None, window: int = DEFAULT_WINDOW
    ) -> None:
        self._handlers[protocol] = (handler, accept, window)
        waited = self._handler_waited
        if waited is not None:
            self._handler_waited = None
            waited.set()

    @property
    def _handler_added(self) -> trio.Event:
        """Set when the next handler is added."""
        event = self._handler_waited
        if event is None:
            event = self._handler_waited = trio.Event()
        return event

    @property
    def _direct(self) -> weakref.WeakKeyDictionary[Channel, tuple[Link, int, tuple[int, int] | None]]:
        """Open direct channels: (link, channel id there, counts last reported).  Weak: a
        channel its user dropped without closing is not kept alive (nor reported) by this
        table."""
        direct = self._direct_made
        if direct is None:
            direct = self._direct_made = weakref.WeakKeyDictionary()
        return direct

    def _channel_request(self, link: Link, request: Request) -> dict[str, Any] | None:
        """Accept (and start serving) or reject a channel someone opens to us."""
        nursery = self._connection.nursery
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
        if ask.protocol not in self._handlers and nursery is not None and trio.current_time() < link.started + HANDLER_GRACE:
            nursery.start_soon(self._answer_when_handled, link, request, ask, end)
            return None
        return self._decide(link, request, ask, end)

    async def _answer_when_handled(self, link: Link, request: Request, ask: ChannelRequest, end: socket.socket | None) -> None:
        """Wait (within the link's first HANDLER_GRACE seconds) for a handler of the label."""
        try:
            with trio.move_on_at(link.started + HANDLER_GRACE):
                while ask.protocol not in self._handlers:
                    await self._handler_added.wait()
        except BaseException:
            if end is not None:
                end.close()  # cancelled: the bus is closing
            raise
        reply = self._decide(link, request, ask, end)
        if reply is not None:
            self._connection.send_nowait(link, reply)

    def _decide(self, link: Link, request: Request, ask: ChannelRequest, end: socket.socket | None) -> dict[str, Any] | None:
        """Accept (and start serving) or reject the request, now that it is known who serves."""
        nursery = self._connection.nursery
        entry = self._handlers.get(ask.protocol)
        refusal = None
        if entry is None or nursery is None:
            refusal = f"no handler for protocol {ask.protocol!r}"
        elif entry[1] is not None:
            refusal = entry[1](ask)
        if ask.route == "unix-fd" and end is None:
            refusal = "the socket for the unix-fd route did not arrive"
        if refusal is not None or entry is None or nursery is None:
            if end is not None:
                end.close()
            return ErrorReply(request.id, ChannelRejected.wire_code, refusal or "rejected").to_wire()
        handler, _, window = entry
        if ask.route == "tcp":
            token = request.args.get("token")
            if not isinstance(token, bytes) or len(token) != 32:
                return ErrorReply(request.id, "minibus.Error.BadRequest", "channel_request: tcp route without a token").to_wire()
            # The answer (host and port) goes out once the listener is open.
            nursery.start_soon(self._serve_direct, link, request.id, ask, token, handler)
            return None
        transport: trio.abc.HalfCloseableStream
        if end is not None:
            transport = UnixChannelStream(end)
        else:
            transport = RelayStream(link, ask.channel, window=window)
            link.channels[ask.channel] = transport
        nursery.start_soon(self._serve_channel, transport, ask, handler, link)
        return Reply(request.id, {}).to_wire()

    @staticmethod
    def _link_is_encrypted(link: Link) -> bool:
        """Whether our link to the broker is TCP or runs box-stream: then every channel relayed
        over it must be encrypted end to end (the broker's word that one is plain is refused)."""
        secure = link.framed.stream
        if not isinstance(secure, SecureStream):
            return False
        transport = secure.transport
        over_tcp = isinstance(transport, trio.SocketStream) and transport.socket.family in (socket.AF_INET, socket.AF_INET6)
        return secure.encrypted or over_tcp

    @staticmethod
    def _listen_host(link: Link) -> str:
        """Where an opener can reach us: our address on a TCP bus connection, else loopback."""
        secure = link.framed.stream
        transport = secure.transport if isinstance(secure, SecureStream) else None
        if isinstance(transport, trio.SocketStream) and transport.socket.family in (socket.AF_INET, socket.AF_INET6):
            return str(transport.socket.getsockname()[0])
        return "127.0.0.1"

    async def _serve_direct(
        self, link: Link, request_id: int, ask: ChannelRequest, token: bytes, handler: Handler
    ) -> None:
        """The tcp route's target side: listen, tell the broker where, accept the opener only.

        A connection must prove the opener's key (shs1) and then present the one-time token:
        see :meth:`_take_direct_opener`.  Nobody within :data:`DIRECT_TIMEOUT`: the broker
        forgets the channel.  The token works once: the listener closes after it is used.
        """
        send_nowait = self._connection.send_nowait
        host = self._listen_host(link)
        try:
            listeners = await trio.open_tcp_listeners(0, host=host)
        except OSError as exc:
            send_nowait(link, ErrorReply(request_id, ChannelRejected.wire_code, f"cannot listen: {exc}").to_wire())
            return
        listener = listeners[0]
        send_nowait(link, Reply(request_id, {"host": host, "port": listener.socket.getsockname()[1]}).to_wire())
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
        identity, network_key = self._connection.identity, self._connection.network_key

        async def check(transport: trio.SocketStream) -> None:
            nonlocal checking
            candidate = SecureStream.server(
                transport, identity, network_key=network_key, authorize=lambda key: key == opener_key
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
    async def _run_handler(handler: Handler, channel: Channel) -> None:
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
    def _take_fd(link: Link) -> socket.socket | None:
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
        handler: Handler,
        link: Link | None = None,
    ) -> None:
        if isinstance(relay, RelayStream):
            # The broker opens the relay when it reads our acceptance, which precedes this grant.
            relay.start()
        opener_key = ask.opener.key
        secure = SecureStream.server(
            relay,
            self._connection.identity,
            network_key=self._connection.network_key,
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

    # -- the opener's side ------------------------------------------------------------------------

    async def open_channel(
        self, name: str, protocol: str = "raw", route: str = "auto", *, window: int = DEFAULT_WINDOW
    ) -> Channel:
        if route not in ("auto", "relay", "direct"):
            raise ValueError(f"route must be 'auto', 'relay' or 'direct', not {route!r}")
        link = self._connection.link
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

        result = await self._connection.request(
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
            relay, self._connection.identity, peer.key, network_key=self._connection.network_key, encrypted=result["encrypted"]
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

    async def _dial_direct(self, result: dict[str, Any], protocol: str) -> Channel:
        """The tcp route's opener side: connect, prove ourselves, present the token."""
        peer = PeerInfo.from_wire(result["peer"])
        with trio.fail_after(DIRECT_TIMEOUT):
            transport = await trio.open_tcp_stream(result["host"], result["port"])
            secure = SecureStream.client(
                transport, self._connection.identity, peer.key, network_key=self._connection.network_key
            )
            try:
                await secure.do_handshake()
                await secure.send_all(result["token"])
            except BaseException:
                await trio.aclose_forcefully(secure)
                raise
        return Channel(secure, transport, peer, protocol, "tcp")

    # -- direct channels: their byte counts for the broker (it does not see their bytes) ------

    def _track_direct(self, channel: Channel, link: Link, channel_id: int) -> Channel:
        self._direct[channel] = (link, channel_id, None)
        nursery = self._connection.nursery
        if not self._reporting and nursery is not None:
            # (A bus that never opens a direct channel never runs this task.)
            nursery.start_soon(self._report_direct_channels)
            self._reporting = True

        def closed() -> None:
            entry = self._direct.pop(channel, None)
            if entry is not None:
                self._send_channel_report(entry[0], entry[1], channel.bytes_in, channel.bytes_out, closed=True)

        channel.on_close = closed
        return channel

    def _send_channel_report(self, link: Link, channel_id: int, bytes_in: int, bytes_out: int, *, closed: bool) -> None:
        """Fire and forget: the broker's answer (or its error, if it forgot us) is not awaited."""
        if link.closed or link is not self._connection.link:
            return  # the broker behind that link is gone, and with it its record of the channel
        report = {"channel": channel_id, "bytes_in": bytes_in, "bytes_out": bytes_out, "closed": closed}
        self._connection.send_request_nowait(link, "channel_report", report)

    def _forget_direct(self, link: Link, channel_id: int) -> None:
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
