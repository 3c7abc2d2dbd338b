"""What each sending and receiving layer costs a small frame, over the bare system call.

Run:  python benchmarks/layers.py [--frames N] [--rounds N] [--size BYTES] [--json FILE]

One process, a Unix socketpair, a relayed RPC message's frame (``--size``, 90 bytes by default:
a 64-byte echo call in a DATA frame).  Each way of sending writes the frame to one end and the
other end reads it back with ``os.read`` (the same read for every way, so the difference is the
layer); each way of receiving reads what a bare ``os.write`` put in:

* the limit: ``os.write``, then ``os.read``;
* send: ``SecureStream.send_nowait`` on a plain (Unix, unencrypted)
  stream after its shs1 handshake, as busd's sessions and the clients' links have it;
  ``FrameWriter.send_nowait`` over that stream, the path every frame busd relays takes;
* receive: ``socket.recvmsg`` with room for descriptors, what a client's link does (it may be
  passed a socket at any time), where busd's reader does ``os.read``.

Then the ends' CBOR for a relayed call of a 64-byte argument: the service reading the call
(``FrameDecoder.whole_message_from``, a channel's checked decoder that has seen one such call),
the caller reading the reply and writing the call (``CallFrames``), each beside cbor2 on the
same map with no check, what the raw 3-process limit's ends do.

Nanoseconds per frame, for the write and the read together; the rounds alternate the ways, and
the table gives each way's best and median round and its excess over the limit.  (*The
thirteenth round, measured again* in benchmarks/README.md: these layers are a small part of
what keeps a relayed call from its limit.)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bus.io.testing import secure_stream_pair  # noqa: E402
from bus.io.writer import FrameWriter  # noqa: E402
from bus.wire.frames import HEADER, CallFrames, FrameDecoder, encode_control  # noqa: E402
from bus.wire.identity import Identity  # noqa: E402

LIMIT = "os.write + os.read (the limit)"


def per_frame(step: Callable[[], Any], frames: int) -> float:
    """Nanoseconds per call of ``step`` (each writes one frame and reads it back)."""
    started = time.perf_counter()
    for _ in range(frames):
        step()
    return (time.perf_counter() - started) / frames * 1e9


async def measure(frames: int, rounds: int, size: int) -> dict[str, list[float]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    near = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    far = trio.SocketStream(trio.socket.from_stdlib_socket(right))
    # Which end is client or server does not matter here: both are plain after the handshake.
    _, sender = await secure_stream_pair((far, near), Identity.generate(), Identity.generate(), encrypted=False)
    writer = FrameWriter(sender, max_frames=64)
    out_fd, in_fd = left.fileno(), right.fileno()
    frame = b"x" * size
    room = socket.CMSG_SPACE(8 * 4)  # (descriptors' room, as a client's link reads)
    read, write, recvmsg = os.read, os.write, right.recvmsg

    def bare() -> None:
        write(out_fd, frame)
        read(in_fd, 65536)

    def secure_send() -> None:
        sender.send_nowait(frame)
        read(in_fd, 65536)

    def writer_send() -> None:
        writer.send_nowait(frame)
        read(in_fd, 65536)

    def recvmsg_read() -> None:
        write(out_fd, frame)
        recvmsg(65536, room)

    ways = {
        LIMIT: bare,
        "SecureStream.send_nowait + os.read": secure_send,
        "FrameWriter.send_nowait + os.read": writer_send,
        "os.write + socket.recvmsg": recvmsg_read,
    }
    results: dict[str, list[float]] = {name: [] for name in ways}
    for name, step in ways.items():
        per_frame(step, frames // 10)  # warm-up
    for _ in range(rounds):
        for name, step in ways.items():
            results[name].append(per_frame(step, frames))
    if len(writer) or writer.queued_bytes:
        raise SystemExit("the writer queued frames: the socket did not take them at once")
    left.close()
    right.close()
    return results


def measure_codec(frames: int, rounds: int) -> dict[str, list[float]]:
    """The ends' CBOR for a relayed call of a 64-byte argument (the frame each end reads or
    writes), beside cbor2 on the same map with no check (what the raw limit's ends do)."""
    payload = b"p" * 64
    call = {"method": "echo", "args": [payload], "op": "call", "id": 123456}
    reply = {"re": 123456, "result": payload}
    call_frame, reply_frame = encode_control(0, call), encode_control(0, reply)
    call_body, reply_body = call_frame[HEADER.size :], reply_frame[HEADER.size :]
    service, caller = FrameDecoder(), FrameDecoder()
    service.whole_message_from(call_frame)  # (a channel's decoder that has seen one such call)
    writer = CallFrames()
    pack, loads, dumps = HEADER.pack, cbor2.loads, cbor2.dumps
    ways: dict[str, Callable[[], Any]] = {
        "service reads a call": lambda: service.whole_message_from(call_frame),
        "  cbor2.loads of its body": lambda: loads(call_body),
        "caller reads a reply": lambda: caller.whole_message_from(reply_frame),
        "  cbor2.loads of its body ": lambda: loads(reply_body),
        "caller writes a call": lambda: writer.encode("echo", payload, 123456),
        "  cbor2.dumps and a header": lambda: pack(1, 0, 0, len(body := dumps(call))) + body,
    }
    if service.whole_message_from(call_frame) != call or caller.whole_message_from(reply_frame) != reply:
        raise SystemExit("the ends read something else than the message")
    if writer.encode("echo", payload, 123456) != call_frame:
        raise SystemExit("the caller writes something else than encode_control")
    results: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, step in ways.items():
            results[name].append(per_frame(step, frames))
    return results


def _summary(results: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for name, values in results.items():
        ordered = sorted(values)
        summary[name.strip()] = {"best_ns": ordered[0], "median_ns": ordered[len(ordered) // 2]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=50_000, help="frames per way per round (default 50,000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the ways alternating (default 5)")
    parser.add_argument("--size", type=int, default=90, help="bytes per frame (default 90)")
    parser.add_argument("--json", metavar="FILE", help="also write the JSON object to FILE")
    args = parser.parse_args()
    summary = _summary(trio.run(measure, args.frames, args.rounds, args.size))
    print(f"{args.size}-byte frames, {args.frames:,} per way per round, {args.rounds} rounds; ns per frame (write + read)")
    print(f"{'way':36} {'best':>7} {'median':>7} {'over the limit (median)':>24}")
    for name, figures in summary.items():
        figures["over_limit_ns"] = figures["median_ns"] - summary[LIMIT]["median_ns"]
        print(f"{name:36} {figures['best_ns']:7.0f} {figures['median_ns']:7.0f} {figures['over_limit_ns']:+24.0f}")
    codec = measure_codec(args.frames, args.rounds)
    print(f"\nthe ends' CBOR for a relayed call of a 64-byte argument; ns per message (best, median)")
    for name, values in codec.items():
        ordered = sorted(values)
        print(f"{name:36} {ordered[0]:7.0f} {ordered[len(ordered) // 2]:7.0f}")
    report = {"size": args.size, "frames": args.frames, "rounds": args.rounds, "ways": summary, "codec": _summary(codec)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
