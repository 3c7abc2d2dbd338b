"""RPC over channels: services with methods, and calls to them.

Theory of operation
-------------------
An RPC channel is an ordinary channel opened with protocol ``rpc``.  Its byte stream carries
minibus frames (the same 10-byte header and CBOR profile as the bus itself, CONTROL frames on
channel 0), so size limits and validation come for free:

* request ``{"op": "call", "id": n, "method": name, "args": [...]}`` or
  ``{"op": "introspect", "id": n}``;
* reply ``{"re": n, "result": value}`` or ``{"re": n, "error": {"code", "message"}}``.

Many calls may be in flight on one channel; replies are matched by id.  A method that raises
a :class:`~bus.errors.RequestError` (or a subclass, or one with its own ``code``) sends that
code and message; any other exception is reported as ``minibus.Error.Failed`` with its type
and text, and the service goes on.  The caller raises the error as the matching
:class:`~bus.errors.RequestError` class (:class:`~bus.errors.RemoteError` for codes it does
not know).

Service side, about fifteen lines::

    service = Service("org.example.Echo", description="echoes")

    @service.method
    async def echo(text: str) -> str:
        "Return the text unchanged."
        return text

    @service.channel("raw")
    async def raw(channel):
        while data := await channel.receive_some():
            await channel.send_all(data)

    async with open_bus(name=service.name, info=service.info) as bus:
        await service.serve(bus)

Caller side: ``await bus.call("org.example.Echo", "echo", "hi")`` (one channel per peer,
opened on first use and reused).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from bus.errors import (
    BadRequest,
    BusError,
    ConnectionLost,
    FrameError,
    LimitError,
    LocalProtocolError,
    QuotaExceeded,
    RequestError,
    UnknownOperation,
    error_from_wire,
)
from bus.io.framed import FramedStream
from bus.io.writer import FrameWriter
from bus.wire.frames import DEFAULT_MAX_CONTROL, DEFAULT_MAX_FRAME, ControlFrame, Frame, FrameDecoder
from bus.wire.messages import ErrorReply, Reply, Request, parse_message

from .channels import Channel

if TYPE_CHECKING:
    from .bus import Bus

__all__ = ["Service", "MethodInfo", "RpcConnection", "RPC_PROTOCOL"]

log = logging.getLogger("minibus.rpc")

RPC_PROTOCOL = "rpc"
MAX_IN_FLIGHT = 256  # concurrent calls served per channel; more are refused (QuotaExceeded)


@dataclass(frozen=True, slots=True)
class MethodInfo:
    name: str
    params: list[dict[str, Any]]
    doc: str

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "doc": self.doc}


def _describe(func: Callable[..., Any]) -> list[dict[str, Any]]:
    params = []
    for p in inspect.signature(func).parameters.values():
        entry: dict[str, Any] = {"name": p.name, "kind": p.kind.name.lower()}
        if p.annotation is not inspect.Parameter.empty:
            entry["type"] = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        if p.default is not inspect.Parameter.empty:
            entry["default"] = repr(p.default)
        params.append(entry)
    return params


@dataclass
class Service:
    """A named service: RPC methods plus handlers for other channel protocols."""

    name: str
    description: str = ""
    version: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Callable[..., Awaitable[Any]]] = field(default_factory=dict)
    channels: dict[str, Callable[[Channel], Awaitable[Any]]] = field(default_factory=dict)
    _signatures: dict[Callable[..., Any], inspect.Signature] = field(default_factory=dict, init=False, repr=False)

    @property
    def info(self) -> dict[str, Any]:
        """Plugin info for ``open_bus(info=...)``."""
        return {"description": self.description, "version": self.version, "metadata": self.metadata}

    def method(self, func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """Decorator: expose an async function as an RPC method under its own name."""
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"{func.__name__}: RPC methods are async functions")
        self.methods[func.__name__] = func
        return func

    def channel(self, protocol: str) -> Callable[[Callable[[Channel], Awaitable[Any]]], Callable[[Channel], Awaitable[Any]]]:
        """Decorator: serve channels opened with this protocol label."""

        def register(handler: Callable[[Channel], Awaitable[Any]]) -> Callable[[Channel], Awaitable[Any]]:
            if protocol == RPC_PROTOCOL:
                raise ValueError("the 'rpc' label is served by the methods")
            self.channels[protocol] = handler
            return handler

        return register

    def introspect(self) -> dict[str, Any]:
        methods = [
            MethodInfo(name, _describe(func), inspect.getdoc(func) or "").to_wire() for name, func in sorted(self.methods.items())
        ]
        return {"name": self.name, "info": self.info, "methods": methods, "protocols": sorted([RPC_PROTOCOL, *self.channels])}

    def attach(self, bus: Bus) -> None:
        """Register this service's channel handlers on a bus."""
        bus.handle_channels(RPC_PROTOCOL, self.serve_channel)
        for protocol, handler in self.channels.items():
            bus.handle_channels(protocol, handler)

    async def serve(self, bus: Bus) -> None:
        """Attach and serve until cancelled."""
        self.attach(bus)
        await trio.sleep_forever()

    async def serve_channel(self, channel: Channel) -> None:
        """Answer calls on one RPC channel until the caller closes it."""
        framed = FramedStream(channel)
        # Replies go out whole and in order, straight to the channel when nothing waits.
        # (Room for every running call's reply, and as many refusals besides.)
        writer = FrameWriter(channel.secure, max_frames=2 * MAX_IN_FLIGHT)
        running = 0  # calls being answered, at most MAX_IN_FLIGHT (one task each)

        async def reply(message: dict[str, Any]) -> None:
            try:
                await writer.put(framed.encode_message(message))  # the task ends next: no checkpoint
            except trio.ClosedResourceError:
                pass  # the caller is gone; nobody is waiting for this reply

        async def run(request: Request) -> None:
            nonlocal running
            try:
                await trio.lowlevel.checkpoint_if_cancelled()  # (yields only when cancelled)
                await reply(await self._answer(request))
            finally:
                running -= 1

        def refuse(request_id: int, error: RequestError) -> None:
            """Answer at once, with no task: a caller flooding us costs no memory."""
            try:
                writer.send_nowait(framed.encode_message(ErrorReply.from_error(request_id, error).to_wire()))
            except trio.WouldBlock:
                raise LimitError("the caller sends calls faster than it reads the answers") from None
            except trio.ClosedResourceError:
                pass

        async def write() -> None:
            try:
                await writer.run()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                writer.close()
                outer.cancel_scope.cancel()  # nobody reads what we answer

        async with trio.open_nursery() as outer:
            outer.start_soon(write)
            async with trio.open_nursery() as calls:

                def handle(frame: Frame) -> None:
                    if not isinstance(frame, ControlFrame):
                        raise FrameError("a data frame on an rpc channel")
                    try:
                        message = parse_message(frame.message)
                    except FrameError as exc:
                        request_id = getattr(exc, "request_id", None)
                        if request_id is None:
                            raise
                        refuse(request_id, BadRequest(str(exc)))
                        return
                    if isinstance(message, Request):
                        nonlocal running
                        if running >= MAX_IN_FLIGHT:
                            refuse(message.id, QuotaExceeded(f"{MAX_IN_FLIGHT} calls are already running on this channel"))
                            return
                        running += 1
                        calls.start_soon(run, message)

                pushed = _PushedFrames(handle)
                if channel.deliver_to(pushed.feed, pushed.end):
                    await pushed.ended.wait()
                    if pushed.error is not None:
                        log.info("rpc channel from %s: %s", channel.peer.unique_id, pushed.error)
                else:
                    while True:
                        try:
                            frame = await framed.receive_frame()
                            if frame is None:
                                break
                            handle(frame)
                        except (FrameError, LimitError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                            log.info("rpc channel from %s: %s", channel.peer.unique_id, exc)
                            break
            writer.finish()  # every call is answered: deliver the replies, then end

    async def _answer(self, request: Request) -> dict[str, Any]:
        try:
            if request.op == "introspect":
                return Reply(request.id, self.introspect()).to_wire()
            if request.op != "call":
                raise UnknownOperation(f"unknown operation {request.op!r}")
            name = request.arg("method", str)
            args = request.arg("args", list, [])
            func = self.methods.get(name)
            if func is None:
                raise UnknownOperation(f"{self.name} has no method {name!r}")
            signature = self._signatures.get(func)
            if signature is None:
                signature = self._signatures[func] = inspect.signature(func)
            try:
                signature.bind(*args)
            except TypeError as exc:
                raise BadRequest(f"{name}: {exc}") from None
            result = await func(*args)
            return Reply(request.id, result).to_wire()
        except RequestError as exc:
            return ErrorReply.from_error(request.id, exc).to_wire()
        except Exception as exc:  # a method's bug is reported, not fatal to the service
            log.exception("method %r failed", request.args.get("method"))
            return ErrorReply(request.id, "minibus.Error.Failed", f"{type(exc).__name__}: {exc}").to_wire()


class _PushedFrames:
    """Frames cut from the bytes a channel pushes (:meth:`Channel.deliver_to`).

    Where the route allows it, RPC takes its bytes this way: the bus's reader cuts the
    frames and hands them on, with no reader task of its own in between."""

    def __init__(self, handle: Callable[[Frame], None]) -> None:
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME, DEFAULT_MAX_CONTROL)
        self._handle = handle
        self.ended = trio.Event()
        self.error: Exception | None = None  # how the channel ended (None: the peer's EOF)

    def feed(self, data: bytes) -> None:
        decoder = self._decoder
        decoder.receive_data(data)
        while (frame := decoder.next_frame()) is not None:
            self._handle(frame)

    def end(self, error: Exception | None) -> None:
        if error is None:
            try:
                self._decoder.end_of_input()
            except FrameError as exc:
                error = exc
        self.error = error
        self.ended.set()


class RpcConnection:
    """The caller's side of one RPC channel: concurrent calls matched by id."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.framed = FramedStream(channel)
        # Requests go out whole and in order, straight to the channel when nothing waits.
        self.writer = FrameWriter(channel.secure, max_frames=MAX_IN_FLIGHT)
        self._next_id = 1
        self._pending: dict[int, tuple[trio.Event, list[Reply | ErrorReply]]] = {}
        self.closed: BusError | None = None
        self._write_failure: BaseException | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read replies until the channel ends; then fail whatever still waits."""
        task_status.started()
        reason = "the service closed the channel"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, nursery.cancel_scope)
                try:
                    await self._read()
                except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError) as exc:
                    reason = f"the rpc channel broke: {exc}"
                nursery.cancel_scope.cancel()
            if self._write_failure is not None:
                reason = f"the rpc channel broke: {self._write_failure}"
        finally:
            self.closed = ConnectionLost(reason)
            self.writer.close()
            for event, _ in self._pending.values():
                event.set()
            await trio.aclose_forcefully(self.channel)

    async def _read(self) -> None:
        pushed = _PushedFrames(self._on_frame)
        if self.channel.deliver_to(pushed.feed, pushed.end):
            await pushed.ended.wait()
            if pushed.error is not None:
                raise pushed.error  # what reading would have raised
            return
        while True:
            frame = await self.framed.receive_frame()
            if frame is None:
                return
            self._on_frame(frame)

    def _on_frame(self, frame: Frame) -> None:
        if not isinstance(frame, ControlFrame):
            raise FrameError("data frame on an rpc channel")
        message = parse_message(frame.message)
        if isinstance(message, (Reply, ErrorReply)) and message.re in self._pending:
            event, slot = self._pending[message.re]
            slot.append(message)
            event.set()

    async def _write(self, scope: trio.CancelScope) -> None:
        try:
            await self.writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._write_failure = exc
            scope.cancel()  # the reader stops; run() fails what still waits

    async def request(self, op: str, **args: Any) -> Any:
        if self.closed is not None:
            raise self.closed
        request_id = self._next_id
        self._next_id += 1
        event = trio.Event()
        slot: list[Reply | ErrorReply] = []
        self._pending[request_id] = (event, slot)
        try:
            try:
                encoded = self.framed.encode_message(Request(op, request_id, args).to_wire())
            except LocalProtocolError as exc:
                raise BadRequest(f"arguments cannot be sent: {exc}") from exc
            try:
                await self.writer.put(encoded)  # waiting for the reply is the checkpoint
            except trio.ClosedResourceError:
                raise self.closed or ConnectionLost("the rpc channel ended") from None
            await event.wait()
        finally:
            self._pending.pop(request_id, None)
        if not slot:
            raise self.closed or ConnectionLost("the rpc channel ended")
        reply = slot[0]
        if isinstance(reply, ErrorReply):
            raise error_from_wire(reply.code, reply.message)
        return reply.result

    async def call(self, method: str, *args: Any) -> Any:
        return await self.request("call", method=method, args=list(args))

    async def introspect(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("introspect")
        return result

    async def aclose(self) -> None:
        await self.channel.aclose()
