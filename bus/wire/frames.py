"""The frame codec: how the broker protocol cuts a byte stream into messages (sans-io).

Theory of operation
-------------------
Every frame is a 10-byte header followed by a body::

    offset  size  field
    0       1     kind      1 = CONTROL, 2 = DATA; anything else is a framing violation
    1       1     flags     0 in this version; anything else is a framing violation
    2       4     channel   u32 big-endian; 0 is the control channel of the connection
    6       4     length    u32 big-endian, size of the body in bytes
    10      len   body

A CONTROL body is exactly one CBOR map in minibus's CBOR profile (below); a DATA body is
opaque bytes that a relay forwards without looking inside.  The body length is checked
against the decoder's maximum (1 MiB for DATA, 64 KiB for CONTROL, by default) as soon as
the header is complete, before any buffer is sized for it, so a peer can never make the decoder hold more than one
maximum-size frame plus whatever the caller fed it in one call.

The CBOR profile (what :func:`check_cbor` accepts) keeps control messages boring and
cheap to decode safely: definite lengths only; no tags; simple values false, true and
null only; floats of any width; integers and lengths in their shortest encoding; map keys
that are text or integers, unique within their map; nesting at most 32 deep; exactly one
top-level item, a map.  Every declared length is checked against the bytes that remain
before anything is decoded, so a 9-byte body cannot claim a four-billion-item array.
"""

from __future__ import annotations

import collections
import enum
import mmap
import re
import struct
from dataclasses import dataclass
from typing import IO, Any, cast

import cbor2

from ..errors import FrameError, FrameTooLarge, LimitError, LocalProtocolError

__all__ = [
    "HEADER",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_CONTROL",
    "MAX_CBOR_DEPTH",
    "CHANNEL_CONTROL_ITEMS",
    "FrameKind",
    "ControlFrame",
    "DataFrame",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "encode_control",
    "EventFrames",
    "CallFrames",
    "EmitFrames",
    "encode_data",
    "decode_control_body",
    "check_cbor",
]

HEADER = struct.Struct(">BBII")
HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
DEFAULT_MAX_FRAME = 1 << 20
#: CONTROL bodies are small by nature; their tighter limit bounds the CPU and memory a
#: peer can make the CBOR check and decode spend on one message.
DEFAULT_MAX_CONTROL = 64 * 1024
MAX_CBOR_DEPTH = 32
#: Data items a CONTROL body on a channel other than 0 holds at most, at the broker: the
#: channel messages (credit, eof, close, reset) hold 3 each, so a check of a body sent on a
#: channel stops after a few items, whatever it holds (see FrameDecoder's ``channel_items``).
CHANNEL_CONTROL_ITEMS = 16
MAX_CHANNEL = 0xFFFFFFFF


class FrameKind(enum.IntEnum):
    CONTROL = 1
    DATA = 2


# The kinds as plain ints, for the decoder's hot path.
_CONTROL, _DATA = int(FrameKind.CONTROL), int(FrameKind.DATA)
#: A header as (kind << 8 | flags, channel, length), and that first number for a CONTROL
#: frame without flags (see FrameDecoder.take_control_messages).
_unpack_run_header = struct.Struct(">HII").unpack_from
_CONTROL_PLAIN = _CONTROL << 8


# Frames and messages are slotted dataclasses, not frozen ones: one is built per frame on
# every hop, and a frozen dataclass takes about twice as long to build (each field goes
# through object.__setattr__).  Nothing changes them once built.
@dataclass(slots=True)
class ControlFrame:
    """A control message: one CBOR map, on channel 0 or on a channel it concerns."""

    channel: int
    message: dict[Any, Any]


@dataclass(slots=True)
class DataFrame:
    """Opaque bytes for a channel.

    ``filled``: bytes of the body that went into the buffer the decoder's owner gave it
    (:meth:`FrameDecoder.fill_data_into`) instead of into ``data`` (then empty).
    ``data`` is a ``memoryview`` of the decoder's read only from a decoder told to hand
    them out (:attr:`FrameDecoder.data_views`); else ``bytes``."""

    channel: int
    data: bytes | memoryview
    filled: int = 0


Frame = ControlFrame | DataFrame


# -- the CBOR profile ----------------------------------------------------------------------


class _Invalid(Exception):
    pass


_SMALLEST = (24, 0x100, 0x10000, 0x100000000)  # the least value each wider head may carry
_SIMPLE_OK = frozenset((20, 21, 22, 25, 26, 27))  # false, true, null, float16/32/64


def _read_head(body: Any, pos: int, n: int) -> tuple[int, int, int, int]:
    """The head of the data item at ``pos`` (``pos < n``): its major type, additional info,
    argument (a float's: its bits) and where the head ends.  Raises _Invalid for a head the
    profile refuses on its own: cut short, an integer or length not in its shortest form, an
    indefinite length or a reserved encoding."""
    initial = body[pos]
    major = initial >> 5
    info = initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, info, pos
    if info < 28:
        size = 1 << (info - 24)
        if pos + size > n:
            raise _Invalid("truncated")
        arg = int.from_bytes(body[pos : pos + size], "big")
        if major != 7 and arg < _SMALLEST[info - 24]:
            raise _Invalid("integer or length not in its shortest encoding")
        return major, info, arg, pos + size
    raise _Invalid("indefinite lengths and reserved encodings are not allowed")


def check_cbor(body: bytes | bytearray | mmap.mmap, max_items: int | None = None) -> None:
    """Raise :class:`FrameError` unless ``body`` is one CBOR map in minibus's profile.

    One pass over the bytes with an explicit stack (no recursion, no decoding): every head
    is checked as it is read, and every declared length against the bytes that remain.
    With ``max_items``, a body holding more data items than that (keys, values and
    container heads all count) is refused too, which bounds the CPU one message can cost.
    """
    n = len(body)
    budget = max_items if max_items is not None else n + 1  # no body holds more items than bytes
    if not n or body[0] >> 5 != 5:
        raise FrameError("control body is not a CBOR map")
    stack: list[tuple[int, set[bytes] | None]] = []
    remaining = 1  # items still to read in the current container (the top level: one map)
    seen: set[bytes] | None = None  # keys of the current map (None inside an array)
    pos = 0
    try:
        while True:
            while not remaining:
                if not stack:
                    if pos != n:
                        raise FrameError(f"control body has {n - pos} trailing bytes after its CBOR map")
                    return
                remaining, seen = stack.pop()
            remaining -= 1
            budget -= 1
            if budget < 0:
                raise _Invalid(f"more than {max_items} data items")
            if pos >= n:
                raise _Invalid("truncated")
            start = pos
            # (_read_head's steps, inline: a call per item costs a body of many items about
            # half as much again, and such a body is the most CPU one message can cost busd)
            initial = body[pos]
            major = initial >> 5
            info = initial & 0x1F
            pos += 1
            if info < 24:
                arg = info
            elif info < 28:
                size = 1 << (info - 24)
                if pos + size > n:
                    raise _Invalid("truncated")
                arg = int.from_bytes(body[pos : pos + size], "big")
                pos += size
                if major != 7 and arg < _SMALLEST[info - 24]:
                    raise _Invalid("integer or length not in its shortest encoding")
            else:
                raise _Invalid("indefinite lengths and reserved encodings are not allowed")
            # In a map the items alternate key, value: with an odd count left, this is a key.
            is_key = seen is not None and remaining & 1
            if is_key and major not in (0, 1, 3):
                raise _Invalid("map keys must be text or integers")
            if major < 2:
                pass
            elif major < 4:
                if arg > n - pos:
                    raise _Invalid("a string is longer than the message")
                pos += arg
            elif major < 6:
                count = arg if major == 4 else 2 * arg
                if count > n - pos:
                    what = "an array claims more items" if major == 4 else "a map claims more entries"
                    raise _Invalid(f"{what} than the message can hold")
                # Items sit one deeper than their container (the top-level map is depth 1).
                if count and len(stack) + 2 > MAX_CBOR_DEPTH:
                    raise _Invalid(f"nesting deeper than {MAX_CBOR_DEPTH}")
                stack.append((remaining, seen))
                remaining = count
                seen = set() if major == 5 else None
                continue
            elif major == 6:
                raise _Invalid("tags are not allowed")
            elif info not in _SIMPLE_OK:
                raise _Invalid("only false, true, null and floats are allowed as simple values")
            if is_key:
                assert seen is not None
                key = bytes(body[start:pos])
                if key in seen:
                    raise _Invalid("duplicate map key")
                seen.add(key)
    except _Invalid as exc:
        raise FrameError(f"control body is not valid minibus CBOR: {exc}") from None


_INT_MIN, _INT_MAX = -(1 << 64), (1 << 64) - 1
_SCALAR_TYPES = frozenset({str, bytes, bool, float, type(None)})


def _plain(value: Any, depth: int) -> bool:
    """Whether cbor2 encodes ``value`` inside the profile: plain types only, no tags.
    (Scalars inside a container are looked at in its loop, without a call each.)"""
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return True
    if kind is int:
        return bool(_INT_MIN <= value <= _INT_MAX)
    if depth >= MAX_CBOR_DEPTH:
        return False
    if kind is dict:
        for key, item in value.items():
            key_kind = type(key)
            if not (key_kind is str or (key_kind is int and _INT_MIN <= key <= _INT_MAX)):
                return False
            item_kind = type(item)
            if item_kind in _SCALAR_TYPES or (item_kind is int and _INT_MIN <= item <= _INT_MAX):
                continue
            if not _plain(item, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        for item in value:
            item_kind = type(item)
            if item_kind in _SCALAR_TYPES or (item_kind is int and _INT_MIN <= item <= _INT_MAX):
                continue
            if not _plain(item, depth + 1):
                return False
        return True
    return False


def _items_within(value: Any, depth: int, budget: int) -> int:
    """What is left of ``budget`` after the data items of ``value`` (keys, values and
    container heads count, as in :func:`check_cbor`), or -1 when it runs out or ``value`` is
    not plain (see :func:`_plain`) or nests deeper than MAX_CBOR_DEPTH.  (Scalars inside a
    container are checked in its loop: a call each would double the cost of a flat map.)"""
    budget -= 1
    kind = type(value)
    if kind in _SCALAR_TYPES:
        return budget
    if kind is int:
        return budget if _INT_MIN <= value <= _INT_MAX else -1
    if depth >= MAX_CBOR_DEPTH or budget < 0:
        return -1
    scalars = _SCALAR_TYPES
    if kind is dict:
        for key, item in value.items():
            key_kind = type(key)
            if not (key_kind is str or (key_kind is int and _INT_MIN <= key <= _INT_MAX)):
                return -1
            item_kind = type(item)
            if item_kind in scalars or (item_kind is int and _INT_MIN <= item <= _INT_MAX):
                budget -= 2
            elif item_kind is list:  # (the list's own call, in place: an RPC call's "args")
                budget -= 2  # its key and its head
                if depth + 1 >= MAX_CBOR_DEPTH or budget < 0:
                    return -1
                for element in item:
                    element_kind = type(element)
                    if element_kind in scalars or (element_kind is int and _INT_MIN <= element <= _INT_MAX):
                        budget -= 1
                    else:
                        budget = _items_within(element, depth + 2, budget)
                    if budget < 0:
                        return -1
            else:
                budget = _items_within(item, depth + 1, budget - 1)
            if budget < 0:
                return -1
        return budget
    if kind is list:
        for item in value:
            item_kind = type(item)
            if item_kind in scalars or (item_kind is int and _INT_MIN <= item <= _INT_MAX):
                budget -= 1
            else:
                budget = _items_within(item, depth + 1, budget)
            if budget < 0:
                return -1
        return budget
    return -1


def _head_size(arg: int) -> int:
    """Bytes of a CBOR head carrying ``arg`` in its shortest form."""
    return 1 if arg < 24 else 2 if arg < 0x100 else 3 if arg < 0x10000 else 5 if arg < 0x100000000 else 9


def _scalar_size(value: Any) -> int:
    """:func:`_canonical_size`'s bytes for a scalar; -1 for anything else (a container, a
    float, a value that is not plain)."""
    kind = type(value)
    if kind is str:
        n = len(value) if value.isascii() else len(value.encode())
    elif kind is bytes:
        n = len(value)
    elif kind is int:
        if 0 <= value <= _INT_MAX:
            return _head_size(value)
        if _INT_MIN <= value < 0:
            return _head_size(-1 - value)
        return -1
    elif kind is bool or value is None:
        return 1
    else:
        return -1
    return n + (1 if n < 24 else 2 if n < 0x100 else _head_size(n))


def _canonical_size(value: Any, depth: int, budget: int) -> tuple[int, int]:
    """``(bytes, items)`` of ``value``'s encoding in the profile's canonical form (every head
    in its shortest form, definite lengths): what a body holding exactly ``value``, and
    nothing written the long way, measures.  Items count as in :func:`check_cbor`.
    ``(-1, 0)`` when that cannot tell: a value that is not plain (:func:`_plain`), a float
    (its width in the body is free), a container at MAX_CBOR_DEPTH or deeper, or more than
    ``budget`` items -- where it stops, having looked at no more than that many: a value
    cbor2 built from shared references (tags 28 and 29, refused by the profile but decoded
    before it is checked) can be a few hundred bytes that reach each of its values by more
    paths than there are atoms in the world, and a walk over every path would never end.  (Scalars
    inside a container are measured in its loop, the common ones without a call.)"""
    kind = type(value)
    if (kind is not dict and kind is not list) or depth >= MAX_CBOR_DEPTH:
        size = _scalar_size(value)
        return (size, 1) if size >= 0 else (-1, 0)
    n = len(value)
    size = 1 if n < 24 else _head_size(n)
    if kind is dict:
        items = 1 + 2 * n  # (the head, and each key and value: a container's own items are added below)
        if items > budget:
            return -1, 0
        known = _KEY_SIZES
        for key, item in value.items():
            part = known.get(key)  # (only text keys are in it: any other key is measured below)
            if part is None:
                part = _scalar_size(key) if type(key) is int or type(key) is str else -1
                if part < 0:
                    return -1, 0
            size += part
            item_kind = type(item)
            if item_kind is bytes or item_kind is str and item.isascii():
                n = len(item)
                size += n + (1 if n < 24 else 2 if n < 0x100 else _head_size(n))
            elif item_kind is int and 0 <= item <= _INT_MAX:
                size += 1 if item < 24 else 2 if item < 0x100 else 3 if item < 0x10000 else 5 if item < 0x100000000 else 9
            elif item_kind is bool or item is None:
                size += 1
            elif item_kind is list and depth + 1 < MAX_CBOR_DEPTH and len(item) < 24:
                # (A short array, as an RPC call's arguments are: its text, bytes and small
                # ints measured here, anything else by the call below.)
                part, count = 1, 1
                for element in item:
                    element_kind = type(element)
                    if element_kind is bytes or element_kind is str and element.isascii():
                        n = len(element)
                        part += n + (1 if n < 24 else 2 if n < 0x100 else _head_size(n))
                    elif element_kind is int and 0 <= element < 24:
                        part += 1
                    else:
                        part, count = _canonical_size(item, depth + 1, budget - items + 1)
                        break
                    count += 1
                if part < 0:
                    return -1, 0
                size += part
                items += count - 1
                if items > budget:
                    return -1, 0
            elif item_kind is dict or item_kind is list:
                # (its slot is counted already: it may take that one and what is left)
                part, count = _canonical_size(item, depth + 1, budget - items + 1)
                if part < 0:
                    return -1, 0
                size += part
                items += count - 1
            else:
                part = _scalar_size(item)
                if part < 0:
                    return -1, 0
                size += part
        return size, items
    items = 1 + n  # (the head and each element: a container's own items are added below)
    if items > budget:
        return -1, 0
    for item in value:
        item_kind = type(item)
        if item_kind is dict or item_kind is list:
            part, count = _canonical_size(item, depth + 1, budget - items + 1)
            items += count - 1
        else:
            part = _scalar_size(item)
        if part < 0:
            return -1, 0
        size += part
    return size, items


#: What the keys of the protocol's own messages measure (looked up, not worked out, per key;
#: others are measured as they come).
_KEY_SIZES = {
    key: 1 + len(key)
    for key in (
        "op", "id", "re", "result", "error", "code", "message", "event", "source", "member", "payload",
        "quiet", "destination", "sender", "identity", "subscription", "name", "channel", "args", "method",
        "credit", "data", "flags", "info", "pattern", "patterns", "watch", "reason", "missed",
    )
}

#: The bytes that may begin an item that takes no more bytes than the canonical form of what
#: cbor2 makes of it, when that is plain (:func:`_canonical_size` measures only plain values):
#:
#: * 0xC2 and 0xC3, a bignum (tags 2 and 3) in a one-byte head: an integer of 2**32 to
#:   2**48 - 1 (or -2**48 to -2**32 - 1) takes 9 bytes canonically and 7 or 8 as a bignum, and
#:   one of 2**16 to 2**24 - 1 or 2**48 to 2**56 - 1 (or of the negative ranges one below
#:   those) as many;
#: * 0xD8 to 0xDB, every tag of 24 or more, and every tag written long: the ones cbor2 reads
#:   through to a plain value -- a shared value and its references (28, 29), string
#:   references (256, 25), self-describe (55799) -- and a bignum's tag in a long head;
#: * 0x9F and 0xBF, an indefinite-length array or map: its start and break take two bytes, as
#:   a canonical head of 24 to 255 items does, and fewer than a head of 256 or more.
#:
#: Nothing else can: every other one-byte tag head (tags 0-23 but 2 and 3) makes cbor2 build
#: a value that is not plain (a datetime, a Decimal, a CBORTag) or fail
#: (tests/test_frames.py holds cbor2 to that); an indefinite-length string (0x5F, 0x7F) takes
#: at least one byte more than its canonical form (its start, its break and a head per chunk,
#: against one head: two more for one chunk; one more for none, or for 65536 bytes or more cut
#: into chunks under 65536, as a 3-byte head and a 1-byte one against a 5-byte head); every
#: other liberty (a long head, a duplicate key) adds bytes.
_SHORT_WAYS = bytes((0xC2, 0xC3, 0xD8, 0xD9, 0xDA, 0xDB, 0x9F, 0xBF))


def _holds_short_way(body: bytes | bytearray | mmap.mmap) -> bool:
    """Whether a byte of :data:`_SHORT_WAYS` is in ``body`` (tests hold the two to the same
    bytes): one ``memchr`` per byte, as quick as deleting them with ``bytes.translate`` and
    comparing lengths for a short body, five times quicker for a body of a KiB and more (the
    translation copies the body and looks up every byte).  (A buffer's ``in`` looks at an
    mmap byte by byte in Python's own loop, some 4,000 times slower than its ``find``.)"""
    if type(body) is mmap.mmap:
        return _mmap_holds(body, _SHORT_WAYS)
    return (
        0xC2 in body or 0xC3 in body or 0xD8 in body or 0xD9 in body
        or 0xDA in body or 0xDB in body or 0x9F in body or 0xBF in body
    )


def _mmap_holds(body: mmap.mmap, values: bytes) -> bool:
    """Whether a byte of ``values`` is in the mmap ``body``: its ``find`` for each, from the
    start (an mmap's ``find`` begins at its position; its ``in`` looks at one byte at a time)."""
    find = body.find
    return any(find(values[i : i + 1], 0) >= 0 for i in range(len(values)))


#: The heads of every tag of 24 or more (one to eight bytes of argument): among them, a shared
#: value and its references (tags 28 and 29) and string references (tags 25 and 256).
_TAG_HEADS = bytes((0xD8, 0xD9, 0xDA, 0xDB))


#: The heads of the tags with which cbor2 makes one value reachable from many places: a
#: string reference (25) and its namespace (256), a shared value (28) and its reference (29),
#: each in every width of its argument (cbor2 takes a head longer than it need be).
_SHARING = re.compile(
    rb"\xd8[\x19\x1c\x1d]|\xd9(?:\x00[\x19\x1c\x1d]|\x01\x00)|\xda\x00\x00(?:\x00[\x19\x1c\x1d]|\x01\x00)"
    rb"|\xdb\x00\x00\x00\x00\x00\x00(?:\x00[\x19\x1c\x1d]|\x01\x00)"
)


def _may_share(body: bytes | bytearray | mmap.mmap) -> bool:
    """Whether ``body`` could hold a tag with which cbor2 makes one value reachable from many
    places (:data:`_SHARING`; first whether any byte could begin a tag of 24 or more, one
    ``memchr`` each, the search only then): without one, what cbor2 makes of it is a tree, no
    bigger written out than the body (but for floats it writes wider, three times at most)."""
    if type(body) is mmap.mmap:
        if not _mmap_holds(body, _TAG_HEADS):
            return False
    elif not (0xD8 in body or 0xD9 in body or 0xDA in body or 0xDB in body):
        return False
    return _SHARING.search(body) is not None


#: A body of at most this many bytes, with no head of a sharing tag (:func:`_may_share`), is
#: given to cbor2 before it is checked (see decode_control_body): map keys made to collide in
#: it cost cbor2 at most a few milliseconds to build into a dict.
_DECODE_FIRST = 4096

#: Where a body holds fewer items than one per this many bytes, checking its heads in Python
#: (about 1 us an item) costs less than encoding it again and comparing (about 0.5 ns a byte).
_BYTES_PER_CHECKED_ITEM = 2048


#: A body in a buffer (a large message's, filled by the decoder) at least this big is first
#: tried with :func:`_decode_flat`.
_FLAT_FROM = 64 * 1024
#: ... which gives up after this many data items (a body of many small items is left to the
#: ways below: decoding it by hand would cost more than cbor2 does).
_FLAT_ITEMS = 32
_FLOATS = {25: struct.Struct(">e"), 26: struct.Struct(">f"), 27: struct.Struct(">d")}
_SIMPLE = {20: False, 21: True, 22: None}


def _decode_flat(body: bytes | bytearray | memoryview | mmap.mmap, max_items: int | None) -> dict[Any, Any] | None:
    """The map in ``body`` when it is in the profile and flat -- text or integer keys, each
    value a scalar (an integer, a string, false, true, null, a float) or an array of scalars,
    as an RPC message's fields are -- with at most _FLAT_ITEMS data items (and ``max_items``);
    else None, having decided nothing (the ways of :func:`decode_control_body` then decide,
    and say why a body is refused).  One pass over the heads, each string copied once out of
    the buffer: cbor2 reads a long string through its file 64 KiB at a time and joins the
    pieces, two copies and a call per piece.  Every rule of :func:`check_cbor` holds for what
    it returns: heads in their shortest form, definite lengths, no tags, only the allowed
    simple values, no duplicate key, no trailing byte."""
    view = memoryview(body)
    n = len(view)
    budget = _FLAT_ITEMS if max_items is None else min(_FLAT_ITEMS, max_items)
    pos = 0
    stack = 0  # array items left (0: at the map's level)
    message: dict[Any, Any] = {}
    key: Any = None
    array: list[Any] | None = None
    entries = -1  # the map's entries left (-1: the map's head not read yet)
    try:
        while True:
            if entries == 0 and not stack:
                return message if pos == n else None
            budget -= 1
            if budget < 0 or pos >= n:
                return None
            major, info, arg, pos = _read_head(view, pos, n)
            if major == 7 and info >= 24:
                if info == 24:
                    return None  # (a simple value in the next byte: not in the profile)
                value: Any = _FLOATS[info].unpack_from(view, pos - (1 << (info - 24)))[0]
                if value != value and info == 25 and arg & 0x7FFF != 0x7E00:
                    return None  # (a half NaN's payload: struct drops it, cbor2 keeps it)
                arg = -1
            if entries < 0:  # the head of the message: a map
                if major != 5:
                    return None
                entries = arg
                continue
            if major < 2:
                value = arg if major == 0 else -1 - arg
            elif major < 4:
                if arg > n - pos:
                    return None
                value = bytes(view[pos : pos + arg]) if major == 2 else str(view[pos : pos + arg], "utf-8")
                pos += arg
            elif major == 7:
                if arg >= 0:
                    if arg not in _SIMPLE:
                        return None
                    value = _SIMPLE[arg]
            elif major == 4 and key is not None and not stack and array is None:
                array = []
                stack = arg
                if not stack:
                    message[key] = array
                    key, array, entries = None, None, entries - 1
                continue
            else:
                return None  # (a tag, a map or an array nested deeper: decided elsewhere)
            if stack:
                assert array is not None
                array.append(value)
                stack -= 1
                if not stack:
                    message[key] = array
                    key, array, entries = None, None, entries - 1
            elif key is None:
                if major not in (0, 1, 3) or value in message:
                    return None
                key = value
            else:
                message[key] = value
                key, entries = None, entries - 1
    except (_Invalid, UnicodeDecodeError, ValueError):
        return None


def decode_control_body(body: bytes | bytearray | mmap.mmap, max_items: int | None = None) -> dict[Any, Any]:
    """Check and decode a CONTROL body into a dict.

    The quickest way first: cbor2's C decoder (it never allocates more than 64 KiB ahead of
    the bytes it has, and refuses nesting past 400), then one walk over what it built that
    measures its canonical encoding (:func:`_canonical_size`); a body of that length with no
    byte in it that could begin an item as short as its canonical form (a few tags, an
    indefinite-length array or map: ``_SHORT_WAYS``) is in the profile (see the comment in
    the code).  Else the quick
    way: the walk over what cbor2 built (plain types, depth, the item budget) and cbor2's own
    encoding of it compared with the body:
    equal bytes are in the profile (shortest forms, definite lengths, no duplicate keys, no
    tags).  Anything else -- including bodies in the profile that cbor2 writes differently,
    such as a float in half precision -- goes through :func:`check_cbor`, which decides, and
    says why.  So does a body of few items for its size (a big string or two): check_cbor
    steps over a string in O(1), where the comparison would encode and compare every byte.

    cbor2 is given first only a body that cannot make it spend much: one of at most
    ``_DECODE_FIRST`` bytes with no head of a tag that makes a value reachable from many places
    (:func:`_may_share`: a shared value or reference, a string reference).  Anything else is checked first (check_cbor: one pass
    over the bytes, refusing every tag and stopping at the item budget) and decoded after.
    Before the check, cbor2 builds whatever the bytes say: from shared references (tags 28
    and 29) a value of more paths than there are atoms in the world, whose every path it
    walks itself to hash it as a map's key (an array key becomes a tuple) -- hours of CPU
    from 500 bytes; from map keys made to collide, a dict that takes time in the square of
    their number to build.  A big body in a buffer (a large message's) is first tried with
    :func:`_decode_flat`, which decodes a flat map of few items in one pass."""
    if type(body) is not bytes and len(body) >= _FLAT_FROM:
        flat = _decode_flat(body, max_items)
        if flat is not None:
            return flat
    if len(body) > _DECODE_FIRST or (max_items is not None and len(body) > max_items) or _may_share(body):
        check_cbor(body, max_items)
        try:
            message = cbor2.loads(body)
        except Exception as exc:
            raise FrameError(f"control body does not decode: {exc}") from exc
        if not isinstance(message, dict):  # pragma: no cover - check_cbor already ensured a map
            raise FrameError("control body is not a CBOR map")
        return message
    try:
        # (A buffer is copied once, in C, into the file cbor2's loads reads it from: a file
        # of our own, however thin, costs a Python call per item -- 30-45 ms for a 1 MiB
        # body of 65,536 items -- and cbor2 reads a big string through either.)
        message = cbor2.loads(body)
    except Exception as exc:  # cbor2 reports bad CBOR with several types
        check_cbor(body, max_items)  # the profile's own reason, when it has one
        raise FrameError(f"control body does not decode: {exc}") from exc
    budget = max_items if max_items is not None else len(body) + 1
    if type(message) is dict:
        # Without a second encoding: every way of writing a plain value other than the
        # canonical one (a head longer than it need be, a duplicate key whose value was
        # dropped, an indefinite-length string) takes more bytes than the canonical form of
        # what was decoded, but for a few tags (a bignum, a string or shared reference) and
        # indefinite-length arrays and maps, which can take as many or fewer, and make up
        # for the others' extra bytes -- so a body in which no byte could begin one of those
        # (_SHORT_WAYS, which says why the others cannot), whose decoded value is plain and
        # float-free and measures exactly the body's length, is in the profile.  Anything
        # else takes the ways below, which decide.
        size, items = _canonical_size(message, 1, budget)
        if size >= 0:
            # Plain, float-free and no deeper than the profile allows (what _items_within
            # would find out again): the bytes decide.  A byte that could begin one of the
            # short ways -- most often one inside a byte string or an integer -- leaves it to the
            # canonical encoding, compared; anything else to check_cbor, which refuses a body
            # not in its canonical form (saying why) and steps over a few big strings quicker
            # than a comparison (see below).
            if size == len(body) and items <= budget and items * _BYTES_PER_CHECKED_ITEM >= size:
                if not _holds_short_way(body) or _same_bytes(cbor2.dumps(message), body):
                    return message
            check_cbor(body, max_items)
            return message
        left = _items_within(message, 1, budget)
        if left >= 0:
            if (budget - left) * _BYTES_PER_CHECKED_ITEM < len(body):
                # Few items for many bytes (big strings): check_cbor steps over each string
                # in O(1), where encoding it again would copy and compare every byte.
                check_cbor(body, max_items)
                return message
            # (No shared value or string reference: what cbor2 built is a tree, no bigger
            # written out again than the body, but for floats, which it may write wider.)
            if _same_bytes(cbor2.dumps(message), body):
                return message
    check_cbor(body, max_items)
    if not isinstance(message, dict):  # pragma: no cover - check_cbor already ensured a map
        raise FrameError("control body is not a CBOR map")
    return message


def _same_bytes(encoded: bytes, body: bytes | bytearray | mmap.mmap) -> bool:
    """Whether ``body`` holds exactly ``encoded`` (an mmap compares only as a view)."""
    return encoded == body if type(body) is not mmap.mmap else memoryview(body) == encoded


def decode_trusted_body(body: bytes) -> dict[Any, Any]:
    """Decode a CONTROL body from a peer that checks the profile itself (see
    :attr:`FrameDecoder.trusted`): malformed CBOR or anything but a map is still refused."""
    try:
        message = cbor2.loads(body)
    except Exception as exc:  # cbor2 reports bad CBOR with several types
        raise FrameError(f"control body does not decode: {exc}") from exc
    if type(message) is not dict:
        raise FrameError("control body is not a CBOR map")
    return message


# -- encoding ------------------------------------------------------------------------------


def _check_channel(channel: int) -> None:
    if not 0 <= channel <= MAX_CHANNEL:
        raise LocalProtocolError(f"channel id {channel} is outside 0..{MAX_CHANNEL}")


def encode_data(channel: int, data: bytes | bytearray | memoryview, max_body: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode a DATA frame."""
    if not 0 <= channel <= MAX_CHANNEL:
        _check_channel(channel)  # (raises, saying why; a call less per frame otherwise)
    size = len(data)
    if size > max_body:
        raise LimitError(f"a frame body of {size} bytes is over the {max_body}-byte maximum")
    return _pack_header(_DATA, 0, channel, size) + data


def encode_control(channel: int, message: dict[Any, Any], max_body: int = DEFAULT_MAX_CONTROL, *, checked: bool = False) -> bytes:
    """Encode a CONTROL frame; the message must fit minibus's CBOR profile.

    ``checked``: the caller knows it does (built of values decoded from checked frames and
    plain ones of its own), so the walk over it that proves so is skipped."""
    if not 0 <= channel <= MAX_CHANNEL:
        _check_channel(channel)  # (raises, saying why; a call less per frame otherwise)
    if not isinstance(message, dict):
        raise LocalProtocolError("a control message is a dict")
    try:
        body = cbor2.dumps(message)
    except Exception as exc:
        raise LocalProtocolError(f"control message cannot be encoded as CBOR: {exc}") from exc
    if not checked and not _plain(message, 1):
        # Something beyond plain types: let the profile check of the bytes decide.
        try:
            check_cbor(body)
        except FrameError as exc:
            raise LocalProtocolError(f"control message uses CBOR that peers refuse: {exc}") from None
    if len(body) > max_body:
        raise LimitError(f"a frame body of {len(body)} bytes is over the {max_body}-byte maximum")
    return _pack_header(_CONTROL, 0, channel, len(body)) + body


#: The heads of byte strings of fewer than 256 bytes, by length (shortest forms).
_BYTES_HEADS = tuple(bytes((0x40 | n,)) if n < 24 else bytes((0x58, n)) for n in range(256))


def cbor_head(major: int, n: int) -> bytes:
    """A CBOR head of major type ``major`` for ``n`` in its shortest form (what cbor2 writes)."""
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return bytes((major << 5 | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major << 5 | 26,)) + n.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + n.to_bytes(8, "big")


#: The keys of a broker's event, in the order :class:`EventFrames` writes them.
_EVENT_KEYS = ("source", "member", "payload", "sender", "identity", "event")


def _event_parts(source: str, member: str, sender: str, identity: str) -> tuple[bytes, bytes]:
    """The body of a broker's event (as :class:`EventFrames` writes it) before its payload's
    item, and after it: plain CBOR, no tags (``cbor2.dumps`` of text; raises for text that is
    no UTF-8)."""
    dumps = cbor2.dumps
    return (
        b"\xa6" + dumps("source") + dumps(source) + dumps("member") + dumps(member) + dumps("payload"),
        dumps("sender") + dumps(sender) + dumps("identity") + dumps(identity) + dumps("event") + dumps("event"),
    )


def _event_shape(message: dict[Any, Any]) -> tuple[bytes, bytes, tuple[str, str, str, str]] | None:
    """For a decoded broker's event with a byte-string payload (its six keys in
    :class:`EventFrames`'s order, text names): the bytes around its payload's item (see
    :func:`_event_parts`) and its four names, for :meth:`FrameDecoder.take_control_messages`
    to know the next events of its kind by; else None."""
    if tuple(message) != _EVENT_KEYS:
        return None
    source, member, payload, sender, identity, event = message.values()
    if type(payload) is not bytes or type(event) is not str or event != "event":
        return None
    names = (source, member, sender, identity)
    for name in names:
        if type(name) is not str:
            return None
    try:
        head, tail = _event_parts(*names)
    except Exception:  # pragma: no cover - (decoded text is UTF-8: cbor2 refuses the rest)
        return None
    return head, tail, names


def _bytes_item(data: bytes, start: int, end: int) -> bytes | None:
    """The bytes of the byte string whose item (with a definite-length head, in any of its
    sizes) is exactly ``data[start:end]`` -- what ``cbor2.loads`` makes of it --, else None."""
    first = data[start]
    if 0x40 <= first <= 0x57:
        at, n = start + 1, first - 0x40
    elif 0x58 <= first <= 0x5B:
        at = start + 1 + (1 << (first - 0x58))
        if at > end:
            return None
        n = int.from_bytes(data[start + 1 : at], "big")
    else:  # (not a byte string, or one in chunks)
        return None
    return data[at:end] if at + n == end else None


def _event_from_shape(data: bytes, start: int, end: int, shape: tuple[bytes, bytes, tuple[str, str, str, str]]) -> dict[str, Any] | None:
    """The broker's event whose body is ``data[start:end]``, if it is ``shape``'s bytes (see
    _event_shape) around exactly one byte string; else None.  (The trusted run's own test,
    for the kinds it knows but the first.)"""
    head, tail, names = shape
    middle, after = start + len(head), end - len(tail)
    if middle < after and data.startswith(head, start) and data.endswith(tail, start, end):
        payload = _bytes_item(data, middle, after)
        if payload is not None:
            source, member, sender, identity = names
            return {"source": source, "member": member, "payload": payload, "sender": sender, "identity": identity, "event": "event"}
    return None


#: Shapes a decoder knows at once (of events, trusted; of requests, checked), the one that last
#: matched first.  Learning one costs more than decoding the body did, so it is paid for: a
#: decoder may learn while its credit holds _LEARN_COST; each body a shape takes adds one,
#: up to _CREDIT_CAP (two shapes' worth, what it starts with).  A stream whose shapes are
#: seldom seen again (every kind new, or more kinds in turn than it knows) stops learning
#: after two: it costs the failed tests, a few tenths of a microsecond a body.
_SHAPES = 4
_LEARN_COST = 4
_CREDIT_CAP = 8
_NO_SHAPES: list[Any] = []  # (every decoder's until it learns one; never changed: see FrameDecoder._learn_shape)

#: The most bytes around the payload a decoder keeps of a request's shape (see _request_shape).
SHAPE_BYTES = 512
#: The least value of each longer head (1, 2, 4 and 8 bytes after it): a head in its
#: shortest form (the profile's) holds no smaller one.
_LONG_HEAD_FROM = (24, 1 << 8, 1 << 16, 1 << 32)
#: The values a request's shape keeps as they were: plain and immutable (the keys: text or int).
_SHAPE_SCALARS = frozenset({str, int, bool, type(None)})


def _request_shape(message: dict[Any, Any], body: bytes, hole: str = "payload") -> tuple[bytes, bytes, dict[Any, Any]] | None:
    """For a request ``body`` in the profile, decoded to ``message``, whose ``hole`` holds a
    byte string and whose last key is ``id``, with an unsigned integer, every other value and
    key plain and immutable: the bytes before the byte string's item, the bytes between it and
    the id's, and the message (a copy, its ``hole`` left empty) -- what
    :meth:`FrameDecoder.take_control_messages` knows the next such requests of this
    connection by (``hole`` "payload": an emit's), and :meth:`FrameDecoder.whole_message_from`
    the next RPC calls of a channel by (``hole`` "args", a list of exactly one byte string:
    its array's head is then among the bytes before).  Else None, and None when those bytes
    would be over SHAPE_BYTES (a connection's decoder keeps them)."""
    if len(message) < 2:
        return None
    keys = list(message)
    if keys[-1] != "id":
        return None
    request_id, payload = message["id"], message.get(hole)
    if hole == "args":
        if type(payload) is not list or len(payload) != 1:
            return None
        payload = payload[0]
    if type(request_id) is not int or request_id < 0 or type(payload) is not bytes:
        return None
    # (The bytes around the payload and the id, as the check below would find them: over
    # SHAPE_BYTES, no shape, known before encoding up to max_items items again to find out.)
    if len(body) - _scalar_size(payload) - _scalar_size(request_id) > SHAPE_BYTES:
        return None
    dumps = cbor2.dumps
    before: list[bytes] = [cbor_head(5, len(message))]
    after: list[bytes] | None = None
    for key in keys[:-1]:
        value = message[key]
        if type(key) is not str and type(key) is not int:
            return None
        if key == hole:
            before.append(dumps(key) if hole == "payload" else dumps(key) + cbor_head(4, 1))
            after = []
            continue
        if type(value) not in _SHAPE_SCALARS:
            return None
        (before if after is None else after).append(dumps(key) + dumps(value))
    if after is None:
        return None
    after.append(dumps("id"))
    head, tail = b"".join(before), b"".join(after)
    if len(head) + len(tail) > SHAPE_BYTES or head + dumps(payload) + tail + dumps(request_id) != body:
        return None
    kept = dict(message)
    kept[hole] = b""  # (not the payload: up to max_control bytes an idle connection would hold)
    return head, tail, kept


def _with_shape(shapes: list[Any], shape: Any) -> list[Any]:
    """``shapes`` (a new list in place of _NO_SHAPES) with ``shape`` first, and at most
    _SHAPES of them: the last goes."""
    if shapes is _NO_SHAPES:
        shapes = []
    shapes.insert(0, shape)
    del shapes[_SHAPES:]
    return shapes


def _shortest_head(data: bytes, at: int, end: int, major: int) -> tuple[int, int] | None:
    """The value of the head of major type ``major`` at ``data[at]`` (before ``end``) and
    where the head ends, if the head is in its shortest form; else None."""
    if at >= end:
        return None
    info = data[at] - (major << 5)
    if 0 <= info < 24:
        return info, at + 1
    if not 24 <= info <= 27:
        return None
    stop = at + 1 + (1 << (info - 24))
    if stop > end:
        return None
    value = int.from_bytes(data[at + 1 : stop], "big")
    return (value, stop) if value >= _LONG_HEAD_FROM[info - 24] else None


#: What an RPC reply ``{"re": id, "result": ...}`` begins with, and what comes after its id,
#: as cbor2 writes them (see _plain_reply).
_REPLY_HEAD = b"\xa2\x62re"
_REPLY_RESULT = b"\x66result"


def _plain_reply(body: bytes) -> dict[Any, Any] | None:
    """``{"re": id, "result": value}`` when ``body`` (which begins with _REPLY_HEAD) is exactly
    the canonical encoding of such a reply whose id is an unsigned integer and whose value is a
    byte string or an unsigned integer (an echo's, a length's), every head in its shortest
    form; else None.  Such a body is cbor2's own encoding of a plain map of five items: in the
    profile, and decode_control_body would give the same map.  (No shape to learn: a reply of
    this kind has one layout, whoever answers.  The heads most ids and values have are read
    here, the others by _shortest_head.)"""
    end = len(body)
    if end < 13:  # (the head, a one-byte id, the key, a one-byte value)
        return None
    first = body[4]
    if first < 24:
        request_id, at = first, 5
    elif first == 0x18:
        request_id, at = body[5], 6
        if request_id < 24:
            return None
    elif first == 0x19:
        request_id, at = body[5] << 8 | body[6], 7
        if request_id < 0x100:
            return None
    elif first == 0x1A:
        request_id, at = int.from_bytes(body[5:9], "big"), 9
        if request_id < 0x10000:
            return None
    else:
        got = _shortest_head(body, 4, end, 0)
        if got is None:
            return None
        request_id, at = got
    if not body.startswith(_REPLY_RESULT, at):
        return None
    at += len(_REPLY_RESULT)
    if at >= end:
        return None
    first = body[at]
    if 0x40 <= first <= 0x57:
        if at + 1 + first - 0x40 != end:
            return None
        return {"re": request_id, "result": body[at + 1 : end]}
    if first == 0x58 and at + 1 < end:
        size = body[at + 1]
        if size < 24 or at + 2 + size != end:
            return None
        return {"re": request_id, "result": body[at + 2 : end]}
    got = _shortest_head(body, at, end, first >> 5) if first >> 5 in (0, 2) else None
    if got is None:
        return None
    value, at = got
    if first >> 5 == 0:
        return {"re": request_id, "result": value} if at == end else None
    return {"re": request_id, "result": body[at:end]} if at + value == end else None


def _shaped_request(
    data: bytes, start: int, end: int, shape: tuple[bytes, bytes, dict[Any, Any]], hole: str = "payload"
) -> dict[Any, Any] | None:
    """The request whose body is ``data[start:end]`` if it is ``shape``'s bytes around a byte
    string and an unsigned integer, both in their shortest forms; else None.  Such a body is
    exactly cbor2's encoding of the message it gives (the shape's bytes are, see
    _request_shape): it is in the profile, and decode_control_body would give the same map.
    ``hole``: the shape's (see _request_shape): the byte string is the message's "payload",
    or ("args") the one item of a new list.  (The payload heads most payloads have are read
    here, the others by _shortest_head.)"""
    head, tail, message = shape
    if not data.startswith(head, start):
        return None
    at = start + len(head)
    if at >= end:
        return None
    first = data[at]
    if 0x40 <= first <= 0x57:
        size, at = first - 0x40, at + 1
    elif first == 0x58 and at + 2 <= end:
        size, at = data[at + 1], at + 2
        if size < 24:
            return None
    elif first == 0x59 and at + 3 <= end:
        size, at = data[at + 1] << 8 | data[at + 2], at + 3
        if size < 0x100:
            return None
    else:
        got = _shortest_head(data, at, end, 2)
        if got is None:
            return None
        size, at = got
    payload_end = at + size
    if not data.startswith(tail, payload_end, end):
        return None
    at = payload_end + len(tail)
    if at >= end:
        return None
    first = data[at]  # (major type 0: 0x00-0x1b)
    if first < 24:
        if at + 1 != end:
            return None
        request_id = first
    elif first <= 27:
        if at + 1 + (1 << (first - 24)) != end:
            return None
        request_id = int.from_bytes(data[at + 1 : end], "big")
        if request_id < _LONG_HEAD_FROM[first - 24]:
            return None
    else:
        return None
    message = message.copy()
    if hole == "payload":
        message["payload"] = data[payload_end - size : payload_end]
    else:
        message[hole] = [data[payload_end - size : payload_end]]
    message["id"] = request_id
    return message


class EventFrames:
    """CONTROL frames of the broker's events on channel 0 -- ``{"source", "member", "payload",
    "sender", "identity", "event": "event"}``, in that order -- whose payload is a byte string:
    the very bytes :func:`encode_control` makes of that message, without encoding all of it
    per event.  What does not change between one emitter's events of one kind (everything but
    the payload) is encoded once and kept, for at most ``keep`` kinds at once (all are
    dropped when that many are kept: a bounded memo, whoever emits what)."""

    __slots__ = ("_parts", "_keep")

    def __init__(self, keep: int = 1024) -> None:
        self._parts: dict[tuple[str, str, str, str], tuple[bytes, bytes]] = {}
        self._keep = keep

    def encode(self, source: str, member: str, payload: bytes, sender: str, identity: str, max_body: int = DEFAULT_MAX_CONTROL) -> bytes:
        """The frame, or :class:`LimitError` for a body over ``max_body`` (as encode_control)."""
        key = (source, member, sender, identity)
        parts = self._parts.get(key)
        if parts is None:
            if len(self._parts) >= self._keep:
                self._parts.clear()
            for text in key:
                if type(text) is not str:
                    raise LocalProtocolError("an event's source, member, sender and identity are text")
            try:
                parts = _event_parts(source, member, sender, identity)
            except Exception as exc:  # (text that is no UTF-8: a lone surrogate, as encode_control says)
                raise LocalProtocolError(f"control message cannot be encoded as CBOR: {exc}") from exc
            self._parts[key] = parts
        head, tail = parts
        n = len(payload)
        payload_head = _BYTES_HEADS[n] if n < 256 else cbor_head(2, n)
        size = len(head) + len(payload_head) + n + len(tail)
        if size > max_body:
            raise LimitError(f"a frame body of {size} bytes is over the {max_body}-byte maximum")
        return b"".join((_pack_header(_CONTROL, 0, 0, size), head, payload_head, payload, tail))


class EmitFrames:
    """CONTROL frames of quiet emits whose payload is a byte string -- ``{"member", "payload",
    "quiet": True, "source", "destination", "op": "emit", "id"}`` in that order, without
    ``source`` or ``destination`` where they are None (as a publishing client builds them) --:
    the very bytes :func:`encode_control` makes of that message, without encoding all of it
    per emit.  What does not change between one kind's emits (everything but the payload and
    the id) is encoded once and kept, for at most ``keep`` kinds at once (all are dropped when
    that many are kept).  busd, which checks every request, knows such emits of a kind by the
    same bytes (see :func:`_request_shape`)."""

    __slots__ = ("_parts", "_keep")

    def __init__(self, keep: int = 256) -> None:
        self._parts: dict[tuple[str, str | None, str | None], tuple[bytes, bytes]] = {}
        self._keep = keep

    def encode(
        self, member: str, source: str | None, destination: str | None, payload: bytes, request_id: int, max_body: int = DEFAULT_MAX_CONTROL
    ) -> bytes:
        """The frame, or :class:`LimitError` for a body over ``max_body`` (as encode_control);
        the names must be text (or None), the id an unsigned 64-bit integer."""
        key = (member, source, destination)
        parts = self._parts.get(key)
        if parts is None:
            if len(self._parts) >= self._keep:
                self._parts.clear()
            if type(member) is not str or not (source is None or type(source) is str) or not (destination is None or type(destination) is str):
                raise LocalProtocolError("an emit's member, source and destination are text")
            dumps = cbor2.dumps
            pairs = 5 + (source is not None) + (destination is not None)
            try:
                middle = dumps("quiet") + dumps(True)
                if source is not None:
                    middle += dumps("source") + dumps(source)
                if destination is not None:
                    middle += dumps("destination") + dumps(destination)
                parts = (cbor_head(5, pairs) + dumps("member") + dumps(member) + dumps("payload"), middle + dumps("op") + dumps("emit") + dumps("id"))
            except Exception as exc:  # (text that is no UTF-8: a lone surrogate, as encode_control says)
                raise LocalProtocolError(f"control message cannot be encoded as CBOR: {exc}") from exc
            self._parts[key] = parts
        return _request_frame(parts, payload, request_id, max_body)


class CallFrames:
    """CONTROL frames of RPC calls of one byte-string argument -- ``{"method", "args":
    [argument], "op": "call", "id"}`` in that order, as ``RpcConnection.call`` builds them --:
    the very bytes :func:`encode_control` makes of that message, without encoding all of it
    per call.  The bytes around the argument and the id are encoded once per method and kept,
    for at most ``keep`` methods at once (all are dropped when that many are kept).  A
    service's channel knows such calls by the same bytes (see
    :meth:`FrameDecoder.whole_message_from`)."""

    __slots__ = ("_parts", "_keep")

    def __init__(self, keep: int = 256) -> None:
        self._parts: dict[str, tuple[bytes, bytes]] = {}
        self._keep = keep

    def encode(self, method: str, argument: bytes, request_id: int, max_body: int = DEFAULT_MAX_CONTROL) -> bytes:
        """The frame, or :class:`LimitError` for a body over ``max_body`` (as encode_control);
        the method must be text, the id an unsigned 64-bit integer."""
        parts = self._parts.get(method)
        if parts is None:
            if len(self._parts) >= self._keep:
                self._parts.clear()
            if type(method) is not str:
                raise LocalProtocolError("a method's name is text")
            dumps = cbor2.dumps
            try:
                parts = (cbor_head(5, 4) + dumps("method") + dumps(method) + dumps("args") + cbor_head(4, 1), dumps("op") + dumps("call") + dumps("id"))
            except Exception as exc:  # (text that is no UTF-8: a lone surrogate, as encode_control says)
                raise LocalProtocolError(f"control message cannot be encoded as CBOR: {exc}") from exc
            self._parts[method] = parts
        return _request_frame(parts, argument, request_id, max_body)


def _request_frame(parts: tuple[bytes, bytes], payload: bytes, request_id: int, max_body: int) -> bytes:
    """A request's CONTROL frame on channel 0: ``parts``' bytes around its byte string and
    its id (see EmitFrames and CallFrames), or :class:`LimitError` for a body over
    ``max_body``."""
    if not 0 <= request_id < 1 << 64:
        raise LocalProtocolError("a request id is an unsigned 64-bit integer")
    head, tail = parts
    n = len(payload)
    payload_head = _BYTES_HEADS[n] if n < 256 else cbor_head(2, n)
    id_item = cbor_head(0, request_id)
    size = len(head) + len(payload_head) + n + len(tail) + len(id_item)
    if size > max_body:
        raise LimitError(f"a frame body of {size} bytes is over the {max_body}-byte maximum")
    return b"".join((_pack_header(_CONTROL, 0, 0, size), head, payload_head, payload, tail, id_item))


def encode_frame(frame: Frame, max_body: int = DEFAULT_MAX_FRAME, max_control: int = DEFAULT_MAX_CONTROL) -> bytes:
    """Encode any frame."""
    if isinstance(frame, DataFrame):
        return encode_data(frame.channel, frame.data, max_body)
    return encode_control(frame.channel, frame.message, min(max_control, max_body))


# -- decoding ------------------------------------------------------------------------------


class FrameDecoder:
    """Cuts a byte stream into frames; refuses oversized or malformed ones.

    Feed bytes with :meth:`receive_data`, take frames with :meth:`next_frame` until it
    returns ``None``.  After an error the decoder is finished: the connection is no longer
    in sync and must be closed.
    """

    def __init__(
        self,
        max_body: int = DEFAULT_MAX_FRAME,
        max_control: int = DEFAULT_MAX_CONTROL,
        max_items: int | None = None,
        *,
        trusted: bool = False,
        channel_items: int | None = None,
    ) -> None:
        if max_body < 1 or max_control < 1:
            raise ValueError("frame size limits must be positive")
        self.max_body = max_body
        self.max_control = min(max_control, max_body)
        self.max_items = max_items
        #: The item budget of a CONTROL body on a channel other than 0 (``max_items`` unless
        #: given): the broker's is CHANNEL_CONTROL_ITEMS, so that a body of thousands of items
        #: sent on a channel, which only ever carries tiny messages, is refused after a few.
        self.channel_items = max_items if channel_items is None else channel_items
        #: CONTROL bodies come from a party that checked them already (a client's broker):
        #: decoded without the profile check (cbor2 still refuses malformed CBOR).
        self.trusted = trusted
        # (the shapes of the broker's events, trusted, or of requests with a byte-string payload,
        # checked, that runs here know, and the credit for learning more; see _SHAPES)
        self._shapes: list[Any] = _NO_SHAPES
        self._shape_credit = _CREDIT_CAP
        # (the shapes of RPC calls whole_message_from knows, checked: see _request_shape)
        self._call_shapes: list[Any] = _NO_SHAPES
        #: A DATA frame whose body lies within one read comes out as a ``memoryview`` of that
        #: read instead of a copy.  For an owner that copies what it keeps (a view keeps the
        #: whole read alive) and hands the rest on at once: a relay, a bus connection's reader.
        self.data_views = False
        #: A DATA frame on a channel other than 0 whose body is not wholly here yet comes out
        #: in pieces as its bytes arrive -- each a DataFrame of what this read brought, the
        #: last one completing it -- instead of being held and joined once whole.  For an
        #: owner to whom a channel's DATA frames are a byte stream (a bus connection's
        #: reader): a relayed frame that straddles two reads costs no join.  Headers, CONTROL
        #: frames and channel 0 are cut as ever.
        self.partial_data = False
        # Bytes arrive in chunks.  A chunk is kept as it came and frames are cut straight out
        # of it (one copy, none for a frame that is the whole chunk).  What is left unread
        # when more arrives goes into ``_parts`` (with what arrives after it, as it came), and
        # a frame is then taken from there with one join: a frame that straddles reads is
        # copied once, whatever its size.  At most one of ``_chunk`` and ``_parts`` holds bytes.
        # (``_parts`` is made when a frame first straddles reads, and dropped once empty: an
        # idle connection holds none.)
        self._parts: collections.deque[bytes | memoryview] | None = None
        self._parts_size = 0
        self._chunk: bytes = b""
        self._pos = 0
        self._header: tuple[int, int, int] | None = None  # (kind, channel, length)
        # DATA bodies go into ``_sink`` from ``_sink_pos`` on, when its owner gave one (see
        # fill_data_into); ``_filling``: bytes of the current frame's body in it (-1: the
        # current frame does not go there); ``_sink_stop``: none after the current frame.
        self._sink: memoryview | None = None
        self._sink_pos = 0
        self._filling = -1
        self._sink_stop = False
        # Why it failed, as text: keeping the error itself would keep, through its traceback,
        # the frames that raised it, which keep this decoder (a reference cycle).
        self._error: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that are not yet part of a returned frame."""
        return self._parts_size + len(self._chunk) - self._pos

    def fill_data_into(self, buffer: bytearray | mmap.mmap | None) -> None:
        """Put the bodies of the DATA frames that come from now on into ``buffer``, one after
        the other, instead of making a ``bytes`` of each: they come out as DataFrames
        with empty ``data`` and their size in ``filled``.  For a consumer that joins the
        bodies of several frames anyway (a large RPC message): each byte is then copied once,
        or not at all where the reader reads into :meth:`fill_room`.  A frame that does not fit
        in what is left of ``buffer`` comes out as usual (for its consumer to refuse), and the
        buffer is let go once full.  ``None``: no more (after the frame being filled, if any)."""
        self._check()
        if buffer is None:
            if self._filling >= 0:
                self._sink_stop = True
            else:
                self._sink = None
            return
        if self._filling >= 0:
            raise LocalProtocolError("a frame is still being put into the previous buffer")
        self._sink = memoryview(buffer)
        self._sink_pos = 0
        self._sink_stop = False

    def fill_room(self) -> memoryview | None:
        """Where the rest of the DATA frame being filled goes (see :meth:`fill_data_into`), for
        a reader that reads straight into it (then :meth:`filled`); ``None`` when no frame is
        being filled.  (While one is, the decoder buffers nothing.)"""
        if self._filling < 0:
            return None
        assert self._sink is not None and self._header is not None
        return self._sink[self._sink_pos + self._filling : self._sink_pos + self._header[2]]

    def filled(self, n: int) -> None:
        """``n`` bytes were read into :meth:`fill_room`."""
        room = self.fill_room()
        if room is None or not 0 <= n <= len(room):
            raise LocalProtocolError(f"{n} bytes cannot have been read into the room of the frame being filled")
        self._filling += n

    def fill_with(self, data: bytes | bytearray | memoryview) -> bool:
        """The quick way for the middle of a DATA frame being filled (see
        :meth:`fill_data_into`): when ``data`` all goes into that frame's room and does not
        complete it, it is put there (its one copy) and True is returned: nothing else is due,
        :meth:`next_frame` would return ``None``.  Else False, having changed nothing: feed
        ``data`` the usual way (:meth:`receive_data`, :meth:`next_frame`), which also does
        what completing the frame does.  For a reader that gets a large message's body in
        pieces of another framing (a relayed RPC body in the bus connection's DATA frames)."""
        filling = self._filling
        if filling < 0:
            return False
        # (Bytes wait behind a frame being filled only once its room is full -- receive_data
        # fills first -- and then the size test below declines: nothing is ever put past
        # bytes that wait.)
        header, sink = self._header, self._sink
        assert header is not None and sink is not None
        n = len(data)
        if not n or filling + n >= header[2]:
            return False
        start = self._sink_pos + filling
        sink[start : start + n] = data
        self._filling = filling + n
        return True

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        if not data:
            return
        if self._filling >= 0 and not self.buffered:
            room = self.fill_room()  # (the body being filled takes these bytes first: no copy but into it)
            assert room is not None
            taken = min(len(room), len(data))
            room[:taken] = data if taken == len(data) else memoryview(data)[:taken]
            self._filling += taken
            if taken == len(data):
                return
            data = memoryview(data)[taken:]
        if self._pos < len(self._chunk):
            self._spill()
        if self._parts:
            self._parts.append(data if type(data) is bytes else bytes(data))
            self._parts_size += len(data)
        else:
            self._chunk = data if type(data) is bytes else bytes(data)
            self._pos = 0

    def _spill(self) -> None:
        chunk, pos = self._chunk, self._pos
        rest = len(chunk) - pos
        if self._parts is None:
            self._parts = collections.deque()
        # A view keeps the whole chunk alive: worth it only for most of one (no copy of a big
        # remainder); a small remainder is copied, so a spent chunk is not held for it.
        self._parts.append(memoryview(chunk)[pos:] if pos == 0 or rest * 2 >= len(chunk) else chunk[pos:])
        self._parts_size += rest
        self._chunk = b""
        self._pos = 0

    def _take(self, n: int) -> bytes:
        """The next ``n`` bytes of ``_parts`` (which holds at least that many), joined once."""
        parts = self._parts
        assert parts is not None
        self._parts_size -= n
        first = parts[0]
        if len(first) == n and type(first) is bytes:
            parts.popleft()
            if not parts:
                self._parts = None
            return first
        taken: list[bytes | memoryview] = []
        while n:
            part = parts[0]
            if len(part) <= n:
                taken.append(parts.popleft())
                n -= len(part)
            else:
                view = part if type(part) is memoryview else memoryview(part)
                taken.append(view[:n])
                parts[0] = view[n:]
                n = 0
        if not parts:
            self._parts = None
        return b"".join(taken)

    def _read_header(self, source: bytes | bytearray, pos: int) -> tuple[int, int, int]:
        kind, flags, channel, length = _unpack_header(source, pos)
        if kind != _CONTROL and kind != _DATA:
            raise self._fail(FrameError(f"unknown frame kind {kind}"))
        if flags:
            raise self._fail(FrameError(f"unknown frame flags 0x{flags:02x}"))
        limit = self.max_control if kind == _CONTROL else self.max_body
        if length > limit:
            what = "control frame" if kind == _CONTROL else "frame"
            raise self._fail(FrameTooLarge(f"a {what} announces {length} bytes, over the {limit}-byte maximum"))
        return kind, channel, length

    def next_frame_from(self, data: bytes | bytearray | memoryview) -> Frame | None:
        """:meth:`receive_data` then :meth:`next_frame`, with less work in the common case
        of bytes that come while nothing is buffered (a relayed message, a burst of events)."""
        if self._header is None and not self._chunk and not self._parts and self._error is None and data:
            # What receive_data does in this case, in one step (no frame is being filled
            # while no header is pending; a view, such as a relayed channel's bytes, is
            # copied as receive_data copies it); next_frame then cuts (a whole CONTROL frame
            # its quick way) and reads any other header as ever.
            self._chunk, self._pos = data if type(data) is bytes else bytes(data), 0
            return self.next_frame()
        self.receive_data(data)
        return self.next_frame()

    def lone_data(self, data: bytes) -> int:
        """The channel of the DATA frame ``data`` is, when it is exactly one whole DATA frame
        (no flags, a body of 1 to ``max_body`` bytes) and nothing is buffered; else -1, having
        changed nothing (feed ``data`` to :meth:`next_frame_from` then).  Its body is
        ``data[HEADER_SIZE:]``, as :meth:`next_frame` would have cut it.  For a reader that
        passes such a frame on at once (busd's relay of a frame that came alone in its read)
        without the frame object and the decoder's state a frame goes through."""
        size = len(data)
        # (The kind first: most reads that are not such a frame, a burst of events or a
        # reply, are told by their first byte.)
        if size <= HEADER_SIZE or data[0] != _DATA or self._header is not None or self._chunk or self._parts or self._error is not None or self._sink is not None:
            return -1
        channel: int  # (as the header says: an unsigned 32-bit number)
        _kind, flags, channel, length = _unpack_header(data, 0)
        if flags or length + HEADER_SIZE != size or length > self.max_body:
            return -1
        return channel

    def whole_message_from(self, data: bytes | bytearray | memoryview) -> dict[Any, Any] | None:
        """The message of ``data`` when it is exactly one whole CONTROL frame on channel 0 and
        nothing is buffered (a relayed RPC message: one DATA frame of the bus connection
        holding one frame of the channel), checked and decoded as :meth:`next_frame` would
        take it from :meth:`next_frame_from` -- without buffering the bytes or building a
        frame.  Else ``None``, having changed nothing: feed ``data`` to
        :meth:`next_frame_from` then.  A body that fails its check fails the decoder, as
        there."""
        size = len(data)
        if size < HEADER_SIZE or self._header is not None or self._chunk or self._parts or self._error is not None:
            return None
        kind, flags, channel, length = _unpack_header(data, 0)
        if kind != _CONTROL or flags or channel or length > self.max_control or HEADER_SIZE + length != size:
            return None
        body = bytes(data[HEADER_SIZE:])  # (one copy: a view of a read is not kept)
        if self.trusted:
            try:
                message = cbor2.loads(body)
            except Exception as exc:  # (as next_frame)
                raise self._fail(FrameError(f"control body does not decode: {exc}")) from exc
            if type(message) is not dict:
                raise self._fail(FrameError("control body is not a CBOR map"))
            return message
        # A reply of a byte string or an unsigned integer, or an RPC call shaped as one this
        # decoder checked before (the same bytes around its one byte-string argument and its
        # id; see _request_shape): cbor2's own encoding of plain values, taken without
        # decoding and checking it all again.
        if body.startswith(_REPLY_HEAD) and (self.max_items is None or self.max_items >= 5):
            message = _plain_reply(body)
            if message is not None:
                return message
        shapes = self._call_shapes
        for i, shape in enumerate(shapes):
            message = _shaped_request(body, 0, len(body), shape, "args")
            if message is not None:
                if i:
                    shapes[0], shapes[i] = shape, shapes[0]
                if self._shape_credit < _CREDIT_CAP:
                    self._shape_credit += 1
                return message
        try:
            message = decode_control_body(body, self.max_items)
        except FrameError as exc:
            raise self._fail(exc) from exc.__cause__
        if self._shape_credit >= _LEARN_COST and type(message.get("id")) is int:
            args = message.get("args")
            if type(args) is list and len(args) == 1 and type(args[0]) is bytes:
                # (Paid for whether or not a shape comes of it: calls that never make one --
                # another value not plain, say -- stop costing an attempt each after two.)
                self._shape_credit -= _LEARN_COST
                call_shape = _request_shape(message, body, "args")
                if call_shape is not None:
                    self._call_shapes = _with_shape(shapes, call_shape)
        return message

    def next_frame(self) -> Frame | None:
        """The next complete frame, or ``None`` if more bytes are needed."""
        # The hot case first, in one step: a whole CONTROL frame in the chunk at hand, its
        # header read with plain ints (an IntEnum member costs a Python-level comparison).
        # It is checked exactly as _read_header checks it: any other header -- another kind,
        # flags, a body over the limit -- or one not wholly here goes the general way below,
        # which refuses it or waits for the rest.  The body is checked (or, trusted, only
        # decoded) as ever.
        if self._header is None and not self._parts and self._error is None:
            chunk, pos = self._chunk, self._pos
            start = pos + HEADER_SIZE
            if len(chunk) >= start:
                kind, flags, channel, length = _unpack_header(chunk, pos)
                end = start + length
                if kind == _DATA and not flags and length <= self.max_body and end <= len(chunk) and self._sink is None:
                    # The same for a whole DATA frame (a relayed message) when no body's
                    # buffer takes DATA frames: a copy, or a view of the read it lies in.
                    if end == len(chunk):
                        self._chunk, self._pos = b"", 0
                    else:
                        self._pos = end
                    return DataFrame(channel, memoryview(chunk)[start:end] if self.data_views else chunk[start:end])
                if kind == _CONTROL and not flags and length <= self.max_control and end <= len(chunk):
                    if end == len(chunk):
                        self._chunk, self._pos = b"", 0
                    else:
                        self._pos = end
                    body = chunk[start:end]
                    if self.trusted:
                        try:
                            message = cbor2.loads(body)
                        except Exception as exc:  # (as decode_trusted_body: cbor2 raises several types)
                            raise self._fail(FrameError(f"control body does not decode: {exc}")) from exc
                        if type(message) is not dict:
                            raise self._fail(FrameError("control body is not a CBOR map"))
                        return ControlFrame(channel, message)
                    try:
                        return ControlFrame(channel, decode_control_body(body, self.channel_items if channel else self.max_items))
                    except FrameError as exc:
                        raise self._fail(exc) from exc.__cause__
            elif pos == len(chunk):
                return None  # (everything read was cut: the common end of a burst)
        return self._next_frame()

    def take_control_messages(
        self, data: bytes | bytearray | memoryview | None = None, max_bytes: int | None = None
    ) -> list[dict[Any, Any]]:
        """The messages of the whole CONTROL frames on channel 0 that come next in the chunk
        at hand, in order, decoded as :meth:`next_frame` decodes them (checked, or only
        decoded when :attr:`trusted`); an empty list if the next frame is not one (a new
        list each call: the caller may keep or change it).  ``data``: bytes just read, fed
        first (:meth:`receive_data`, in one step when nothing is buffered, as
        :meth:`next_frame_from` feeds them).

        ``max_bytes``: no frame is taken once the frames taken hold that many bytes (so at
        most one frame more than that): checking and decoding cost CPU per byte and per
        item, and a caller that shares its time in slices (busd's reader) takes a read of
        256 KiB a part at a time, not all of it in one call between two of its checks.

        For a reader taking a burst (a subscriber's events): one call and one loop for the
        run, where :meth:`next_frame` is a call and a :class:`ControlFrame` per frame.  It
        stops before the first frame that is anything else -- another channel or kind, bad
        flags, a body over the limit, not wholly here, or a body that does not decode or
        check -- and leaves it, and everything after it, to :meth:`next_frame`, which returns
        it or refuses it exactly as it would have.  Only CONTROL frames are taken, so a
        handler of one may still change how the DATA frames after it are taken
        (:meth:`fill_data_into`) before they are cut."""
        if data is not None:
            if self._header is None and not self._chunk and not self._parts and self._error is None and data:
                self._chunk, self._pos = data if type(data) is bytes else bytes(data), 0
            else:
                self.receive_data(data)
        if self._header is not None or self._parts or self._error is not None:
            return []
        chunk, pos = self._chunk, self._pos
        size = len(chunk)
        messages: list[dict[Any, Any]] = []
        message: dict[Any, Any] | None
        append, unpack, limit = messages.append, _unpack_run_header, self.max_control
        start = pos + HEADER_SIZE  # (of the next frame's body)
        # A frame is looked at while its header is wholly here and it begins before
        # ``max_bytes`` were taken: while ``start <= size and pos < pos0 + max_bytes``, which
        # is one test, ``start <= bound``.
        bound = size if max_bytes is None else min(size, pos + max_bytes + HEADER_SIZE - 1)
        # (One loop for each way of decoding: no test of it per frame.  A header is read as
        # kind and flags in one number, channel, length: a CONTROL frame without flags on
        # channel 0 has _CONTROL_PLAIN and 0 there.)
        if self.trusted:
            loads = cbor2.loads
            # The broker's events of the kinds decoded here by cbor2 (see _event_shape and
            # _SHAPES): one whose body is a known kind's bytes around exactly one byte string
            # (the payload) is made without cbor2.  The bytes around it are plain CBOR (no tags)
            # that we wrote ourselves, so cbor2 would make the very same map of such a body.
            # The first kind is tested here, the others by _event_from_shape.
            shapes, credit = self._shapes, self._shape_credit
            head, tail, names = shapes[0] if shapes else (b"", b"", ("", "", "", ""))
            head_size, tail_size = len(head), len(tail)
            while start <= bound:
                kind_flags, channel, length = unpack(chunk, pos)
                end = start + length
                if kind_flags != _CONTROL_PLAIN or channel or length > limit or end > size:
                    break
                middle, after = start + head_size, end - tail_size
                if (
                    middle < after
                    and head_size
                    and chunk.startswith(head, start)
                    and chunk.endswith(tail, start, end)
                    and (payload := _bytes_item(chunk, middle, after)) is not None
                ):
                    source, member, sender, identity = names
                    message = {"source": source, "member": member, "payload": payload, "sender": sender, "identity": identity, "event": "event"}
                    if credit < _CREDIT_CAP:
                        credit += 1
                else:
                    message = None
                    for i in range(1, len(shapes)):
                        message = _event_from_shape(chunk, start, end, shapes[i])
                        if message is not None:
                            shapes[0], shapes[i] = shapes[i], shapes[0]
                            break
                    if message is None:
                        try:
                            message = loads(chunk[start:end])
                        except Exception:  # (left for next_frame, which says why)
                            break
                        if type(message) is not dict:
                            break
                        if len(message) == 6 and credit >= _LEARN_COST and (event_shape := _event_shape(message)) is not None:
                            credit -= _LEARN_COST
                            shapes = self._learn_shape(event_shape)
                    elif credit < _CREDIT_CAP:
                        credit += 1
                    if shapes:
                        head, tail, names = shapes[0]
                        head_size, tail_size = len(head), len(tail)
                append(message)
                pos, start = end, end + HEADER_SIZE
            self._shape_credit = credit
        else:
            max_items = self.max_items
            # Requests with a byte-string payload, shaped as one such this decoder checked (see
            # _request_shape and _SHAPES): one that is those bytes around a payload and an id
            # in their shortest forms is cbor2's own encoding of plain values, and is taken
            # without decoding it all again.
            shapes, credit = self._shapes, self._shape_credit
            while start <= bound:
                kind_flags, channel, length = unpack(chunk, pos)
                end = start + length
                if kind_flags != _CONTROL_PLAIN or channel or length > limit or end > size:
                    break
                message = None
                for i, shape in enumerate(shapes):
                    message = _shaped_request(chunk, start, end, shape)
                    if message is not None:
                        if i:
                            shapes[0], shapes[i] = shape, shapes[0]
                        if credit < _CREDIT_CAP:
                            credit += 1
                        break
                if message is None:
                    body = chunk[start:end]
                    try:
                        message = decode_control_body(body, max_items)
                    except FrameError:
                        break
                    if credit >= _LEARN_COST and type(message.get("payload")) is bytes:
                        request_shape = _request_shape(message, body)
                        if request_shape is not None:
                            credit -= _LEARN_COST
                            shapes = self._learn_shape(request_shape)
                append(message)
                pos, start = end, end + HEADER_SIZE
            self._shape_credit = credit
        if pos == size:
            self._chunk, self._pos = b"", 0
        else:
            self._pos = pos
        return messages

    def _learn_shape(self, shape: Any) -> list[Any]:
        """Put ``shape`` first among the shapes this decoder knows (at most _SHAPES: the last
        goes); returns them.  (The caller pays the credit.)"""
        shapes = self._shapes = _with_shape(self._shapes, shape)
        return shapes

    def _next_frame(self) -> Frame | None:
        """:meth:`next_frame`, any case."""
        self._check()
        if self._parts:
            if self._header is None:
                if self._parts_size < HEADER_SIZE:
                    return None
                self._header = self._read_header(self._take(HEADER_SIZE), 0)
            kind, channel, length = self._header
            if self._sink is not None and kind == _DATA and self._fits_sink(length):
                return self._fill(channel, length)
            if self.partial_data and kind == _DATA and channel and length:
                return self._data_piece(channel, length)
            if self._parts_size < length:
                return None
            body = self._take(length) if length else b""
        else:
            chunk, pos = self._chunk, self._pos
            if self._header is None:
                if len(chunk) - pos < HEADER_SIZE:
                    if pos < len(chunk):
                        self._spill()
                    return None
                self._header = self._read_header(chunk, pos)
                pos = self._pos = pos + HEADER_SIZE
            kind, channel, length = self._header
            if self._sink is not None and kind == _DATA and self._fits_sink(length):
                return self._fill(channel, length)
            if len(chunk) - pos < length:
                if self.partial_data and kind == _DATA and channel:
                    return self._data_piece(channel, length)
                if pos < len(chunk):
                    self._spill()
                return None
            if pos == 0 and length == len(chunk):
                body = chunk
            elif kind == FrameKind.DATA and self.data_views:
                # (No copy: the frame is a view of the read it lies in.)
                self._pos = pos + length
                if self._pos == len(chunk):
                    self._chunk, self._pos = b"", 0
                self._header = None
                return DataFrame(channel, memoryview(chunk)[pos : pos + length])
            else:
                body = chunk[pos : pos + length]
            self._pos = pos + length
            if self._pos == len(chunk):
                self._chunk, self._pos = b"", 0
        self._header = None
        if kind == _DATA:
            return DataFrame(channel, body)
        try:
            if self.trusted:
                return ControlFrame(channel, decode_trusted_body(body))
            return ControlFrame(channel, decode_control_body(body, self.channel_items if channel else self.max_items))
        except FrameError as exc:
            raise self._fail(exc) from exc.__cause__

    def _data_piece(self, channel: int, length: int) -> DataFrame | None:
        """:attr:`partial_data`: the next piece of the current DATA frame (``length`` bytes of
        its body still due), as much of it as is buffered, at most ``length``; ``None`` if
        none is.  The frame's header stays current for the rest, if any."""
        parts = self._parts
        if parts:
            # (Bytes left over from a read before the header was whole: one piece at a time.)
            part = parts[0]
            n = min(len(part), length)
            if n == len(part):
                parts.popleft()
                if not parts:
                    self._parts = None
                piece: bytes | memoryview = part if type(part) is bytes or self.data_views else bytes(part)
            else:
                view = part if type(part) is memoryview else memoryview(part)
                parts[0] = view[n:]
                piece = view[:n] if self.data_views else bytes(view[:n])
            self._parts_size -= n
        else:
            chunk, pos = self._chunk, self._pos
            n = min(len(chunk) - pos, length)
            if not n:
                return None
            if pos == 0 and n == len(chunk):
                piece = chunk
            else:
                piece = memoryview(chunk)[pos : pos + n] if self.data_views else chunk[pos : pos + n]
            self._pos = pos + n
            if self._pos == len(chunk):
                self._chunk, self._pos = b"", 0
        self._header = (_DATA, channel, length - n) if n < length else None
        return DataFrame(channel, piece)

    def _fits_sink(self, length: int) -> bool:
        """Whether the DATA frame whose header was just read goes into the sink."""
        assert self._sink is not None
        if self._filling >= 0:
            return True
        return not self._sink_stop and length <= len(self._sink) - self._sink_pos

    def _fill(self, channel: int, length: int) -> DataFrame | None:
        """Move what is buffered of the current DATA frame's body into the sink; the frame,
        once all of it is there."""
        sink = self._sink
        assert sink is not None
        if self._filling < 0:
            self._filling = 0
        start = self._sink_pos + self._filling
        if self._filling < length:
            self._filling += self._move_into(sink[start : self._sink_pos + length])
            if self._filling < length:
                return None
        self._header = None
        self._filling = -1
        self._sink_pos += length
        if self._sink_stop or self._sink_pos == len(sink):
            self._sink = None
            self._sink_stop = False
        return DataFrame(channel, b"", length)

    def _move_into(self, room: memoryview) -> int:
        """Move up to ``len(room)`` buffered bytes into ``room``; how many were moved."""
        want = len(room)
        moved = 0
        parts = self._parts
        if parts:
            while moved < want and parts:
                part = parts[0]
                view = part if type(part) is memoryview else memoryview(part)
                n = min(len(view), want - moved)
                room[moved : moved + n] = view[:n]
                moved += n
                if n == len(view):
                    parts.popleft()
                else:
                    parts[0] = view[n:]
            self._parts_size -= moved
            if not parts:
                self._parts = None
            return moved
        chunk, pos = self._chunk, self._pos
        n = min(len(chunk) - pos, want)
        if n:
            room[:n] = memoryview(chunk)[pos : pos + n]
            if pos + n == len(chunk):
                self._chunk, self._pos = b"", 0
            else:
                self._pos = pos + n
        return n

    def __iter__(self) -> FrameDecoder:
        return self

    def __next__(self) -> Frame:
        frame = self.next_frame()
        if frame is None:
            raise StopIteration
        return frame

    def end_of_input(self) -> None:
        """The stream ended: an error if it ended inside a frame."""
        self._check()
        if self.buffered or self._header is not None:
            raise self._fail(FrameError("the stream ended inside a frame"))

    def _check(self) -> None:
        if self._error is not None:
            raise LocalProtocolError(f"frame decoder already failed: {self._error}")

    def _fail(self, error: FrameError) -> FrameError:
        self._error = str(error)
        self._parts = None
        self._parts_size = 0
        self._chunk, self._pos = b"", 0
        self._sink, self._filling = None, -1
        return error
