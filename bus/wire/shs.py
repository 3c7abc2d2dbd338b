"""The shs1 secret handshake (Secure Scuttlebutt), as sans-io state machines.

Theory of operation
-------------------
Four messages, each of fixed size, prove to both sides who the other is and derive the
keys of the box-stream that follows (see docs/protocol.md for the byte layout)::

    client                                  server
      msg1  hmac_N(a_pub) || a_pub      64 ->
                                        <- 64  msg2  hmac_N(b_pub) || b_pub
      msg3  box(sig_A || A_pub)        112 ->        (server may refuse A here)
                                        <- 80  msg4  box(sig_B)

:class:`ClientHandshake` and :class:`ServerHandshake` are fed bytes with
:meth:`~_Handshake.receive_data` in chunks of any size and hand back the bytes to send with
:meth:`~_Handshake.data_to_send`.  They never touch a socket; ``bus.io.secure`` drives them
over trio streams and ``tests/shs1/`` drives them over stdin/stdout for ``shs1-test``.

Every transition is in :data:`TRANSITIONS`, a table of ``(role, state, event) -> state``.
Any failure caused by the peer's bytes -- a bad hmac (wrong network key), a box that does
not open (wrong server key), a bad signature, a low-order or invalid curve point -- moves
the machine to ``FAILED`` and raises :class:`~bus.errors.HandshakeError`; nothing else
escapes.  Using a machine after it failed raises :class:`~bus.errors.LocalProtocolError`.
Bytes received after the final message are kept in :attr:`~_Handshake.unused_data`:
they already belong to the box-stream.  A client may send its first bytes of that stream
right behind msg3, sealed with :meth:`ClientHandshake.early_outcome`'s keys (the outcome's,
known once msg3 is made; docs/protocol.md section 2.6), and trusts nothing before msg4.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

import nacl.bindings as sodium
import nacl.exceptions

from ..errors import HandshakeError, HandshakeHangup, IdentityRefused, LocalProtocolError
from .identity import Identity, PublicKey, curve25519_public

__all__ = [
    "DEFAULT_NETWORK_KEY",
    "HELLO_SIZE",
    "CLIENT_AUTH_SIZE",
    "SERVER_ACCEPT_SIZE",
    "Role",
    "State",
    "Event",
    "TRANSITIONS",
    "HandshakeOutcome",
    "ClientHandshake",
    "ServerHandshake",
    "parse_network_key",
]

#: minibus's own network key (the shs "app key"): 32 random bytes chosen once for minibus
#: so that a minibus peer never completes a handshake with a Scuttlebutt main-net peer by
#: accident.  Override it with ``--network-key HEX`` / ``MINIBUS_NETWORK_KEY``.
DEFAULT_NETWORK_KEY = bytes.fromhex("0be691442888d417bd997425c5cf46d5be8b1da3c4ae47d1c4fead62b21725cb")

HELLO_SIZE = 64
CLIENT_AUTH_SIZE = 112
SERVER_ACCEPT_SIZE = 80
_ZERO_NONCE = bytes(24)

# What pynacl raises for invalid input to a primitive: low-order points (scalarmult),
# points not on the curve (pk_to_curve25519), failed MACs and signatures.
_CRYPTO_FAILURES = (nacl.exceptions.CryptoError, RuntimeError, ValueError, TypeError)


def parse_network_key(text: str) -> bytes:
    """Parse a network key given as 64 hex digits."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError as exc:
        raise ValueError("a network key is 64 hex digits") from exc
    if len(key) != 32:
        raise ValueError(f"a network key is 32 bytes (64 hex digits), got {len(key)} bytes")
    return key


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_SERVER_HELLO = "await msg2"  # client: msg1 queued
    AWAIT_SERVER_ACCEPT = "await msg4"  # client: msg3 queued
    AWAIT_CLIENT_HELLO = "await msg1"  # server
    AWAIT_CLIENT_AUTH = "await msg3"  # server: msg2 queued
    DONE = "done"
    FAILED = "failed"


class Event(enum.Enum):
    CLIENT_HELLO = "msg1"
    SERVER_HELLO = "msg2"
    CLIENT_AUTH = "msg3"
    SERVER_ACCEPT = "msg4"
    FAIL = "fail"


#: Every legal transition.  Anything not listed is a protocol error.
TRANSITIONS: dict[tuple[Role, State, Event], State] = {
    (Role.CLIENT, State.AWAIT_SERVER_HELLO, Event.SERVER_HELLO): State.AWAIT_SERVER_ACCEPT,
    (Role.CLIENT, State.AWAIT_SERVER_ACCEPT, Event.SERVER_ACCEPT): State.DONE,
    (Role.SERVER, State.AWAIT_CLIENT_HELLO, Event.CLIENT_HELLO): State.AWAIT_CLIENT_AUTH,
    (Role.SERVER, State.AWAIT_CLIENT_AUTH, Event.CLIENT_AUTH): State.DONE,
}
for _role in Role:
    for _state in State:
        if _state not in (State.DONE, State.FAILED):
            TRANSITIONS[(_role, _state, Event.FAIL)] = State.FAILED

#: Size of the message each waiting state expects next.
_EXPECTED: dict[State, tuple[Event, int]] = {
    State.AWAIT_SERVER_HELLO: (Event.SERVER_HELLO, HELLO_SIZE),
    State.AWAIT_SERVER_ACCEPT: (Event.SERVER_ACCEPT, SERVER_ACCEPT_SIZE),
    State.AWAIT_CLIENT_HELLO: (Event.CLIENT_HELLO, HELLO_SIZE),
    State.AWAIT_CLIENT_AUTH: (Event.CLIENT_AUTH, CLIENT_AUTH_SIZE),
}


@dataclass(frozen=True, slots=True)
class HandshakeOutcome:
    """What a completed handshake proves and derives, from one side's point of view."""

    local_key: PublicKey
    #: The peer's long-term key, verified by its signature.
    remote_key: PublicKey
    encrypt_key: bytes = field(repr=False)
    encrypt_nonce: bytes = field(repr=False)
    decrypt_key: bytes = field(repr=False)
    decrypt_nonce: bytes = field(repr=False)

    def to_bytes(self) -> bytes:
        """``enc_key || enc_nonce || dec_key || dec_nonce`` (112 bytes), as shs1-test wants."""
        return self.encrypt_key + self.encrypt_nonce + self.decrypt_key + self.decrypt_nonce


def _auth(key: bytes, msg: bytes) -> bytes:
    """libsodium's crypto_auth: HMAC-SHA-512 truncated to 32 bytes."""
    return hmac.digest(key, msg, "sha512")[:32]


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _verify(public: bytes, message: bytes, signature: bytes) -> None:
    sodium.crypto_sign_open(signature + message, public)


class _CallbackFailed(Exception):
    """Carries an exception raised by a caller's callback out of the crypto error handling."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Handshake:
    role: Role

    def __init__(
        self,
        identity: Identity,
        network_key: bytes,
        ephemeral_secret: bytes | None,
        state: State,
    ) -> None:
        if len(network_key) != 32:
            raise ValueError("the network key is exactly 32 bytes")
        self._identity = identity
        self._network_key = network_key
        if ephemeral_secret is None:
            self._eph_public, self._eph_secret = sodium.crypto_box_keypair()
        else:
            self._eph_secret = ephemeral_secret
            self._eph_public = sodium.crypto_scalarmult_base(ephemeral_secret)
        self._state = state
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._outcome: HandshakeOutcome | None = None
        # Set once the handshake failed; the error is kept for later reporting.
        self.error: HandshakeError | None = None

    # -- public surface ----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def is_done(self) -> bool:
        return self._state is State.DONE

    @property
    def outcome(self) -> HandshakeOutcome:
        """The result; only once :attr:`is_done`."""
        if self._outcome is None:
            raise LocalProtocolError(f"the handshake is not complete (state: {self._state.value})")
        return self._outcome

    @property
    def bytes_wanted(self) -> int:
        """How many more bytes complete the next expected message (0 when none is expected)."""
        expected = _EXPECTED.get(self._state)
        return 0 if expected is None else max(0, expected[1] - len(self._inbox))

    @property
    def unused_data(self) -> bytes:
        """Bytes received after the final message: the start of the stream that follows."""
        return bytes(self._inbox) if self._state is State.DONE else b""

    def data_to_send(self) -> bytes:
        """Take the bytes that are waiting to go to the peer (may be empty)."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; raises :class:`HandshakeError` if they break the handshake."""
        if self._state is State.FAILED:
            raise LocalProtocolError("the handshake already failed; it cannot take more data")
        if self._state is State.DONE and data:
            raise LocalProtocolError("the handshake is complete; feed later bytes to the stream that follows")
        self._inbox += data
        while (expected := _EXPECTED.get(self._state)) is not None:
            event, size = expected
            if len(self._inbox) < size:
                return
            message = bytes(self._inbox[:size])
            del self._inbox[:size]
            self._handle(event, message)

    def fail(self, error: HandshakeError) -> HandshakeError:
        """Move to FAILED (e.g. on a timeout or transport EOF) and return ``error`` to raise."""
        if self._state is State.FAILED:
            assert self.error is not None
            return self.error
        if self._state is State.DONE:
            raise LocalProtocolError("the handshake is complete; it cannot fail now")
        self._transition(Event.FAIL)
        self.error = error
        self._outbox.clear()
        return error

    def end_of_input(self) -> None:
        """The peer closed the transport; an unfinished handshake fails."""
        if self._state in (State.DONE, State.FAILED):
            return
        raise self.fail(HandshakeHangup(self._hangup_reason()))

    # -- internals --------------------------------------------------------------------

    def _hangup_reason(self) -> str:
        return f"peer hung up during the handshake ({self._state.value})"

    def _transition(self, event: Event) -> None:
        key = (self.role, self._state, event)
        if key not in TRANSITIONS:
            raise LocalProtocolError(f"no transition for {event.value} in state {self._state.value}")
        self._state = TRANSITIONS[key]

    def _handle(self, event: Event, message: bytes) -> None:
        try:
            self._process(event, message)
        except HandshakeError as exc:
            raise self.fail(exc) from exc.__cause__
        except _CRYPTO_FAILURES as exc:
            # Low-order or invalid points, failed boxes and signatures all end here.
            raise self.fail(HandshakeError(f"{event.value} is invalid: {exc}")) from exc
        except _CallbackFailed as exc:
            # The caller's authorize callback raised: fail the handshake, surface its error.
            self.fail(HandshakeError("the authorize callback raised"))
            raise exc.error from None
        self._transition(event)

    def _process(self, event: Event, message: bytes) -> None:
        raise NotImplementedError

    def _hello(self) -> bytes:
        return _auth(self._network_key, self._eph_public) + self._eph_public

    def _open_hello(self, message: bytes, what: str) -> bytes:
        mac, eph = message[:32], message[32:]
        if not hmac.compare_digest(mac, _auth(self._network_key, eph)):
            raise HandshakeError(f"{what} has a bad hmac: the peer uses another network key or does not speak shs1")
        return eph

    def _finish(self, remote: PublicKey, box_key: bytes, remote_hello: bytes, local_hello: bytes) -> None:
        # S = sha256(box key of msg4); each direction's key binds the receiver's identity.
        shared = _sha256(box_key)
        self._outcome = HandshakeOutcome(
            local_key=self._identity.public_key,
            remote_key=remote,
            encrypt_key=_sha256(shared + remote.raw),
            encrypt_nonce=remote_hello[:24],
            decrypt_key=_sha256(shared + self._identity.public_key.raw),
            decrypt_nonce=local_hello[:24],
        )


class ClientHandshake(_Handshake):
    """The client side: knows the server's key in advance and proves its own identity first.

    msg1 is ready in :meth:`data_to_send` as soon as the object exists.
    """

    role = Role.CLIENT

    def __init__(
        self,
        identity: Identity,
        server_key: PublicKey,
        network_key: bytes = DEFAULT_NETWORK_KEY,
        *,
        ephemeral_secret: bytes | None = None,
    ) -> None:
        super().__init__(identity, network_key, ephemeral_secret, State.AWAIT_SERVER_HELLO)
        self._server_key = server_key
        try:
            self._server_curve = curve25519_public(server_key.raw)
        except _CRYPTO_FAILURES as exc:
            raise ValueError(f"server key {server_key.id} is not a valid Ed25519 point") from exc
        self._msg1 = self._hello()
        self._outbox += self._msg1
        self._msg2 = b""
        self._ab = self._aB = self._sig_a = b""
        self._accept_key = b""  # msg4's box key, once early_outcome() has needed it
        self._pending: HandshakeOutcome | None = None

    def _hangup_reason(self) -> str:
        if self._state is State.AWAIT_SERVER_ACCEPT:
            return (
                "server hung up after msg3: it refused our identity, "
                "or we dialled the wrong server key"
            )
        return super()._hangup_reason()

    def _process(self, event: Event, message: bytes) -> None:
        n = self._network_key
        if event is Event.SERVER_HELLO:
            b_eph = self._open_hello(message, "server hello (msg2)")
            self._msg2 = message
            self._ab = sodium.crypto_scalarmult(self._eph_secret, b_eph)
            self._aB = sodium.crypto_scalarmult(self._eph_secret, self._server_curve)
            self._b_eph = b_eph
            self._sig_a = self._identity.sign(n + self._server_key.raw + _sha256(self._ab))
            box_key = _sha256(n + self._ab + self._aB)
            self._outbox += sodium.crypto_secretbox_easy(
                self._sig_a + self._identity.public_key.raw, _ZERO_NONCE, box_key
            )
        else:  # SERVER_ACCEPT
            box_key = self._accept_key or self._msg4_key()
            try:
                sig_b = sodium.crypto_secretbox_open_easy(message, _ZERO_NONCE, box_key)
                _verify(
                    self._server_key.raw,
                    n + self._sig_a + self._identity.public_key.raw + _sha256(self._ab),
                    sig_b,
                )
            except _CRYPTO_FAILURES as exc:
                raise HandshakeError(
                    "server accept (msg4) is invalid: the server could not prove it holds "
                    f"{self._server_key.id}"
                ) from exc
            if self._pending is not None:
                self._outcome = self._pending
            else:
                self._finish(self._server_key, box_key, self._msg2, self._msg1)

    def _msg4_key(self) -> bytes:
        Ab = sodium.crypto_scalarmult(self._identity.curve_secret, self._b_eph)
        return _sha256(self._network_key + self._ab + self._aB + Ab)

    def early_outcome(self) -> HandshakeOutcome:
        """The keys the handshake will end with if msg4 proves the server, known once msg3 is
        made (state ``AWAIT_SERVER_ACCEPT``): for bytes sent after msg3 without waiting for
        msg4.  Only the holder of the server's secret key can open what they seal (the keys
        bind ``aB``); nothing received may be trusted until msg4 is checked."""
        if self._state is not State.AWAIT_SERVER_ACCEPT:
            raise LocalProtocolError(f"the early keys are known once msg3 is made, not in {self._state.value}")
        pending = self._pending
        if pending is None:
            self._accept_key = self._msg4_key()
            self._finish(self._server_key, self._accept_key, self._msg2, self._msg1)
            pending, self._outcome = self._outcome, None
            assert pending is not None
            self._pending = pending
        return pending


class ServerHandshake(_Handshake):
    """The server side: learns and verifies the client's identity from msg3.

    ``authorize`` is called with the client's verified key before the server proves its
    own identity; returning false (or raising :class:`IdentityRefused`) refuses it and
    msg4 is never sent.
    """

    role = Role.SERVER

    def __init__(
        self,
        identity: Identity,
        network_key: bytes = DEFAULT_NETWORK_KEY,
        *,
        authorize: Callable[[PublicKey], bool] | None = None,
        ephemeral_secret: bytes | None = None,
    ) -> None:
        super().__init__(identity, network_key, ephemeral_secret, State.AWAIT_CLIENT_HELLO)
        self._authorize = authorize
        self._msg1 = b""
        self._msg2 = self._hello()
        self._a_eph = self._ab = self._aB = b""
        self.client_key: PublicKey | None = None

    def _process(self, event: Event, message: bytes) -> None:
        n = self._network_key
        if event is Event.CLIENT_HELLO:
            self._a_eph = self._open_hello(message, "client hello (msg1)")
            self._msg1 = message
            self._ab = sodium.crypto_scalarmult(self._eph_secret, self._a_eph)
            self._aB = sodium.crypto_scalarmult(self._identity.curve_secret, self._a_eph)
            self._outbox += self._msg2
            return
        # CLIENT_AUTH
        try:
            plain = sodium.crypto_secretbox_open_easy(message, _ZERO_NONCE, _sha256(n + self._ab + self._aB))
        except _CRYPTO_FAILURES as exc:
            raise HandshakeError(
                "client authenticate (msg3) does not open: the client dialled another server key "
                "or uses another network key"
            ) from exc
        sig_a, a_pub = plain[:64], plain[64:]
        sha_ab = _sha256(self._ab)
        try:
            _verify(a_pub, n + self._identity.public_key.raw + sha_ab, sig_a)
        except _CRYPTO_FAILURES as exc:
            raise HandshakeError("client authenticate (msg3) carries a bad signature") from exc
        client = PublicKey(a_pub)
        Ab = sodium.crypto_scalarmult(self._eph_secret, curve25519_public(a_pub))
        self.client_key = client
        if self._authorize is not None:
            try:
                allowed = self._authorize(client)
            except HandshakeError:
                raise
            except Exception as exc:
                raise _CallbackFailed(exc) from exc
            if not allowed:
                raise IdentityRefused(f"identity {client.id} is not authorized on this bus")
        box_key = _sha256(n + self._ab + self._aB + Ab)
        sig_b = self._identity.sign(n + sig_a + a_pub + sha_ab)
        self._outbox += sodium.crypto_secretbox_easy(sig_b, _ZERO_NONCE, box_key)
        self._finish(client, box_key, self._msg1, self._msg2)
