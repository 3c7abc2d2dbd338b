"""Control-plane messages: the shapes carried in CONTROL frames (sans-io).

Three shapes, told apart by their keys (see docs/protocol.md, section 5):

* request ``{"op": str, "id": int, ...arguments}`` -- either side may send one; ids are
  chosen by the sender, unique among its requests still waiting for a reply;
* reply ``{"re": id, "result": value}`` or ``{"re": id, "error": {"code": str, "message": str}}``
  -- exactly one per request (but a quiet ``emit``, answered only if refused, by an event);
* event ``{"event": str, ...fields}`` -- pushed, never answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest, FrameError, RequestError

__all__ = [
    "Request",
    "Reply",
    "ErrorReply",
    "Event",
    "Message",
    "parse_message",
    "MAX_REQUEST_ID",
    "MAX_ERROR_MESSAGE",
]

MAX_REQUEST_ID = 2**53  # stays exact in every language's numbers
#: An error reply's message is cut to this many characters, whatever it quotes, so every
#: error reply fits a control frame by construction.
MAX_ERROR_MESSAGE = 1024


# (Slotted, not frozen: built for every message; see the note on the frames.)
@dataclass(slots=True)
class Request:
    op: str
    id: int
    args: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {**self.args, "op": self.op, "id": self.id}

    def arg(self, name: str, kind: type | tuple[type, ...], default: Any = ..., *, optional: bool = False) -> Any:
        """A typed argument; a missing or mistyped one raises :class:`BadRequest`."""
        if name not in self.args or (optional and self.args[name] is None):
            if default is not ...:
                return default
            raise BadRequest(f"{self.op}: missing argument {name!r}")
        value = self.args[name]
        if isinstance(value, bool) and kind in (int, float):
            raise BadRequest(f"{self.op}: argument {name!r} must be {kind.__name__}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise BadRequest(f"{self.op}: argument {name!r} must be {names}, not {type(value).__name__}")
        return value


@dataclass(slots=True)
class Reply:
    re: int
    result: Any

    def to_wire(self) -> dict[str, Any]:
        return {"re": self.re, "result": self.result}


@dataclass(slots=True)
class ErrorReply:
    re: int
    code: str
    message: str

    @classmethod
    def from_error(cls, re: int, error: RequestError) -> ErrorReply:
        message = error.message
        if len(message) > MAX_ERROR_MESSAGE:
            message = message[: MAX_ERROR_MESSAGE - 1] + "\u2026"
        return cls(re, error.code[:255], message)

    def to_wire(self) -> dict[str, Any]:
        return {"re": self.re, "error": {"code": self.code, "message": self.message}}


@dataclass(slots=True)
class Event:
    event: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {**self.fields, "event": self.event}


Message = Request | Reply | ErrorReply | Event


class MalformedRequest(FrameError):
    """A message that looks like a request but is not well formed; ``id`` allows a reply."""

    def __init__(self, message: str, request_id: int | None) -> None:
        super().__init__(message)
        self.request_id = request_id


_STR_ONLY = {str}


def _valid_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_REQUEST_ID


def parse_message(body: dict[Any, Any]) -> Message:
    """Classify a decoded CONTROL body.

    Raises :class:`MalformedRequest` (with the id, when there is a usable one, so the
    receiver can answer with an error and keep the connection) or :class:`FrameError`
    for something that is no message at all.
    """
    if "op" in body:
        request_id: Any = body.get("id")
        # (_valid_id's test, for the int every decoded id is, without a call; the rest asks it)
        if not (type(request_id) is int and 0 < request_id <= MAX_REQUEST_ID or _valid_id(request_id)):
            raise MalformedRequest("a request needs an integer 'id' between 1 and 2**53", None)
        op = body["op"]
        if type(op) is not str and not isinstance(op, str) or not op:
            raise MalformedRequest("a request's 'op' must be a non-empty string", request_id)
        args = body.copy()
        del args["op"], args["id"]
        if args and not set(map(type, args)) <= _STR_ONLY:
            raise MalformedRequest("request arguments must have string names", request_id)
        return Request(op, request_id, args)
    if "re" in body:
        if not _valid_id(body["re"]):
            raise FrameError("a reply's 're' must be an integer between 1 and 2**53")
        if "error" in body:
            err = body["error"]
            if not (isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str)):
                raise FrameError("an error reply needs error.code and error.message strings")
            return ErrorReply(body["re"], err["code"], err["message"])
        if "result" not in body:
            raise FrameError("a reply needs 'result' or 'error'")
        return Reply(body["re"], body["result"])
    if "event" in body:
        if not isinstance(body["event"], str):
            raise FrameError("an event's name must be a string")
        fields = body.copy()
        del fields["event"]
        return Event(body["event"], fields)
    raise FrameError("a control message needs 'op', 're' or 'event'")
