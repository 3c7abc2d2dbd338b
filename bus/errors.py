"""The one exception hierarchy of minibus.

Theory of operation
-------------------
Every error that minibus raises on purpose derives from :class:`BusError`.  The tree is
split by *who is at fault*, as in h11:

* :class:`LocalProtocolError` -- this side misused an API (sent after EOF, fed a finished
  state machine).  A bug in the caller, never caused by a peer.
* :class:`RemoteProtocolError` -- the peer sent bytes that break the protocol.  The
  connection that carried them is finished; nothing else is.
* :class:`HandshakeError` -- the secret handshake did not complete (bad keys, a refusal,
  a timeout, garbage).  Subclasses say which.
* :class:`LimitError` -- a configured limit was exceeded.
* :class:`KeyFileError` -- an identity file could not be used.
* :class:`SocketActivationError` -- what systemd passed (sockets, notification settings) cannot be used.

Byte streams reuse trio's errors (``BusyResourceError``, ``ClosedResourceError``,
``BrokenResourceError``), chaining the minibus error that caused them as ``__cause__``.

Classes whose instances cross the wire carry a ``wire_code``; :func:`error_from_wire` is
the single place that turns a code received from a peer back into an exception: always a
:class:`RequestError` (a typed one such as :class:`NameNotFound`, or :class:`RemoteError` for
unknown codes), so an error the peer *reports* is never mistaken for one this side *detected*.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "BusError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "FrameError",
    "FrameTooLarge",
    "BoxStreamError",
    "BoxStreamTruncated",
    "HandshakeError",
    "HandshakeTimeout",
    "HandshakeHangup",
    "IdentityRefused",
    "LimitError",
    "KeyFileError",
    "InsecureKeyFile",
    "SocketActivationError",
    "RequestError",
    "RemoteError",
    "UnknownOperation",
    "BadRequest",
    "AccessDenied",
    "NameNotFound",
    "InvalidName",
    "QuotaExceeded",
    "MessageTooLarge",
    "ChannelRejected",
    "ActivationFailed",
    "ConnectionLost",
    "error_from_wire",
]


class BusError(Exception):
    """Root of every error minibus raises on purpose."""

    #: Stable identifier used when this error is reported to a peer.
    wire_code: ClassVar[str] = "minibus.Error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ProtocolError(BusError):
    """Abstract: the protocol was violated, by this side or the peer."""

    wire_code = "minibus.Error.Protocol"


class LocalProtocolError(ProtocolError):
    """This side used an API in a way the protocol does not allow (a caller bug)."""

    wire_code = "minibus.Error.Protocol"


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""

    wire_code = "minibus.Error.Protocol"


class FrameError(RemoteProtocolError):
    """A frame (header or body) received from the peer is malformed."""

    wire_code = "minibus.Error.Frame"


class LimitError(BusError):
    """A configured limit was exceeded."""

    wire_code = "minibus.Error.Limit"


class FrameTooLarge(FrameError, LimitError):
    """A frame announced (or a caller tried to send) a body over the maximum frame size."""

    wire_code = "minibus.Error.FrameTooLarge"


class BoxStreamError(RemoteProtocolError):
    """A box-stream header or body failed to authenticate, or broke the framing rules."""

    wire_code = "minibus.Error.BoxStream"


class BoxStreamTruncated(BoxStreamError):
    """The transport ended before the box-stream goodbye: the stream was cut short."""

    wire_code = "minibus.Error.BoxStream"


class HandshakeError(BusError):
    """The shs1 secret handshake did not complete."""

    wire_code = "minibus.Error.Handshake"


class HandshakeTimeout(HandshakeError):
    """The peer did not finish the handshake before the deadline."""

    wire_code = "minibus.Error.Handshake"


class HandshakeHangup(HandshakeError):
    """The peer closed the transport before the handshake was done."""

    wire_code = "minibus.Error.Handshake"


class IdentityRefused(HandshakeError):
    """The server's authorization refused the client's (verified) identity after msg3."""

    wire_code = "minibus.Error.Denied"


class KeyFileError(BusError):
    """An identity key file is missing, corrupt or of the wrong kind."""


class InsecureKeyFile(KeyFileError):
    """An identity key file can be read by other users, so it is refused."""


class SocketActivationError(BusError):
    """The socket activation or notification environment (``LISTEN_*``, ``NOTIFY_SOCKET``,
    ``WATCHDOG_*``) or a descriptor it names cannot be used; the message says which."""


class RequestError(BusError):
    """A request was refused.  Raised by the side that refuses, it travels to the requester
    as an error reply (code and message) and is raised there as the same class."""

    wire_code = "minibus.Error.Failed"

    def __init__(self, message: str = "", code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.wire_code

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


class RemoteError(RequestError):
    """An error reply whose code this version does not know; ``code`` keeps it."""


class UnknownOperation(RequestError):
    """The peer does not implement the requested operation (the connection stays)."""

    wire_code = "minibus.Error.UnknownOperation"


class BadRequest(RequestError):
    """A request's arguments are missing or of the wrong type."""

    wire_code = "minibus.Error.BadRequest"


class AccessDenied(RequestError):
    """Policy refused the request; the message names the rule."""

    wire_code = "minibus.Error.AccessDenied"


class NameNotFound(RequestError):
    """No connection owns that name (or it is not visible to the caller)."""

    wire_code = "minibus.Error.NameNotFound"


class InvalidName(RequestError):
    """A well-known name does not follow the reverse-DNS grammar."""

    wire_code = "minibus.Error.InvalidName"


class ChannelRejected(RequestError):
    """The target of a channel refused it (with its reason) or did not answer in time."""

    wire_code = "minibus.Error.ChannelRejected"


class ActivationFailed(RequestError):
    """busd could not start the plugin of an activatable name, or the plugin did not take its
    name in time; the message says why (the exit status, the last lines of its stderr)."""

    wire_code = "minibus.Error.ActivationFailed"


class QuotaExceeded(RequestError, LimitError):
    """A per-connection or per-identity limit refused the request."""

    wire_code = "minibus.Error.QuotaExceeded"


class MessageTooLarge(RequestError, LimitError):
    """An RPC message (a call's arguments or its result) is over the size limit of the side
    that refuses it; the message names the limit.  The caller gets it before sending
    arguments over its own limit, and from the service for a call or a result over the
    service's; either way only that call fails."""

    wire_code = "minibus.Error.MessageTooLarge"


class ConnectionLost(BusError):
    """The connection to the bus ended while a request was waiting for its reply."""


def error_from_wire(code: str, message: str) -> RequestError:
    """Turn an error reply (code and message) received from a peer into an exception.

    Only :class:`RequestError` classes are ever produced, so an error the peer *reports*
    is never mistaken for one this side *detected* (a framing or handshake failure).
    Unknown codes give :class:`RemoteError`, keeping the code.
    """
    pending: list[type[RequestError]] = [RequestError]
    while pending:
        cls = pending.pop(0)
        if cls is not RemoteError and cls.wire_code == code:
            return cls(message, code)
        pending.extend(cls.__subclasses__())
    return RemoteError(message, code)
