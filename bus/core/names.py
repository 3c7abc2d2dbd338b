"""Well-known names and who owns them, with D-Bus semantics (sans-io).

Theory of operation
-------------------
A well-known name (``org.example.Echo``) has at most one *primary owner* and a queue of
connections waiting for it.  :class:`NameRegistry` applies the rules of the D-Bus
``RequestName`` / ``ReleaseName`` calls and returns, with every result, the list of
:class:`OwnerChanged` events the change caused, in order; the broker turns those into
notifications.  Nothing here does I/O or knows about sockets; connections are plain ids.

``request_name(conn, name, flags)``:

==================================================  ==========================================
situation                                           result
==================================================  ==========================================
nobody owns the name                                PRIMARY_OWNER
``conn`` already owns it                            ALREADY_OWNER (its flags are updated)
owner allows replacement, ``conn`` asks to replace  PRIMARY_OWNER; the old owner goes to the
                                                    head of the queue, or loses the name if it
                                                    asked not to be queued
otherwise, ``conn`` asked not to be queued          EXISTS (and it leaves the queue if it was in it)
otherwise                                           IN_QUEUE (appended, or flags updated in place)
==================================================  ==========================================

``release_name`` gives RELEASED (the next in line, if any, becomes owner), NOT_OWNER or
NON_EXISTENT.  ``remove_connection`` releases everything a connection owned or waited for,
exactly once, and reports the hand-overs.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from ..errors import InvalidName, QuotaExceeded

__all__ = [
    "MAX_NAME_LENGTH",
    "NameFlag",
    "RequestResult",
    "ReleaseResult",
    "OwnerChanged",
    "InvalidName",
    "NameRegistry",
    "validate_name",
]

MAX_NAME_LENGTH = 255
_ELEMENT = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*\Z")
#: A whole valid name (length aside) in one match: the usual case, checked without a split.
_NAME = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*(?:\.[A-Za-z_-][A-Za-z0-9_-]*)+\Z")


def validate_name(name: str) -> str:
    """Check a well-known name: two or more dot-separated elements of ``[A-Za-z0-9_-]``,
    none empty or starting with a digit, 255 characters at most.  Returns the name."""
    if type(name) is str and len(name) <= MAX_NAME_LENGTH and _NAME.match(name):
        return name  # (valid: one match; anything else is checked step by step, to say why not)
    if not isinstance(name, str):
        raise InvalidName("a well-known name is a string")
    if not name:
        raise InvalidName("a well-known name cannot be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"a well-known name is at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    elements = name.split(".")
    if len(elements) < 2:
        raise InvalidName(f"{name!r} needs at least two dot-separated elements (like org.example.Echo)")
    for element in elements:
        if not _ELEMENT.match(element):
            raise InvalidName(
                f"{name!r}: element {element!r} must be non-empty, use only letters, digits, '_' and '-', "
                "and not start with a digit"
            )
    return name


class NameFlag(enum.IntFlag):
    NONE = 0
    ALLOW_REPLACEMENT = 1
    REPLACE_EXISTING = 2
    DO_NOT_QUEUE = 4


class RequestResult(enum.Enum):
    PRIMARY_OWNER = "primary-owner"
    IN_QUEUE = "in-queue"
    EXISTS = "exists"
    ALREADY_OWNER = "already-owner"


class ReleaseResult(enum.Enum):
    RELEASED = "released"
    NON_EXISTENT = "non-existent"
    NOT_OWNER = "not-owner"


@dataclass(frozen=True, slots=True)
class OwnerChanged:
    """``name`` passed from ``old`` to ``new`` (either may be None: appeared / vanished)."""

    name: str
    old: int | None
    new: int | None


@dataclass(slots=True)
class _Entry:
    conn: int
    flags: NameFlag


@dataclass(slots=True)
class _Name:
    # entries[0] is the primary owner; the rest wait in order.
    entries: list[_Entry] = field(default_factory=list)

    def find(self, conn: int) -> int:
        for i, entry in enumerate(self.entries):
            if entry.conn == conn:
                return i
        return -1


class NameRegistry:
    """Owners and queues of every well-known name on one broker."""

    def __init__(self, *, max_names_per_connection: int = 64) -> None:
        self.max_names_per_connection = max_names_per_connection
        self._names: dict[str, _Name] = {}
        self._by_conn: dict[int, set[str]] = {}  # names a connection owns or waits for

    # -- queries ---------------------------------------------------------------------------

    def owner(self, name: str) -> int | None:
        entry = self._names.get(name)
        return entry.entries[0].conn if entry else None

    def queue(self, name: str) -> list[int]:
        """The waiting connections, in order (not including the owner)."""
        entry = self._names.get(name)
        return [e.conn for e in entry.entries[1:]] if entry else []

    def names(self) -> dict[str, int]:
        """Every owned name and its owner."""
        return {name: entry.entries[0].conn for name, entry in self._names.items()}

    def held_by(self, conn: int) -> set[str] | frozenset[str]:
        """Names ``conn`` owns or waits for."""
        return self._by_conn.get(conn, frozenset())

    def owned_by(self, conn: int) -> list[str]:
        return sorted(n for n in self._by_conn.get(conn, ()) if self.owner(n) == conn)

    def waiting_for(self, conn: int) -> list[str]:
        return sorted(n for n in self._by_conn.get(conn, ()) if self.owner(n) != conn)

    # -- changes ---------------------------------------------------------------------------

    def request_name(
        self, conn: int, name: str, flags: NameFlag = NameFlag.NONE, *, validated: bool = False
    ) -> tuple[RequestResult, list[OwnerChanged]]:
        """``validated``: the caller checked ``name`` with :func:`validate_name` already."""
        if not validated:
            validate_name(name)
        if type(flags) is not NameFlag:
            flags = NameFlag(flags)
        entry = self._names.get(name)
        if entry is None:
            self._charge(conn, name)
            self._names[name] = _Name([_Entry(conn, flags)])
            return RequestResult.PRIMARY_OWNER, [OwnerChanged(name, None, conn)]
        primary = entry.entries[0]
        if primary.conn == conn:
            primary.flags = flags
            return RequestResult.ALREADY_OWNER, []
        position = entry.find(conn)
        if NameFlag.REPLACE_EXISTING in flags and NameFlag.ALLOW_REPLACEMENT in primary.flags:
            if position < 0:
                self._charge(conn, name)
            else:
                del entry.entries[position]
            entry.entries.pop(0)
            if NameFlag.DO_NOT_QUEUE in primary.flags:
                self._uncharge(primary.conn, name)
                entry.entries.insert(0, _Entry(conn, flags))
            else:
                entry.entries[0:0] = [_Entry(conn, flags), primary]
            return RequestResult.PRIMARY_OWNER, [OwnerChanged(name, primary.conn, conn)]
        if NameFlag.DO_NOT_QUEUE in flags:
            if position > 0:
                del entry.entries[position]
                self._uncharge(conn, name)
            return RequestResult.EXISTS, []
        if position > 0:
            entry.entries[position].flags = flags
        else:
            self._charge(conn, name)
            entry.entries.append(_Entry(conn, flags))
        return RequestResult.IN_QUEUE, []

    def release_name(self, conn: int, name: str) -> tuple[ReleaseResult, list[OwnerChanged]]:
        validate_name(name)
        entry = self._names.get(name)
        if entry is None:
            return ReleaseResult.NON_EXISTENT, []
        position = entry.find(conn)
        if position < 0:
            return ReleaseResult.NOT_OWNER, []
        return ReleaseResult.RELEASED, self._drop(conn, name, entry, position)

    def remove_connection(self, conn: int) -> list[OwnerChanged]:
        """Forget a connection that left: every name it owned passes on; queues shrink."""
        events: list[OwnerChanged] = []
        for name in sorted(self._by_conn.get(conn, set())):
            entry = self._names[name]
            events += self._drop(conn, name, entry, entry.find(conn))
        self._by_conn.pop(conn, None)
        return events

    # -- internals -------------------------------------------------------------------------

    def _drop(self, conn: int, name: str, entry: _Name, position: int) -> list[OwnerChanged]:
        del entry.entries[position]
        self._uncharge(conn, name)
        if position != 0:
            return []
        if entry.entries:
            return [OwnerChanged(name, conn, entry.entries[0].conn)]
        del self._names[name]
        return [OwnerChanged(name, conn, None)]

    def _charge(self, conn: int, name: str) -> None:
        held = self._by_conn.setdefault(conn, set())
        if len(held) >= self.max_names_per_connection:
            raise QuotaExceeded(
                f"names_per_connection reached: connection :{conn} already owns or waits for {len(held)} names "
                f"(limit {self.max_names_per_connection})"
            )
        held.add(name)

    def _uncharge(self, conn: int, name: str) -> None:
        held = self._by_conn.get(conn)
        if held is not None:
            held.discard(name)
            if not held:
                del self._by_conn[conn]
