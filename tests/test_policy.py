"""Policy decisions (sans-io)."""

from __future__ import annotations

import tomllib

import pytest

from bus.core.policy import Policy, PolicyError, parse_authorized_keys
from bus.errors import AccessDenied
from bus.wire.identity import Identity

OWNER, FRIEND, PLUGIN, STRANGER = (Identity.generate().public_key for _ in range(4))

POLICY_TOML = f"""
[[rule]]
name = "echo-plugins"
identities = ["{PLUGIN.id}"]
connect = true
own = ["org.example.*"]
see = ["org.example.*"]

[[rule]]
name = "everyone-sees-public"
identities = ["*"]
see = ["org.public.*"]
"""


def policy() -> Policy:
    return Policy.from_mapping(OWNER, tomllib.loads(POLICY_TOML), frozenset({FRIEND.id}))


def test_owner_and_authorized_keys_may_do_everything() -> None:
    p = policy()
    for key in (OWNER, FRIEND):
        assert p.may_connect(key).allowed
        assert p.may_own(key, "com.anything.At.All").allowed
        assert p.may_see(key, "x.y").allowed
        assert p.is_admin(key)
    assert p.may_connect(OWNER).rule == "owner"
    assert p.may_connect(FRIEND).rule == "authorized_keys"


def test_unknown_identities_are_refused_by_default() -> None:
    decision = policy().may_connect(STRANGER)
    assert not decision.allowed and "default deny" in decision.rule


def test_rules_grant_what_they_say_and_denials_name_the_rules() -> None:
    p = policy()
    assert p.may_connect(PLUGIN).rule == "echo-plugins"
    assert p.may_own(PLUGIN, "org.example.Echo").allowed
    denied = p.may_own(PLUGIN, "org.other.Thing")
    assert not denied.allowed
    assert "echo-plugins" in denied.rule and "everyone-sees-public" in denied.rule
    with pytest.raises(AccessDenied, match="may not own 'org.other.Thing'"):
        denied.check()
    assert p.may_see(PLUGIN, "org.public.News").rule == "everyone-sees-public"
    assert not p.is_admin(PLUGIN)


def test_authorized_keys_file_format() -> None:
    text = f"# the team\n{FRIEND.id}  laptop\n\n   {PLUGIN.id} # ci\n"
    assert parse_authorized_keys(text) == {FRIEND.id, PLUGIN.id}
    with pytest.raises(PolicyError, match=":2:"):
        parse_authorized_keys("# ok\nnot-a-key\n")


@pytest.mark.parametrize(
    "toml",
    [
        'rule = "x"',
        "[[rule]]\nname = 1\nidentities = ['*']",
        "[[rule]]\nname = 'r'\nidentities = []",
        "[[rule]]\nname = 'r'\nidentities = ['@bad.ed25519']",
        "[[rule]]\nname = 'r'\nidentities = ['*']\nown = [1]",
        "[[rule]]\nname = 'r'\nidentities = ['*']\nconnect = 'yes'",
        "[[rule]]\nname = 'r'\nidentities = ['*']\nfly = true",
    ],
)
def test_bad_policies_are_refused(toml: str) -> None:
    with pytest.raises(PolicyError):
        Policy.from_mapping(OWNER, tomllib.loads(toml))


def test_decisions_stay_the_same_while_the_rules_per_identity_are_remembered_and_bounded() -> None:
    """The rules that apply to an identity are worked out once and remembered; a crowd of
    identities cannot grow the memo past its bound, and no decision changes with it."""
    from bus.core.policy import _APPLICABLE_MEMO

    p = policy()
    strangers = [Identity.generate().public_key for _ in range(_APPLICABLE_MEMO + 50)]
    for _ in range(2):
        for key in [PLUGIN, *strangers, PLUGIN, OWNER]:
            assert len(p._memo) <= _APPLICABLE_MEMO
            if key is PLUGIN:
                assert p.may_connect(key).allowed and not p.is_admin(key)
                assert p.may_own(key, "org.example.Echo").allowed
                assert not p.may_own(key, "org.other.Echo").allowed
                assert p.may_see(key, "org.public.X").allowed
            elif key is OWNER:
                assert p.may_connect(key).allowed and p.is_admin(key) and p.may_own(key, "org.other.Echo").allowed
            else:
                assert not p.may_connect(key).allowed and not p.is_admin(key)
                assert not p.may_own(key, "org.example.Echo").allowed
                denied = p.may_see(key, "org.example.Echo")
                assert not denied.allowed and "everyone-sees-public" in denied.rule
                assert p.may_see(key, "org.public.X").allowed


def test_a_pattern_of_star_allows_every_name_and_the_other_actions_still_match_their_patterns() -> None:
    """A rule whose patterns for an action include ``*`` allows that action on any name (no
    pattern is matched for it); its other actions keep to their own patterns."""
    p = Policy.from_mapping(
        OWNER,
        tomllib.loads(
            f"""
[[rule]]
name = "owns-anything"
identities = ["{PLUGIN.id}"]
connect = true
own = ["org.example.*", "*"]
see = ["org.example.*"]
"""
        ),
    )
    for name in ("org.example.Echo", "a.b", "org.other.X-1", "z." * 100 + "z"):
        assert p.may_own(PLUGIN, name) == p.may_own(PLUGIN, name) and p.may_own(PLUGIN, name).rule == "owns-anything"
        assert p.may_own(PLUGIN, name).allowed
    assert p.may_see(PLUGIN, "org.example.Echo").allowed
    denied = p.may_see(PLUGIN, "org.other.Echo")
    assert not denied.allowed and "owns-anything" in denied.rule
    assert not p.may_emit(PLUGIN, "org.example.Echo").allowed
    assert not p.may_own(STRANGER, "org.example.Echo").allowed
