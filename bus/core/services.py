"""Service files: what busd may start, and how (sans-io).

Theory of operation
-------------------
An installed plugin is described by one TOML file (see docs/activation.md)::

    name = "org.example.Echo"
    exec = ["python", "../echo_service.py"]
    description = "echoes what it is sent"
    version = "0.2.0"
    activation = "on-demand"        # or "always"
    restart = "on-failure"          # or "always", "never"
    working_directory = ".."        # default: the directory that holds the file
    environment = { LOG_LEVEL = "info" }
    identity = "echo.key"           # a key file; the plugin connects as that identity
    stop_timeout = 5.0              # seconds between SIGTERM and SIGKILL

:func:`parse_service` turns a file's bytes and its path into a :class:`ServiceSpec`, or
raises :class:`ServiceFileError` naming the file and the field: unknown keys and wrong types
are refused, never ignored.  Relative paths (``working_directory``, ``identity``, and an
``exec`` program containing a ``/``) are taken relative to the file's directory, for the
first two, and to the working directory for the program, so a service file can sit beside
its plugin.  Reading the files (owners, modes, sizes) is the trio side's business
(``bus.supervisor``); this module only judges their content.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from ..errors import BusError, InvalidName
from .names import validate_name

__all__ = [
    "ServiceSpec",
    "ServiceFileError",
    "parse_service",
    "ACTIVATIONS",
    "RESTARTS",
    "SERVICE_FILE_BYTES",
]

ACTIVATIONS = ("on-demand", "always")
RESTARTS = ("on-failure", "always", "never")
#: A service file is at most this many bytes.
SERVICE_FILE_BYTES = 64 * 1024
_FIELDS = (
    "name",
    "exec",
    "description",
    "version",
    "activation",
    "restart",
    "working_directory",
    "environment",
    "identity",
    "stop_timeout",
)
_TEXT_LIMIT = 1024  # description, version
_ARGS_LIMIT = 256  # exec arguments
_ENV_LIMIT = 256  # environment entries


class ServiceFileError(BusError):
    """A service file that cannot be used; ``path`` and ``field`` say where (``field`` is
    empty when the file as a whole is wrong, e.g. not TOML)."""

    def __init__(self, path: str, field: str, problem: str) -> None:
        where = f"{path}: {field}: " if field else f"{path}: "
        super().__init__(where + problem)
        self.path = path
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One installed plugin, as its service file describes it (paths already resolved)."""

    name: str
    exec: tuple[str, ...]
    path: str  # the service file
    description: str = ""
    version: str = ""
    activation: str = "on-demand"
    restart: str = "on-failure"
    working_directory: str = ""
    environment: dict[str, str] = field(default_factory=dict)
    identity: str | None = None
    stop_timeout: float = 5.0

    def to_wire(self, *, details: bool) -> dict[str, Any]:
        """The file's fields as a reply shows them; ``details`` (for admins) adds the file,
        the command line and the working directory."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "activation": self.activation,
            "restart": self.restart,
        }
        if details:
            out.update(file=self.path, exec=list(self.exec), working_directory=self.working_directory)
        return out


def _text(path: str, data: dict[str, Any], key: str, default: str, limit: int = _TEXT_LIMIT) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ServiceFileError(path, key, f"expected a string, got {type(value).__name__}")
    if len(value) > limit:
        raise ServiceFileError(path, key, f"longer than {limit} characters")
    if "\0" in value:
        raise ServiceFileError(path, key, "contains a NUL character")
    return value


def _choice(path: str, data: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = _text(path, data, key, choices[0])
    if value not in choices:
        raise ServiceFileError(path, key, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


def _resolve(base: PurePath, value: str) -> str:
    return str(base / value) if value else str(base)


def parse_service(data: bytes | str, path: str) -> ServiceSpec:
    """The :class:`ServiceSpec` a service file describes, or :class:`ServiceFileError`."""
    if isinstance(data, bytes):
        if len(data) > SERVICE_FILE_BYTES:
            raise ServiceFileError(path, "", f"larger than {SERVICE_FILE_BYTES} bytes")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ServiceFileError(path, "", "not UTF-8 text") from None
    try:
        table = tomllib.loads(data)
    except tomllib.TOMLDecodeError as exc:
        raise ServiceFileError(path, "", f"not valid TOML: {exc}") from None
    for key in table:
        if key not in _FIELDS:
            raise ServiceFileError(path, key, f"unknown field (known: {', '.join(_FIELDS)})")
    if "name" not in table:
        raise ServiceFileError(path, "name", "missing (the well-known name the plugin owns)")
    name = _text(path, table, "name", "", 255)
    try:
        validate_name(name)
    except InvalidName as exc:
        raise ServiceFileError(path, "name", exc.message) from None
    argv = table.get("exec")
    if argv is None:
        raise ServiceFileError(path, "exec", "missing (the command line, a list of strings)")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ServiceFileError(path, "exec", "expected a non-empty list of strings (an argv; no shell)")
    if len(argv) > _ARGS_LIMIT or any("\0" in a for a in argv) or not argv[0]:
        raise ServiceFileError(path, "exec", f"at most {_ARGS_LIMIT} arguments, no NUL, a non-empty program")
    base = PurePath(path).parent
    workdir = _resolve(base, _text(path, table, "working_directory", "", 4096))
    program = argv[0]
    if "/" in program and not program.startswith("/"):
        program = str(PurePath(workdir) / program)
    env = table.get("environment", {})
    if not isinstance(env, dict) or len(env) > _ENV_LIMIT:
        raise ServiceFileError(path, "environment", f"expected a table of at most {_ENV_LIMIT} strings")
    for key, value in env.items():
        if not isinstance(value, str) or not key or "=" in key or "\0" in key or "\0" in value:
            raise ServiceFileError(path, "environment", f"{key!r}: expected a string value and a name without '=' or NUL")
    identity = table.get("identity")
    if identity is not None:
        identity = _resolve(base, _text(path, table, "identity", "", 4096))
        if not table["identity"]:
            raise ServiceFileError(path, "identity", "an empty path")
    timeout = table.get("stop_timeout", 5.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or not 0 < timeout <= 3600:
        raise ServiceFileError(path, "stop_timeout", "expected a number of seconds, more than 0 and at most 3600")
    return ServiceSpec(
        name=name,
        exec=(program, *argv[1:]),
        path=path,
        description=_text(path, table, "description", ""),
        version=_text(path, table, "version", ""),
        activation=_choice(path, table, "activation", ACTIVATIONS),
        restart=_choice(path, table, "restart", RESTARTS),
        working_directory=workdir,
        environment=dict(env),
        identity=identity,
        stop_timeout=float(timeout),
    )
