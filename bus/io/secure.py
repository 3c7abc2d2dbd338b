"""SecureStream: the shs1 handshake and box-stream over any trio stream.

Theory of operation
-------------------
A :class:`SecureStream` wraps a transport stream (a socket, a memory stream, another
SecureStream) the way :class:`trio.SSLStream` wraps one around an SSL engine: the protocol
lives in sans-io objects (:mod:`bus.wire.shs`, :mod:`bus.wire.boxstream`) and this class
only moves their bytes.

* The handshake runs once, explicitly with :meth:`SecureStream.do_handshake` or lazily on
  the first send or receive, under a deadline (10 s by default).  Any failure -- a peer
  error, the deadline, a refusal -- closes the transport and leaves the stream BROKEN.
  ``do_handshake`` raises the :class:`~bus.errors.HandshakeError`; the lazy path raises
  :class:`trio.BrokenResourceError` with it chained as ``__cause__``.
* A client may hand the stream's first bytes to :attr:`SecureStream.early_data`: they go out
  in the same write as msg3, sealed with the keys the handshake will end with (only the
  server's key holder can open them); nothing received is trusted before msg4 checks out
  (docs/protocol.md, section 2.6).
* Afterwards bytes go either through box-stream (``encrypted=True``) or straight through
  (``encrypted=False``, for Unix sockets, where the kernel keeps the stream private and the
  handshake still proves both identities).
* Half-close: :meth:`send_eof` sends the box-stream goodbye (plain streams half-close the
  transport instead); the peer then reads ``b""``.  :meth:`aclose` sends the goodbye too,
  within :attr:`close_timeout` and only when no send is in progress, so a clean close reads
  as EOF on the other side and a cut connection as :class:`trio.BrokenResourceError`.  A
  forced close (:func:`trio.aclose_forcefully`, a cancelled task) sends nothing: it is an
  abort, and reads as one.  An owner ending cleanly where it cannot wait (a connection shut
  down from a cancelled scope) calls :meth:`goodbye_nowait` first: the goodbye goes straight
  to the socket.  No goodbye ever follows part of a box (wire bytes from :meth:`send_nowait`
  still owed, or a send in progress): the peer then sees the truncation that it is.
* A send cancelled half-way through an encrypted write would leave half a box on the wire,
  so it breaks the stream (like SSLStream).
"""

from __future__ import annotations

import enum
import functools
import math
import operator
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any

import trio

from ..errors import BoxStreamError, HandshakeError, HandshakeTimeout, LocalProtocolError
from ..wire.boxstream import BoxStreamDecoder, BoxStreamEncoder
from ..wire.identity import Identity, PublicKey
from ..wire.shs import DEFAULT_NETWORK_KEY, ClientHandshake, HandshakeOutcome, ServerHandshake
from ..wire.shs import State as HandshakeState
from .framed import stdlib_socket

__all__ = ["SecureStream", "DEFAULT_HANDSHAKE_TIMEOUT"]

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: How long aclose() may spend delivering the goodbye to a peer that does not read.
DEFAULT_CLOSE_TIMEOUT = 2.0
_RECEIVE_SIZE = 1 << 17


class _State(enum.Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raises BusyResourceError when two tasks use the same direction at once."""

    __slots__ = ("_held", "_message")

    def __init__(self, message: str) -> None:
        self._held = False
        self._message = message

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._message)
        self._held = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._held = False

    @property
    def held(self) -> bool:
        return self._held


_UNKNOWN: Any = object()
_NOTHING = memoryview(b"")
#: The most pieces :meth:`SecureStream.send_pieces_nowait` writes in one ``sendmsg`` (the
#: system's limit, IOV_MAX, is 1024 here).
MAX_PIECES = 256


# A server's handshake directly on its trio SocketStream's socket (see SecureStream.server's
# ``direct_handshake``): each of these is a cancel point (checkpoint_if_cancelled), and yields
# only where it waits.  The handshake always waits for the peer's next message, and the
# stream's owner for the first message after the handshake: those waits are its schedule points.


def _socket_error(sock: trio.socket.SocketType, exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if sock.fileno() < 0:
        return trio.ClosedResourceError("the socket was closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


async def _socket_send(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` whole, waiting only while the socket is full."""
    await trio.lowlevel.checkpoint_if_cancelled()
    if sock.fileno() < 0:
        raise trio.ClosedResourceError("the socket was closed")
    with memoryview(data) as view:
        sent = 0
        while sent < len(view):
            try:
                sent += os.write(sock.fileno(), view[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
            except OSError as exc:
                raise _socket_error(sock, exc) from exc


async def _socket_receive(sock: trio.socket.SocketType, max_bytes: int, *, wait_first: bool = False) -> bytes:
    """What one read brings (``b""`` at the end), waiting only while nothing is there (or,
    with ``wait_first``, once before reading: it cannot be there yet)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    if sock.fileno() < 0:
        raise trio.ClosedResourceError("the socket was closed")
    if wait_first:
        await trio.lowlevel.wait_readable(sock)
    while True:
        try:
            return os.read(sock.fileno(), max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except OSError as exc:
            raise _socket_error(sock, exc) from exc


async def _socket_exchange(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview, max_bytes: int) -> bytes:
    """Send ``data`` whole on ``sock``, then return what one read brings once it is readable
    (FdSocketStream.send_then_receive's rules): the wait for the answer is the one checkpoint."""
    await _socket_send(sock, data)
    return await _socket_receive(sock, max_bytes, wait_first=True)


class SecureStream(trio.abc.HalfCloseableStream):
    """A byte stream whose peer has proven its identity, encrypted or plain.

    Build one with :meth:`client` or :meth:`server`.  ``handshake_timeout`` bounds
    :meth:`do_handshake`; ``math.inf`` leaves it to the caller's own deadline (one cancel
    scope fewer for a caller that bounds more than the handshake).
    """

    #: Where :meth:`send_nowait` writes: the transport's socket, its ``send_some_nowait``,
    #: or None (neither); looked up on first use.
    _send_target: Any = _UNKNOWN
    _send_to_socket = False

    def __init__(
        self,
        transport: trio.abc.Stream,
        handshake: ClientHandshake | ServerHandshake,
        *,
        encrypted: bool = True,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        direct_handshake: bool = False,
    ) -> None:
        if not encrypted and not isinstance(transport, trio.abc.HalfCloseableStream):
            raise TypeError("a plain SecureStream needs a half-closeable transport to carry EOF")
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        self.transport = transport
        self.encrypted = encrypted
        self.handshake_timeout = handshake_timeout
        self.close_timeout = DEFAULT_CLOSE_TIMEOUT
        self._direct_handshake = direct_handshake  # (see server())
        # Both are dropped once the handshake is done (the machine's buffers and keys are
        # not needed any more: a broker holds thousands of idle streams).
        self._handshake: ClientHandshake | ServerHandshake | None = handshake
        self._handshake_lock: trio.Lock | None = trio.Lock()
        self._outcome: HandshakeOutcome | None = None
        self._state = _State.OK
        self._broken_by: BaseException | None = None
        self._send_conflict = _ConflictDetector("another task is sending on this SecureStream")
        self._receive_conflict = _ConflictDetector("another task is receiving on this SecureStream")
        self._encoder: BoxStreamEncoder | None = None
        self._decoder: BoxStreamDecoder | None = None
        self._incoming = bytearray()  # plaintext received but not yet returned
        self._eof_sent = False
        self._eof_received = False
        # Wire bytes send_nowait() left for send_wire(): until they are sent, the wire ends
        # mid-box and no goodbye may follow.
        self._wire_owed = 0
        self._goodbye_rest = b""  # what the socket did not take of goodbye_nowait()'s goodbye
        #: The client's first bytes of the stream, sent with msg3 (not after msg4): called
        #: once, when msg3 is made; what it returns (may be empty) goes out right behind msg3,
        #: sealed with the stream's keys (only the holder of the server's secret key can
        #: open them; nothing received is trusted before msg4 proves the server).  Saves the
        #: round trip a protocol whose client speaks first would otherwise wait for msg4.
        self.early_data: Callable[[], bytes] | None = None
        self._early_sent = False  # (early data went out: a reset before msg4 is a refusal)
        #: Plaintext bytes sent and received after the handshake (the early data counts as sent).
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- construction ------------------------------------------------------------------

    @classmethod
    def client(
        cls,
        transport: trio.abc.Stream,
        identity: Identity,
        server_key: PublicKey,
        *,
        network_key: bytes = DEFAULT_NETWORK_KEY,
        encrypted: bool = True,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> SecureStream:
        """The dialling side; it must know the server's key in advance."""
        return cls(
            transport,
            ClientHandshake(identity, server_key, network_key),
            encrypted=encrypted,
            handshake_timeout=handshake_timeout,
        )

    @classmethod
    def server(
        cls,
        transport: trio.abc.Stream,
        identity: Identity,
        *,
        network_key: bytes = DEFAULT_NETWORK_KEY,
        authorize: Callable[[PublicKey], bool] | None = None,
        encrypted: bool = True,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        direct_handshake: bool = False,
    ) -> SecureStream:
        """The accepting side; ``authorize`` may refuse the client's key after msg3.

        ``direct_handshake``: over a trio SocketStream, msg2 is written to the socket and msg3
        read once it is readable, in one step (no scheduler pass after the write, no read that
        finds nothing), as over FdSocketStream; the same bytes either way."""
        return cls(
            transport,
            ServerHandshake(identity, network_key, authorize=authorize),
            encrypted=encrypted,
            handshake_timeout=handshake_timeout,
            direct_handshake=direct_handshake,
        )

    # -- identity ----------------------------------------------------------------------

    @property
    def handshake_done(self) -> bool:
        return self._outcome is not None

    @property
    def peer_key(self) -> PublicKey:
        """The peer's verified long-term key (after the handshake)."""
        return self._require_outcome().remote_key

    @property
    def local_key(self) -> PublicKey:
        return self._require_outcome().local_key

    def plain_transport(self) -> trio.abc.HalfCloseableStream | None:
        """The transport, when this stream would only pass bytes through to it.

        That is: plain (not encrypted), handshake done, nothing received beyond the
        handshake still buffered here, and still open both ways.  A caller may then send
        and receive on the transport directly (its errors and half-close are the same);
        closing still goes through this stream.
        """
        if self.encrypted or self._outcome is None or self._incoming or self._eof_sent or self._state is not _State.OK:
            return None
        assert isinstance(self.transport, trio.abc.HalfCloseableStream)
        return self.transport

    @property
    def early_data_sent(self) -> bool:
        """Whether :attr:`early_data` gave bytes, which went out behind msg3."""
        return self._early_sent

    def _require_outcome(self) -> HandshakeOutcome:
        if self._outcome is None:
            raise LocalProtocolError("the handshake has not completed; await do_handshake() first")
        return self._outcome

    # -- handshake ---------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake if it has not run; raises :class:`HandshakeError` on failure."""
        if self._outcome is not None:
            await trio.lowlevel.checkpoint()
            return
        lock = self._handshake_lock
        assert lock is not None  # (dropped only once the outcome is set)
        async with lock:
            if self._outcome is not None:
                return
            self._check_usable()
            try:
                if self.handshake_timeout == math.inf:
                    await self._run_handshake()  # (bounded by the caller's deadline, if any)
                else:
                    with trio.fail_after(self.handshake_timeout):
                        await self._run_handshake()
            except trio.TooSlowError as exc:
                err = self._fail_handshake(
                    HandshakeTimeout(f"the peer did not complete the handshake within {self.handshake_timeout:g} s")
                )
                await self._break(err)
                raise err from exc
            except HandshakeError as exc:
                await self._break(exc)
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if self._state is _State.CLOSED:
                    raise trio.ClosedResourceError("the SecureStream was closed during the handshake") from exc
                err = self._fail_handshake(HandshakeError(f"the transport failed during the handshake: {exc!r}"))
                await self._break(err)
                raise err from exc
            except BaseException as exc:
                # Cancelled from outside, or a bug: never leave a half-done handshake open.
                if self._state is _State.OK:
                    await self._break(exc)
                raise

    def _fail_handshake(self, error: HandshakeError) -> HandshakeError:
        # The machine may already be DONE when only the delivery of msg4 failed.
        hs = self._handshake
        if hs is not None and not hs.is_done:
            return hs.fail(error)
        return error

    async def _run_handshake(self) -> None:
        hs = self._handshake
        assert hs is not None
        transport = self.transport
        # A transport that can send a message and wait for its answer in one step (the
        # client's Unix socket, FdSocketStream) does so: the same bytes, one checkpoint.
        exchange = getattr(transport, "send_then_receive", None)
        # (server(direct_handshake=True): the same, with msg1 read and msg4 written directly.)
        sock = transport.socket if self._direct_handshake and type(transport) is trio.SocketStream else None
        if exchange is None and sock is not None:
            exchange = functools.partial(_socket_exchange, sock)
        while not hs.is_done:
            out = hs.data_to_send()
            if self.early_data is not None and isinstance(hs, ClientHandshake) and hs.state is HandshakeState.AWAIT_SERVER_ACCEPT:
                out = self._with_early_data(hs, out)
            try:
                if out and exchange is not None:
                    data = await exchange(out, hs.bytes_wanted)
                elif sock is not None and not out:
                    data = await _socket_receive(sock, hs.bytes_wanted)
                else:
                    if out:
                        await transport.send_all(out)
                    data = await transport.receive_some(hs.bytes_wanted)
            except trio.BrokenResourceError:
                if self._early_sent and hs.state is HandshakeState.AWAIT_SERVER_ACCEPT:
                    # A server that hangs up after msg3 with bytes of ours unread (the early
                    # data) resets the connection: the same refusal as a plain hang-up.  (Without
                    # early data a refusal is a clean end: a reset is the transport's failure,
                    # e.g. a channel's relay that broke, and is reported with its reason.)
                    hs.end_of_input()
                raise
            if not data:
                hs.end_of_input()  # raises HandshakeError
            hs.receive_data(data)
        out = hs.data_to_send()
        if out:
            if sock is not None:
                await _socket_send(sock, out)
            else:
                await transport.send_all(out)
        outcome = hs.outcome
        if self.encrypted:
            if self._encoder is None:  # (made for early data already: its nonce moved on)
                self._encoder = BoxStreamEncoder(outcome.encrypt_key, outcome.encrypt_nonce)
            self._decoder = BoxStreamDecoder(outcome.decrypt_key, outcome.decrypt_nonce)
            self._decoder.receive_data(hs.unused_data)
        else:
            self._incoming += hs.unused_data
        self._outcome = outcome
        self._handshake = self._handshake_lock = None

    def _with_early_data(self, hs: ClientHandshake, msg3: bytes) -> bytes:
        """msg3 with the early data behind it (see :attr:`early_data`)."""
        make, self.early_data = self.early_data, None
        assert make is not None
        data = make()
        if not data:
            return msg3
        if self.encrypted:
            keys = hs.early_outcome()
            self._encoder = BoxStreamEncoder(keys.encrypt_key, keys.encrypt_nonce)
            wire = self._encoder.encode(data)
        else:
            wire = bytes(data)
        self.bytes_sent += len(data)
        self._early_sent = True
        return msg3 + wire

    async def _ensure_handshake(self) -> None:
        """The lazy handshake of send/receive: failures surface as BrokenResourceError."""
        if self._outcome is not None:
            return
        try:
            await self.do_handshake()
        except HandshakeError as exc:
            raise trio.BrokenResourceError(f"secure handshake failed: {exc}") from exc

    # -- state helpers -----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this SecureStream was closed")
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this SecureStream is broken") from self._broken_by

    async def _break(self, cause: BaseException) -> None:
        if self._state is _State.OK:
            self._state = _State.BROKEN
            self._broken_by = cause
        await trio.aclose_forcefully(self.transport)

    def _socket(self) -> trio.socket.SocketType | None:
        """The transport's socket, when it is one (written to directly, without waiting)."""
        sock = getattr(self.transport, "socket", None)
        return sock if isinstance(sock, trio.socket.SocketType) else None

    def forget_failure_frames(self) -> None:
        """Drop the tracebacks of the error that broke this stream (and of its causes).

        The stream keeps that error to chain it to later ones; its traceback holds the frames
        it went through, and they hold this stream: a reference cycle that only the cyclic
        garbage collector could free.  An owner that is done with a failed stream calls this,
        so the stream goes by reference counting (the messages and types stay)."""
        if self._broken_by is None:
            return  # (not broken: nothing to drop)
        seen: set[int] = set()
        pending: list[BaseException | None] = [self._broken_by]
        while pending:
            exc = pending.pop()
            if exc is None or id(exc) in seen:
                continue
            seen.add(id(exc))
            exc.__traceback__ = None
            pending += [exc.__cause__, exc.__context__]

    def _mark_broken(self, cause: BaseException) -> None:
        if self._state is _State.OK:
            self._state = _State.BROKEN
            self._broken_by = cause

    # -- sending -----------------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            self._check_usable()
            if self._eof_sent:
                raise trio.ClosedResourceError("cannot send after send_eof()")
            await self._ensure_handshake()
            if not data:
                await trio.lowlevel.checkpoint()
                return
            if self._encoder is not None:
                payload: bytes | bytearray | memoryview = self._encoder.encode(data)
            else:
                payload = data
            await self._transport_send(payload)
            self.bytes_sent += len(data)

    def send_nowait(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Send ``data`` as far as the transport takes it without waiting (no checkpoint).

        For a stream whose handshake is done.  Returns the wire bytes (ciphertext when
        encrypted) that were not written: pass them to :meth:`send_wire` before sending
        anything else.  A socket transport is written to directly; any other transport is
        used when it has a synchronous ``send_some_nowait(data) -> int`` (bytes taken) of
        its own (a relayed channel does), else all of the wire bytes come back.  A failed
        transport raises :class:`trio.BrokenResourceError` and breaks the stream.
        """
        if self._send_conflict._held:
            raise trio.BusyResourceError("another task is sending on this SecureStream")
        if self._state is not _State.OK:
            self._check_usable()
        if self._eof_sent:
            raise trio.ClosedResourceError("cannot send after send_eof()")
        if self._outcome is None:
            raise LocalProtocolError("send_nowait needs a completed handshake")
        encoder = self._encoder
        wire = encoder.encode(data) if encoder is not None else data
        size = len(wire)
        if not size:
            return _NOTHING
        target = self._send_target
        if target is _UNKNOWN:  # (looked up once: the transport stays the same)
            target = self._find_send_target()
        if self._send_to_socket:
            try:
                sent = os.write(target.fileno(), wire)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._socket_broken(exc) from exc
        elif target is None:
            sent = 0  # e.g. another SecureStream: everything goes through send_wire
        else:
            try:
                sent = target(wire)
            except trio.BrokenResourceError as exc:
                self._mark_broken(exc)
                raise
        # Taken: what the transport did not take now follows in send_wire.
        self.bytes_sent += size if encoder is None else len(data)
        if sent == size:
            return _NOTHING
        self._wire_owed += size - sent
        return memoryview(wire)[sent:]

    def _socket_broken(self, exc: OSError) -> trio.BrokenResourceError:
        """The error a failed write of the socket raises (the stream is broken from now on)."""
        broken = trio.BrokenResourceError(f"socket connection broken: {exc}")
        self._mark_broken(broken)
        return broken

    def _find_send_target(self) -> Any:
        """Where :meth:`send_nowait` writes: the transport's socket (a stdlib one, its fileno
        in C), else its ``send_some_nowait``, else None; looked up once."""
        sock: Any = getattr(self.transport, "raw_socket", None) or self._socket()
        if sock is not None:
            sock = stdlib_socket(sock)
        self._send_to_socket = sock is not None
        target = self._send_target = sock if sock is not None else getattr(self.transport, "send_some_nowait", None)
        return target

    def send_pieces_nowait(self, parts: list[bytes | memoryview], size: int) -> memoryview | None:
        """:meth:`send_nowait` for wire bytes given as pieces (``size`` bytes in all, at most
        MAX_PIECES of them), written with one ``sendmsg`` where the stream is plain over a
        socket: no join, no copy of them.  Returns what was not written, as
        :meth:`send_nowait` does (a copy of the rest only); None, with nothing done, where the
        stream is encrypted or not over a socket (join them and use :meth:`send_nowait`)."""
        if self._encoder is not None or len(parts) > MAX_PIECES or not size:
            return None
        self.send_nowait(_NOTHING)  # (its checks, raising as it does; nothing sent)
        target = self._send_target
        if target is _UNKNOWN:
            target = self._find_send_target()
        if not self._send_to_socket:
            return None
        try:
            sent = target.sendmsg(parts)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise self._socket_broken(exc) from exc
        self.bytes_sent += size
        if sent == size:
            return _NOTHING
        self._wire_owed += size - sent
        rest: list[bytes | memoryview] = []
        for part in parts:  # (the pieces the socket took all of are skipped, not copied)
            n = len(part)
            if sent >= n:
                sent -= n
                continue
            rest.append(memoryview(part)[sent:] if sent else part)
            sent = 0
        return memoryview(b"".join(rest))

    @property
    def sends_pieces(self) -> bool:
        """Whether :meth:`send_pieces` sends pieces without joining them (a plain stream over
        a transport that takes pieces: a relayed channel)."""
        return self._encoder is None and self._outcome is not None and hasattr(self.transport, "send_pieces")

    async def send_pieces(self, parts: list[bytes | memoryview], size: int) -> None:
        """Send the bytes of ``parts`` (``size`` in all) as if joined: handed to the
        transport's own ``send_pieces`` where :attr:`sends_pieces`, else joined."""
        if not self.sends_pieces:
            await self.send_all(b"".join(parts))
            return
        with self._send_conflict:
            self._check_usable()
            if self._eof_sent:
                raise trio.ClosedResourceError("cannot send after send_eof()")
            await self._transport_send(b"", parts, size)
            self.bytes_sent += size

    async def send_wire(self, wire: bytes | bytearray | memoryview) -> None:
        """Send wire bytes that :meth:`send_nowait` left over (already encoded)."""
        with self._send_conflict:
            self._check_usable()
            await self._transport_send(wire)
            self._wire_owed = max(0, self._wire_owed - len(wire))

    async def _transport_send(
        self, payload: bytes | bytearray | memoryview, pieces: list[bytes | memoryview] | None = None, size: int = 0
    ) -> None:
        """The transport's ``send_all(payload)``, or, given ``pieces``, its
        ``send_pieces(pieces, size)`` (see :meth:`send_pieces`); a failure breaks this stream."""
        try:
            if pieces is None:
                await self.transport.send_all(payload)
            else:
                await getattr(self.transport, "send_pieces")(pieces, size)
        except trio.BrokenResourceError as exc:
            self._mark_broken(exc)
            raise
        except trio.ClosedResourceError:
            self._check_usable()
            raise
        except BaseException as exc:
            if self.encrypted:
                # Half a box may be on the wire: this direction cannot continue.
                self._mark_broken(exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            self._check_usable()
            # A handshake started by a receive uses the transport; wait for it to finish.
            await self._ensure_handshake()
            await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        with self._send_conflict:
            self._check_usable()
            await self._ensure_handshake()
            if self._eof_sent:
                await trio.lowlevel.checkpoint()
                return
            self._eof_sent = True
            if self._encoder is not None:
                # The goodbye is box-stream's end signal.  The transport stays open both
                # ways: SSB peers close their own sending side on a TCP FIN.
                await self._transport_send(self._encoder.goodbye())
                return
            assert isinstance(self.transport, trio.abc.HalfCloseableStream)
            try:
                await self.transport.send_eof()
            except trio.BrokenResourceError as exc:
                self._mark_broken(exc)
                raise

    # -- receiving ---------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receive_conflict:
            if max_bytes is not None:
                max_bytes = operator.index(max_bytes)
                if max_bytes < 1:
                    raise ValueError("max_bytes must be >= 1")
            self._check_usable()
            await self._ensure_handshake()
            incoming = self._incoming
            if incoming:
                await trio.lowlevel.checkpoint()
            elif self._decoder is None:
                data = await self._transport_receive(max_bytes)
                self.bytes_received += len(data)
                return data
            else:
                data = await self._receive_boxes()
                if max_bytes is None or len(data) <= max_bytes:
                    self.bytes_received += len(data)
                    return data
                incoming += data
            if max_bytes is None or max_bytes >= len(incoming):
                out = bytes(incoming)
                incoming.clear()
            else:
                out = bytes(incoming[:max_bytes])
                del incoming[:max_bytes]
            self.bytes_received += len(out)
            return out

    async def _transport_receive(self, max_bytes: int | None) -> bytes:
        try:
            data = await self.transport.receive_some(max_bytes)
        except trio.BrokenResourceError as exc:
            self._mark_broken(exc)
            raise
        except trio.ClosedResourceError:
            self._check_usable()
            raise
        return bytes(data)

    async def _receive_boxes(self) -> bytes:
        """Plaintext of the next complete boxes (b"" once the peer's goodbye arrived)."""
        decoder = self._decoder
        assert decoder is not None
        while True:
            if decoder.ended:
                await trio.lowlevel.checkpoint()
                return b""
            data = await self._transport_receive(_RECEIVE_SIZE)
            try:
                if data:
                    decoder.receive_data(data)
                    plain = decoder.read()
                    if plain:
                        return plain
                else:
                    decoder.end_of_input()
            except BoxStreamError as exc:
                self._mark_broken(exc)
                await trio.aclose_forcefully(self.transport)
                raise trio.BrokenResourceError(str(exc)) from exc

    # -- closing -----------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        was_ok = self._state is _State.OK
        self._state = _State.CLOSED
        try:
            if (
                was_ok
                and self._encoder is not None
                and not self._eof_sent
                and not self._send_conflict.held
                and not self._wire_owed
            ):
                # Best effort: a clean close reads as EOF on the other side.
                self._eof_sent = True
                with self._send_conflict, trio.move_on_after(self.close_timeout):
                    try:
                        await self.transport.send_all(self._encoder.goodbye())
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            elif was_ok and self._goodbye_rest and not self._send_conflict.held:
                # What the socket did not take of goodbye_nowait's goodbye (a graceful close only).
                rest, self._goodbye_rest = self._goodbye_rest, b""
                with self._send_conflict, trio.move_on_after(self.close_timeout):
                    try:
                        await self.transport.send_all(rest)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        finally:
            await self.transport.aclose()

    def close_nowait(self) -> bool:
        """Close at once, without a checkpoint, as :func:`trio.aclose_forcefully` would close
        it (nothing more is sent: over box-stream, call :meth:`goodbye_nowait` first for a
        clean end).  Returns False, doing nothing, when the transport cannot be closed
        without waiting (it is not a socket stream); then await :meth:`aclose`."""
        transport = self.transport
        close = getattr(transport, "close_nowait", None)
        if close is None and isinstance(transport, trio.SocketStream):
            close = transport.socket.close
        if close is None:
            return False
        self._state = _State.CLOSED
        close()
        return True

    def goodbye_nowait(self) -> None:
        """End our sending direction cleanly, now, without waiting (no checkpoint).

        For an owner that is closing cleanly but may not wait (its scope is being
        cancelled): the box-stream goodbye is written straight to a socket transport, so a
        forced close that follows reads as an end of stream, not a truncation.  Nothing is
        sent, and the stream is left as it was, when the handshake has not completed, the
        stream is plain (closing it is its clean end) or not OK, a send is in progress, part
        of a box is still owed, or the transport is not a socket.  Afterwards sends raise
        :class:`trio.ClosedResourceError`, as after :meth:`send_eof`; what the socket did not
        take at once goes out in a graceful :meth:`aclose` (a forced one drops it).
        """
        sock = self._socket()
        if (
            self._encoder is None
            or self._state is not _State.OK
            or self._eof_sent
            or self._send_conflict.held
            or self._wire_owed
            or sock is None
        ):
            return
        self._eof_sent = True
        goodbye = self._encoder.goodbye()
        try:
            sent = os.write(sock.fileno(), goodbye)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the peer is gone: nobody left to tell
        self._goodbye_rest = goodbye[sent:]
