"""Who pays for what the broker holds: budgets, charges and fair shares (sans-io).

Theory of operation
-------------------
Every resource the broker keeps for someone (a channel, a pending channel opening, a watch,
relay buffer space) is paid for out of :class:`Budget` slots: one per limit, per connection
and per identity.  Taking a resource makes a :class:`Charge` that records exactly what was
taken from which budgets, and the object that owns the resource holds it; releasing the
charge gives everything back, and a second release is a no-op, so release happens exactly
once by construction (as in dbus-broker's ``user.c``).

Some budgets belong to one party but are spent by others: the channels and pending
openings a *target* has room for are taken by whoever opens to it.  Those spends name an
*actor* (the spender's identity), and an actor that already holds some may never hold more
than what is left free after its charge, nor take any of the last eighth of the budget: one
opener can take at most half of a target's room, and however many join in, an eighth stays
for openers that hold nothing yet (an actor's first unit is granted while any is free).  So
no peer, nor any group of them, can lock a service against a newcomer until an eighth of the
budget's worth of newcomers came.  Charging one's own budgets is never shared out.

A refusal is a :class:`~bus.errors.QuotaExceeded` whose message names the limit (the
setting in ``[limits]``), who owns the budget and who asked.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import QuotaExceeded

__all__ = ["Budget", "Charge"]


class Budget:
    """One slot: ``limit`` units of one kind, owned by one connection or identity."""

    __slots__ = ("limit_name", "owner", "limit", "used", "_by_actor")

    def __init__(self, limit_name: str, owner: str, limit: int) -> None:
        self.limit_name = limit_name
        self.owner = owner
        self.limit = limit
        self.used = 0
        # Units held per actor, for a shared budget (made when an actor first takes some:
        # most budgets never have one, and a broker holds seven per connection).
        self._by_actor: dict[str, int] | None = None

    @property
    def free(self) -> int:
        return self.limit - self.used

    def held_by(self, actor: str) -> int:
        return self._by_actor.get(actor, 0) if self._by_actor else 0

    def check(self, amount: int, actor: str | None = None) -> None:
        """Raise :class:`QuotaExceeded` unless ``amount`` more can be taken (by ``actor``)."""
        if amount > self.free:
            raise QuotaExceeded(
                f"{self.limit_name} reached: {self.owner} holds {self.used} of {self.limit}"
                + (f" (asked by {actor})" if actor is not None else "")
            )
        if actor is not None:
            held = self._by_actor.get(actor, 0) if self._by_actor else 0
            if held and self.free - amount < max(held + amount, self.limit // 8):
                raise QuotaExceeded(
                    f"{self.limit_name}: {actor} may hold at most a fair share of what {self.owner} has free "
                    f"({held} held, {self.free} of {self.limit} free, the last eighth kept for newcomers)"
                )

    def _take(self, amount: int, actor: str | None) -> None:
        self.used += amount
        if actor is not None:
            if self._by_actor is None:
                self._by_actor = {}
            self._by_actor[actor] = self._by_actor.get(actor, 0) + amount

    def _give(self, amount: int, actor: str | None) -> None:
        self.used -= amount
        if actor is not None:
            by_actor = self._by_actor
            assert by_actor is not None  # (it took some)
            left = by_actor[actor] - amount
            if left:
                by_actor[actor] = left
            else:
                del by_actor[actor]
                if not by_actor:
                    self._by_actor = None


class Charge:
    """What one resource took, from which budgets; :meth:`release` gives it back once."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[tuple[Budget, int, str | None]] = []

    @classmethod
    def take(cls, amount: int, own: Iterable[Budget] = (), shared: Iterable[Budget] = (), actor: str = "") -> Charge:
        """Take ``amount`` from each of ``own`` and (as ``actor``) from each of ``shared``.

        All or nothing: every budget is checked before any is charged."""
        own, shared = list(own), list(shared)
        for budget in own:
            budget.check(amount)
        for budget in shared:
            budget.check(amount, actor)
        charge = cls()
        for budget in own:
            budget._take(amount, None)
            charge._parts.append((budget, amount, None))
        for budget in shared:
            budget._take(amount, actor)
            charge._parts.append((budget, amount, actor))
        return charge

    @property
    def amount(self) -> int:
        return self._parts[0][1] if self._parts else 0

    def add(self, other: Charge) -> None:
        """Take over what ``other`` holds (released together from now on)."""
        self._parts += other._parts
        other._parts = []

    def move(self) -> Charge:
        """A new charge holding what this one held (this one is left empty): for handing a
        resource's payment to the object that owns it next."""
        moved = Charge()
        moved._parts, self._parts = self._parts, []
        return moved

    def release(self) -> None:
        parts, self._parts = self._parts, []
        for budget, amount, actor in parts:
            budget._give(amount, actor)

    def __bool__(self) -> bool:
        return bool(self._parts)
