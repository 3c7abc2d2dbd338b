"""Bus address strings."""

from __future__ import annotations

import pytest

from bus.wire.address import AddressError, Endpoint, format_address, parse_address
from bus.wire.identity import Identity

KEY = Identity.from_seed(b"k" * 32).public_key


def test_round_trip_both_transports() -> None:
    eps = [Endpoint("unix", KEY, path="/run/user/1000/minibus/bus.sock"), Endpoint("tcp", KEY, host="127.0.0.1", port=7420)]
    text = format_address(eps)
    assert text.startswith("unix:path=/run/user/1000/minibus/bus.sock,key=@")
    assert ";tcp:host=127.0.0.1,port=7420,key=@" in text
    assert parse_address(text) == eps


def test_an_encrypted_unix_endpoint_says_so() -> None:
    ep = Endpoint("unix", KEY, path="/run/bus.sock", encrypted=True)
    text = format_address([ep])
    assert text == f"unix:path=/run/bus.sock,encrypted=1,key={KEY.id}"
    assert parse_address(text) == [ep] and ep.uses_box_stream
    plain = parse_address(f"unix:path=/run/bus.sock,key={KEY.id}")[0]
    assert not plain.encrypted and not plain.uses_box_stream
    assert Endpoint("tcp", KEY, host="h", port=1).uses_box_stream
    with pytest.raises(AddressError, match="encrypted= is 0 or 1"):
        parse_address(f"unix:path=/x,encrypted=yes,key={KEY.id}")


def test_special_characters_in_paths_are_escaped() -> None:
    ep = Endpoint("unix", KEY, path="/tmp/we,ird;na=me%/bus.sock")
    assert parse_address(format_address([ep])) == [ep]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix",
        "unix:path=/x",  # no key
        f"unix:key={KEY.id}",  # no path
        f"tcp:host=h,key={KEY.id}",  # no port
        f"tcp:host=h,port=99999,key={KEY.id}",
        f"tcp:host=h,port=x,key={KEY.id}",
        f"udp:host=h,port=1,key={KEY.id}",
        "unix:path=/x,key=@nope.ed25519",
        f"unix:path=/x,path=/y,key={KEY.id}",
        f"unix:path,key={KEY.id}",
    ],
)
def test_bad_addresses_say_what_is_wrong(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address(text)
