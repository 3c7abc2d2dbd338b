"""Who may do what on the bus (sans-io).

Theory of operation
-------------------
Policy is a list of *allow* rules; anything no rule allows is denied.  A rule names the
identities it applies to (``@….ed25519`` keys, or ``*`` for every identity that got in)
and what they may do: ``connect``, ``own`` / ``see`` / ``open`` / ``emit`` name patterns
(shell globs such as ``org.example.*``), and ``admin``.  Two rules are always there first:

* ``owner`` -- the broker's own identity (the user's default key) may do everything;
* ``authorized_keys`` -- every key listed in the authorized-keys file may do everything.

Every decision says which rule allowed it, or, for a denial, what was asked and which
rules were looked at, so a client's error names the rule.  The TOML form::

    authorized_keys = "/path/to/authorized_keys"    # optional

    [[rule]]
    name = "plugins"
    identities = ["@AAAA….ed25519", "@BBBB….ed25519"]
    connect = true
    own = ["org.example.*"]
    see = ["*"]
    open = ["org.example.*"]
    emit = ["org.example.*"]        # may emit events as these names (when it owns them)
    admin = false
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import AccessDenied
from ..wire.identity import PublicKey
from .glob import Glob, GlobError, compile_glob

__all__ = ["Rule", "Decision", "Policy", "PolicyError", "parse_authorized_keys"]

_ACTIONS = ("own", "see", "open", "emit")


class PolicyError(ValueError):
    """A policy file or authorized-keys file that cannot be used."""


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    identities: frozenset[str]  # key ids, or "*"
    connect: bool = False
    own: tuple[str, ...] = ()
    see: tuple[str, ...] = ()
    open: tuple[str, ...] = ()
    emit: tuple[str, ...] = ()
    admin: bool = False
    _globs: dict[str, tuple[Glob, ...]] = field(init=False, repr=False, compare=False, hash=False)
    # The actions one of whose patterns is ``*`` (every name: no pattern is matched for them).
    _everything: frozenset[str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        try:
            globs = {action: tuple(compile_glob(p) for p in getattr(self, action)) for action in _ACTIONS}
        except GlobError as exc:
            raise PolicyError(f"rule {self.name!r}: {exc}") from None
        object.__setattr__(self, "_globs", globs)
        object.__setattr__(self, "_everything", frozenset(a for a in _ACTIONS if "*" in getattr(self, a)))

    def applies_to(self, key: PublicKey) -> bool:
        return "*" in self.identities or key.id in self.identities

    def allows(self, action: str, name: str) -> bool:
        if action in self._everything:
            return True
        for glob in self._globs[action]:
            if glob.match(name):
                return True
        return False


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # the rule that allowed it, or a description of the denial

    def check(self) -> None:
        """Raise :class:`AccessDenied` naming the rule, if denied."""
        if not self.allowed:
            raise AccessDenied(self.rule)


def parse_authorized_keys(text: str, source: str = "authorized_keys") -> frozenset[str]:
    """One ``@….ed25519`` per line; ``#`` starts a comment; blank lines are ignored."""
    keys = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            keys.add(PublicKey.from_id(line.split()[0]).id)
        except ValueError as exc:
            raise PolicyError(f"{source}:{number}: {exc}") from None
    return frozenset(keys)


#: Identities whose applicable rules a policy remembers (see Policy._applicable).
_APPLICABLE_MEMO = 1024


def _everything(name: str, identities: Iterable[str]) -> Rule:
    return Rule(name, frozenset(identities), connect=True, own=("*",), see=("*",), open=("*",), emit=("*",), admin=True)


@dataclass(frozen=True)
class Policy:
    owner: PublicKey
    authorized_keys: frozenset[str] = frozenset()
    rules: tuple[Rule, ...] = ()
    _all: tuple[Rule, ...] = field(init=False, repr=False)
    # The rules that apply to an identity, by its id (see _applicable).
    _memo: dict[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        built = (_everything("owner", [self.owner.id]), _everything("authorized_keys", self.authorized_keys))
        object.__setattr__(self, "_all", built + tuple(self.rules))
        object.__setattr__(self, "_memo", {})

    @classmethod
    def from_mapping(cls, owner: PublicKey, data: Mapping[str, Any], authorized_keys: frozenset[str] = frozenset()) -> Policy:
        """Build from parsed TOML (the ``[[rule]]`` tables)."""
        rules = []
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list):
            raise PolicyError("'rule' must be an array of tables ([[rule]])")
        for i, raw in enumerate(raw_rules, 1):
            if not isinstance(raw, Mapping):
                raise PolicyError(f"rule {i} is not a table")
            unknown = set(raw) - {"name", "identities", "connect", "admin", *_ACTIONS}
            if unknown:
                raise PolicyError(f"rule {i}: unknown keys {sorted(unknown)}")
            name = raw.get("name", f"rule-{i}")
            identities = raw.get("identities", [])
            if not isinstance(name, str) or not isinstance(identities, list) or not identities:
                raise PolicyError(f"rule {name!r}: needs a string 'name' and a non-empty 'identities' list")
            ids = set()
            for ident in identities:
                if ident == "*":
                    ids.add("*")
                    continue
                try:
                    ids.add(PublicKey.from_id(str(ident)).id)
                except ValueError as exc:
                    raise PolicyError(f"rule {name!r}: {exc}") from None
            patterns: dict[str, tuple[str, ...]] = {}
            for action in _ACTIONS:
                value = raw.get(action, [])
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                    raise PolicyError(f"rule {name!r}: {action!r} must be a list of name patterns")
                patterns[action] = tuple(value)
            for flag in ("connect", "admin"):
                if not isinstance(raw.get(flag, False), bool):
                    raise PolicyError(f"rule {name!r}: {flag!r} must be true or false")
            rules.append(
                Rule(
                    name,
                    frozenset(ids),
                    connect=raw.get("connect", False),
                    admin=raw.get("admin", False),
                    **patterns,
                )
            )
        return cls(owner, authorized_keys, tuple(rules))

    # -- decisions --------------------------------------------------------------------------

    def _applicable(self, key: PublicKey) -> tuple[Rule, ...]:
        """The rules that apply to ``key``, remembered: a connect asks three times (connect,
        admin, the hello's name).  A policy never changes; the memo holds at most
        ``_APPLICABLE_MEMO`` identities (it starts over when full), so no peer can grow it."""
        memo = self._memo
        rules = memo.get(key.id)
        if rules is None:
            if len(memo) >= _APPLICABLE_MEMO:
                memo.clear()
            rules = memo[key.id] = tuple(r for r in self._all if r.applies_to(key))
        return rules

    def may_connect(self, key: PublicKey) -> Decision:
        for rule in self._applicable(key):
            if rule.connect:
                return Decision(True, rule.name)
        return Decision(False, f"{key.id} may not connect: no rule allows it (default deny)")

    def is_admin(self, key: PublicKey) -> bool:
        return any(r.admin for r in self._applicable(key))

    def may(self, action: str, key: PublicKey, name: str) -> Decision:
        """Whether ``key`` may ``action`` (own, see, open, emit) ``name``, and which rule says so."""
        return self._may(action, key, name)

    def _may(self, action: str, key: PublicKey, name: str) -> Decision:
        applicable = self._applicable(key)
        for rule in applicable:
            if rule.allows(action, name):
                return Decision(True, rule.name)
        looked = ", ".join(r.name for r in applicable) or "none"
        return Decision(False, f"{key.id} may not {action} {name!r}: no rule allows it (rules for this identity: {looked})")

    def may_own(self, key: PublicKey, name: str) -> Decision:
        return self._may("own", key, name)

    def may_see(self, key: PublicKey, name: str) -> Decision:
        return self._may("see", key, name)

    def may_emit(self, key: PublicKey, name: str) -> Decision:
        """Whether ``key`` may emit events as the well-known ``name`` (owning it is needed too)."""
        return self._may("emit", key, name)

    def may_open(self, key: PublicKey, name: str) -> Decision:
        return self._may("open", key, name)
