"""Box-stream: Scuttlebutt's encrypted framing, as a sans-io encoder and decoder.

Theory of operation
-------------------
Each direction has its own key ``K`` and a 24-byte big-endian nonce counter ``n`` (both
from the handshake outcome).  A write is cut into pieces of 1 to 4096 bytes; each piece
goes out as::

    header(34) = secretbox(u16_be(len) || body_mac(16), nonce=n,   K)
    body(len)  = the ciphertext of secretbox(piece,       nonce=n+1, K) without its MAC

and ``n`` advances by 2 (wrapping to zero after 2**192-1).  The stream ends with a
*goodbye*: a header whose plaintext is 18 zero bytes.  A transport EOF without a goodbye
means the stream was truncated -- an attacker can cut a TCP stream but cannot forge a
goodbye -- and is reported as :class:`~bus.errors.BoxStreamTruncated`.

The decoder accepts bytes in chunks of any size and yields plaintext.  It refuses a header
that announces more than :data:`MAX_BODY` bytes (the reference receivers are lenient here;
no reference sender produces such headers) and a zero-length header that is not a goodbye,
so the most it ever buffers is one header plus one body beyond what the caller fed it.
"""

from __future__ import annotations

import nacl.bindings as sodium
import nacl.exceptions

from ..errors import BoxStreamError, BoxStreamTruncated, LocalProtocolError

__all__ = ["HEADER_SIZE", "MAX_BODY", "BoxStreamEncoder", "BoxStreamDecoder"]

HEADER_SIZE = 34
MAX_BODY = 4096
_MAC = 16
_NONCE_MOD = 1 << 192
_GOODBYE = bytes(18)

_box = sodium.crypto_secretbox_easy
_unbox = sodium.crypto_secretbox_open_easy


def _nonce_int(nonce: bytes) -> int:
    if len(nonce) != 24:
        raise ValueError("a box-stream nonce is exactly 24 bytes")
    return int.from_bytes(nonce, "big")


class BoxStreamEncoder:
    """Turns plaintext into box-stream bytes for one direction."""

    def __init__(self, key: bytes, nonce: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a box-stream key is exactly 32 bytes")
        self._key = key
        self._nonce = _nonce_int(nonce)
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once the goodbye was produced."""
        return self._closed

    @property
    def nonce(self) -> bytes:
        """The nonce the next header will use."""
        return self._nonce.to_bytes(24, "big")

    def encode(self, data: bytes | bytearray | memoryview) -> bytes:
        """Box ``data`` (any length; empty gives nothing)."""
        if self._closed:
            raise LocalProtocolError("box-stream: cannot send after the goodbye")
        if not isinstance(data, bytes):
            data = bytes(data)
        size = len(data)
        key = self._key
        n = self._nonce
        if n + 2 * (size // MAX_BODY + 1) >= _NONCE_MOD:
            return self._encode_near_wrap(data)
        box = _box
        parts: list[bytes | memoryview] = []
        append = parts.append
        for start in range(0, size, MAX_BODY):
            piece = data[start : start + MAX_BODY]
            body = box(piece, (n + 1).to_bytes(24, "big"), key)
            append(box(len(piece).to_bytes(2, "big") + body[:_MAC], n.to_bytes(24, "big"), key))
            append(memoryview(body)[_MAC:])
            n += 2
        self._nonce = n
        return b"".join(parts)

    def _encode_near_wrap(self, data: bytes) -> bytes:
        # The rare path where the 192-bit counter wraps inside this write.
        key = self._key
        n = self._nonce
        parts: list[bytes] = []
        for start in range(0, len(data), MAX_BODY):
            piece = data[start : start + MAX_BODY]
            body = _box(piece, ((n + 1) % _NONCE_MOD).to_bytes(24, "big"), key)
            parts.append(_box(len(piece).to_bytes(2, "big") + body[:_MAC], n.to_bytes(24, "big"), key))
            parts.append(body[_MAC:])
            n = (n + 2) % _NONCE_MOD
        self._nonce = n
        return b"".join(parts)

    def goodbye(self) -> bytes:
        """The 34-byte goodbye that ends this direction; later :meth:`encode` calls fail."""
        if self._closed:
            raise LocalProtocolError("box-stream: the goodbye was already sent")
        self._closed = True
        return _box(_GOODBYE, self._nonce.to_bytes(24, "big"), self._key)


class BoxStreamDecoder:
    """Turns box-stream bytes from one direction back into plaintext."""

    def __init__(self, key: bytes, nonce: bytes, *, max_body: int = MAX_BODY) -> None:
        if len(key) != 32:
            raise ValueError("a box-stream key is exactly 32 bytes")
        if not 1 <= max_body <= 0xFFFF:
            raise ValueError("max_body must be between 1 and 65535")
        self._key = key
        self._nonce = _nonce_int(nonce)
        self._max_body = max_body
        self._buffer = bytearray()
        # (length, body MAC) of a header already opened whose body has not fully arrived.
        self._pending: tuple[int, bytes] | None = None
        self._ended = False
        self._error: BoxStreamError | None = None
        self._error_raised = False

    @property
    def ended(self) -> bool:
        """True once the peer's goodbye was read: the peer sends nothing more."""
        return self._ended

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport."""
        self._check()
        if data and self._ended:
            raise self._fail(BoxStreamError("box-stream: bytes arrived after the goodbye"))
        self._buffer += data

    def read(self) -> bytes:
        """All plaintext that can be decoded from what was fed so far (b"" if none)."""
        self._check()
        buf = self._buffer
        key = self._key
        unbox = _unbox
        out: list[bytes] = []
        n = self._nonce
        pos = 0  # consumed prefix of buf, dropped once at the end
        end = len(buf)
        max_body = self._max_body
        pending = self._pending
        # Far from the 192-bit wrap (always, in practice) the counter needs no modulo.
        fast = n + 2 * end + 4 < _NONCE_MOD
        try:
            with memoryview(buf) as view:
                while True:
                    if pending is None:
                        if end - pos < HEADER_SIZE:
                            break
                        try:
                            header = unbox(bytes(view[pos : pos + HEADER_SIZE]), n.to_bytes(24, "big"), key)
                        except nacl.exceptions.CryptoError as exc:
                            raise BoxStreamError("box-stream: a header failed to authenticate") from exc
                        pos += HEADER_SIZE
                        if header == _GOODBYE:
                            self._ended = True
                            if pos != end:
                                # Deliver what was authenticated before it; fail on the next call.
                                self._error = BoxStreamError("box-stream: bytes arrived after the goodbye")
                                pos = end
                            break
                        length = (header[0] << 8) | header[1]
                        if not 0 < length <= max_body:
                            if length == 0:
                                raise BoxStreamError("box-stream: a header announces an empty body")
                            raise BoxStreamError(
                                f"box-stream: a header announces {length} bytes, over the {max_body}-byte limit"
                            )
                        pending = (length, header[2:])
                    length, mac = pending
                    if end - pos < length:
                        break
                    body_nonce = n + 1 if fast else (n + 1) % _NONCE_MOD
                    try:
                        out.append(unbox(mac + view[pos : pos + length], body_nonce.to_bytes(24, "big"), key))
                    except nacl.exceptions.CryptoError as exc:
                        raise BoxStreamError("box-stream: a body failed to authenticate") from exc
                    pos += length
                    pending = None
                    n = n + 2 if fast else (n + 2) % _NONCE_MOD
        except BoxStreamError as exc:
            raise self._fail(exc) from exc.__cause__
        finally:
            self._nonce = n
            self._pending = pending
        del buf[:pos]
        return out[0] if len(out) == 1 else b"".join(out)

    def end_of_input(self) -> None:
        """The transport reached EOF: fine after the goodbye, a truncation otherwise."""
        self._check()
        if not self._ended:
            where = "inside a box" if (self._buffer or self._pending) else "between boxes"
            raise self._fail(
                BoxStreamTruncated(f"box-stream: the stream ended {where} without a goodbye (truncated)")
            )

    def _check(self) -> None:
        if self._error is not None:
            if not self._error_raised:
                self._error_raised = True
                raise self._error
            raise LocalProtocolError(f"box-stream decoder already failed: {self._error}")

    def _fail(self, error: BoxStreamError) -> BoxStreamError:
        self._error = error
        self._error_raised = True
        self._buffer.clear()
        return error
