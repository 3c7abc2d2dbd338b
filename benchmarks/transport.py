#!/usr/bin/env python3
"""Transport benchmarks: the secret handshake and SecureStream, each beside its limit.

Run:  python benchmarks/transport.py [--quick] [--json FILE]

Everything is measured in one run, side by side, on this machine:

* handshakes/s of the sans-io client+server pair against the *crypto ceiling*: the same
  pynacl and hashlib calls one handshake needs (both sides), with nothing around them;
  plus the full SecureStream handshake over a Unix socketpair (trio included);
* SecureStream throughput with 64 KiB writes over a Unix socketpair and over TCP loopback:
  plain against a raw trio SocketStream of the same kind, encrypted against the raw
  box-stream cost of pynacl (secretbox and open of every 4096-byte piece and its header).

Each figure is the best of several rounds (rounds alternate between the rows, so a
passing disturbance hits them alike).  The table goes to stdout, then one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import platform
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nacl.bindings as sodium  # noqa: E402
import trio  # noqa: E402
from _report import emit_json  # noqa: E402

from bus.io.secure import SecureStream  # noqa: E402
from bus.io.testing import secure_stream_pair, tcp_stream_pair, unix_stream_pair  # noqa: E402
from bus.wire.identity import Identity  # noqa: E402
from bus.wire.shs import DEFAULT_NETWORK_KEY, ClientHandshake, ServerHandshake  # noqa: E402

WRITE = 64 * 1024
PIECE = 4096

CLIENT = Identity.generate()
SERVER = Identity.generate()


# -- handshakes -------------------------------------------------------------------------------


def sansio_handshake() -> None:
    client = ClientHandshake(CLIENT, SERVER.public_key)
    server = ServerHandshake(SERVER)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.is_done and server.is_done


def crypto_ceiling_handshake() -> None:
    """Exactly the primitive calls of one handshake, both sides, with no protocol logic."""
    n = DEFAULT_NETWORK_KEY
    a_pk, a_sk = sodium.crypto_box_keypair()
    b_pk, b_sk = sodium.crypto_box_keypair()
    # hellos: each side makes one hmac and checks the other's
    mac_a = hmac.digest(n, a_pk, "sha512")[:32]
    mac_b = hmac.digest(n, b_pk, "sha512")[:32]
    hmac.compare_digest(mac_a, hmac.digest(n, a_pk, "sha512")[:32])
    hmac.compare_digest(mac_b, hmac.digest(n, b_pk, "sha512")[:32])
    # client: ab, aB (converting B) and msg3
    B_curve = sodium.crypto_sign_ed25519_pk_to_curve25519(SERVER.public_key.raw)
    ab = sodium.crypto_scalarmult(a_sk, b_pk)
    aB = sodium.crypto_scalarmult(a_sk, B_curve)
    sha_ab = hashlib.sha256(ab).digest()
    sig_a = sodium.crypto_sign(n + SERVER.public_key.raw + sha_ab, CLIENT.secret_key)[:64]
    k3 = hashlib.sha256(n + ab + aB).digest()
    msg3 = sodium.crypto_secretbox_easy(sig_a + CLIENT.public_key.raw, bytes(24), k3)
    # server: ab, aB, open msg3, verify, convert A, Ab, msg4
    ab2 = sodium.crypto_scalarmult(b_sk, a_pk)
    aB2 = sodium.crypto_scalarmult(SERVER.curve_secret, a_pk)
    plain = sodium.crypto_secretbox_open_easy(msg3, bytes(24), hashlib.sha256(n + ab2 + aB2).digest())
    sodium.crypto_sign_open(plain[:64] + n + SERVER.public_key.raw + hashlib.sha256(ab2).digest(), plain[64:])
    Ab2 = sodium.crypto_scalarmult(b_sk, sodium.crypto_sign_ed25519_pk_to_curve25519(plain[64:]))
    k4 = hashlib.sha256(n + ab2 + aB2 + Ab2).digest()
    sig_b = sodium.crypto_sign(n + plain + sha_ab, SERVER.secret_key)[:64]
    msg4 = sodium.crypto_secretbox_easy(sig_b, bytes(24), k4)
    # client: Ab, open msg4, verify
    Ab = sodium.crypto_scalarmult(CLIENT.curve_secret, b_pk)
    k4c = hashlib.sha256(n + ab + aB + Ab).digest()
    sig = sodium.crypto_secretbox_open_easy(msg4, bytes(24), k4c)
    sodium.crypto_sign_open(sig + n + sig_a + CLIENT.public_key.raw + sha_ab, SERVER.public_key.raw)
    # session keys, both sides
    for k in (k4, k4c):
        s = hashlib.sha256(k).digest()
        hashlib.sha256(s + SERVER.public_key.raw).digest()
        hashlib.sha256(s + CLIENT.public_key.raw).digest()


def rate(fn: Callable[[], None], seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(20):
            fn()
        count += 20
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


async def socket_handshakes(seconds: float) -> float:
    count = 0
    start = trio.current_time()
    while trio.current_time() - start < seconds:
        left, right = socket.socketpair()
        c = SecureStream.client(trio.SocketStream(trio.socket.from_stdlib_socket(left)), CLIENT, SERVER.public_key)
        s = SecureStream.server(trio.SocketStream(trio.socket.from_stdlib_socket(right)), SERVER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.do_handshake)
            nursery.start_soon(s.do_handshake)
        await c.transport.aclose()
        await s.transport.aclose()
        count += 1
    return count / (trio.current_time() - start)


# -- throughput -------------------------------------------------------------------------------


def crypto_ceiling_throughput(total: int) -> float:
    """Bytes/s of the bare secretbox/open calls box-stream makes for ``total`` bytes."""
    key = os.urandom(32)
    piece = os.urandom(PIECE)
    nonce, nonce1 = os.urandom(24), os.urandom(24)
    box, unbox = sodium.crypto_secretbox_easy, sodium.crypto_secretbox_open_easy
    pieces = total // PIECE
    start = time.perf_counter()
    for _ in range(pieces):
        body = box(piece, nonce1, key)
        header = box(b"\x10\x00" + body[:16], nonce, key)
        unbox(header, nonce, key)
        unbox(body, nonce1, key)
    return pieces * PIECE / (time.perf_counter() - start)


async def stream_pair(kind: str, mode: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    transports = unix_stream_pair() if kind == "unix" else await tcp_stream_pair()
    if mode == "raw":
        return transports
    return await secure_stream_pair(transports, CLIENT, SERVER, encrypted=mode == "encrypted")


async def throughput(kind: str, mode: str, total: int) -> float:
    sender, receiver = await stream_pair(kind, mode)
    block = os.urandom(WRITE)
    writes = total // WRITE
    received = 0

    async def send() -> None:
        for _ in range(writes):
            await sender.send_all(block)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while received < writes * WRITE:
            received += len(await receiver.receive_some(1 << 18))
    elapsed = time.perf_counter() - start
    await sender.aclose()
    await receiver.aclose()
    return received / elapsed


# -- the run ----------------------------------------------------------------------------------


def _serial(*rates: float) -> float:
    """The rate of doing several per-byte jobs one after the other."""
    return 1 / sum(1 / r for r in rates)


def best(samples: list[float]) -> float:
    return max(samples)


async def main_async(quick: bool) -> dict[str, object]:
    rounds = 2 if quick else 5
    hs_seconds = 0.3 if quick else 1.0
    total_plain = (64 if quick else 256) * WRITE * 16  # bytes per throughput round
    total_enc = (8 if quick else 32) * WRITE * 16

    hs: dict[str, list[float]] = {"sansio": [], "ceiling": [], "socket": []}
    tp: dict[str, list[float]] = {}
    for _ in range(rounds):
        hs["ceiling"].append(rate(crypto_ceiling_handshake, hs_seconds))
        hs["sansio"].append(rate(sansio_handshake, hs_seconds))
        hs["socket"].append(await socket_handshakes(hs_seconds))
        tp.setdefault("box-stream crypto ceiling", []).append(crypto_ceiling_throughput(total_enc))
        for kind in ("unix", "tcp"):
            for mode in ("raw", "plain", "encrypted"):
                size = total_enc if mode == "encrypted" else total_plain
                tp.setdefault(f"{kind} {mode}", []).append(await throughput(kind, mode, size))

    h = {k: best(v) for k, v in hs.items()}
    t = {k: best(v) for k, v in tp.items()}
    ceiling = t["box-stream crypto ceiling"]
    result: dict[str, object] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "rounds": rounds,
        "handshakes_per_second": {
            "crypto_ceiling": h["ceiling"],
            "sansio_pair": h["sansio"],
            "securestream_unix_socketpair": h["socket"],
        },
        "handshake_ratios": {
            "sansio_vs_ceiling": h["sansio"] / h["ceiling"],
            "securestream_vs_ceiling": h["socket"] / h["ceiling"],
        },
        "throughput_MBps": {k: v / 1e6 for k, v in t.items()},
        "throughput_ratios": {
            "unix_plain_vs_raw": t["unix plain"] / t["unix raw"],
            "tcp_plain_vs_raw": t["tcp plain"] / t["tcp raw"],
            "unix_encrypted_vs_crypto_ceiling": t["unix encrypted"] / ceiling,
            "tcp_encrypted_vs_crypto_ceiling": t["tcp encrypted"] / ceiling,
            # The crypto plus moving the same bytes through the same socket, serially:
            # what an encrypted stream on one thread could reach with zero glue.
            "unix_encrypted_vs_crypto_plus_socket": t["unix encrypted"] / _serial(ceiling, t["unix raw"]),
            "tcp_encrypted_vs_crypto_plus_socket": t["tcp encrypted"] / _serial(ceiling, t["tcp raw"]),
        },
    }
    return result


def print_table(r: dict[str, object]) -> None:
    hs = r["handshakes_per_second"]
    hr = r["handshake_ratios"]
    tp = r["throughput_MBps"]
    tr = r["throughput_ratios"]
    assert isinstance(hs, dict) and isinstance(hr, dict) and isinstance(tp, dict) and isinstance(tr, dict)
    print(f"{'handshakes (client + server)':40} {'per s':>10} {'vs ceiling':>11}")
    print(f"{'  crypto ceiling (pynacl calls only)':40} {hs['crypto_ceiling']:10.0f} {1.0:11.2f}")
    print(f"{'  sans-io machines, in memory':40} {hs['sansio_pair']:10.0f} {hr['sansio_vs_ceiling']:11.2f}  (goal >= 0.80)")
    print(f"{'  SecureStream, Unix socketpair':40} {hs['securestream_unix_socketpair']:10.0f} {hr['securestream_vs_ceiling']:11.2f}")
    print()
    print(f"{'throughput, 64 KiB writes':40} {'MB/s':>10} {'ratio':>11}")
    print(f"{'  box-stream crypto ceiling':40} {tp['box-stream crypto ceiling']:10.0f} {1.0:11.2f}")
    for kind in ("unix", "tcp"):
        print(f"{'  ' + kind + ' raw trio SocketStream':40} {tp[kind + ' raw']:10.0f} {1.0:11.2f}")
        print(f"{'  ' + kind + ' SecureStream plain':40} {tp[kind + ' plain']:10.0f} {tr[kind + '_plain_vs_raw']:11.2f}  vs raw (goal >= 0.90)")
        print(
            f"{'  ' + kind + ' SecureStream encrypted':40} {tp[kind + ' encrypted']:10.0f} "
            f"{tr[kind + '_encrypted_vs_crypto_ceiling']:11.2f}  vs crypto ceiling (goal >= 0.80); "
            f"{tr[kind + '_encrypted_vs_crypto_plus_socket']:.2f} vs crypto + raw {kind} socket"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (a smoke run)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    args = parser.parse_args()
    result = trio.run(main_async, args.quick)
    print_table(result)
    emit_json(result, args.json)


if __name__ == "__main__":
    main()
