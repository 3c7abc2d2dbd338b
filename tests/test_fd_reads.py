"""Descriptors that come with a bus connection's reads (FdSocketStream, read by
FramedStream.read_messages as the client's reader reads it): queued in order for the frames
that announce them, kept across reads that bring none, at most MAX_QUEUED_FDS held (the rest
closed), and none leaked when the kernel truncates the ancillary data (MSG_CTRUNC)."""

from __future__ import annotations

import array
import os
import socket

import trio

from bus.io.fdpass import MAX_QUEUED_FDS, FdSocketStream
from bus.io.framed import FramedStream
from bus.wire.frames import encode_control


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def send_with(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


async def test_descriptors_reach_their_frames_across_reads_within_the_limit() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = FdSocketStream(right)
    framed = FramedStream(stream, receive_stream=stream, trusted=True)
    files = [os.open("/dev/null", os.O_RDONLY) for _ in range(4)]
    try:
        with left, trio.fail_after(10):
            # One descriptor with a frame, then reads that bring none: it stays queued.
            send_with(left, encode_control(0, {"event": "fd", "n": 0}), [files[0]])
            assert await framed.read_messages() == [{"event": "fd", "n": 0}]
            left.sendall(encode_control(0, {"event": "plain"}))
            assert await framed.read_messages() == [{"event": "plain"}]
            fd = stream.take_fd()
            assert fd is not None and os.fstat(fd).st_ino == os.fstat(files[0]).st_ino
            os.close(fd)
            assert stream.take_fd() is None

            # More than MAX_QUEUED_FDS waiting: the rest are closed at once.
            before = open_fds()
            for n in range(MAX_QUEUED_FDS // 4 + 2):
                send_with(left, encode_control(0, {"event": "fd", "n": n}), files)
                assert await framed.read_messages() == [{"event": "fd", "n": n}]
            assert len(stream.fds) == MAX_QUEUED_FDS
            assert open_fds() == before + MAX_QUEUED_FDS
            while (fd := stream.take_fd()) is not None:
                os.close(fd)
            assert open_fds() == before

            # More descriptors than a read makes room for (MSG_CTRUNC): those that fit are
            # queued, the kernel drops the others, none is left open unowned.
            many = files * 2
            send_with(left, encode_control(0, {"event": "fd", "n": 99}), many)
            assert await framed.read_messages() == [{"event": "fd", "n": 99}]
            queued = len(stream.fds)
            assert 1 <= queued < len(many)
            assert open_fds() == before + queued
    finally:
        for fd in files:
            os.close(fd)
        await stream.aclose()
