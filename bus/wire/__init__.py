"""The wire layer: everything that turns bytes into protocol and back, with no I/O.

Nothing in this package imports trio or opens a socket (an import-linter contract checks it).
"""

from .boxstream import BoxStreamDecoder, BoxStreamEncoder
from .frames import ControlFrame, DataFrame, Frame, FrameDecoder, FrameKind, encode_frame
from .identity import Identity, PublicKey, default_identity_path, load_identity, load_or_create_identity, save_identity
from .shs import DEFAULT_NETWORK_KEY, ClientHandshake, HandshakeOutcome, ServerHandshake, parse_network_key

__all__ = [
    "BoxStreamDecoder",
    "BoxStreamEncoder",
    "ClientHandshake",
    "ControlFrame",
    "DEFAULT_NETWORK_KEY",
    "DataFrame",
    "Frame",
    "FrameDecoder",
    "FrameKind",
    "HandshakeOutcome",
    "Identity",
    "PublicKey",
    "ServerHandshake",
    "default_identity_path",
    "encode_frame",
    "load_identity",
    "load_or_create_identity",
    "parse_network_key",
    "save_identity",
]
