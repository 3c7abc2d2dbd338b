#!/usr/bin/env python3
"""Replay the recorded vectors of npm ``test-secret-handshake`` through minibus's machines.

Usage: ``check_vectors.py path/to/test-secret-handshake/data.json``

The vectors record each step of the reference implementation (``secret-handshake``'s
crypto.js) with its whole state, including the ephemeral keys.  Each step is replayed by
building the matching minibus machine with the same long-term and ephemeral keys and
feeding it the recorded messages; created messages must be equal byte for byte, verified
ones must pass or fail exactly when the reference's did, and the final keys must match the
reference's ``clean`` step (a client's keys asked for early too, before msg4).  Exits with the number of mismatches.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bus.errors import HandshakeError
from bus.wire.identity import Identity, PublicKey
from bus.wire.shs import ClientHandshake, ServerHandshake, State


def hx(value: str) -> bytes:
    return bytes.fromhex(value)


def identity(local: dict[str, Any]) -> Identity:
    return Identity.from_secret_key(hx(local["secretKey"]))


def client(state: dict[str, Any]) -> ClientHandshake:
    return ClientHandshake(
        identity(state["local"]),
        PublicKey(hx(state["remote"]["publicKey"])),
        hx(state["app_key"]),
        ephemeral_secret=hx(state["local"]["kx_sk"]),
    )


def server(state: dict[str, Any]) -> ServerHandshake:
    return ServerHandshake(identity(state["local"]), hx(state["app_key"]), ephemeral_secret=hx(state["local"]["kx_sk"]))


def remote_hello(state: dict[str, Any]) -> bytes:
    return hx(state["remote"]["app_mac"]) + hx(state["remote"]["kx_pk"])


def feed(machine: ClientHandshake | ServerHandshake, *messages: bytes) -> bytes | None:
    """Feed messages; return everything the machine sent, or None if it refused one."""
    sent = machine.data_to_send()
    try:
        for message in messages:
            machine.receive_data(message)
            sent += machine.data_to_send()
    except HandshakeError:
        return None
    return sent


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        vectors = json.load(f)
    msg3_by_pair: dict[tuple[str, str], bytes] = {}
    for v in vectors:
        if v["name"] == "serverVerifyAuth":
            s = v["args"][0]
            msg3_by_pair[(s["local"]["kx_pk"], s["remote"]["kx_pk"])] = hx(v["args"][1])
    keys_by_pair: dict[tuple[str, str], tuple[bytes, bytes]] = {}
    early_by_pair: dict[tuple[str, str], tuple[bytes, bytes]] = {}
    checked = failed = 0

    def check(ok: bool, index: int, name: str, detail: str = "") -> None:
        nonlocal checked, failed
        checked += 1
        if not ok:
            failed += 1
            print(f"MISMATCH vector {index} ({name}) {detail}")

    for i, v in enumerate(vectors):
        name, args, result = v["name"], v["args"], v["result"]
        state = args[0] if args else None
        if name == "createChallenge":
            if "publicKey" in state["remote"]:
                sent = client(state).data_to_send()
            else:  # a server's hello follows the client's
                sent = (feed(server(state), remote_hello(state)) or b"")[:64]
            check(sent == hx(result), i, name)
        elif name == "verifyChallenge":
            check((feed(server(state), hx(args[1])) is None) == (result is None), i, name)
        elif name == "clientVerifyChallenge":
            check((feed(client(state), hx(args[1])) is None) == (result is None), i, name)
        elif name == "clientCreateAuth":
            sent = feed(client(state), remote_hello(state))
            check(sent is not None and sent[64:] == hx(result), i, name)
        elif name == "serverVerifyAuth":
            machine = server(state)
            accepted = feed(machine, remote_hello(state), hx(args[1])) is not None
            check(accepted == (result is not None), i, name)
            if accepted:
                check(machine.outcome.remote_key.raw == hx(result["remote"]["publicKey"]), i, name, "client key")
                pair = (state["local"]["kx_pk"], state["remote"]["kx_pk"])
                keys_by_pair[pair] = (machine.outcome.encrypt_key, machine.outcome.decrypt_key)
        elif name == "serverCreateAccept":
            msg3 = msg3_by_pair.get((state["local"]["kx_pk"], state["remote"]["kx_pk"]))
            sent = None if msg3 is None else feed(server(state), remote_hello(state), msg3)
            check(sent is not None and sent[64:] == hx(result), i, name)
        elif name == "clientVerifyAccept":
            machine = client(state)
            accepted = feed(machine, remote_hello(state), hx(args[1])) is not None
            check(accepted == (result is not None), i, name)
            # The same, with the early keys asked for before msg4 (docs/protocol.md 2.6): msg4
            # is checked the same, and they are the keys the reference ends with.
            early_machine = client(state)
            feed(early_machine, remote_hello(state))
            early = early_machine.early_outcome()
            check((feed(early_machine, hx(args[1])) is not None) == accepted, i, name, "with early keys")
            if accepted:
                check(machine.state is State.DONE, i, name, "not done")
                check(early_machine.outcome == early == machine.outcome, i, name, "early keys")
                pair = (state["local"]["kx_pk"], state["remote"]["kx_pk"])
                keys_by_pair[pair] = (machine.outcome.encrypt_key, machine.outcome.decrypt_key)
                early_by_pair[pair] = (early.encrypt_key, early.decrypt_key)
        elif name == "clean":
            pair = (state["local"]["kx_pk"], state["remote"]["kx_pk"])
            if pair in keys_by_pair and result.get("encryptKey"):
                want = (hx(result["encryptKey"]), hx(result["decryptKey"]))
                check(keys_by_pair[pair] == want, i, name, "session keys")
                if pair in early_by_pair:
                    check(early_by_pair[pair] == want, i, name, "early session keys")
    print(f"test-secret-handshake vectors: {checked - failed} passed, {failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
