"""The one exception hierarchy and its single wire mapping."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("minibus.Error.Frame", errors.FrameError),
        ("minibus.Error.FrameTooLarge", errors.FrameTooLarge),
        ("minibus.Error.Limit", errors.LimitError),
        ("minibus.Error.Denied", errors.IdentityRefused),
        ("minibus.Error.Handshake", errors.HandshakeError),
    ],
)
def test_known_codes_map_back_to_their_class(code: str, cls: type[errors.BusError]) -> None:
    err = errors.error_from_wire(code, "message text")
    assert type(err) is cls
    assert str(err) == "message text"
    assert cls.wire_code == code


def test_unknown_codes_keep_their_code() -> None:
    err = errors.error_from_wire("org.example.Error.Custom", "boom")
    assert isinstance(err, errors.RemoteError)
    assert err.code == "org.example.Error.Custom"
    assert "boom" in str(err) and "org.example.Error.Custom" in str(err)
