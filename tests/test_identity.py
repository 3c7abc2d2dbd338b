"""Identities and SSB-format key files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from bus.errors import InsecureKeyFile, KeyFileError
from bus.wire.identity import (
    Identity,
    PublicKey,
    default_identity_path,
    load_identity,
    load_or_create_identity,
    save_identity,
)


def test_text_form_is_ssb_feed_id() -> None:
    ident = Identity.from_seed(bytes(range(32)))
    text = ident.id
    assert text.startswith("@") and text.endswith(".ed25519")
    assert len(text) == 53  # 44 base64 characters with one '=' of padding
    assert "=" in text
    assert PublicKey.from_id(text) == ident.public_key
    assert PublicKey.from_id(text[1:]) == ident.public_key  # '@' optional


@pytest.mark.parametrize(
    "text",
    ["", "@", "@abc.ed25519", "@" + "A" * 44 + ".sha256", "@!!!!" + "A" * 40 + ".ed25519", "@" + "AAAA" * 12 + ".ed25519"],
)
def test_bad_identity_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        PublicKey.from_id(text)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "sub" / "secret"
    save_identity(path, ident)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    loaded = load_identity(path)
    assert loaded.public_key == ident.public_key
    assert loaded.secret_key == ident.secret_key


def test_file_format_matches_ssb(tmp_path: Path) -> None:
    ident = Identity.generate()
    path = tmp_path / "secret"
    save_identity(path, ident)
    text = path.read_text()
    body = json.loads("\n".join(ln for ln in text.splitlines() if not ln.startswith("#")))
    assert body["curve"] == "ed25519"
    assert body["id"] == ident.id
    assert body["public"] == ident.id[1:]
    assert body["private"].endswith(".ed25519")


def test_ssb_written_file_loads(tmp_path: Path) -> None:
    """A secret file as ssb-keys writes it (comments, indentation) is read as is."""
    ident = Identity.generate()
    import base64

    pub = base64.b64encode(ident.public_key.raw).decode()
    priv = base64.b64encode(ident.secret_key).decode()
    text = (
        "# this is your SECRET name.\n#\n\n"
        + json.dumps({"curve": "ed25519", "public": pub + ".ed25519", "private": priv + ".ed25519", "id": "@" + pub + ".ed25519"}, indent=2)
        + "\n\n# your public name: @" + pub + ".ed25519\n"
    )
    path = tmp_path / "secret"
    path.write_text(text)
    os.chmod(path, 0o600)
    assert load_identity(path).id == ident.id


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    save_identity(path, Identity.generate())
    with pytest.raises(KeyFileError, match="already exists"):
        save_identity(path, Identity.generate())


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_loose_permissions_are_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret"
    save_identity(path, Identity.generate())
    os.chmod(path, mode)
    with pytest.raises(InsecureKeyFile, match="chmod 600"):
        load_identity(path)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "# only comments\n",
        "not json at all",
        "[1, 2, 3]",
        '{"curve": "secp256k1", "private": "x"}',
        '{"curve": "ed25519"}',
        '{"curve": "ed25519", "private": "@@@.ed25519"}',
        '{"curve": "ed25519", "private": "AAAA.ed25519"}',
    ],
)
def test_corrupt_files_are_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "secret"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="secret file"):
        load_identity(path)


def test_mismatched_public_field_is_refused(tmp_path: Path) -> None:
    one, other = Identity.generate(), Identity.generate()
    text = one.to_secret_file().replace(one.id, other.id)
    path = tmp_path / "secret"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="does not match"):
        load_identity(path)


def test_binary_garbage_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"\xff\xfe\x00garbage")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="UTF-8"):
        load_identity(path)


def test_missing_file_says_how_to_create(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="keygen"):
        load_identity(tmp_path / "nope")


def test_default_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    assert default_identity_path() == tmp_path / "cfg" / "minibus" / "secret"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_identity_path() == tmp_path / "home" / ".config" / "minibus" / "secret"


def test_load_or_create_creates_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    first = load_or_create_identity()
    second = load_or_create_identity()
    assert first.id == second.id
    assert stat.S_IMODE((tmp_path / "minibus" / "secret").stat().st_mode) == 0o600


def test_signatures_verify() -> None:
    import nacl.signing

    ident = Identity.generate()
    sig = ident.sign(b"message")
    nacl.signing.VerifyKey(ident.public_key.raw).verify(b"message", sig)


def test_fifo_at_the_key_path_does_not_hang(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    os.mkfifo(path, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_identity(path)


def test_deeply_nested_json_is_a_key_file_error(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("[" * 100_000 + "]" * 100_000)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError):
        load_identity(path)


def test_unwritable_directory_is_a_key_file_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KeyFileError, match="key directory"):
        save_identity(blocker / "sub" / "secret", Identity.generate())


def test_curve25519_public_is_the_conversion_and_never_remembers_a_refusal() -> None:
    import nacl.bindings as sodium

    from bus.wire.identity import curve25519_public

    key = Identity.generate().public_key.raw
    assert curve25519_public(key) == sodium.crypto_sign_ed25519_pk_to_curve25519(key)
    assert curve25519_public(key) == curve25519_public(bytes(key))  # remembered or not, the same
    not_a_point = b"\xff" * 32
    for _ in range(2):  # refused each time it is asked, never answered from memory
        with pytest.raises(Exception):
            curve25519_public(not_a_point)
