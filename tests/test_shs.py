"""The shs1 handshake as sans-io state machines: two endpoints wired together in memory."""

from __future__ import annotations

import hashlib
import hmac
import os
import re

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.errors import HandshakeError, IdentityRefused, LocalProtocolError
from bus.wire.identity import Identity, PublicKey
from bus.wire.shs import (
    DEFAULT_NETWORK_KEY,
    TRANSITIONS,
    ClientHandshake,
    Event,
    Role,
    ServerHandshake,
    State,
    parse_network_key,
)

N = DEFAULT_NETWORK_KEY


def run(client: ClientHandshake, server: ServerHandshake, chunk: int | None = None) -> None:
    """Shuttle bytes between the two machines until both stop producing them."""
    for _ in range(10):
        for src, dst in ((client, server), (server, client)):
            data = src.data_to_send()
            if chunk is None:
                if data:
                    dst.receive_data(data)
            else:
                for i in range(0, len(data), chunk):
                    dst.receive_data(data[i : i + chunk])


def test_honest_handshake_agrees_on_keys(client_identity: Identity, server_identity: Identity) -> None:
    client = ClientHandshake(client_identity, server_identity.public_key)
    server = ServerHandshake(server_identity)
    run(client, server)
    assert client.is_done and server.is_done
    c, s = client.outcome, server.outcome
    assert c.remote_key == server_identity.public_key
    assert s.remote_key == client_identity.public_key
    assert c.encrypt_key == s.decrypt_key and c.encrypt_nonce == s.decrypt_nonce
    assert c.decrypt_key == s.encrypt_key and c.decrypt_nonce == s.encrypt_nonce
    assert c.encrypt_key != c.decrypt_key
    assert len(c.to_bytes()) == 112


@pytest.mark.parametrize("chunk", [1, 7, 63, 64, 65, 200])
def test_any_chunking_works(chunk: int, client_identity: Identity, server_identity: Identity) -> None:
    client = ClientHandshake(client_identity, server_identity.public_key)
    server = ServerHandshake(server_identity)
    run(client, server, chunk)
    assert client.outcome.encrypt_key == server.outcome.decrypt_key


def test_message_sizes_are_exact(client_identity: Identity, server_identity: Identity) -> None:
    client = ClientHandshake(client_identity, server_identity.public_key)
    server = ServerHandshake(server_identity)
    msg1 = client.data_to_send()
    assert len(msg1) == 64 and client.bytes_wanted == 64
    server.receive_data(msg1)
    msg2 = server.data_to_send()
    assert len(msg2) == 64 and server.bytes_wanted == 112
    client.receive_data(msg2)
    msg3 = client.data_to_send()
    assert len(msg3) == 112 and client.bytes_wanted == 80
    server.receive_data(msg3)
    msg4 = server.data_to_send()
    assert len(msg4) == 80
    client.receive_data(msg4 + b"box-stream bytes")
    assert client.is_done and client.unused_data == b"box-stream bytes"
    assert client.bytes_wanted == 0


def test_outcome_matches_the_spec_formula(client_identity: Identity, server_identity: Identity) -> None:
    """Recompute the session keys from the published formulas with fixed ephemeral keys."""
    a_sk, b_sk = os.urandom(32), os.urandom(32)
    client = ClientHandshake(client_identity, server_identity.public_key, ephemeral_secret=a_sk)
    server = ServerHandshake(server_identity, ephemeral_secret=b_sk)
    msg1 = client.data_to_send()
    server.receive_data(msg1)
    msg2 = server.data_to_send()
    client.receive_data(msg2)
    run(client, server)
    a_pub, b_pub = sodium.crypto_scalarmult_base(a_sk), sodium.crypto_scalarmult_base(b_sk)
    assert msg1 == hmac.digest(N, a_pub, "sha512")[:32] + a_pub
    ab = sodium.crypto_scalarmult(a_sk, b_pub)
    aB = sodium.crypto_scalarmult(a_sk, sodium.crypto_sign_ed25519_pk_to_curve25519(server_identity.public_key.raw))
    Ab = sodium.crypto_scalarmult(client_identity.curve_secret, b_pub)
    sha = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    s = sha(sha(N + ab + aB + Ab))
    assert client.outcome.encrypt_key == sha(s + server_identity.public_key.raw)
    assert client.outcome.encrypt_nonce == msg2[:24]
    assert client.outcome.decrypt_key == sha(s + client_identity.public_key.raw)
    assert client.outcome.decrypt_nonce == msg1[:24]


def test_wrong_network_key_fails_at_msg1(client_identity: Identity, server_identity: Identity) -> None:
    client = ClientHandshake(client_identity, server_identity.public_key, os.urandom(32))
    server = ServerHandshake(server_identity)
    with pytest.raises(HandshakeError, match="network key"):
        server.receive_data(client.data_to_send())
    assert server.state is State.FAILED
    assert server.data_to_send() == b""  # nothing is sent after a failure


def test_wrong_network_key_fails_at_msg2_for_client(client_identity: Identity, server_identity: Identity) -> None:
    client = ClientHandshake(client_identity, server_identity.public_key)
    # A server on another network answers with a hello whose hmac uses its own key.
    eph = sodium.crypto_box_keypair()[0]
    msg2 = hmac.digest(os.urandom(32), eph, "sha512")[:32] + eph
    with pytest.raises(HandshakeError, match="bad hmac"):
        client.receive_data(msg2)
    assert client.state is State.FAILED


def test_client_dialling_wrong_server_key(client_identity: Identity, server_identity: Identity) -> None:
    impostor_key = Identity.generate().public_key
    client = ClientHandshake(client_identity, impostor_key)
    server = ServerHandshake(server_identity)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    with pytest.raises(HandshakeError, match="another server key"):
        server.receive_data(client.data_to_send())
    assert server.data_to_send() == b""
    # The client only sees the server hang up.
    with pytest.raises(HandshakeError, match="refused our identity, or we dialled the wrong server key"):
        client.end_of_input()


def test_server_refuses_identity_before_proving_its_own(client_identity: Identity, server_identity: Identity) -> None:
    seen: list[PublicKey] = []

    def authorize(key: PublicKey) -> bool:
        seen.append(key)
        return False

    client = ClientHandshake(client_identity, server_identity.public_key)
    server = ServerHandshake(server_identity, authorize=authorize)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    with pytest.raises(IdentityRefused, match=re.escape(client_identity.id)):
        server.receive_data(client.data_to_send())
    assert seen == [client_identity.public_key]
    assert server.data_to_send() == b""  # msg4 never leaves
    assert server.state is State.FAILED


def test_refusal_with_a_reason(client_identity: Identity, server_identity: Identity) -> None:
    def authorize(key: PublicKey) -> bool:
        raise IdentityRefused("denied by rule 'connect' in policy.toml")

    client = ClientHandshake(client_identity, server_identity.public_key)
    server = ServerHandshake(server_identity, authorize=authorize)
    with pytest.raises(IdentityRefused, match="rule 'connect'"):
        run(client, server)


def test_authorize_callback_bug_fails_handshake_and_surfaces(client_identity: Identity, server_identity: Identity) -> None:
    def authorize(key: PublicKey) -> bool:
        raise KeyError("bug")

    client = ClientHandshake(client_identity, server_identity.public_key)
    server = ServerHandshake(server_identity, authorize=authorize)
    with pytest.raises(KeyError):
        run(client, server)
    assert server.state is State.FAILED
    assert server.data_to_send() == b""


def test_tampered_msg4_is_caught(client_identity: Identity, server_identity: Identity) -> None:
    client = ClientHandshake(client_identity, server_identity.public_key)
    server = ServerHandshake(server_identity)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    msg4 = bytearray(server.data_to_send())
    msg4[40] ^= 1
    with pytest.raises(HandshakeError, match="msg4"):
        client.receive_data(bytes(msg4))


def _low_order_hello() -> bytes:
    point = bytes(32)  # u = 0: every scalar multiple is the all-zero point
    return hmac.digest(N, point, "sha512")[:32] + point


def test_low_order_point_with_valid_hmac_at_server(server_identity: Identity) -> None:
    server = ServerHandshake(server_identity)
    with pytest.raises(HandshakeError):
        server.receive_data(_low_order_hello())
    assert server.state is State.FAILED
    assert server.data_to_send() == b""


def test_low_order_point_with_valid_hmac_at_client(client_identity: Identity, server_identity: Identity) -> None:
    client = ClientHandshake(client_identity, server_identity.public_key)
    client.data_to_send()
    with pytest.raises(HandshakeError):
        client.receive_data(_low_order_hello())
    assert client.data_to_send() == b""


@pytest.mark.parametrize(
    "point",
    [
        bytes(32),
        (1).to_bytes(32, "little"),
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
        bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),  # order 8
        bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p - 1
    ],
)
def test_every_small_order_point_is_a_handshake_error(point: bytes, server_identity: Identity) -> None:
    server = ServerHandshake(server_identity)
    with pytest.raises(HandshakeError):
        server.receive_data(hmac.digest(N, point, "sha512")[:32] + point)


def test_truncated_handshake_is_an_error(client_identity: Identity, server_identity: Identity) -> None:
    client = ClientHandshake(client_identity, server_identity.public_key)
    server = ServerHandshake(server_identity)
    server.receive_data(client.data_to_send()[:40])
    with pytest.raises(HandshakeError, match="hung up"):
        server.end_of_input()


def test_use_after_failure_is_a_local_error(server_identity: Identity) -> None:
    server = ServerHandshake(server_identity)
    with pytest.raises(HandshakeError):
        server.receive_data(bytes(64))
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        server.outcome  # noqa: B018


def test_invalid_server_key_is_refused_up_front(client_identity: Identity) -> None:
    not_a_point = PublicKey(bytes.fromhex("ff" * 32))
    with pytest.raises(ValueError, match="not a valid Ed25519 point"):
        ClientHandshake(client_identity, not_a_point)


def test_network_key_parsing() -> None:
    assert parse_network_key(N.hex()) == N
    for bad in ["", "zz" * 32, "ab" * 31, "ab" * 33]:
        with pytest.raises(ValueError):
            parse_network_key(bad)


def test_transition_table_is_complete() -> None:
    """Each waiting state has exactly one message event and a failure edge; final states none."""
    for role in Role:
        for state in State:
            events = {e for (r, s, e) in TRANSITIONS if r is role and s is state}
            if state in (State.DONE, State.FAILED):
                assert not events
    assert TRANSITIONS[(Role.CLIENT, State.AWAIT_SERVER_HELLO, Event.SERVER_HELLO)] is State.AWAIT_SERVER_ACCEPT
    assert TRANSITIONS[(Role.SERVER, State.AWAIT_CLIENT_AUTH, Event.CLIENT_AUTH)] is State.DONE


# -- Hypothesis: every state x input gives a valid transition or a protocol error -------------

_ID_A, _ID_B = Identity.from_seed(b"a" * 32), Identity.from_seed(b"b" * 32)


def _machines_in_every_state() -> list[ClientHandshake | ServerHandshake]:
    machines: list[ClientHandshake | ServerHandshake] = []
    c = ClientHandshake(_ID_A, _ID_B.public_key)
    s = ServerHandshake(_ID_B)
    machines += [ClientHandshake(_ID_A, _ID_B.public_key), ServerHandshake(_ID_B)]
    s.receive_data(c.data_to_send())
    machines.append(s)  # server awaiting msg3
    c.receive_data(s.data_to_send())
    machines.append(c)  # client awaiting msg4
    return machines


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, 3), chunks=st.lists(st.binary(max_size=200), max_size=5))
def test_arbitrary_bytes_in_any_state(index: int, chunks: list[bytes]) -> None:
    machine = _machines_in_every_state()[index]
    before = machine.state
    for chunk in chunks:
        try:
            machine.receive_data(chunk)
        except HandshakeError:
            assert machine.state is State.FAILED
            assert machine.data_to_send() == b""
            return
        except LocalProtocolError:
            assert machine.state is State.FAILED
            return
        assert (machine.role, before, Event.FAIL) in TRANSITIONS or machine.state is before
        assert machine.state in (before, *[v for (r, s, e), v in TRANSITIONS.items() if r is machine.role and s is before])
        before = machine.state
    try:
        machine.end_of_input()
    except HandshakeError:
        assert machine.state is State.FAILED
