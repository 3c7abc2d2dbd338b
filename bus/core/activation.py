"""Installed plugins at the broker: their state, and requests held until one takes its name
(sans-io).

Theory of operation
-------------------
:class:`ServiceTable` is what :class:`~bus.core.broker.BrokerCore` knows of the installed
plugins: the :class:`~bus.core.services.ServiceSpec` of each activatable name, the
:class:`ServiceState` the supervisor (``bus.supervisor``, the trio side) keeps up to date, and
the requests *held* for a name that nobody owns yet.

When a channel is opened to an activatable name that has no owner, the core holds the
``open_channel`` request (charged like a pending opening: a pending slot of the opener's
connection and identity, and a fair share of the name's own ``pending_opens_per_target``
budget) and, for the first request held for that name, emits a :class:`ServiceAction`
``activate``: the supervisor starts the plugin (or waits for the one already running) under
the activation deadline.  As soon as the name gets an owner, the core replays every held
request as if it had just arrived, and emits ``owned`` so the supervisor knows the launch
worked.  If the launch fails, the supervisor calls :meth:`BrokerCore.activation_failed` and
every held request gets an ``ActivationFailed`` error saying why.

The admin commands (start, stop, restart, reload) are :class:`ServiceAction` items too; the
supervisor carries them out and answers through :meth:`BrokerCore.service_reply`.  Each one
waiting for its answer holds a pending slot of its connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..wire.messages import Request
from .accounting import Budget, Charge
from .services import ServiceSpec

__all__ = ["ServiceAction", "ServiceState", "HeldRequest", "ServiceTable", "STATES"]

#: What a plugin can be doing, as ``busctl list --activatable`` shows it.
STATES = ("not running", "starting", "running", "stopping", "restarting", "failed")


class ServiceAction(NamedTuple):
    """Work for the supervisor: ``activate`` (start the plugin of ``name`` for held requests,
    or wait for the one running), ``owned`` (``name`` has an owner now), or an admin command
    (``start``, ``stop``, ``restart``, ``reload``) that ``conn`` sent as ``request`` and that
    is answered through :meth:`~bus.core.broker.BrokerCore.service_reply`."""

    op: str
    name: str
    conn: int = 0
    request: int = 0


@dataclass(slots=True)
class ServiceState:
    """What the supervisor knows of one plugin (it updates these fields; the core shows them)."""

    state: str = "not running"
    pid: int | None = None
    #: Restarts by the supervisor (after an exit) since it was last started on purpose.
    restarts: int = 0
    #: Processes started for it since busd started (every launch, restarts included).
    launches: int = 0
    #: How its last process ended ("exited with status 1", "killed by SIGKILL"), if one did.
    last_exit: str | None = None
    #: When its current process started (seconds since the epoch), if it runs.
    since: float | None = None
    #: Why it was marked failed (a crash loop), if it is.
    failure: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "launches": self.launches,
            "last_exit": self.last_exit,
            "since": self.since,
            "failure": self.failure,
        }


@dataclass(slots=True)
class HeldRequest:
    """A request waiting for ``name`` to get an owner (or a supervisor's answer)."""

    conn: int
    request: Request
    name: str
    charge: Charge = field(default_factory=Charge)


class ServiceTable:
    """The installed plugins: specs, states, and the requests held for them."""

    def __init__(self, pending_per_name: int) -> None:
        self.specs: dict[str, ServiceSpec] = {}
        self.states: dict[str, ServiceState] = {}
        #: Channel openings held per activatable name, oldest first.
        self.held: dict[str, list[HeldRequest]] = {}
        #: Admin commands waiting for the supervisor, by (connection, request id).
        self.commands: dict[tuple[int, int], HeldRequest] = {}
        self._budgets: dict[str, Budget] = {}
        self._pending_per_name = pending_per_name

    def replace(self, specs: dict[str, ServiceSpec]) -> list[str]:
        """Take a new set of service files (a reload); returns the names that are gone.

        The state of a name that stays is kept (its process runs on); a gone name keeps its
        state until the supervisor has stopped it (see :meth:`forget`)."""
        gone = [name for name in self.specs if name not in specs]
        self.specs = dict(specs)
        for name in specs:
            self.states.setdefault(name, ServiceState())
        return gone

    def forget(self, name: str) -> None:
        """A gone name's plugin is stopped: drop its state too."""
        if name not in self.specs:
            self.states.pop(name, None)
            if not self.held.get(name):
                self._budgets.pop(name, None)

    def state(self, name: str) -> ServiceState:
        return self.states.setdefault(name, ServiceState())

    def budget(self, name: str) -> Budget:
        """The name's own room for held openings (shared fairly among its openers)."""
        budget = self._budgets.get(name)
        if budget is None:
            budget = self._budgets[name] = Budget("pending_opens_per_target", name, self._pending_per_name)
        return budget

    def hold(self, item: HeldRequest) -> bool:
        """Hold an opening; True when it is the first held for its name (a launch is due)."""
        held = self.held.setdefault(item.name, [])
        held.append(item)
        return len(held) == 1

    def release(self, name: str) -> list[HeldRequest]:
        """Every opening held for ``name`` (their charges released), oldest first."""
        held = self.held.pop(name, [])
        for item in held:
            item.charge.release()
        return held

    def drop_connection(self, conn_id: int) -> None:
        """A connection left: its held openings and commands go, and what they held."""
        if not self.held and not self.commands:
            return  # (the usual case: nothing held for anyone)
        for name in list(self.held):
            kept = []
            for item in self.held[name]:
                if item.conn == conn_id:
                    item.charge.release()
                else:
                    kept.append(item)
            if kept:
                self.held[name] = kept
            else:
                del self.held[name]
        for key in [k for k in self.commands if k[0] == conn_id]:
            self.commands.pop(key).charge.release()
