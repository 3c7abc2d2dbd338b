"""The trio layer: streams and connections that move the wire layer's bytes."""

from .secure import DEFAULT_HANDSHAKE_TIMEOUT, SecureStream

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "SecureStream"]
