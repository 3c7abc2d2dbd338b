"""Identities: Ed25519 key pairs, their text form, and Scuttlebutt-format key files.

An identity *is* a key.  Its public half is written ``@<base64>.ed25519`` (standard base64
alphabet with ``=`` padding, 53 characters in all), the same text Scuttlebutt uses for feed
ids, so keys move freely between minibus and SSB tools.

Key files use the SSB secret-file format: ``#`` comment lines around one JSON object
``{"curve": "ed25519", "public": "<b64>.ed25519", "private": "<b64 of 64-byte sk>.ed25519",
"id": "@<b64>.ed25519"}``.  Files are created with mode 0600 in a 0700 directory; a key file
that group or others may read is refused with :class:`~bus.errors.InsecureKeyFile`.

This module does blocking file I/O but no network I/O; it belongs to the sans-io wire layer.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings as sodium

from ..errors import InsecureKeyFile, KeyFileError
from .files import LocalFileError, check_file_stat, create_temp_file

__all__ = [
    "curve25519_public",
    "PublicKey",
    "Identity",
    "default_identity_path",
    "load_identity",
    "save_identity",
    "load_or_create_identity",
]


@functools.lru_cache(maxsize=256)
def curve25519_public(raw: bytes) -> bytes:
    """An Ed25519 public key as the Curve25519 point the handshake needs (ValueError-like
    pynacl errors for a key that is not a valid point; those are never cached).

    Remembered for the last 256 keys: a client dials the same broker key every time, and a
    broker sees the same clients again; the conversion costs tens of microseconds."""
    return sodium.crypto_sign_ed25519_pk_to_curve25519(raw)

_SUFFIX = ".ed25519"


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A verified-format Ed25519 public key (32 bytes)."""

    raw: bytes
    _id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise ValueError("an Ed25519 public key is exactly 32 bytes")
        # The text form is asked for on hot paths (stamping events, policy memos): made once.
        object.__setattr__(self, "_id", "@" + base64.b64encode(self.raw).decode("ascii") + _SUFFIX)

    @classmethod
    def from_id(cls, text: str) -> PublicKey:
        """Parse ``@<base64>.ed25519`` (the leading ``@`` is optional)."""
        body = text[1:] if text.startswith("@") else text
        if not body.endswith(_SUFFIX):
            raise ValueError(f"not an ed25519 identity (expected '@<base64>.ed25519'): {text!r}")
        raw = _b64decode(body[: -len(_SUFFIX)], 32, text)
        return cls(raw)

    @property
    def id(self) -> str:
        """The text form, ``@<base64>.ed25519``."""
        return self._id

    def __str__(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"PublicKey({self.id!r})"


@dataclass(frozen=True, slots=True)
class Identity:
    """An Ed25519 key pair: who a process is on the bus."""

    seed: bytes = field(repr=False)
    public_key: PublicKey
    #: libsodium's 64-byte secret key, ``seed || public``.
    secret_key: bytes = field(repr=False)
    #: The secret key converted to Curve25519, for the handshake's Diffie-Hellman steps.
    curve_secret: bytes = field(repr=False)

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is exactly 32 bytes")
        pk, sk = sodium.crypto_sign_seed_keypair(seed)
        return cls(seed, PublicKey(pk), sk, sodium.crypto_sign_ed25519_sk_to_curve25519(sk))

    @classmethod
    def from_secret_key(cls, secret_key: bytes) -> Identity:
        """From libsodium's 64-byte form; the public half must match the seed."""
        if len(secret_key) != 64:
            raise ValueError("an Ed25519 secret key is exactly 64 bytes")
        ident = cls.from_seed(secret_key[:32])
        if ident.secret_key != secret_key:
            raise ValueError("the secret key's public half does not belong to its seed")
        return ident

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_seed(os.urandom(32))

    @property
    def id(self) -> str:
        return self.public_key.id

    def sign(self, message: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature."""
        signed: bytes = sodium.crypto_sign(message, self.secret_key)
        return signed[:64]

    def to_secret_file(self) -> str:
        """The SSB secret-file text for this identity."""
        pub = base64.b64encode(self.public_key.raw).decode("ascii")
        priv = base64.b64encode(self.secret_key).decode("ascii")
        body = json.dumps(
            {
                "curve": "ed25519",
                "public": pub + _SUFFIX,
                "private": priv + _SUFFIX,
                "id": "@" + pub + _SUFFIX,
            },
            indent=2,
        )
        return (
            "# this is your SECRET name.\n"
            "# this name gives you magical powers.\n"
            "# with it you can prove who you are on a minibus (or an ssb network).\n"
            "# never show this to anyone!\n\n"
            f"{body}\n\n"
            "# WARNING! It's vital that you DO NOT edit OR share your secret name\n"
            "# instead, share your public name\n"
            f"# your public name: {self.id}\n"
        )

    @classmethod
    def from_secret_file(cls, text: str, source: str = "key file") -> Identity:
        """Parse the SSB secret-file format, checking that every field agrees."""
        lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        try:
            obj = json.loads("\n".join(lines))
        except (ValueError, RecursionError) as exc:
            raise KeyFileError(f"{source}: not a secret file (no JSON object): {exc}") from exc
        if not isinstance(obj, dict):
            raise KeyFileError(f"{source}: not a secret file (JSON is not an object)")
        if obj.get("curve") != "ed25519":
            raise KeyFileError(f"{source}: secret file has unsupported curve {obj.get('curve')!r}, want 'ed25519'")
        try:
            private = obj["private"]
            if not isinstance(private, str) or not private.endswith(_SUFFIX):
                raise ValueError("'private' must be '<base64>.ed25519'")
            ident = cls.from_secret_key(_b64decode(private[: -len(_SUFFIX)], 64, "private"))
            for key, want in (("public", ident.id[1:]), ("id", ident.id)):
                if key in obj and obj[key] != want:
                    raise ValueError(f"{key!r} does not match the private key")
        except (KeyError, ValueError) as exc:
            raise KeyFileError(f"{source}: corrupt secret file: {exc}") from exc
        return ident


def _b64decode(text: str, length: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"bad base64 in {what!r}") from exc
    if len(raw) != length:
        raise ValueError(f"{what!r} decodes to {len(raw)} bytes, expected {length}")
    return raw


def default_identity_path() -> Path:
    """``$XDG_CONFIG_HOME/minibus/secret``, falling back to ``~/.config/minibus/secret``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "minibus" / "secret"


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Load a key file, refusing one that group or others can read."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang us before the checks below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such key file (create one with 'busctl keygen {path}')") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot open key file: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        try:
            check_file_stat(st, path, "key file", secret=True)
        except LocalFileError as exc:
            raise InsecureKeyFile(str(exc)) from None
        data = f.read(65536)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{path}: corrupt secret file (not UTF-8 text)") from exc
    return Identity.from_secret_file(text, str(path))


def save_identity(path: str | os.PathLike[str], identity: Identity, *, overwrite: bool = False) -> None:
    """Write a key file with mode 0600 (its directory is created 0700 when missing).

    The file is written beside its final name and renamed into place, so a crash never
    leaves half a key.  An existing file is kept unless ``overwrite`` is true.
    """
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"{path.parent}: cannot create the key directory: {exc.strerror}") from exc
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite an identity")
    try:
        fd, tmp = create_temp_file(path)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot write the key file: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(identity.to_secret_file())
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if another process created the file meanwhile: first writer wins.
            try:
                os.link(tmp, path)
            except FileExistsError as exc:
                raise KeyFileError(f"{path}: already exists; refusing to overwrite an identity") from exc
            finally:
                os.unlink(tmp)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def load_or_create_identity(path: str | os.PathLike[str] | None = None) -> Identity:
    """Load the identity at ``path`` (default: :func:`default_identity_path`), creating it on first use."""
    path = Path(path) if path is not None else default_identity_path()
    if not path.exists():
        try:
            save_identity(path, Identity.generate())
        except KeyFileError:
            pass  # another process created it first; load theirs
    return load_identity(path)
