"""The one exception hierarchy and its single wire mapping."""

from __future__ import annotations

from typing import ClassVar

from bus import errors


def test_every_error_is_a_bus_error() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.BusError), name


def test_who_is_at_fault() -> None:
    assert issubclass(errors.FrameError, errors.RemoteProtocolError)
    assert issubclass(errors.BoxStreamTruncated, errors.BoxStreamError)
    assert issubclass(errors.BoxStreamError, errors.RemoteProtocolError)
    assert not issubclass(errors.LocalProtocolError, errors.RemoteProtocolError)
    assert issubclass(errors.HandshakeTimeout, errors.HandshakeError)
    assert issubclass(errors.IdentityRefused, errors.HandshakeError)
    assert issubclass(errors.InsecureKeyFile, errors.KeyFileError)
    assert issubclass(errors.FrameTooLarge, errors.LimitError)


def test_reported_errors_are_never_mistaken_for_local_ones() -> None:
    for code in ("minibus.Error.Frame", "minibus.Error.Handshake", "minibus.Error.Protocol", "org.example.Custom"):
        err = errors.error_from_wire(code, "text")
        assert type(err) is errors.RemoteError
        assert err.code == code and err.message == "text"
        assert code in str(err) and "text" in str(err)
    assert type(errors.error_from_wire("minibus.Error.NameNotFound", "x")) is errors.NameNotFound
    assert isinstance(errors.error_from_wire("minibus.Error.QuotaExceeded", "x"), errors.LimitError)


def test_typed_remote_errors_map_by_code() -> None:
    class NoSuchThing(errors.RemoteError):
        wire_code: ClassVar[str] = "test.Error.NoSuchThing"

    err = errors.error_from_wire("test.Error.NoSuchThing", "missing")
    assert type(err) is NoSuchThing and err.code == "test.Error.NoSuchThing"
