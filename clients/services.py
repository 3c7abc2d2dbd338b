"""Installed plugins, as the broker shows and runs them (service files; docs/activation.md).

:class:`Services` sends the broker's service requests: ``list_services`` (every page),
``service_status``, and the admin commands ``start_service``, ``stop_service``,
``restart_service`` and ``reload_services``.  Starting waits until the plugin owns its name
(or the broker's activation deadline passed), so its request gets a longer deadline than
the others: :data:`START_TIMEOUT` at least.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .link import BusConnection

__all__ = ["Services", "ServiceInfo", "START_TIMEOUT"]

#: The deadline of a start or restart request, at least (the broker's activation deadline is
#: 8 s by default, and a stop before a restart may take the plugin's stop_timeout).
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class ServiceInfo:
    """One installed plugin: what its service file says and what busd is doing with it."""

    name: str
    description: str
    version: str
    activation: str
    restart: str
    state: str
    pid: int | None
    restarts: int
    launches: int
    last_exit: str | None
    since: float | None
    failure: str | None
    owner: str | None
    #: For admins only: the service file, the command line and the working directory.
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, entry: dict[str, Any]) -> ServiceInfo:
        def text(key: str) -> str:
            value = entry.get(key)
            return value if isinstance(value, str) else ""

        def maybe(key: str, kind: type | tuple[type, ...]) -> Any:
            value = entry.get(key)
            return value if isinstance(value, kind) and not isinstance(value, bool) else None

        details: dict[str, Any] = {k: entry[k] for k in ("file", "exec", "working_directory") if k in entry}
        return cls(
            name=text("name"),
            description=text("description"),
            version=text("version"),
            activation=text("activation"),
            restart=text("restart"),
            state=text("state"),
            pid=maybe("pid", int),
            restarts=maybe("restarts", int) or 0,
            launches=maybe("launches", int) or 0,
            last_exit=maybe("last_exit", str),
            since=maybe("since", (int, float)),
            failure=maybe("failure", str),
            owner=maybe("owner", str),
            details=details,
        )

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "description": self.description,
            "version": self.version,
            "activation": self.activation,
            "restart": self.restart,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "launches": self.launches,
            "last_exit": self.last_exit,
            "since": self.since,
            "failure": self.failure,
            "owner": self.owner,
        }
        out.update(self.details)
        return out


class Services:
    """The broker's installed plugins, over one :class:`~clients.link.BusConnection`."""

    def __init__(self, connection: BusConnection) -> None:
        self._connection = connection

    async def list(self) -> list[ServiceInfo]:
        entries: list[ServiceInfo] = []
        after: str | None = None
        while True:
            args: dict[str, Any] = {} if after is None else {"after": after}
            page = await self._connection.request("list_services", args)
            entries += [ServiceInfo.from_wire(e) for e in page.get("entries", []) if isinstance(e, dict)]
            after = page.get("next")
            if not isinstance(after, str):
                return entries

    async def status(self, name: str) -> ServiceInfo:
        return ServiceInfo.from_wire(await self._connection.request("service_status", {"name": name}))

    async def command(self, op: str, name: str | None = None) -> dict[str, Any]:
        """``start``, ``stop``, ``restart`` (``name``) or ``reload``: the broker's answer."""
        args = {} if name is None else {"name": name}
        op_name = "reload_services" if op == "reload" else f"{op}_service"
        timeout = max(self._connection.request_timeout, START_TIMEOUT)
        result = await self._connection.request(op_name, args, timeout=timeout)
        return result if isinstance(result, dict) else {}
