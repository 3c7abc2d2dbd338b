"""The minibus client library: connect, register names, query, watch.

Everything a program (or ``busctl``) needs is importable from here::

    from clients import open_bus

    async with open_bus(name="org.example.Echo", info={"description": "echoes"}) as bus:
        ...
"""

from bus.errors import (
    AccessDenied,
    ActivationFailed,
    ChannelRejected,
    BadRequest,
    BusError,
    ConnectionLost,
    HandshakeError,
    InvalidName,
    KeyFileError,
    NameNotFound,
    QuotaExceeded,
    RemoteError,
    RequestError,
    UnknownOperation,
)
from bus.wire.identity import Identity, PublicKey, default_identity_path, load_identity, load_or_create_identity, save_identity
from bus.wire.shs import parse_network_key

from .bus import (
    Bus,
    CannotConnect,
    NameEvent,
    NameInfo,
    RequestTimeout,
    ServiceInfo,
    Watch,
    WatchOverflow,
    find_address,
    identity_from_env,
    open_bus,
)
from .channels import Channel, ChannelRequest, PeerInfo
from .events import Event, Gap, Subscription
from .rpc import Service

__all__ = [
    "AccessDenied",
    "ActivationFailed",
    "BadRequest",
    "Bus",
    "BusError",
    "CannotConnect",
    "Channel",
    "Event",
    "Gap",
    "Subscription",
    "ChannelRejected",
    "ChannelRequest",
    "ConnectionLost",
    "HandshakeError",
    "Identity",
    "InvalidName",
    "KeyFileError",
    "NameEvent",
    "NameInfo",
    "NameNotFound",
    "PeerInfo",
    "PublicKey",
    "QuotaExceeded",
    "RemoteError",
    "RequestError",
    "RequestTimeout",
    "Service",
    "ServiceInfo",
    "UnknownOperation",
    "Watch",
    "WatchOverflow",
    "default_identity_path",
    "find_address",
    "identity_from_env",
    "load_identity",
    "load_or_create_identity",
    "open_bus",
    "parse_network_key",
    "save_identity",
]
