"""The floor of the 1 MiB RPC rows: receiving 1 MiB arguments that cbor2 must decode.

Run:  python benchmarks/bulk_floor.py [--seconds S] [--rounds N]

Two processes on a Unix socketpair (the writer's end with the 1 MiB send buffer busd gives a
unix-fd channel's sockets); the writer sends the 1 MiB call body minibus sends
(``{"args": [1 MiB of bytes], "method": "take"}`` as CBOR) again and again, and the reader:

* ``raw socket``: ``recv_into`` one 256 KiB buffer, nothing else (the table's bulk limit);
* ``reads + join + cbor2.loads``: 256 KiB reads, the parts of each body joined, then
  ``cbor2.loads`` (the least a receiver does that reads frames and hands the method a
  ``bytes`` value: no framing, no profile check, no trio);
* ``recv_into one buffer + cbor2.loads``: each body read into one preallocated buffer, then
  decoded from it (no join);
* ``recv_into a buffer per body + decode, 8 held``: what minibus's receiver does since the
  bulk branch with 8 calls in flight: each body read into a new buffer of its announced size,
  decoded by ``cbor2.loads`` from that buffer (as minibus decodes a body that is not flat: it
  copies the buffer once, in C, into the file it reads from), and the last 8
  decoded values kept alive (8 calls running), so that memory comes and goes as it does there.

MB/s of bodies, best of the rounds, and each against the raw socket.  The RPC row cannot pass
what a receiver that decodes with cbor2 can take.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import cbor2

BODY = cbor2.dumps({"args": [b"x" * (1 << 20)], "method": "take"})
READ = 1 << 18


def _receive(mode: str, sock: socket.socket, seconds: float) -> float:
    size = len(BODY)
    received = 0
    start = time.perf_counter()
    if mode == "raw":
        buffer = bytearray(READ)
        while time.perf_counter() - start < seconds:
            received += sock.recv_into(buffer)
    elif mode == "join":
        parts: list[bytes] = []
        have = 0
        while time.perf_counter() - start < seconds:
            data = os.read(sock.fileno(), READ)
            parts.append(data)
            have += len(data)
            if have >= size:
                whole = b"".join(parts)
                cbor2.loads(whole[:size] if len(whole) > size else whole)
                rest = whole[size:]
                parts = [rest] if rest else []
                have = len(rest)
                received += size
    elif mode == "into":
        buffer = bytearray(size)
        view = memoryview(buffer)
        filled = 0
        while time.perf_counter() - start < seconds:
            filled += sock.recv_into(view[filled:])
            if filled == size:
                cbor2.loads(buffer)
                filled = 0
                received += size
    elif mode == "fill":
        held: list[object] = []
        while time.perf_counter() - start < seconds:
            buffer = bytearray(size)
            view = memoryview(buffer)
            filled = 0
            while filled < size:
                filled += sock.recv_into(view[filled:])
            held.append(cbor2.loads(view))  # (as minibus decodes a filled body that is not flat)
            del buffer, view
            if len(held) > 8:
                held.pop(0)
            received += size
    return received / (time.perf_counter() - start) / 1e6


def measure(mode: str, seconds: float) -> float:
    reader, writer = socket.socketpair()
    # The send buffer busd gives both ends of a unix-fd channel (bus.broker.UNIX_FD_SEND_BUFFER).
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    pid = os.fork()
    if pid == 0:  # the writer
        reader.close()
        try:
            while True:
                writer.sendall(BODY)
        except OSError:
            os._exit(0)
    writer.close()
    try:
        return _receive(mode, reader, seconds)
    finally:
        reader.close()
        os.waitpid(pid, 0)


MODES = [
    ("raw", "raw socket"),
    ("join", "reads + join + cbor2.loads"),
    ("into", "recv_into one buffer + cbor2.loads"),
    ("fill", "recv_into a buffer per body + decode, 8 held"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring window per round (default 2 s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, best kept (default 2)")
    options = parser.parse_args()
    best = {mode: max(measure(mode, options.seconds) for _ in range(options.rounds)) for mode, _ in MODES}
    print("| receiver | MB/s | of raw socket |")
    print("| --- | --- | --- |")
    for mode, label in MODES:
        print(f"| {label} | {best[mode]:,.0f} | {best[mode] / best['raw']:.2f} |")
    print()
    print(json.dumps({label: best[mode] for mode, label in MODES}, indent=2))


if __name__ == "__main__":
    main()
