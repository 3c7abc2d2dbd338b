"""RPC over channels: services with methods, and calls to them.

Theory of operation
-------------------
An RPC channel is an ordinary channel opened with protocol ``rpc``.  Its byte stream carries
minibus frames (the same 10-byte header and CBOR profile as the bus itself, CONTROL frames on
channel 0), so size limits and validation come for free:

* request ``{"op": "call", "id": n, "method": name, "args": [...]}`` or
  ``{"op": "introspect", "id": n}``;
* reply ``{"re": n, "result": value}`` or ``{"re": n, "error": {"code", "message"}}``.

A message too big for one CONTROL frame (64 KiB) is cut in two: a CONTROL frame with the
fields that say what it is (``op`` and ``id``, or ``re``) and ``"follows": n``, then the other
fields as one CBOR map of n bytes, in DATA frames of at most :data:`MESSAGE_PART` bytes right
behind it, with nothing in between (each message goes to the channel's writer as one piece,
so no other message and no cancellation can come between its frames).  The receiver checks n
against its ``max_message`` (16 MiB by default) from the header alone, before it keeps a
byte: over it, the body is skipped as it arrives and only that call fails (a request is
answered with :class:`~bus.errors.MessageTooLarge`; a reply fails the call waiting for it),
so the channel stays in step.  A sender refuses its own message over its limit before
sending anything.  A stream that ends, or a CONTROL frame that comes, before the announced
bytes are in, and a DATA frame that runs past them, break the channel as any framing error
does.  The body is decoded by the task that wants it (the call's, the caller's), not by the
reader, and a body that does not decode fails only its call.

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
opened on first use and reused), or an :class:`RpcConnection` of one's own (to choose its
``max_message``).
"""

from __future__ import annotations

import inspect
import logging
import mmap
import re
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast, overload

import trio

import cbor2

from bus.errors import (
    BadRequest,
    BusError,
    ConnectionLost,
    FrameError,
    LimitError,
    LocalProtocolError,
    MessageTooLarge,
    QuotaExceeded,
    RequestError,
    UnknownOperation,
    error_from_wire,
)
from bus.io.framed import FramedStream
from bus.io.writer import COALESCE, FrameWriter, Gathered
from bus.wire.frames import (
    DEFAULT_MAX_CONTROL,
    DEFAULT_MAX_FRAME,
    HEADER,
    CallFrames,
    ControlFrame,
    DataFrame,
    Frame,
    FrameDecoder,
    FrameKind,
    _items_within,
    cbor_head,
    decode_control_body,
    encode_control,
)
from bus.wire.messages import MAX_REQUEST_ID, ErrorReply, Message, Reply, Request, parse_message

from .channels import Channel
from .link import BusConnection, RequestTimeout

__all__ = [
    "Service",
    "MethodInfo",
    "RpcConnection",
    "RpcCalls",
    "ChannelHost",
    "RPC_PROTOCOL",
    "DEFAULT_MAX_MESSAGE",
    "MESSAGE_PART",
]

log = logging.getLogger("minibus.rpc")

RPC_PROTOCOL = "rpc"
MAX_IN_FLIGHT = 256  # concurrent calls served per channel; more are refused (QuotaExceeded)
#: Calls one caller (an identity: all its connections and channels together) may have running
#: at one service, in tasks or with their bodies coming; more are refused (QuotaExceeded).
#: (A call answered inline, by a method declared synchronous while its channel's writer has
#: room, runs in no task and holds nothing after: it is not counted.)
CALLER_IN_FLIGHT = 4 * MAX_IN_FLIGHT
#: The largest message body (bytes of CBOR) sent or taken, unless a side chooses another.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
#: The most body bytes one DATA frame of a large message carries: the frame maximum, so that
#: a receiver reading big frames on their own (FramedStream) gets a 1 MiB argument in few reads.
MESSAGE_PART = DEFAULT_MAX_FRAME
#: Bodies of the calls one caller (an identity, across all its channels) has running at one
#: service may hold this many times ``max_message``.
HELD_MESSAGES = 4
#: A kept body up to this size gets its buffer's pages at once (MAP_POPULATE: one system call,
#: about a third of what the page faults of filling it cost on this machine); a bigger one
#: takes them page by page as its bytes come.
POPULATE_AT_ONCE = 2 * 1024 * 1024
#: ... while the buffers made so in this process and not yet let go hold at most this much:
#: an announcement is a header (its bytes may never come), so what announcements alone can
#: make a process take ahead is this constant, however many channels a peer opens; past it,
#: a body's pages are taken as its bytes come (as a big body's are).
POPULATED_BUDGET = 16 * 1024 * 1024
_populated = [0]  # bytes of the populated buffers alive (each given back when it is freed)
_populated_lock = threading.RLock()  # (re-entrant: a finalizer giving back may run inside it)
#: The window of an RPC channel whose bytes are pushed (a plain relay): they go straight into
#: messages and bodies (accounted there), so nothing waits unread at this end; a window this
#: big lets the broker write frames on as they come (not buffer them until a grant) and
#: takes credit back once per MiB instead of every 256 KiB.
PUSH_WINDOW = 2 * 1024 * 1024
_POPULATED = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
#: Populated buffers whose message was decoded are kept for the next body of the same size,
#: while the kept ones hold at most this much (a peer sending bodies of one size again and
#: again then costs no pages taken and zeroed per body; they count within POPULATED_BUDGET).
KEPT_BUFFERS = 4 * 1024 * 1024
_kept: dict[int, list[mmap.mmap]] = {}  # by size, the buffers kept (newest last)
_kept_bytes = [0]
#: Held for each step on the kept buffers: trio runs in other threads of the process (busctl
#: run from a thread, several buses in one program) take and keep them too.  (No mapping is
#: made or let go while it is held.)
_kept_lock = threading.Lock()
_populated_buffers: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()


def _give_back_populated(size: int) -> None:
    with _populated_lock:  # (a finalizer: it may run in any thread, inside the lock's holder too)
        _populated[0] -= size


def _body_buffer(size: int) -> mmap.mmap:
    """A body's buffer: an anonymous mapping, whose pages are taken as its bytes come (a
    bytearray is zeroed, all of it, at once), or at once (POPULATE_AT_ONCE) while the
    populated buffers alive stay within POPULATED_BUDGET; one kept (see :func:`_keep_buffer`)
    when there is one of this size."""
    if size <= POPULATE_AT_ONCE:
        if size in _kept:
            with _kept_lock:
                kept = _kept.get(size)
                if kept:
                    _kept_bytes[0] -= size
                    buffer = kept.pop()
                    if not kept:
                        del _kept[size]
                    return buffer  # (its old bytes are all overwritten before the body is complete)
        with _populated_lock:  # (the budget is the process's: trio runs in several threads)
            take = _populated[0] + size <= POPULATED_BUDGET
            if take:
                _populated[0] += size
        if take:
            try:
                buffer = mmap.mmap(-1, size, flags=_POPULATED)
            except BaseException:
                _give_back_populated(size)
                raise
            weakref.finalize(buffer, _give_back_populated, size)
            _populated_buffers.add(buffer)
            return buffer
    return mmap.mmap(-1, size)


def _keep_buffer(buffer: mmap.mmap) -> None:
    """A populated body buffer whose message was decoded (nothing refers to its bytes any
    more: the decoder let it go once full, and decoding copied what it made): kept for the
    next body of its size while the kept buffers hold at most KEPT_BUFFERS."""
    size = len(buffer)
    if buffer in _populated_buffers:
        with _kept_lock:
            if _kept_bytes[0] + size <= KEPT_BUFFERS:
                _kept.setdefault(size, []).append(buffer)
                _kept_bytes[0] += size


def _drop_kept_buffers() -> None:
    """Let the kept buffers go (their pages back to the system once nothing else holds them)."""
    with _kept_lock:
        kept = list(_kept.values())
        _kept.clear()
        _kept_bytes[0] = 0
    del kept  # (the mappings are let go here, not while the lock is held)


#: A body may hold one CBOR data item per this many bytes of ``max_message`` (the broker's
#: ratio for control frames: 4096 items in 64 KiB), which bounds the time and memory that
#: decoding one message can cost.
BYTES_PER_ITEM = 16
#: ... and a message in one CONTROL frame one per 16 bytes of the frame's most: 4,096, the
#: broker's own bound for a request.  A message with more is sent as a large one (a header
#: and its body in DATA frames), whatever its size; a frame with more is a framing violation.
#: (Decoded, a frame of 64 KiB of empty arrays would otherwise take some 4 MiB: 1,024 such
#: calls running, 4 GiB.)
ONE_FRAME_ITEMS = DEFAULT_MAX_CONTROL // BYTES_PER_ITEM
_HEAD_KEYS = ("op", "id", "re")  # what a large message's header keeps; the rest is its body


def _check_max_message(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < DEFAULT_MAX_CONTROL:
        raise ValueError(f"max_message must be an integer of at least {DEFAULT_MAX_CONTROL} (one control frame)")
    return value


def _what(request: Request) -> str:
    """What a call's message carries, for error messages."""
    return repr(request.args.get("method", request.op))


_INT_MIN, _INT_MAX = -(1 << 64), (1 << 64) - 1
_SCALARS = frozenset({str, bytes, bool, float, type(None)})
_FIXED_SCALARS = frozenset({bool, float, type(None)})
#: Calls made while others are in flight are written in bursts: once half as many as are in
#: flight wait, and never fewer than this many (see :func:`call_burst`).
CALL_BURST_MIN = 8


def call_burst(in_flight: int) -> int:
    """How many queued calls make a write when ``in_flight`` calls are in flight: half of them
    (at least :data:`CALL_BURST_MIN`; calls of COALESCE bytes or more are not written in
    bursts: the writer's task writes them).  The calls woken by one read of replies then go out in
    two writes, and the service starts on the first while the second is being made: one write
    of all of them leaves the three processes of a relayed call working one after another, and
    smaller bursts cost every hop more per call (benchmarks/README.md, *Bursts*)."""
    return max(CALL_BURST_MIN, (in_flight + 1) // 2)


#: A str or bytes result up to this size surely fits one control frame with its reply.
_SMALL_RESULT = DEFAULT_MAX_CONTROL // 8


def _flat_size(values: Any) -> int:
    """-1 unless every value is a scalar inside the CBOR profile (a plain str, bytes, bool,
    float, None, or an int of at most 64 bits) or a list of such: a message of such values,
    with string keys, needs no walk to prove it is in the profile.  Else the bytes of the
    strings and bytes among them (one pass: whether the message can be one frame at all).
    (Anything that is not flat is walked as usual.)"""
    scalars = _SCALARS
    size = 0
    for value in values:
        kind = type(value)
        if kind is bytes or kind is str:
            size += len(value)
        elif kind in scalars or (kind is int and _INT_MIN <= value <= _INT_MAX):
            continue
        elif kind is list:
            for item in value:
                kind = type(item)
                if kind is bytes or kind is str:
                    size += len(item)
                elif not (kind in scalars or (kind is int and _INT_MIN <= item <= _INT_MAX)):
                    return -1
        else:
            return -1
    return size


def _flat_items(message: dict[str, Any]) -> int:
    """The data items of a flat message (see :func:`_flat_size`): its map's head, each key and
    value, and each element of its arrays."""
    return 1 + 2 * len(message) + sum(len(value) for value in message.values() if type(value) is list)


def _flat(values: Any) -> bool:
    """Whether ``values`` are flat (see :func:`_flat_size`)."""
    return _flat_size(values) >= 0


#: A flat message whose strings take up to this much is first encoded as one CONTROL frame
#: (its heads and other values rarely take the rest; when they do, the size check after the
#: encoding sends it the other way).
_ONE_FRAME_STRINGS = DEFAULT_MAX_CONTROL // 2
_CONTROL_HEADER = HEADER.pack
_CONTROL = int(FrameKind.CONTROL)
#: What :meth:`RpcConnection.call` gives ``_exchange`` for a call of one byte-string argument
#: whose strings fit one frame (below any :func:`_flat_size`).
_ONE_ARGUMENT = -2


@overload
def _encode_message(
    message: dict[str, Any], max_message: int, answering: Request | None = None, *, flat: bool = False, strings: int = -1
) -> bytes: ...


@overload
def _encode_message(
    message: dict[str, Any], max_message: int, answering: Request | None = None, *, flat: bool = False, strings: int = -1,
    gather: bool,
) -> bytes | Gathered: ...


def _encode_message(
    message: dict[str, Any], max_message: int, answering: Request | None = None, *, flat: bool = False, strings: int = -1,
    gather: bool = False,
) -> bytes | Gathered:
    """The wire bytes of one RPC message: a CONTROL frame, or a header and DATA frames.

    Raises :class:`MessageTooLarge` for a body over ``max_message`` and
    :class:`LocalProtocolError` for a value outside the CBOR profile.  ``answering`` is the
    request a reply answers (for the error message).  ``flat``: the caller found the
    message's values flat (and its keys strings); ``strings``: then, if known, the
    :func:`_flat_size` of its values.  ``gather``: a message of a header and DATA frames
    comes as its pieces (:class:`Gathered`: its big values are the caller's own objects),
    for a writer that sends them without joining them."""
    if flat:
        if strings < 0:
            strings = _flat_size(message.values())
        if strings <= _ONE_FRAME_STRINGS:
            # The common case: one frame, in the profile by construction (what encode_control
            # makes of it, without its checks; a str cbor2 cannot encode, such as a lone
            # surrogate, goes the usual way, which raises the error).
            try:
                body = cbor2.dumps(message)
            except Exception:
                pass
            else:
                if len(body) <= DEFAULT_MAX_CONTROL and (len(body) <= ONE_FRAME_ITEMS or _flat_items(message) <= ONE_FRAME_ITEMS):
                    return _CONTROL_HEADER(_CONTROL, 0, 0, len(body)) + body
    if not (flat and strings > DEFAULT_MAX_CONTROL):  # (surely too big for one frame: no try)
        try:
            frame = encode_control(0, message, checked=flat)
        except LimitError:
            pass  # (encode_control checked the profile before the size)
        else:
            # (a body of no more bytes than ONE_FRAME_ITEMS holds no more items than that)
            if len(frame) - HEADER.size <= ONE_FRAME_ITEMS or (
                _flat_items(message) <= ONE_FRAME_ITEMS if flat else _items_within(message, 1, ONE_FRAME_ITEMS) >= 0
            ):
                return frame
    head = {key: message[key] for key in _HEAD_KEYS if key in message}
    fields = {key: value for key, value in message.items() if key not in _HEAD_KEYS}
    flat_pieces: list[bytes] | None = None
    if flat:
        try:
            flat_pieces, size = _flat_body(fields)
        except Exception as exc:  # (a str cbor2 cannot encode, such as a lone surrogate)
            raise LocalProtocolError(f"control message cannot be encoded as CBOR: {exc}") from exc
    else:
        body = cbor2.dumps(fields)
        size = len(body)
    if size > max_message:
        if answering is None:
            what, whose = "the arguments of " + repr(message.get("method", message.get("op"))), "this caller's"
        else:
            what, whose = "the results of " + _what(answering), "the service's"
        raise MessageTooLarge(
            f"{what} take {size} bytes, over {whose} {max_message}-byte limit for one RPC message (max_message)"
        )
    pieces: list[bytes | memoryview] = [encode_control(0, {**head, "follows": size})]
    if flat_pieces is not None:
        _cut_into_parts(flat_pieces, size, pieces)
    else:
        view = memoryview(body)
        for start in range(0, size, MESSAGE_PART):
            part = view[start : start + MESSAGE_PART]
            pieces.append(HEADER.pack(FrameKind.DATA, 0, 0, len(part)))
            pieces.append(part)
    if gather:
        return Gathered(pieces, sum(map(len, pieces)))
    return b"".join(pieces)


def _cut_into_parts(body: list[bytes], size: int, out: list[bytes | memoryview]) -> None:
    """Append to ``out`` the DATA frames of a body of ``size`` bytes given as pieces: each
    frame's header, then the pieces (or views of them) that make its bytes."""
    left_in_part = 0
    left = size
    for piece in body:
        view: bytes | memoryview = piece
        while view:
            if not left_in_part:
                left_in_part = min(MESSAGE_PART, left)
                out.append(HEADER.pack(FrameKind.DATA, 0, 0, left_in_part))
            if len(view) <= left_in_part:
                out.append(view)
                taken = len(view)
                view = b""
            else:
                whole = view if type(view) is memoryview else memoryview(view)
                out.append(whole[:left_in_part])
                taken = left_in_part
                view = whole[left_in_part:]
            left_in_part -= taken
            left -= taken


#: A bytes value this big is put into a flat message's wire bytes by reference (see
#: :func:`_flat_body`); smaller values are encoded by cbor2.
_BY_REFERENCE = 4096


def _flat_body(fields: dict[str, Any]) -> tuple[list[bytes], int]:
    """The CBOR map of a flat message's fields (string keys, :func:`_flat` values) as pieces
    to be joined, and their total size: the bytes cbor2 would write, but with every big
    ``bytes`` value a piece of its own, the caller's object itself, so that the one join of
    the wire bytes is its only copy (cbor2 would copy it into its output first)."""
    dumps = cbor2.dumps
    pieces = [cbor_head(5, len(fields))]
    size = len(pieces[0])
    for key, value in fields.items():
        pieces.append(dumps(key))
        size += len(pieces[-1])
        values = value if type(value) is list else (value,)
        if values is value:
            pieces.append(cbor_head(4, len(value)))
            size += len(pieces[-1])
        for item in values:
            if type(item) is bytes and len(item) >= _BY_REFERENCE:
                pieces.append(cbor_head(2, len(item)))
                size += len(pieces[-1])
            else:
                item = dumps(item)
            pieces.append(item)
            size += len(item)
    return pieces, size


class _Body:
    """The body of a message announced with ``"follows": size``, collected or skipped."""

    __slots__ = ("header", "size", "missing", "parts")

    def __init__(self, header: dict[str, Any], size: int) -> None:
        self.header = header  # the announcing CONTROL frame's map, without "follows"
        self.size = size
        self.missing = size  # bytes still to come
        # The bytes so far when kept (None: skipped): the frames' bodies, or one buffer of the
        # body's size that the frame decoder fills (see _MessageFrames.fill).
        self.parts: list[bytes | bytearray | mmap.mmap] | None = None

    def message(self, max_items: int) -> dict[str, Any]:
        """The whole message: the header's fields and the body's (a body that does not
        decode, or repeats a header field, raises :class:`FrameError`)."""
        assert self.parts is not None and not self.missing
        parts, self.parts = self.parts, None
        rest = decode_control_body(parts[0] if len(parts) == 1 else b"".join(parts), max_items)
        if type(parts[0]) is mmap.mmap:
            _keep_buffer(parts[0])  # (one buffer of the body's size, decoded: for the next body)
        del parts
        if any(key in rest for key in self.header):
            raise FrameError("a message body repeats a field of its header")
        rest.update(self.header)
        return rest


class _MessageFrames:
    """One direction of an RPC channel, cut into messages (sans-io).

    :meth:`feed` takes each frame in turn and returns a whole message (a CONTROL frame's
    map), a completed :class:`_Body`, or ``None``.  For a header, ``announce(header, size)``
    says at once whether its body is kept; a skipped body's bytes are counted and dropped.
    """

    def __init__(self, announce: Callable[[dict[str, Any], int], bool]) -> None:
        self._announce = announce
        self.body: _Body | None = None  # the body being received
        #: The frame decoder's ``fill_data_into``, where this direction's reader has one: a
        #: kept body is then one buffer of its announced size, which the decoder fills as its
        #: DATA frames come (read straight into it from a socket), instead of their bytes
        #: being kept and joined.  (A body is checked against its limits before it is made.)
        self.fill: Callable[[bytearray | mmap.mmap | None], None] | None = None
        self._filled: _Body | None = None  # the body whose buffer the decoder fills

    def feed(self, frame: Frame) -> dict[str, Any] | _Body | None:
        body = self.body
        if body is not None:
            if type(frame) is not DataFrame:
                raise FrameError(
                    f"a control frame where {body.missing} more bytes of a {body.size}-byte message body were due"
                )
            data = frame.data
            size = len(data) + frame.filled  # (filled: in the body's buffer already)
            if size > body.missing:
                raise FrameError(f"a data frame runs {size - body.missing} bytes past the end of a message body")
            body.missing -= size
            if body.parts is None:
                if self._filled is body:  # given up: the decoder stops filling after this frame
                    assert self.fill is not None
                    self.fill(None)
                    self._filled = None
            elif data:
                if self._filled is body:  # (the reader must hand over each frame before cutting the next)
                    raise LocalProtocolError("a data frame was cut before its body's buffer reached the decoder")
                body.parts.append(data if type(data) is bytes else bytes(data))
            if body.missing:
                return None
            self.body = self._filled = None  # (the decoder let a full buffer go)
            return body if body.parts is not None else None
        if type(frame) is not ControlFrame:
            raise FrameError("a data frame on an rpc channel outside a message body")
        message = frame.message
        if "follows" not in message:
            return message
        size = message.pop("follows")
        if type(size) is not int or size < 1:
            raise FrameError("'follows' must be a positive integer: the byte length of the message body")
        self.body = _Body(message, size)
        if self._announce(message, size):
            if self.fill is None:
                self.body.parts = []
            else:
                # Pages taken as the bytes come, or at once within a budget for the whole
                # process (_body_buffer): announcements alone cost at most that constant.
                buffer = _body_buffer(size)
                self.fill(buffer)
                self.body.parts = [buffer]
                self._filled = self.body
        return None

    def end_of_input(self) -> None:
        """The stream ended: an error if it ended inside a message body."""
        body = self.body
        if body is not None:
            raise FrameError(
                f"the stream ended inside a message body ({body.size - body.missing} of {body.size} bytes)"
            )


@dataclass(frozen=True, slots=True)
class MethodInfo:
    name: str
    params: list[dict[str, Any]]
    doc: str
    returns: str | None = None  # the return annotation, when the method has one

    def to_wire(self) -> dict[str, Any]:
        wire = {"name": self.name, "params": self.params, "doc": self.doc}
        if self.returns is not None:
            wire["returns"] = self.returns
        return wire


def _type_name(annotation: Any) -> str:
    """An annotation as text: as written (string annotations), a class's name, else its repr."""
    if isinstance(annotation, str):
        return annotation
    if annotation is None:
        return "None"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _returns(func: Callable[..., Any]) -> str | None:
    annotation = inspect.signature(func).return_annotation
    return None if annotation is inspect.Signature.empty else _type_name(annotation)


def _describe(func: Callable[..., Any]) -> list[dict[str, Any]]:
    params = []
    for p in inspect.signature(func).parameters.values():
        entry: dict[str, Any] = {"name": p.name, "kind": p.kind.name.lower()}
        if p.annotation is not inspect.Parameter.empty:
            entry["type"] = _type_name(p.annotation)
        if p.default is not inspect.Parameter.empty:
            entry["default"] = repr(p.default)
        params.append(entry)
    return params


_F = TypeVar("_F", bound=Callable[..., Any])
_M = TypeVar("_M", bound=Callable[..., Any])
_MEMBER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")


class ChannelHost(Protocol):
    """Where a service registers its channel handlers and emits: a :class:`~clients.bus.Bus`."""

    def handle_channels(self, protocol: str, handler: Callable[[Channel], Awaitable[Any]]) -> None: ...

    async def emit(self, member: str, payload: Any = None, *, source: str | None = None, destination: str | None = None) -> int: ...

    async def publish(self, member: str, payload: Any = None, *, source: str | None = None, destination: str | None = None) -> None: ...


class _CallerLoad:
    """What one caller (an identity) has running at a :class:`Service`, across its channels."""

    __slots__ = ("channels", "running", "held")

    def __init__(self) -> None:
        self.channels = 0  # its channels being served
        self.running = 0  # its calls in tasks (or whose body is coming), at most CALLER_IN_FLIGHT
        self.held = 0  # the bytes of their bodies, at most HELD_MESSAGES x max_message


@dataclass
class Service:
    """A named service: RPC methods plus handlers for other channel protocols.

    ``max_message`` bounds one call's arguments and one result, in bytes of CBOR (16 MiB by
    default, at least 64 KiB): a bigger call is answered with
    :class:`~bus.errors.MessageTooLarge` without being kept, and so is a call whose result
    is bigger.  The calls one caller (an identity: all its channels together) has running
    here hold at most :data:`HELD_MESSAGES` times that in arguments, and are at most
    :data:`CALLER_IN_FLIGHT` (:data:`MAX_IN_FLIGHT` on one channel); a call beyond either is
    refused with :class:`~bus.errors.QuotaExceeded`, and nobody else's calls wait for it.
    """

    name: str
    description: str = ""
    version: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    methods: dict[str, Callable[..., Awaitable[Any]]] = field(default_factory=dict)
    #: Methods declared synchronous (plain functions): answered inline by the reader.
    sync_methods: dict[str, Callable[..., Any]] = field(default_factory=dict)
    channels: dict[str, Callable[[Channel], Awaitable[Any]]] = field(default_factory=dict)
    #: Events this service declares (member -> doc text), for introspection.
    events: dict[str, str] = field(default_factory=dict)
    max_message: int = DEFAULT_MAX_MESSAGE
    _arities: dict[Callable[..., Any], tuple[int, int] | inspect.Signature] = field(default_factory=dict, init=False, repr=False)
    _bus: ChannelHost | None = field(default=None, init=False, repr=False)
    #: What each caller (by identity) has running here, across its channels (see serve_channel).
    _callers: dict[str, _CallerLoad] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_max_message(self.max_message)

    @property
    def info(self) -> dict[str, Any]:
        """Plugin info for ``open_bus(info=...)``."""
        return {"description": self.description, "version": self.version, "metadata": self.metadata}

    def method(self, func: _M) -> _M:
        """Decorator: expose a function as an RPC method under its own name.

        An ``async def`` method runs in a task of its own per call.  A plain ``def`` method is
        *declared synchronous*: it is answered inline by the channel's reader, in the order the
        calls came, with no task; it must not block (it holds up the channel's reader, and on
        a relayed channel the bus connection's, while it runs)."""
        name = func.__name__
        if inspect.iscoroutinefunction(func) or getattr(func, "returns_coroutine", False) is True:
            # (an async def, or a plain function marked as returning a coroutine to await, as
            # RpcConnection.call is: a service forwarding to another's call awaits it)
            self.sync_methods.pop(name, None)
            self.methods[name] = func
        elif inspect.isfunction(func) or inspect.ismethod(func):
            self.methods.pop(name, None)
            self.sync_methods[name] = func
        else:
            raise TypeError(f"{getattr(func, '__name__', func)!r}: RPC methods are functions (async or plain)")
        self._arities.pop(func, None)
        return func

    def channel(self, protocol: str) -> Callable[[Callable[[Channel], Awaitable[Any]]], Callable[[Channel], Awaitable[Any]]]:
        """Decorator: serve channels opened with this protocol label."""

        def register(handler: Callable[[Channel], Awaitable[Any]]) -> Callable[[Channel], Awaitable[Any]]:
            if protocol == RPC_PROTOCOL:
                raise ValueError("the 'rpc' label is served by the methods")
            self.channels[protocol] = handler
            return handler

        return register

    def event(self, member: str, doc: str = "") -> Callable[[_F], _F]:
        """Decorator (or call ``service.event("NewOtx", "doc")``): declare an event this
        service emits, with its doc text, for introspection."""
        if not _MEMBER.match(member):
            raise ValueError(f"{member!r} is not an event member (an identifier: letters, digits, '_')")
        self.events[member] = doc

        def declare(func: _F) -> _F:
            if not doc:
                self.events[member] = inspect.getdoc(func) or ""
            return func

        return declare

    async def emit(self, member: str, payload: Any = None, *, destination: str | None = None) -> int:
        """Emit a declared event as this service's name (the bus it is attached to must own
        it); returns to how many connections the broker queued it."""
        if member not in self.events:
            raise ValueError(f"{self.name}: event {member!r} is not declared (use @service.event({member!r}))")
        if self._bus is None:
            raise ConnectionLost(f"{self.name} is not attached to a bus")
        return await self._bus.emit(member, payload, source=self.name, destination=destination)

    async def publish(self, member: str, payload: Any = None, *, destination: str | None = None) -> None:
        """Emit a declared event as this service's name, one-way (see ``Bus.publish``)."""
        if member not in self.events:
            raise ValueError(f"{self.name}: event {member!r} is not declared (use @service.event({member!r}))")
        if self._bus is None:
            raise ConnectionLost(f"{self.name} is not attached to a bus")
        await self._bus.publish(member, payload, source=self.name, destination=destination)

    def introspect(self) -> dict[str, Any]:
        methods = [
            MethodInfo(name, _describe(func), inspect.getdoc(func) or "", _returns(func)).to_wire()
            for name, func in sorted({**self.methods, **self.sync_methods}.items())
        ]
        events = [{"member": member, "doc": doc} for member, doc in sorted(self.events.items())]
        return {
            "name": self.name,
            "info": self.info,
            "methods": methods,
            "events": events,
            "protocols": sorted([RPC_PROTOCOL, *self.channels]),
        }

    def attach(self, bus: ChannelHost) -> None:
        """Register this service's channel handlers on a bus (and emit through it)."""
        self._bus = bus
        bus.handle_channels(RPC_PROTOCOL, self.serve_channel)
        for protocol, handler in self.channels.items():
            bus.handle_channels(protocol, handler)

    async def serve(self, bus: ChannelHost) -> None:
        """Attach and serve until cancelled."""
        self.attach(bus)
        await trio.sleep_forever()

    async def serve_channel(self, channel: Channel) -> None:
        """Answer calls on one RPC channel until the caller closes it."""
        framed = FramedStream(channel, receive_stream=channel.socket_reads(), max_items=ONE_FRAME_ITEMS)
        framed.whole_messages = True  # (calls by their shape: see FramedStream)
        # Replies go out whole and in order, straight to the channel when nothing waits.
        # (Room for every running call's reply, and as many refusals besides.)
        writer = FrameWriter(channel.secure, max_frames=2 * MAX_IN_FLIGHT)
        writer.direct = channel.whole_frame_sender()  # (a plain relay: one layer fewer per reply)
        max_message = self.max_message
        max_held = HELD_MESSAGES * max_message
        max_items = max_message // BYTES_PER_ITEM
        running = 0  # calls being answered (or whose body is coming), at most MAX_IN_FLIGHT
        # The caller's own account, shared by all its channels here: what its calls in tasks
        # hold (their count, at most CALLER_IN_FLIGHT, and their bodies' bytes, at most
        # max_held), so that opening more channels buys a caller no more of this service.
        who = channel.peer.identity
        caller = self._callers.get(who)
        if caller is None:
            caller = self._callers[who] = _CallerLoad()
        # What this channel's calls admitted at their header and not yet running took from
        # the caller's account (a body on its way: at most one at a time): given back by the
        # call's task once it runs, else when the channel ends inside the body.
        admitted = [0, 0]  # (calls, bytes)

        def encode_reply(message: dict[str, Any], request: Request) -> bytes:
            try:
                flat = "result" in message and _flat((message["result"],))  # ("re": the request's id)
                return _encode_message(message, max_message, request, flat=flat)
            except MessageTooLarge as exc:
                return framed.encode_message(ErrorReply.from_error(request.id, exc).to_wire())
            except LocalProtocolError as exc:
                what = "the results of " + _what(request)
                log.warning("%s cannot be sent: %s", what, exc)
                error = RequestError(f"{what} cannot be sent: {exc}")
                return framed.encode_message(ErrorReply.from_error(request.id, error).to_wire())

        async def reply(message: dict[str, Any], request: Request) -> None:
            encoded = encode_reply(message, request)
            try:
                await writer.put(encoded)  # the task ends next: no checkpoint
            except trio.ClosedResourceError:
                pass  # the caller is gone; nobody is waiting for this reply

        async def run(request: Request) -> None:
            nonlocal running
            try:
                await trio.lowlevel.checkpoint_if_cancelled()  # (yields only when cancelled)
                await reply(await self._answer(request), request)
            finally:
                running -= 1
                caller.running -= 1

        async def run_announced(body: _Body) -> None:
            """A call whose body came in DATA frames: decoded here, in the call's own task."""
            nonlocal running
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    request = parse_message(body.message(max_items))
                except FrameError as exc:
                    request = Request(body.header["op"], body.header["id"])
                    message = ErrorReply.from_error(request.id, BadRequest(f"the call's body: {exc}")).to_wire()
                else:
                    assert isinstance(request, Request)  # (the header's "op" and "id" are kept)
                    message = await self._answer(request)
                await reply(message, request)
            finally:
                running -= 1
                caller.running -= 1
                caller.held -= body.size

        def refuse(request_id: int, error: RequestError) -> None:
            """Answer at once, with no task: a caller flooding us costs no memory."""
            try:
                writer.send_nowait(framed.encode_message(ErrorReply.from_error(request_id, error).to_wire()))
            except trio.WouldBlock:
                raise LimitError("the caller sends calls faster than it reads the answers") from None
            except trio.ClosedResourceError:
                pass

        def parse_or_refuse(item: dict[str, Any]) -> Message | None:
            """The message ``item`` is, or None having answered a request whose fields are
            wrong (a map that is no message at all raises FrameError: the channel ends)."""
            try:
                return parse_message(item)
            except FrameError as exc:
                request_id = getattr(exc, "request_id", None)
                if request_id is None:
                    raise
                refuse(request_id, BadRequest(str(exc)))
                return None

        def refuse_busy(request_id: int) -> bool:
            """Refuse a call that would run past this channel's or this caller's count, and
            say True; else False (it may run)."""
            if running >= MAX_IN_FLIGHT:
                refuse(request_id, QuotaExceeded(f"{MAX_IN_FLIGHT} calls are already running on this channel"))
                return True
            if caller.running >= CALLER_IN_FLIGHT:
                refuse(
                    request_id,
                    QuotaExceeded(f"{CALLER_IN_FLIGHT} calls of this caller are already running at this service (on all its channels)"),
                )
                return True
            return False

        def announce(header: dict[str, Any], size: int) -> bool:
            """A call announced its body: keep it, or answer now and skip it as it comes."""
            nonlocal running
            if "op" not in header:
                return False  # (not a call: ignored, as a one-frame reply or event would be)
            message = parse_or_refuse(header)
            if message is None:
                return False
            assert isinstance(message, Request)  # (it has an "op")
            if size > max_message:
                limit = f"the service's {max_message}-byte limit for one RPC message (max_message)"
                refuse(message.id, MessageTooLarge(f"a call of {size} bytes is over {limit}"))
                return False
            if refuse_busy(message.id):
                return False
            if caller.held + size > max_held:
                refuse(
                    message.id,
                    QuotaExceeded(
                        f"the calls this caller has running at this service (on all its channels) hold {caller.held}"
                        f" bytes of arguments; {size} more would pass the {max_held}-byte limit ({HELD_MESSAGES} x max_message)"
                    ),
                )
                return False
            running += 1
            caller.running += 1
            caller.held += size
            admitted[0] += 1
            admitted[1] += size
            return True

        frames = _MessageFrames(announce)
        frames.fill = framed.fill_data_into  # (or the pushed frames' decoder: below)
        sync_methods = self.sync_methods  # (the dict itself: methods declared later are in it)

        async def write() -> None:
            try:
                await writer.run()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                writer.close()
                outer.cancel_scope.cancel()  # nobody reads what we answer

        caller.channels += 1
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(write)
                async with trio.open_nursery() as calls:

                    def handle(frame: Frame | dict[str, Any]) -> None:
                        nonlocal running
                        item: dict[str, Any] | _Body | None
                        if type(frame) is dict:
                            item = frame  # (a message in one frame, from _PushedFrames' quick way)
                        elif frames.body is None and type(frame) is ControlFrame and "follows" not in frame.message:
                            item = frame.message  # (a message in one frame)
                        else:
                            item = frames.feed(cast(Frame, frame))  # (not a dict: the first test)
                            if item is None:
                                return
                            if type(item) is _Body:
                                # (admitted and counted when announced: its task gives it back)
                                admitted[0] -= 1
                                admitted[1] -= item.size
                                calls.start_soon(run_announced, item)
                                return
                        assert type(item) is dict
                        if (
                            len(item) == 4
                            and "op" in item
                            and "id" in item
                            and "method" in item
                            and "args" in item
                            and item["op"] == "call"
                            and running < MAX_IN_FLIGHT
                            and writer.has_room
                        ):
                            # The common call, {"op", "id", "method", "args"}: what parse_message
                            # would make of it, without its copy and checks of every key.
                            request_id, method, args = item["id"], item["method"], item["args"]
                            func = sync_methods.get(method) if type(method) is str else None
                            if (
                                func is not None
                                and type(request_id) is int
                                and 0 < request_id <= MAX_REQUEST_ID
                                and type(args) is list
                            ):
                                answer = self._call_now(request_id, method, args, func)
                                result = answer.get("result", answer)  # (an error reply: not small)
                                kind = type(result)
                                try:
                                    encoded = None
                                    if (
                                        kind in _FIXED_SCALARS
                                        or (kind is int and _INT_MIN <= result <= _INT_MAX)
                                        or ((kind is bytes or kind is str) and len(result) <= _SMALL_RESULT)
                                    ):
                                        # A small scalar: one frame, in the profile by construction
                                        # (a str cbor2 cannot encode, such as a lone surrogate,
                                        # goes the usual way, which answers with the error).
                                        try:
                                            body = cbor2.dumps(answer)  # (encode_control, checked)
                                        except Exception:
                                            pass
                                        else:
                                            encoded = _CONTROL_HEADER(_CONTROL, 0, 0, len(body)) + body
                                    if encoded is None:
                                        call = Request("call", request_id, {"method": method, "args": args})
                                        encoded = encode_reply(answer, call)
                                    writer.send_nowait(encoded)
                                except trio.ClosedResourceError:
                                    pass  # the caller is gone; nobody is waiting for this reply
                                return
                        message = parse_or_refuse(item)
                        if isinstance(message, Request):
                            if running >= MAX_IN_FLIGHT:
                                refuse_busy(message.id)
                                return
                            if writer.has_room:
                                # A method declared synchronous (or an answer that needs no
                                # method) is answered here, in order, with no task; while the
                                # writer is full, calls wait for room in tasks of their own.
                                now = self._answer_now(message)
                                if now is not None:
                                    try:
                                        writer.send_nowait(encode_reply(now, message))
                                    except trio.ClosedResourceError:
                                        pass  # the caller is gone; nobody is waiting for this reply
                                    return
                            if refuse_busy(message.id):  # (this caller's other channels)
                                return
                            running += 1
                            caller.running += 1
                            calls.start_soon(run, message)

                    pushed = _PushedFrames(handle, frames, writer)
                    # (Set before deliver_to, which hands over what came already: a body
                    # announced in it is filled by the decoder that cuts its frames.)
                    frames.fill = pushed.fill_data_into
                    if channel.deliver_to(pushed.feed, pushed.end, views=True, window=PUSH_WINDOW):
                        await pushed.ended.wait()
                        if pushed.error is not None:
                            log.info("rpc channel from %s: %s", channel.peer.unique_id, pushed.error)
                    else:
                        frames.fill = framed.fill_data_into
                        while True:
                            try:
                                frame = await framed.receive_frame()
                                if frame is None:
                                    frames.end_of_input()
                                    break
                                handle(frame)
                            except (FrameError, LimitError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                                log.info("rpc channel from %s: %s", channel.peer.unique_id, exc)
                                break
                writer.finish()  # every call is answered: deliver the replies, then end
        finally:
            # Its calls here have all ended (the nurseries waited for them); a body admitted
            # and never completed (the channel ended inside it) gives back what it took.
            caller.running -= admitted[0]
            caller.held -= admitted[1]
            caller.channels -= 1
            if not caller.channels:
                del self._callers[who]

    def _check_arity(self, name: str, func: Callable[..., Any], args: list[Any]) -> None:
        """Raise :class:`BadRequest` unless ``func`` takes ``args`` (positionally).

        A signature of plain parameters is checked by counting (what ``Signature.bind`` would
        decide, without its cost per call); any other by ``bind`` itself."""
        arity = self._arities.get(func)
        if arity is None:
            arity = self._arities[func] = _arity(func)
        if type(arity) is tuple:
            if arity[0] <= len(args) <= arity[1]:
                return
            signature = inspect.signature(func)  # (rare: the error's text, as bind words it)
        else:
            assert isinstance(arity, inspect.Signature)
            signature = arity
        try:
            signature.bind(*args)
        except TypeError as exc:
            raise BadRequest(f"{name}: {exc}") from None

    def _call_now(self, request_id: int, name: str, args: list[Any], func: Callable[..., Any]) -> dict[str, Any]:
        """The reply to a call of the synchronous method ``name``, ``func`` (what
        :meth:`_answer_now` makes of it, without building the request first)."""
        try:
            arity = self._arities.get(func)  # (_check_arity's common case, without the call)
            if type(arity) is not tuple or not arity[0] <= len(args) <= arity[1]:
                self._check_arity(name, func, args)
            return {"re": request_id, "result": func(*args)}
        except RequestError as exc:
            return ErrorReply.from_error(request_id, exc).to_wire()
        except Exception as exc:  # a method's bug is reported, not fatal to the service
            log.exception("method %r failed", name)
            return ErrorReply(request_id, "minibus.Error.Failed", f"{type(exc).__name__}: {exc}").to_wire()

    def _answer_now(self, request: Request) -> dict[str, Any] | None:
        """The reply to ``request`` if it needs no waiting (a method declared synchronous,
        introspection, an error), else ``None``: an async method, for :meth:`_answer`."""
        try:
            if request.op == "introspect":
                return Reply(request.id, self.introspect()).to_wire()
            if request.op != "call":
                raise UnknownOperation(f"unknown operation {request.op!r}")
            name = request.arg("method", str)
            args = request.arg("args", list, [])
            func = self.sync_methods.get(name)
            if func is None:
                if name in self.methods:
                    return None
                raise UnknownOperation(f"{self.name} has no method {name!r}")
            self._check_arity(name, func, args)
            return Reply(request.id, func(*args)).to_wire()
        except RequestError as exc:
            return ErrorReply.from_error(request.id, exc).to_wire()
        except Exception as exc:  # a method's bug is reported, not fatal to the service
            log.exception("method %r failed", request.args.get("method"))
            return ErrorReply(request.id, "minibus.Error.Failed", f"{type(exc).__name__}: {exc}").to_wire()

    async def _answer(self, request: Request) -> dict[str, Any]:
        answer = self._answer_now(request)
        if answer is not None:
            return answer
        name = request.args["method"]
        args = request.args.get("args", [])
        try:
            func = self.methods.get(name)
            if func is None:  # (re-declared synchronous meanwhile)
                raise UnknownOperation(f"{self.name} has no async method {name!r}")
            self._check_arity(name, func, args)
            result = await func(*args)
            return Reply(request.id, result).to_wire()
        except RequestError as exc:
            return ErrorReply.from_error(request.id, exc).to_wire()
        except Exception as exc:  # a method's bug is reported, not fatal to the service
            log.exception("method %r failed", name)
            return ErrorReply(request.id, "minibus.Error.Failed", f"{type(exc).__name__}: {exc}").to_wire()


def _arity(func: Callable[..., Any]) -> tuple[int, int] | inspect.Signature:
    """How many positional arguments ``func`` takes, (least, most), when its parameters are
    plain enough for counting to say whether a call binds; else its signature."""
    signature = inspect.signature(func)
    least = most = 0
    for p in signature.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            most += 1
            if p.default is p.empty:
                if least != most - 1:
                    return signature  # (cannot happen in Python; counted only when it cannot)
                least = most
        elif p.kind is p.VAR_POSITIONAL:
            most = 1 << 62
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return signature  # never binds positionally: bind says why
    return least, most


class _PushedFrames:
    """Frames cut from the bytes a channel pushes (:meth:`Channel.deliver_to`).

    Where the route allows it, RPC takes its bytes this way: the bus's reader cuts the
    frames and hands them on, with no reader task of its own in between."""

    def __init__(
        self,
        handle: Callable[[Frame | dict[str, Any]], None],
        frames: _MessageFrames,
        writer: FrameWriter | None = None,
    ) -> None:
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME, DEFAULT_MAX_CONTROL, ONE_FRAME_ITEMS)
        #: Takes each frame, or (the quick way) the map of a message that came in one CONTROL
        #: frame on channel 0 while no message body is due (``frames.body`` is None).
        self._handle = handle
        self._frames = frames
        self._writer = writer  # corked while a burst of frames is handled (their answers: one write)
        self._at_end = frames.end_of_input  # raises FrameError if the stream may not end here
        self.ended = trio.Event()
        self.error: Exception | None = None  # how the channel ended (None: the peer's EOF)

    def feed(self, data: bytes | memoryview) -> None:
        """The next bytes of the channel: ``bytes``, or a view valid only during the call
        (the decoder copies what it keeps: into a body's buffer, or what is left over)."""
        decoder = self._decoder
        message = decoder.whole_message_from(data)
        if message is not None:
            # The common case, bytes that are one whole message (a relayed RPC message, one
            # DATA frame of the bus connection): decoded straight from them, no buffering.
            # (_handle_message's steps, inline: once per call at one call in flight.)
            if self._frames.body is None and "follows" not in message:
                self._handle(message)
            else:
                self._handle(ControlFrame(0, message))
            return
        if decoder.fill_with(data):
            return  # (the middle of a large message's body: into its buffer, nothing else due)
        # Else the frames the bytes complete, in order: each run of CONTROL frames on channel
        # 0 (a burst of calls or replies) in one call (FrameDecoder.take_control_messages: no
        # frame object each), the frames after it one by one.  Only CONTROL frames are cut
        # ahead of handling: a handler may still tell the decoder where the DATA frames after
        # it go (a body's buffer, see _MessageFrames.fill) before they are cut.
        run = decoder.take_control_messages(data)
        frame: Frame | None = None
        if not run:
            frame = decoder.next_frame()
            if frame is None:
                return
            if not decoder.buffered:
                self._handle(frame)
                return
        elif len(run) == 1 and not decoder.buffered:
            self._handle_message(run[0])
            return
        # More than one frame: cork (what handling them sends goes out in one write).
        writer = self._writer
        corked = writer is not None and not writer.corked
        if corked:
            assert writer is not None
            writer.cork()
        try:
            while True:
                if run:
                    for message in run:
                        self._handle_message(message)
                else:
                    assert frame is not None
                    self._handle(frame)
                run = decoder.take_control_messages()
                if not run:
                    frame = decoder.next_frame()
                    if frame is None:
                        break
        finally:
            if corked:
                assert writer is not None
                writer.uncork()

    def _handle_message(self, message: dict[str, Any]) -> None:
        """A message that came in one CONTROL frame: the quick way (its map) while no message
        body is due and it announces none, else as its frame."""
        if self._frames.body is None and "follows" not in message:
            self._handle(message)
        else:
            self._handle(ControlFrame(0, message))

    def fill_data_into(self, buffer: bytearray | mmap.mmap | None) -> None:
        """See :meth:`FrameDecoder.fill_data_into`."""
        self._decoder.fill_data_into(buffer)

    def end(self, error: Exception | None) -> None:
        if error is None:
            try:
                self._decoder.end_of_input()
                self._at_end()
            except FrameError as exc:
                error = exc
        self.error = error
        self.ended.set()


class _Call:
    """One call waiting for its reply: what came for it, and how its task is woken.

    The call's task parks itself (:meth:`park`, trio's lowlevel parking: no ``Event`` per
    call) when it has to wait for someone else: a reader that hands it its reply, the end of
    the channel, or (unix-fd) its turn to read.  A lone call on a socket of its own reads its
    reply itself and never parks.  Whoever answers or ends the call wakes it if it is
    parked.  A result (the common answer) is kept as itself in ``value``, with ``result``
    set to :data:`_RESULT`."""

    __slots__ = ("task", "result", "value")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None  # parked, waiting to be woken
        self.result: Reply | ErrorReply | _Body | BusError | _Result | None = None
        self.value: Any = None

    def resolve(self, result: Reply | ErrorReply | _Body | BusError) -> None:
        if self.result is None:  # (the first answer counts; a repeated id is ignored)
            self.result = result
            self.wake()

    def resolve_value(self, value: Any) -> None:
        """:meth:`resolve` with a :class:`Reply` carrying ``value``, without making one."""
        if self.result is None:
            self.result = _RESULT
            self.value = value
            task = self.task
            if task is not None:
                self.task = None
                trio.lowlevel.reschedule(task)

    def wake(self) -> None:
        """Wake the call's task if it is parked (at most once per park)."""
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    async def park(self) -> None:
        """Wait until :meth:`wake` (or a cancellation: then nothing is lost, the call's
        result still comes to it if it waits again)."""
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _Result:
    """The type of :data:`_RESULT`."""

    __slots__ = ()


#: What :attr:`_Call.result` holds when the reply was a result (kept in ``value``).
_RESULT = _Result()


class RpcConnection:
    """The caller's side of one RPC channel: concurrent calls matched by id.

    ``max_message`` bounds one call's arguments (refused with
    :class:`~bus.errors.MessageTooLarge` before anything is sent) and one reply (over it, the
    call fails with MessageTooLarge and the reply is skipped as it arrives), in bytes of
    CBOR: 16 MiB by default, at least 64 KiB.

    Who reads the replies depends on the route.  A plain relayed channel pushes its bytes
    from the bus connection's reader (:meth:`Channel.deliver_to`).  A channel that is a
    plain socket of its own (unix-fd) is read by the calls themselves, taking turns: the
    first call that finds nobody reading reads until its own reply has come, handing on
    every other reply it reads (their tasks wake with it), then passes the turn to a call
    still waiting.  A lone call thus reads its own reply, with no task in between.  A call
    cancelled while it reads loses nothing: what was read stays in the frame decoder for the
    next reader.  While no call waits nobody reads; :meth:`poll` reads, without waiting,
    what came meanwhile (the service's end of the channel).  Any other route (tcp,
    box-stream) is read by a task of :meth:`run`.
    """

    def __init__(self, channel: Channel, *, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.channel = channel
        self.max_message = _check_max_message(max_message)
        reads = channel.socket_reads()
        self.framed = FramedStream(channel, receive_stream=reads, max_items=ONE_FRAME_ITEMS)
        self.framed.whole_messages = True  # (replies by their layout: see FramedStream)
        # (poll's look at the socket: whether a read would find anything, without one)
        self._readable_now = reads.readable_now if reads is not None else None
        # Requests go out whole and in order, straight to the channel when nothing waits.
        self.writer = FrameWriter(channel.secure, max_frames=MAX_IN_FLIGHT)
        self.writer.direct = channel.whole_frame_sender()  # (a plain relay: one layer fewer per call)
        # Calls woken together go out in bursts of call_burst(calls in flight), set as they
        # are made.
        self.writer.burst = CALL_BURST_MIN
        self._next_id = 1
        self._pending: dict[int, _Call] = {}
        self._call_frames = CallFrames()  # (calls of one byte-string argument: see call())
        self._frames = _MessageFrames(self._announce)
        self.closed: BusError | None = None
        self._write_failure: BaseException | None = None
        self._turns = False  # the calls read their own replies (decided by run())
        self._reader: _Call | None = None  # the call reading now (turns)
        self._ended = trio.Event()  # no more replies will come (set by _stop)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the channel until it ends (its writer, and its reader unless the calls read);
        then fail whatever still waits and close it."""
        pushed: _PushedFrames | None = _PushedFrames(self._on_frame, self._frames)
        assert pushed is not None
        self._frames.fill = pushed.fill_data_into  # (before deliver_to: see serve_channel)
        if not self.channel.deliver_to(pushed.feed, pushed.end, views=True, window=PUSH_WINDOW):
            pushed = None
            self._turns = self.channel.socket_reads() is not None
            self._frames.fill = self.framed.fill_data_into
        task_status.started()
        reason = "the service closed the channel"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, nursery.cancel_scope)
                try:
                    if pushed is not None:
                        await pushed.ended.wait()
                        if pushed.error is not None:
                            raise pushed.error  # what reading would have raised
                    elif self._turns:
                        await self._ended.wait()
                    else:
                        await self._read()
                except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError) as exc:
                    reason = f"the rpc channel broke: {exc}"
                nursery.cancel_scope.cancel()
            if self._write_failure is not None:
                reason = f"the rpc channel broke: {self._write_failure}"
        finally:
            self._stop(reason)
            self.writer.close()
            await trio.aclose_forcefully(self.channel)

    def _stop(self, reason: str) -> None:
        """No more replies will come: fail every call still waiting (the first reason stays)."""
        if self.closed is None:
            self.closed = ConnectionLost(reason)
        for call in self._pending.values():
            call.wake()
        self._ended.set()

    async def _read(self) -> None:
        """Read replies until the channel ends (a route the calls do not read themselves)."""
        while True:
            frame = await self.framed.receive_frame()
            if frame is None:
                self._frames.end_of_input()
                return
            self._on_frame(frame)

    async def _wait_for(self, call: _Call) -> None:
        """Wait for the call's reply, reading when it is this call's turn (turns): it reads
        until its reply has come or the channel ended."""
        while call.result is None and self.closed is None:
            if self._reader is None:
                self._reader = call
                framed = self.framed
                try:
                    while call.result is None:
                        frame = await framed.receive_frame()
                        if frame is None:
                            self._frames.end_of_input()
                            self._stop("the service closed the channel")
                            return
                        self._on_frame(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError) as exc:
                    self._stop(f"the rpc channel broke: {exc}")
                finally:
                    self._reader = None
            else:
                await call.park()  # (woken with its reply, at the end, or for the turn)

    def _pass_turn(self) -> None:
        """Nobody reads: wake a call still waiting, to read (turns)."""
        if self._reader is None and self.closed is None:
            for call in self._pending.values():
                if call.result is None and call.task is not None:  # (a parked one: a call that
                    call.wake()  # is not parked yet looks for the turn itself when it waits)
                    return

    def poll(self) -> None:
        """Take what the channel brought while no call was reading (the service's end, replies
        to calls given up), without waiting.  Afterwards :attr:`closed` says whether the
        channel ended.  (Only where the calls read themselves; elsewhere a task reads.)"""
        if not self._turns or self._reader is not None or self.closed is not None:
            return
        if self._readable_now is not None and not self._readable_now():
            return  # (nothing came: the common case, known without a read)
        framed = self.framed
        try:
            while framed.read_nowait():
                while (frame := framed.receive_frame_nowait()) is not None:
                    self._on_frame(frame)
                if framed.at_end:
                    self._frames.end_of_input()
                    self._stop("the service closed the channel")
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, FrameError) as exc:
            self._stop(f"the rpc channel broke: {exc}")

    def _on_frame(self, frame: Frame | dict[str, Any]) -> None:
        """A frame, or (from _PushedFrames' quick way) a message that came in one frame."""
        frames = self._frames
        whole: dict[str, Any] | None = None
        if type(frame) is dict:
            whole = frame
        elif frames.body is None and type(frame) is ControlFrame and "follows" not in frame.message:
            whole = frame.message  # (a message in one frame)
        if whole is not None:
            if len(whole) == 2 and "result" in whole:  # (a result: what parse_message would make)
                re: Any = whole.get("re")
                waiting = self._pending.get(re) if type(re) is int else None  # (pending: valid ids)
                if waiting is not None:
                    waiting.resolve_value(whole["result"])
                    return
            item: dict[str, Any] | _Body | None = whole
        else:
            item = frames.feed(cast(Frame, frame))  # (not a dict: the first test)
            if item is None:
                return
            if type(item) is _Body:
                waiting = self._pending.get(item.header["re"])
                if waiting is not None:
                    waiting.resolve(item)  # decoded by the caller's task
                return
        assert type(item) is dict
        message = parse_message(item)
        if isinstance(message, (Reply, ErrorReply)):
            waiting = self._pending.get(message.re)
            if waiting is not None:
                waiting.resolve(message)

    def _announce(self, header: dict[str, Any], size: int) -> bool:
        """A reply announced its body: keep it if its call still waits and it is not too big."""
        if "re" not in header:
            return False  # (not a reply: ignored, as a one-frame request or event would be)
        re = header["re"]
        if type(re) is not int or not 0 < re <= MAX_REQUEST_ID:
            raise FrameError("a reply's 're' must be an integer between 1 and 2**53")
        waiting = self._pending.get(re)
        if waiting is None:
            return False  # its caller gave up: skipped as it comes
        if size > self.max_message:
            waiting.resolve(
                MessageTooLarge(
                    f"the reply takes {size} bytes, over this caller's {self.max_message}-byte limit"
                    " for one RPC message (max_message)"
                )
            )
            return False
        return True

    async def _write(self, scope: trio.CancelScope) -> None:
        try:
            await self.writer.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._write_failure = exc
            scope.cancel()  # the reader stops; run() fails what still waits

    async def request(self, op: str, **args: Any) -> Any:
        return await self._exchange({**args, "op": op}, _flat_size((*args.values(), op)))

    def call(self, method: str, *args: Any) -> Coroutine[Any, Any, Any]:
        """Call ``method`` with ``args``: ``await rpc.call(...)`` returns its result or raises
        its error.  (What ``request("call", method=method, args=list(args))`` sends, without
        the keywords' round trip; a plain function that returns the exchange itself: one
        coroutine fewer to step through, twice a call.  It is marked ``returns_coroutine``,
        so ``Service.method`` takes it, or a bound one, as an async method.)"""
        values = list(args)
        if len(values) == 1 and type(values[0]) is bytes and type(method) is str and len(values[0]) + len(method) <= _ONE_FRAME_STRINGS:
            # One byte-string argument (a message passed on, an echo): the frame is written
            # from the method's bytes, encoded once (CallFrames), around it and the id.
            return self._exchange({"method": method, "args": values, "op": "call"}, _ONE_ARGUMENT)
        return self._exchange({"method": method, "args": values, "op": "call"}, _flat_size((method, values)))

    call.returns_coroutine = True  # type: ignore[attr-defined]

    async def _exchange(self, wire: dict[str, Any], strings: int) -> Any:
        """Send the request ``wire`` (its fields and "op"; the id is added here, last, as
        ``Request(...).to_wire()`` orders it) and return its result.  ``strings``: the
        :func:`_flat_size` of its fields, or _ONE_ARGUMENT for a call of one byte-string
        argument that fits one frame (see :meth:`call`)."""
        if self.closed is not None:
            raise self.closed
        request_id = self._next_id
        self._next_id += 1
        call = _Call()
        self._pending[request_id] = call
        try:
            try:
                wire["id"] = request_id
                encoded: bytes | Gathered
                if strings == _ONE_ARGUMENT:  # (its strings fit half a frame: so does the frame)
                    encoded = self._call_frames.encode(wire["method"], wire["args"][0], request_id)
                else:
                    # Large messages as pieces, written without a join of the whole message: with
                    # one sendmsg where the channel is a socket of its own, in frames of the bus
                    # connection made from views of them on a relay (joined if encrypted).
                    encoded = _encode_message(wire, self.max_message, flat=strings >= 0, strings=strings, gather=True)
            except LocalProtocolError as exc:
                raise BadRequest(f"arguments cannot be sent: {exc}") from exc
            try:
                if isinstance(encoded, Gathered):
                    # A large message, as its pieces: written at once without joining them
                    # where nothing waits ahead of it (else one entry of the queue, in order,
                    # which run() writes so too; joined where the stream is not a socket).
                    await self.writer.put_gathered(encoded)
                elif len(self._pending) > 1:
                    # Other calls are in flight: their tasks, woken by one read, send theirs
                    # too; the writer sends small ones in bursts (one frame each on a relay),
                    # and leaves big ones to its task, which joins no more than COALESCE
                    # bytes into one write (a burst of them would be joined whole).
                    self.writer.burst = call_burst(len(self._pending)) if len(encoded) < COALESCE else MAX_IN_FLIGHT + 1
                    await self.writer.put_later(encoded)
                else:
                    await self.writer.put(encoded)  # waiting for the reply is the checkpoint
            except trio.ClosedResourceError:
                raise self.closed or ConnectionLost("the rpc channel ended") from None
            del encoded  # (the writer holds it until it is sent)
            if self._turns:
                await self._wait_for(call)
            elif call.result is None and self.closed is None:
                # (call.park(), without a coroutine of its own to step through)
                call.task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(call._abort)
            else:
                await trio.lowlevel.checkpoint()  # (answered or ended already: still a checkpoint)
        finally:
            del self._pending[request_id]
            body = self._frames.body
            if body is not None and body.header.get("re") == request_id:
                body.parts = None  # its reply is on its way: the rest is skipped, not kept
            if self._turns and self._reader is None:
                self._pass_turn()  # (it may have been given the turn just before it left)
        reply = call.result
        if reply is _RESULT:  # (the common case first)
            return call.value
        if reply is None:
            raise self.closed or ConnectionLost("the rpc channel ended")
        if isinstance(reply, BusError):
            raise reply
        if isinstance(reply, _Body):
            try:
                message = parse_message(reply.message(self.max_message // BYTES_PER_ITEM))
            except FrameError as exc:
                raise FrameError(f"the reply does not decode: {exc}") from exc
            if not isinstance(message, (Reply, ErrorReply)):
                raise FrameError("the reply's body turned it into something else than a reply")
            reply = message
        if isinstance(reply, ErrorReply):
            raise error_from_wire(reply.code, reply.message)
        assert isinstance(reply, Reply)
        return reply.result

    async def introspect(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("introspect")
        return result

    async def aclose(self) -> None:
        self._stop("this side closed the channel")
        await self.channel.aclose()


class RpcCalls:
    """A bus's calls to services: one :class:`RpcConnection` per peer, opened on first use
    (under a lock per name) and reused while it lasts."""

    def __init__(
        self,
        connection: BusConnection,
        open_channel: Callable[[str, str], Awaitable[Channel]],
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._connection = connection
        self._open_channel = open_channel
        #: The largest RPC message (argument or result) these calls send or accept.
        self.max_message = max_message
        self.connections: dict[str, RpcConnection] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def call(self, name: str, method: str, *args: Any) -> Any:
        connection = self.connections.get(name)
        if connection is not None:
            connection.poll()  # (whether the service ended the channel while it was idle)
        if connection is None or connection.closed is not None:
            connection = await self._connect(name)
        timeout = self._connection.request_timeout
        with trio.move_on_after(timeout):
            return await connection.call(method, *args)
        raise RequestTimeout(f"{name}.{method}: no reply within {timeout:g} s")

    async def introspect(self, name: str) -> dict[str, Any]:
        connection = await self._connect(name)
        timeout = self._connection.request_timeout
        with trio.move_on_after(timeout):
            return await connection.introspect()
        raise RequestTimeout(f"{name}: no introspection reply within {timeout:g} s")

    async def _connect(self, name: str) -> RpcConnection:
        connection = self.connections.get(name)
        if connection is not None:
            connection.poll()  # (whether the service ended the channel while it was idle)
            if connection.closed is None:
                return connection  # (no lock, no checkpoint: the call's wait is one)
        lock = self._locks.setdefault(name, trio.Lock())
        async with lock:
            connection = self.connections.get(name)
            if connection is not None:
                connection.poll()  # (whether the service ended the channel while it was idle)
            if connection is None or connection.closed is not None:
                nursery = self._connection.nursery
                if nursery is None:
                    raise ConnectionLost("the bus is not running")
                channel = await self._open_channel(name, RPC_PROTOCOL)
                connection = RpcConnection(channel, max_message=self.max_message)
                await nursery.start(connection.run)
                self.connections[name] = connection
            return connection
