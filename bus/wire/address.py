"""Bus addresses: where a broker listens and which key it proves, as one string.

Format (in ``MINIBUS_ADDRESS`` and the address file), alternatives separated by ``;``,
each a transport followed by ``key=value`` pairs separated by ``,``::

    unix:path=/run/user/1000/minibus/bus.sock,key=@<base64>.ed25519;tcp:host=127.0.0.1,port=7420,key=@<base64>.ed25519

Values may percent-encode ``,``, ``;``, ``=`` and ``%`` (``%2C`` …), as D-Bus addresses do.
A Unix alternative may add ``encrypted=1``: that broker runs box-stream on its Unix socket
too (its ``encrypt_unix`` setting), so clients must.  Other keys are ignored, for later
versions.
A client tries the alternatives in order.  Every alternative must carry the broker's key:
the handshake needs it before the first byte is sent.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote


from .identity import PublicKey, curve25519_public

__all__ = ["Endpoint", "parse_address", "format_address", "AddressError", "default_runtime_dir"]


def default_runtime_dir() -> Path:
    """Where the broker's socket and address file live by default:
    ``$XDG_RUNTIME_DIR/minibus``, else ``/tmp/minibus-$UID``.

    Only a path: whoever uses it checks it first, since in ``/tmp`` another user may have
    created it (busd: :func:`~bus.wire.files.ensure_private_dir`; clients:
    :func:`~bus.wire.files.check_owned_dir`)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "minibus"
    return Path(f"/tmp/minibus-{os.getuid()}")


class AddressError(ValueError):
    """A bus address that cannot be parsed."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    transport: str  # "unix" or "tcp"
    key: PublicKey
    path: str | None = None
    host: str | None = None
    port: int | None = None
    encrypted: bool = False  # box-stream after the handshake (always so on TCP)

    @property
    def uses_box_stream(self) -> bool:
        return self.transport == "tcp" or self.encrypted

    def __str__(self) -> str:
        return format_address([self])


def _value(text: str) -> str:
    return quote(text, safe="/@.:-_+=[]")


def format_address(endpoints: list[Endpoint]) -> str:
    parts = []
    for ep in endpoints:
        if ep.transport == "unix":
            fields = [("path", ep.path or "")]
            if ep.encrypted:
                fields.append(("encrypted", "1"))
        else:
            fields = [("host", ep.host or ""), ("port", str(ep.port))]
        fields.append(("key", ep.key.id))
        parts.append(ep.transport + ":" + ",".join(f"{k}={_value(v)}" for k, v in fields))
    return ";".join(parts)


def parse_address(text: str) -> list[Endpoint]:
    """Parse an address into its endpoints, in order; raises :class:`AddressError`.

    A client parses the same address at every connect: the (immutable) endpoints of the
    last few addresses are remembered (an address that fails is not)."""
    return list(_parse_address(text))


@functools.lru_cache(maxsize=16)
def _parse_address(text: str) -> tuple[Endpoint, ...]:
    endpoints = []
    for part in text.strip().split(";"):
        if not part:
            continue
        transport, sep, rest = part.partition(":")
        if not sep:
            raise AddressError(f"address part {part!r} has no transport (want unix:… or tcp:…)")
        fields: dict[str, str] = {}
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise AddressError(f"address part {part!r}: {item!r} is not key=value")
            if key in fields:
                raise AddressError(f"address part {part!r}: {key!r} given twice")
            fields[key] = unquote(value)
        if "key" not in fields:
            raise AddressError(f"address part {part!r} has no key=@….ed25519 (the broker's identity)")
        try:
            public = PublicKey.from_id(fields["key"])
            # The handshake needs the key as a curve25519 point: check that here, not after
            # a socket is open.
            curve25519_public(public.raw)
        except ValueError as exc:
            raise AddressError(f"address part {part!r}: {exc}") from None
        except Exception:
            raise AddressError(f"address part {part!r}: the key is not a valid Ed25519 point") from None
        if transport == "unix":
            if not fields.get("path"):
                raise AddressError(f"address part {part!r} has no path=")
            encrypted = fields.get("encrypted", "0")
            if encrypted not in ("0", "1"):
                raise AddressError(f"address part {part!r}: encrypted= is 0 or 1")
            endpoints.append(Endpoint("unix", public, path=fields["path"], encrypted=encrypted == "1"))
        elif transport == "tcp":
            host, port = fields.get("host"), fields.get("port", "")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise AddressError(f"address part {part!r} needs host= and a port= between 1 and 65535")
            endpoints.append(Endpoint("tcp", public, host=host, port=int(port)))
        else:
            raise AddressError(f"unknown transport {transport!r} (want unix or tcp)")
    if not endpoints:
        raise AddressError("empty bus address")
    return tuple(endpoints)
