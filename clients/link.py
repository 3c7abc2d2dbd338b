"""The link to the broker: connect, say hello, requests and replies, reconnect.

Theory of operation
-------------------
:class:`BusConnection` dials the bus address (Unix socket or TCP, whichever the address
lists first and answers), runs the secret handshake against the broker key in the address
and says hello: that makes a :class:`Link`, one live connection.  While the bus is open,
:meth:`BusConnection.start` runs, in the bus's nursery, a *reader* task (replies, events,
the broker's requests and pings; it reconnects when its link ends) and, once a frame has to
wait, one *writer* task per link (frames go straight to the socket while nothing waits; the
writer finishes what the socket took only part of, so a cancelled request never leaves half a
frame behind).

Connecting (dial, handshake, hello) has one deadline (``connect_timeout``, 10 s by default;
with several endpoints, each but the last may take a share of what is left of it, at most the
handshake's own 10 s, so one whose dial or handshake stalls gives way to the next in time).  Requests wait for their reply under a deadline (``request_timeout``,
10 s by default); callers may add tighter ones with ``trio.fail_after``.

When the link drops, requests in flight fail with :class:`~bus.errors.ConnectionLost`
(none is replayed).  With ``reconnect=True`` the connection then dials again with
exponential backoff (0.1 s doubling to 5 s), says hello again and lets the capabilities
above it restore their state (names, watches) through its ``restore`` hook.

This module knows nothing of names, watches or channels: the reader hands control events
and the broker's requests to the handlers registered for them, and data on other channel
ids to the :class:`ChannelEnd` registered in :attr:`Link.channels`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import trio

from bus.errors import BusError, ConnectionLost, FrameError, HandshakeError, RequestError, error_from_wire
from bus.io.fdpass import FdSocketStream
from bus.io.framed import FramedStream
from bus.io.secure import DEFAULT_HANDSHAKE_TIMEOUT, SecureStream
from bus.io.writer import FrameWriter
from bus.wire.address import Endpoint, default_runtime_dir, parse_address
from bus.wire.files import LocalFileError, check_owned_dir, read_trusted_file
from bus.wire.frames import DEFAULT_MAX_CONTROL, HEADER_SIZE, ControlFrame, DataFrame, Frame, encode_control
from bus.wire.identity import Identity, load_identity, load_or_create_identity
from bus.wire.messages import ErrorReply, Event, Reply, Request, parse_message
from bus.wire.shs import DEFAULT_NETWORK_KEY, parse_network_key

__all__ = [
    "BusConnection",
    "CannotConnect",
    "ChannelEnd",
    "Link",
    "RequestTimeout",
    "find_address",
    "identity_from_env",
    "network_key_from_env",
]

log = logging.getLogger("minibus.client")

DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 10.0
OUTBOUND_BUFFER = 1024
#: The send buffer asked for a bus connection on the Unix socket (``SO_SNDBUF``; Linux
#: grants twice what is asked, up to twice ``net.core.wmem_max``, whose usual default is this
#: very value).  With the default buffer (``net.core.wmem_default``, the same 208 KiB, not
#: doubled) a relayed channel's batched writes (``SEND_BATCH``) often went out in parts and
#: the broker read about 75 KiB a wake-up; with twice the room it reads more at once, and a
#: relayed bulk transfer moves about a fifth faster (benchmarks/README.md, *The nineteenth
#: pass*).  The buffer is this end's own socket's: what it holds in the kernel is what this
#: client sent and the broker has not read yet, charged to this client's socket, and any
#: process could ask for as much itself.  TCP keeps its own autotuning.
BUS_SEND_BUFFER = 212_992

#: Answers a request the broker sends us: the reply to send now, or None if it is sent later.
RequestHandler = Callable[["Link", Request], "dict[str, Any] | None"]
#: Takes an event the broker pushes on the control channel.
EventHandler = Callable[["Link", Event], None]
#: Takes events' messages as they came, for the events that come by the thousand (without the
#: copy of its fields an :class:`~bus.wire.messages.Event` makes, and one call for a run of
#: them): ``handler(link, run, start)`` takes ``run[start]`` (an event of its name) and the
#: messages after it while they are events of its name (an ``event`` key naming it, no ``op``
#: or ``re``: what :func:`~bus.wire.messages.parse_message` calls an event), in order; it
#: returns the index of the first message it did not take (``len(run)`` for none).  The maps
#: are read, not changed or kept.  It sends nothing (the reader does not cork the link for a
#: read of events alone: what one sent would go out at once, not with the read's answers).
RawEventHandler = Callable[["Link", list[dict[Any, Any]], int], int]


class CannotConnect(BusError):
    """No endpoint of the bus address accepted a connection and a handshake."""


class RequestTimeout(BusError):
    """The broker did not answer a request before the deadline."""


def identity_from_env() -> Identity:
    """``MINIBUS_IDENTITY`` (the path of a key file: busd sets it for a plugin whose service
    file names an identity), else the user's default key (created on first use)."""
    path = os.environ.get("MINIBUS_IDENTITY")
    return load_identity(path) if path else load_or_create_identity()


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


class ChannelEnd(Protocol):
    """What the reader feeds the frames of a relayed channel to (a relay stream)."""

    def on_control(self, body: dict[str, Any]) -> None: ...

    def on_data(self, data: bytes | memoryview) -> None:
        """``data``: a view of the link's read when it lay in one; valid only during the call
        (what is kept must be copied)."""
        ...

    def on_link_lost(self, reason: str) -> None: ...


def dial_at_once(address: str) -> FdSocketStream | None:
    """For an address of one Unix endpoint: its socket, connected now without waiting (the
    broker starts on its side of the connect while the client makes its bus: the two take
    turns); None for any other address, or when the connect would wait or fails (the connect
    proper then dials, under its deadline, and says why it failed)."""
    try:
        endpoints = parse_address(address)
    except Exception:
        return None  # (said by the connect proper)
    if len(endpoints) != 1 or endpoints[0].transport != "unix" or endpoints[0].path is None:
        return None
    try:
        return FdSocketStream.connect_nowait(endpoints[0].path)
    except OSError:
        return None


def _cannot_dial(errors: list[str]) -> CannotConnect:
    return CannotConnect("cannot connect to the bus: " + "; ".join(errors))


class _Refused(Exception):
    """The broker's error event in place of the answer to hello: why it will not serve us."""

    def __init__(self, code: str, message: str) -> None:
        suffix = f" [{code}]"
        super().__init__(message if message.endswith(suffix) else message + suffix)


def _lone_data_to(channels: dict[int, ChannelEnd]) -> Callable[[int, bytes], bool]:
    """For a link's reader (FramedStream.lone_data): a DATA frame that came alone in its read
    (``frame``, its header and body) is handed to its channel in ``channels`` as a view of the
    read, as the reader's dispatch would hand it, and True; False for any other (the control
    channel's, an unknown channel's), which the reader takes the usual way.  No cork: a frame
    alone has nothing to share a write with.  (A function of the channels, not a method of
    the link: no reference cycle through the stream.)"""

    def lone_data(channel: int, frame: bytes) -> bool:
        relay = channels.get(channel) if channel else None
        if relay is None:
            return False
        relay.on_data(memoryview(frame)[HEADER_SIZE:])
        return True

    return lone_data


class Link:
    """One live connection: the stream, its writer queue, pending requests and relayed channels."""

    def __init__(self, framed: FramedStream, unique_id: str) -> None:
        self.framed = framed
        self.unique_id = unique_id
        assert isinstance(framed.stream, SecureStream)
        # Channel bytes are handed to their channel as views of the link's reads (no copy per
        # frame): each channel copies what it keeps (ChannelEnd.on_data).  A frame that
        # straddles two reads comes in two pieces, each handed on as it is read (a channel is
        # a byte stream): no join of it.
        framed.data_views = True
        framed.partial_data = True
        # Frames out: straight to the socket when nothing waits, else queued (bounded).
        self.send = FrameWriter(framed.stream, max_frames=OUTBOUND_BUFFER)
        self.pending: dict[int, _Pending] = {}
        self.channels: dict[int, ChannelEnd] = {}
        # A channel's frame that came alone in its read goes to its channel from the read.
        framed.lone_data = _lone_data_to(self.channels)
        self.closed = False
        self._closed_event: trio.Event | None = None  # (made when first asked for)
        self.reason = "the broker closed the connection"
        self.started = trio.current_time()
        #: The name this link's hello asked for (None: none); see names.restore.
        self.hello_name: str | None = None

    @property
    def closed_event(self) -> trio.Event:
        """Set once the link has ended (made when first asked for: most links never are)."""
        event = self._closed_event
        if event is None:
            event = self._closed_event = trio.Event()
            if self.closed:
                event.set()
        return event

    def mark_closed(self, reason: str) -> None:
        """The link has ended (when its reader never ran: see BusConnection._end_unread)."""
        self.reason = reason
        self.closed = True
        if self._closed_event is not None:
            self._closed_event.set()


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


async def _restore_nothing(link: Link) -> None:
    pass


def _ignore_give_up(error: BusError) -> None:
    pass


class BusConnection:
    """The connection to the broker across reconnects: one :class:`Link` at a time.

    The capabilities above it plug in through :attr:`request_handlers` (requests the broker
    sends us, by operation), :attr:`event_handlers` and :attr:`raw_event_handlers` (events,
    by name; a raw one gets the message as it came), :attr:`restore`
    (after every (re)connect) and :attr:`on_give_up` (when it stops reconnecting); tasks that
    run for as long as the bus is open go in :attr:`nursery`, started when first needed.
    """

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
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self.address = address
        self.endpoints = parse_address(address)
        self.identity = identity
        self.network_key = network_key
        self.plugin_info = dict(info or {})
        self.reconnect = reconnect
        self.request_timeout = request_timeout
        #: Dial, handshake and hello, at every (re)connect, within this many seconds.
        if not 0 < connect_timeout < math.inf:
            raise ValueError(f"connect_timeout must be a positive number of seconds, not {connect_timeout!r}")
        self.connect_timeout = connect_timeout
        #: Names to hold: the first goes with hello, the rest are requested again by the names.
        self.requested_names: dict[str, list[str]] = {}
        if name is not None:
            self.requested_names[name] = list(flags)
        self.request_handlers: dict[str, RequestHandler] = {}
        self.event_handlers: dict[str, EventHandler] = {}
        self.raw_event_handlers: dict[str, RawEventHandler] = {}
        self.restore: Callable[[Link], Awaitable[None]] = _restore_nothing
        self.on_give_up: Callable[[BusError], None] = _ignore_give_up
        self.nursery: trio.Nursery | None = None
        self.link: Link | None = None
        self.failure: BusError | None = None  # why the bus gave up reconnecting, if it did
        self._next_id = 1
        self.closed = False
        #: The task that reads the link (and reconnects) has started running.
        self.serving = False
        self.reconnects = 0
        self.endpoint: Endpoint | None = None
        # The bus was left before its reader task ran, and its link was ended and closed then
        # (see end_unread_now): the task has nothing left to do.
        self._ended_unread = False
        self._hello_sent = False  # (the last connect got as far as hello: see connect_timed_out)
        self._hello_frame: bytes | None = None  # (made while the broker works on the handshake)
        self._hello_name: str | None = None  # (the name the last hello made asked for)
        #: Run once while the broker answers the next hello (the owner's work that does not
        #: need the answer: open_bus makes the rest of the bus then).
        self.meanwhile: Callable[[], None] | None = None
        #: A socket connected already to the (only, Unix) endpoint: see dial_at_once.
        self.dialled: FdSocketStream | None = None

    # -- requests -----------------------------------------------------------------------------

    async def request(
        self,
        op: str,
        args: dict[str, Any],
        on_result: Callable[[Any], None] | None = None,
        on_abandoned: Callable[[Any], None] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Send a request and return its result; remote errors raise their RequestError class.
        ``timeout`` replaces ``request_timeout`` for this request (one that takes long by design).

        ``on_result`` runs in the reader when the result arrives, before any later message;
        ``on_abandoned`` undoes it if the caller gave up by then (or runs when a late result
        comes)."""
        link = self.link
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
            deadline = self.request_timeout if timeout is None else timeout
            with trio.move_on_after(deadline) as scope:
                await pending.done.wait()
            if scope.cancelled_caught:
                raise RequestTimeout(f"{op}: no reply from the broker within {deadline:g} s")
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

    @staticmethod
    def send_nowait(link: Link, message: dict[str, Any]) -> None:
        """Send without waiting; a link that is ending or hopelessly behind loses it (its
        other end notices the link, not the message)."""
        try:
            link.send.send_nowait(link.framed.encode_message(message))
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass

    def take_request_id(self) -> int:
        """An id for a request nobody waits for the answer of."""
        request_id = self._next_id
        self._next_id += 1
        return request_id

    def send_request_nowait(self, link: Link, op: str, args: dict[str, Any]) -> None:
        """A request whose answer nobody waits for (it arrives with an unknown id: dropped)."""
        self.send_nowait(link, Request(op, self.take_request_id(), args).to_wire())

    # -- connecting ---------------------------------------------------------------------------

    async def _dial(self) -> tuple[SecureStream, Endpoint]:
        """The first endpoint that connects and completes its handshake.  Each but the last
        has a share of what is left of connect()'s deadline (at most the handshake's own
        timeout), so a stalled one gives way to the next in time; the last has the rest (no
        scope of its own: connect()'s deadline is its deadline)."""
        errors: list[str] = []
        endpoints = self.endpoints
        last = len(endpoints) - 1
        for i, ep in enumerate(endpoints):
            if i == last:
                stream = await self._try_endpoint(ep, errors)
            else:
                left = trio.current_effective_deadline() - trio.current_time()
                share = min(DEFAULT_HANDSHAKE_TIMEOUT, max(0.0, left) / (last + 1 - i))
                stream = None
                with trio.move_on_after(share) as scope:
                    stream = await self._try_endpoint(ep, errors)
                if scope.cancelled_caught:
                    # (only an endpoint's own share ends here: connect()'s deadline is outside;
                    # what the attempt opened was closed on its way out)
                    errors.append(f"{ep.transport}: no handshake within {share:.3g} s")
                    continue
            if stream is not None:
                return stream, ep
        raise _cannot_dial(errors)

    async def _try_endpoint(self, ep: Endpoint, errors: list[str]) -> SecureStream | None:
        """Connect to ``ep`` and complete the handshake: the stream, or None (why is added to
        ``errors``).  Whatever it opened is closed if it fails or is cancelled."""
        transport: trio.abc.HalfCloseableStream
        try:
            if ep.transport == "unix":
                assert ep.path is not None
                # Unix connections can receive socket ends: the unix-fd channel route.
                dialled, self.dialled = self.dialled, None
                transport = dialled if dialled is not None else await FdSocketStream.connect(ep.path)
                with contextlib.suppress(OSError):  # (a tuning: never a reason to fail the connect)
                    transport.raw_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUS_SEND_BUFFER)
                # The hello's frame is made while the broker works on its handshake message:
                # on the first connect only, which nothing else runs beside.  (A reconnect
                # runs beside the bus's users, who may release a name meanwhile: its hello
                # is made when it is sent, from the names wanted then.)
                if self.link is None:
                    transport.after_send = self._prepare_hello
            else:
                assert ep.host is not None and ep.port is not None
                transport = await trio.open_tcp_stream(ep.host, ep.port)
        except OSError as exc:
            errors.append(f"{ep.transport}: {exc.strerror or exc}")
            return None
        stream = SecureStream.client(
            transport,
            self.identity,
            ep.key,
            network_key=self.network_key,
            encrypted=ep.uses_box_stream,
            handshake_timeout=math.inf,  # (bounded by the scope around it)
        )
        # The hello goes out right behind msg3 (see _early_hello).
        stream.early_data = self._early_hello
        try:
            await stream.do_handshake()
        except HandshakeError as exc:
            errors.append(f"{ep.transport}: handshake failed: {exc}")
            # Closed here (its transport already is), and its error's tracebacks dropped: the
            # error holds the stream's frames, so the stream would wait for the cyclic garbage
            # collector otherwise.
            if not stream.close_nowait():
                await trio.aclose_forcefully(stream)
            stream.forget_failure_frames()
            return None
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def connect(self) -> Link:
        """Dial, handshake and say hello (with the first requested name): a new link.

        All of it within :attr:`connect_timeout` (one deadline: :class:`CannotConnect` says
        what it was waiting for when it passed)."""
        with trio.move_on_after(self.connect_timeout) as scope:
            link = await self.connect_in_scope()
        if scope.cancelled_caught:
            raise self.connect_timed_out()
        return link

    async def connect_in_scope(self) -> Link:
        """:meth:`connect`'s steps, under a deadline the caller set (``connect_timeout`` from
        now) in a cancel scope of its own; if that scope catches the cancellation, raise
        :meth:`connect_timed_out`.  (open_bus sets it on the bus's nursery: a connect then
        makes no scope of its own.)"""
        self._hello_sent = False
        self._hello_frame = None
        endpoints = self.endpoints
        if len(endpoints) == 1:  # (most addresses: no _dial frame to resume at each wait)
            errors: list[str] = []
            endpoint = endpoints[0]
            dialled = await self._try_endpoint(endpoint, errors)
            if dialled is None:
                raise _cannot_dial(errors)
            stream = dialled
        else:
            stream, endpoint = await self._dial()
        try:
            # The hello went out behind msg3, but nothing the broker says is read before
            # msg4 has proven it.
            self._hello_sent = True
            link, reply = await self._hello(stream)
        except BaseException:
            if not stream.close_nowait():
                await trio.aclose_forcefully(stream)
            raise
        if isinstance(reply, ErrorReply):
            if not stream.close_nowait():
                await trio.aclose_forcefully(stream)
            raise error_from_wire(reply.code, reply.message)
        self.endpoint = endpoint
        link.unique_id = reply.result["unique_id"]
        return link

    def connect_timed_out(self) -> CannotConnect:
        """The error of a connect whose deadline passed: what it was waiting for."""
        if self._hello_sent:
            return CannotConnect(f"the broker did not answer hello within {self.connect_timeout:g} s")
        return CannotConnect(f"cannot connect to the bus within {self.connect_timeout:g} s")

    async def _hello(self, stream: SecureStream) -> tuple[Link, Reply | ErrorReply]:
        """Say hello on a stream whose handshake is done: the link (its unique id still to be
        set from the answer) and the broker's answer.  The caller closes the stream if this
        raises."""
        # The broker checks every message it takes in against the CBOR profile, and builds
        # what it sends from checked values: its control messages are decoded without a
        # second check (cbor2 still refuses malformed CBOR).  What other peers send on
        # channels is checked here as ever (see clients/rpc.py).
        transport = stream.plain_transport()  # (asked before sending: a failed send breaks it)
        # Hello (and the names) go out before the reader and writer start: no other traffic yet.
        early = stream.early_data_sent
        send_failure: BaseException | None = None
        try:
            if not early:
                # (The hello could not be encoded behind msg3: its error is raised here.)
                frame = self._hello_frame_now()
                try:
                    # Straight to the socket (it has room: nothing was sent since the
                    # handshake); only what it did not take waits.
                    rest = stream.send_nowait(frame)
                    if rest:
                        await stream.send_wire(rest)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    # The broker may have refused us (a quota) and hung up before our hello
                    # arrived: its reason may still wait to be read.
                    send_failure = exc
            # While the broker answers, the link is made, and what the owner wants done
            # (off the connect's serial path: the two sides take turns, so what either does
            # while the other works costs no time).
            framed = FramedStream(stream, receive_stream=transport, trusted=True)
            link = Link(framed, "")
            link.hello_name = self._hello_name
            meanwhile = self.meanwhile
            if meanwhile is not None:
                self.meanwhile = None
                meanwhile()
            try:
                if not early and isinstance(transport, FdSocketStream):
                    # Nothing can have come yet: wait before reading (a read now finds nothing).
                    await transport.wait_readable()
                reply = await self._await_direct_reply(framed, 1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if send_failure is not None:
                    raise send_failure from None
                raise
        except _Refused as exc:
            raise CannotConnect(f"the broker refused the connection: {exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError) as exc:
            raise CannotConnect(f"the broker did not answer hello: {exc!r}") from exc
        return link, reply

    def _early_hello(self) -> bytes:
        """The hello's frame, sent behind msg3 (SecureStream.early_data): the broker reads it
        once the handshake is done, and its answer is read only once msg4 has proven the
        broker.  Empty (sent the usual way, after the handshake, where its error is raised)
        if it cannot be encoded."""
        frame = self._hello_frame
        self._hello_frame = None
        if frame is None:
            try:
                frame = self._hello_frame_now()
            except Exception:
                return b""
        return frame

    def _prepare_hello(self) -> None:
        try:
            self._hello_frame = self._hello_frame_now()
        except Exception:
            pass  # (a hello that cannot be encoded says so where it is sent, as ever)

    def _hello_frame_now(self) -> bytes:
        """The hello's frame, with the first requested name (the broker checks and answers it;
        the client's own FramedStream would encode it the same, with the default limit)."""
        names = list(self.requested_names.items())
        first = names[0] if names else None
        self._hello_name = first[0] if first is not None else None
        # (Request("hello", 1, args).to_wire(), built in place.)
        hello: dict[str, Any] = {"info": self.plugin_info}
        if first is not None:
            hello["name"], hello["flags"] = first
        hello["op"], hello["id"] = "hello", 1
        return encode_control(0, hello, DEFAULT_MAX_CONTROL)

    async def _await_direct_reply(self, framed: FramedStream, request_id: int) -> Reply | ErrorReply:
        while True:
            # What the socket holds is read without a coroutine (the caller waited for it to
            # be readable); only what has not come yet is waited for.
            frame = framed.receive_frame_nowait()
            if frame is None and not (framed.read_nowait() and (frame := framed.receive_frame_nowait()) is not None):
                frame = await framed.receive_frame()
            if frame is None:
                raise trio.BrokenResourceError("the broker closed the connection during hello")
            if isinstance(frame, ControlFrame):
                message = parse_message(frame.message)
                if isinstance(message, (Reply, ErrorReply)) and message.re == request_id:
                    return message
                if isinstance(message, Event) and message.event == "error":
                    raise _Refused(str(message.fields.get("code")), str(message.fields.get("message")))

    # -- running a link -------------------------------------------------------------------------

    def start(self, nursery: trio.Nursery, first: Link) -> None:
        """Run the bus in ``nursery`` from the link :meth:`connect` made, without waiting: one
        task that reads the link and, when it ends, reconnects; and the link's writer, started
        when a frame first has to wait.

        No nursery of their own: a short-lived bus (connect, one request, leave) pays for no
        more.  (:attr:`restore` runs after a reconnect only: on a first connect nothing was
        held before.)"""
        self.nursery = nursery
        self.link = first
        self._run_writer_when_needed(first)
        nursery.start_soon(self._serve, first)

    def _run_writer_when_needed(self, link: Link) -> None:
        """The link's writer task starts when a frame first has to wait (most frames go
        straight to the socket, and a short-lived bus may never need the task)."""
        nursery = self.nursery
        assert nursery is not None
        link.send.run_when_needed(lambda: nursery.start_soon(self._writer, link))

    async def _writer(self, link: Link) -> None:
        try:
            await link.send.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Nothing more can be sent: end the link (the reader then reports it lost).
            await trio.aclose_forcefully(link.framed.stream)

    async def _reader(self, link: Link) -> None:
        reason = "the broker closed the connection"
        try:
            framed = link.framed
            dispatch = self._dispatch_frames
            next_frame, take_messages = framed.receive_frame_nowait, framed.take_control_messages
            send = link.send
            # What the handshake may have left, then read after read: each read's run of
            # control messages (a burst of events is one), then the frames after it.  What
            # handling them sends goes out in one write at the end (channel frames, answers),
            # not one write per frame: the dispatch corks the link before it hands on anything
            # but events to their raw handler (which send nothing: a read of events alone
            # needs no cork).
            run: list[dict[Any, Any]] | None = take_messages()
            while run is not None:
                try:
                    error = dispatch(link, run, next_frame, take_messages)
                finally:
                    if send.corked:
                        send.uncork()
                if error is not None:
                    reason = error
                # (A DATA frame may be a view of the whole read it came in: none is kept
                # alive while this task waits.)  Every whole frame read so far was handed on:
                # the next one needs a read.
                run = None
                run = await framed.read_messages()
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
                if pending.reply is None:  # (a reply that came before the end stands)
                    pending.reply = lost
                pending.done.set()
            link.send.close()
            log.debug("bus connection ended: %s", reason)

    def _dispatch_frames(
        self,
        link: Link,
        run: list[dict[Any, Any]],
        next_frame: Callable[[], Frame | None],
        take_messages: Callable[[], list[dict[Any, Any]]],
    ) -> str | None:
        """Hand ``run`` (control messages on channel 0, in order), then the rest of what is
        buffered, to whoever each message or frame is for (no waiting): the frame
        ``next_frame`` gives, the run of control messages ``take_messages`` cuts after it (see
        :meth:`FrameDecoder.take_control_messages`), and so on until ``next_frame`` gives
        None.  Returns the reason of a broker's error event (the connection ends after it),
        else None.

        The hot cases are handled in this loop, without a call of their own: a channel's
        data frame goes straight to its channel (what follows it comes from ``next_frame``);
        an event (as parse_message tells them: an ``event`` key and no ``op`` or ``re``)
        that has a raw handler goes straight to it, with no copy of its fields and no
        message object, and so do the events of its name that follow it in the run.
        Anything else goes to :meth:`_dispatch`, in its place in the order.

        The link's writer is corked before anything but a raw handler's events is handed on
        (what the rest sends goes out in one write when the reader uncorks it), and left as
        it was for those (they send nothing: see RawEventHandler)."""
        error = None
        raw_handlers = self.raw_event_handlers
        dispatch = self._dispatch
        send = link.send
        while True:
            i, end = 0, len(run)
            while i < end:
                body = run[i]
                name = body.get("event")
                if type(name) is str and "op" not in body and "re" not in body:
                    raw = raw_handlers.get(name)
                    if raw is not None:
                        # (it and the events of its name after it; at least it, whatever a
                        # handler returns, so that one that took nothing cannot stall the reader)
                        taken = raw(link, run, i)
                        i = taken if taken > i else i + 1
                        continue
                if not send.corked:
                    send.cork()
                error = dispatch(link, ControlFrame(0, body)) or error
                i += 1
            frame = next_frame()
            if frame is None:
                return error  # (the common end of a read: every frame of it was taken)
            if not send.corked:
                send.cork()
            while type(frame) is DataFrame and frame.channel:
                relay = link.channels.get(frame.channel)
                if relay is not None:  # (late frames of a channel already gone are dropped)
                    relay.on_data(frame.data)
                frame = next_frame()
            if frame is None:
                return error
            if frame.channel == 0 and type(frame) is ControlFrame:
                run = take_messages()  # (a fresh list: this frame's message goes first)
                run.insert(0, frame.message)
            else:
                error = dispatch(link, frame) or error
                run = take_messages()

    def _dispatch(self, link: Link, frame: Frame) -> str | None:
        """Hand one frame from the broker to whoever it is for (no waiting); returns the
        reason of a broker's error event (the connection ends after it), else None."""
        if frame.channel != 0:
            relay = link.channels.get(frame.channel)
            if relay is not None:
                if type(frame) is DataFrame:
                    relay.on_data(frame.data)
                else:
                    assert isinstance(frame, ControlFrame)
                    relay.on_control(frame.message)
            return None  # (late frames of a channel already gone are dropped)
        if type(frame) is not ControlFrame:
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
        elif message.event == "error":
            return f"{message.fields.get('code')}: {message.fields.get('message')}"
        else:
            handler = self.event_handlers.get(message.event)
            if handler is not None:
                handler(link, message)
        return None

    def _answer(self, link: Link, request: Request) -> None:
        handler = self.request_handlers.get(request.op)
        if request.op == "ping":
            reply: dict[str, Any] = Reply(request.id, {}).to_wire()
        elif handler is not None:
            answer = handler(link, request)
            if answer is None:
                return  # answered later
            reply = answer
        else:
            reply = ErrorReply(request.id, "minibus.Error.UnknownOperation", f"unknown operation {request.op!r}").to_wire()
        self.send_nowait(link, reply)

    # -- the bus's lifetime: serve, reconnect, close --------------------------------------------

    async def _serve(self, link: Link) -> None:
        """Read each link until it ends; then reconnect (if asked to) or give up."""
        self.serving = True
        if self._ended_unread:
            return  # (the bus was left before this task ran, and ended the link itself)
        while True:
            try:
                if self.closed:
                    # The bus was left before this task first ran (a connect that did nothing
                    # that waits): nothing was read, nothing is read now.
                    self._end_unread(link)
                    return
                await self._reader(link)
            finally:
                # Leaving on purpose (cancelled: the bus is closing) or after the broker ended
                # the link: over box-stream, say goodbye (unless a frame is half-sent), then
                # close, at once (the writer, if it is still writing, then ends too).
                self._goodbye_nowait(link)
                stream = link.framed.stream
                if not (isinstance(stream, SecureStream) and stream.close_nowait()):
                    await trio.aclose_forcefully(stream)
            if not self.closed:
                log.warning("lost the bus connection (%s)%s", link.reason, "; reconnecting" if self.reconnect else "")
            if not self.reconnect or self.closed:
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
            self.link = link
            assert self.nursery is not None
            self._run_writer_when_needed(link)
            # Names and watches are restored beside this task, which reads their answers.
            self.nursery.start_soon(self.restore, link)

    def end_unread_now(self, link: Link) -> None:
        """The bus is being left and its reader task has not run yet (the block never waited):
        end the link as that task would on its first step, and close the stream now, so the
        broker reads the end while this side still waits for the task (which then returns at
        once).  A stream that cannot be closed without waiting is left to the task."""
        stream = link.framed.stream
        if isinstance(stream, SecureStream):
            self._goodbye_nowait(link)
            if stream.close_nowait():
                self._end_unread(link)
                self._ended_unread = True

    @staticmethod
    def _end_unread(link: Link) -> None:
        """End a link whose reader never ran (what its reader does on its way out)."""
        link.mark_closed("the bus was closed")
        if link.channels:
            for relay in list(link.channels.values()):
                relay.on_link_lost(link.reason)
        if link.pending:  # (most short-lived buses have none: no error made for nobody)
            lost = ConnectionLost(link.reason)
            for pending in link.pending.values():
                if pending.reply is None:  # (a reply that came before the end stands)
                    pending.reply = lost
                pending.done.set()
        link.send.close()

    def _give_up(self, error: BusError) -> None:
        self.failure = error
        self.on_give_up(error)

    async def _reconnect(self) -> Link:
        delay = 0.1
        while True:
            await trio.sleep(delay)
            try:
                link = await self.connect()
            except (CannotConnect, OSError) as exc:
                log.info("reconnect failed (next try in %.1f s): %s", min(delay * 2, 5.0), exc)
                delay = min(delay * 2, 5.0)
                continue
            self.reconnects += 1
            return link

    def detach(self) -> None:
        """The bus is over (its tasks have ended): drop what ties this connection to the
        capabilities above it (their handlers and hooks) and to its nursery.  Those ties are
        reference cycles; without them a finished bus, its link and its stream are freed by
        reference counting when their last user lets go, not by a garbage collection."""
        self.request_handlers.clear()
        self.event_handlers.clear()
        self.raw_event_handlers.clear()
        self.restore = _restore_nothing
        self.on_give_up = _ignore_give_up
        self.meanwhile = None
        if self.dialled is not None:  # (never used: a bus that failed before dialling)
            self.dialled.close_nowait()
            self.dialled = None
        self.nursery = None

    async def aclose(self) -> None:
        self.closed = True
        link = self.link
        if link is not None:
            self._goodbye_nowait(link)
            await trio.aclose_forcefully(link.framed.stream)

    @staticmethod
    def _goodbye_nowait(link: Link) -> None:
        """We are leaving, cleanly, and may not wait: over box-stream (TCP) the goodbye goes
        out now, so the broker reads an end of stream, not a truncation (a forced close of the
        stream alone is an abort)."""
        secure = link.framed.stream
        if isinstance(secure, SecureStream):
            secure.goodbye_nowait()
