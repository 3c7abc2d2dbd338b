"""Direct routes (unix-fd and tcp) against a dead or hostile peer, and the broker's word on
encryption, through a real broker over real sockets.

* A sender that dies mid-transfer is :class:`trio.BrokenResourceError` on the other end, never a
  clean end of file: on unix-fd the clean end is explicit (an end mark with a descriptor), on
  tcp it is box-stream's goodbye.
* The target's tcp listener checks its callers concurrently, each within a short deadline: a
  silent local process that connects first, a wrong key or a wrong token hold up nobody.
* A client whose own link is TCP (or an encrypted Unix socket) refuses a relayed channel the
  broker calls plain.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import clients.channel_routes
from bus.errors import ChannelRejected, HandshakeError, RemoteProtocolError
from bus.io.fdpass import END_MARK, UnixChannelStream
from bus.io.framed import FramedStream
from bus.io.secure import SecureStream
from bus.wire.address import Endpoint, format_address
from bus.wire.frames import ControlFrame
from bus.wire.identity import Identity
from clients.bus import Bus, open_bus
from clients.channels import Channel

from .brokers import FRIEND, OWNER, PLUGIN, running_broker
from .test_broker import raw_connect
from .test_channels import echo, hand_over_channels, pair, round_trip

ROOT = Path(__file__).resolve().parent.parent
ROUTE_OF = {"unix": "unix-fd", "tcp": "tcp"}

# A sender in its own process, so that it can die for real (SIGKILL: no goodbye of any kind).
SENDER = """
import sys, trio
from bus.wire.identity import Identity
from clients import open_bus

async def main(address):
    async with open_bus(address, identity=Identity.from_seed(b"f" * 32), reconnect=False) as bus:
        ch = await bus.open_channel("org.example.Sink", route="direct")
        block = b"s" * 65536
        while True:
            await ch.send_all(block)

trio.run(main, sys.argv[1])
"""


async def _serve_sink(service: Bus, enough: int) -> tuple[list[str], trio.Event, trio.Event]:
    """A 'raw' handler that reads to the end: (how each channel ended, set once ``enough``
    bytes arrived, set when a channel ended)."""
    outcome: list[str] = []
    arrived, ended = trio.Event(), trio.Event()

    async def read(ch: Channel) -> None:
        got = 0
        try:
            while data := await ch.receive_some():
                got += len(data)
                if got >= enough:
                    arrived.set()
            outcome.append(f"eof after {got}")
        except trio.BrokenResourceError as exc:
            outcome.append(f"broken: {exc!r} {exc.__cause__!r}")
        finally:
            ended.set()

    service.handle_channels("raw", read)
    return outcome, arrived, ended


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_sender_killed_mid_transfer_breaks_the_receiver(tmp_path: Path, transport: str) -> None:
    async with running_broker(tmp_path) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        async with open_bus(address, identity=PLUGIN, name="org.example.Sink") as service:
            outcome, arrived, ended = await _serve_sink(service, enough=1 << 20)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            sender = await trio.lowlevel.open_process([sys.executable, "-c", SENDER, address], cwd=str(ROOT), env=env)
            try:
                with trio.fail_after(30):  # guards against hanging, not timing assertions
                    await arrived.wait()
                    sender.send_signal(signal.SIGKILL)  # mid-transfer
                    await sender.wait()
                    await ended.wait()
            finally:
                if sender.returncode is None:
                    sender.kill()
                    await sender.wait()
            assert len(outcome) == 1 and outcome[0].startswith("broken"), outcome
            if transport == "unix":
                assert "truncated" in outcome[0]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_clean_ends_still_read_as_end_of_file(tmp_path: Path, transport: str) -> None:
    async with pair(tmp_path, transport) as (_, service, client):
        outcome, _, ended = await _serve_sink(service, enough=1)
        blob = os.urandom(3 * 1024 * 1024 + 7)
        # send_eof: everything, then b"" (and the channel stays usable the other way).
        ch = await client.open_channel("org.example.Echo", route="direct")
        assert ch.route == ROUTE_OF[transport]
        await ch.send_all(blob)
        await ch.send_eof()
        with trio.fail_after(10):
            await ended.wait()
        assert outcome == [f"eof after {len(blob)}"]
        await ch.aclose()
        # A graceful close without send_eof is a clean end too.
        outcome.clear()
        ended = trio.Event()

        async def read(ch: Channel) -> None:
            try:
                got = b""
                while data := await ch.receive_some():
                    got += data
                outcome.append(f"eof after {len(got)}")
            except trio.BrokenResourceError as exc:
                outcome.append(f"broken: {exc}")
            ended.set()

        service.handle_channels("raw", read)
        ch = await client.open_channel("org.example.Echo", route="direct")
        await ch.send_all(b"last words")
        await ch.aclose()
        with trio.fail_after(10):
            await ended.wait()
        assert outcome == ["eof after 10"]

        # A handler that returns closes its end cleanly: the opener reads what it sent, then b"".
        async def answer_and_return(ch: Channel) -> None:
            await ch.send_all(b"done")

        service.handle_channels("raw", answer_and_return)
        ch = await client.open_channel("org.example.Echo", route="direct")
        got = b""
        with trio.fail_after(10):
            while data := await ch.receive_some():
                got += data
        assert got == b"done"
        await ch.aclose()
        # And a plain echo round trip, for good measure.
        service.handle_channels("raw", echo)
        ch = await client.open_channel("org.example.Echo", route="direct")
        assert await round_trip(ch, blob) == blob
        await ch.aclose()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_an_aborted_end_reads_as_broken(tmp_path: Path, transport: str) -> None:
    async with pair(tmp_path, transport) as (_, service, client):
        accepted = hand_over_channels(service)
        # A forced close (what a cancelled task does) is an abort, not an end.
        ch = await client.open_channel("org.example.Echo", route="direct")
        target = await accepted.receive()
        await ch.send_all(b"partial")
        await trio.aclose_forcefully(ch)
        with trio.fail_after(10):
            assert await target.receive_some() == b"partial"
            with pytest.raises(trio.BrokenResourceError):
                await target.receive_some()
        # The socket closed under the channel, as a crash leaves it.
        ch = await client.open_channel("org.example.Echo", route="direct")
        target = await accepted.receive()
        await ch.send_all(b"partial")
        ch.raw.socket.close()  # type: ignore[attr-defined]
        with trio.fail_after(10):
            assert await target.receive_some() == b"partial"
            with pytest.raises(trio.BrokenResourceError):
                await target.receive_some()
            with pytest.raises(trio.BrokenResourceError):  # and it stays broken
                await target.receive_some()


def _send_with_descriptor(ch: Channel, data: bytes) -> None:
    """Write ``data`` on a unix-fd channel's socket by hand, with a descriptor attached."""
    assert isinstance(ch.raw, UnixChannelStream)
    with open(os.devnull, "rb") as null, socket.socket(fileno=os.dup(ch.raw.socket.fileno())) as sock:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [null.fileno()]))])


async def test_unix_fd_a_descriptor_on_data_breaks_the_stream(tmp_path: Path) -> None:
    """Only the end mark may carry a descriptor; a peer that passes one on data breaks its own
    channel (the descriptor is closed, not kept)."""
    async with pair(tmp_path, "unix") as (_, service, client):
        accepted = hand_over_channels(service)
        ch = await client.open_channel("org.example.Echo", route="direct")
        target = await accepted.receive()
        assert isinstance(target.raw, UnixChannelStream)
        _send_with_descriptor(ch, b"data")
        before = len(os.listdir("/proc/self/fd"))
        with trio.fail_after(10):
            with pytest.raises(trio.BrokenResourceError, match="descriptor"):
                await target.receive_some()
        assert len(os.listdir("/proc/self/fd")) <= before
        await ch.aclose()
        # The mark itself, sent by hand, is a clean end.
        ch = await client.open_channel("org.example.Echo", route="direct")
        target = await accepted.receive()
        _send_with_descriptor(ch, b"xy" + END_MARK)
        with trio.fail_after(10):
            assert await target.receive_some() == b"xy"
            assert await target.receive_some() == b""
        await ch.aclose()


async def test_unix_fd_channel_sockets_hold_a_whole_big_frame(tmp_path: Path) -> None:
    """Each end of a unix-fd channel's socketpair has a send buffer a 1 MiB frame fits in
    (bulk transfers then wake each end about once a MiB), as far as the kernel allows."""
    from bus.broker import UNIX_FD_SEND_BUFFER

    with open("/proc/sys/net/core/wmem_max") as limit:
        allowed = min(UNIX_FD_SEND_BUFFER, int(limit.read()))
    async with pair(tmp_path, "unix") as (_, service, client):
        accepted = hand_over_channels(service)
        ch = await client.open_channel("org.example.Echo", route="direct")
        target = await accepted.receive()
        for end in (ch, target):
            assert isinstance(end.raw, UnixChannelStream)
            # The kernel caps the size asked at wmem_max and keeps twice that: an untouched
            # socket reports wmem_default (212992 by default, as wmem_max), less than this.
            assert end.raw.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * allowed
        await ch.aclose()


# -- the tcp route's listener: candidates checked concurrently ------------------------------------


async def _offer(tcp_address: str) -> tuple[FramedStream, dict[str, Any]]:
    """Ask for a direct channel by hand (as FRIEND, over TCP): the broker's offer to the opener."""
    raw = await raw_connect(tcp_address, FRIEND)
    await raw.send_message({"op": "hello", "id": 1})
    await raw.send_message({"op": "open_channel", "id": 2, "name": "org.example.Echo", "route": "direct"})
    with trio.fail_after(10):
        while True:
            frame = await raw.receive_frame()
            if isinstance(frame, ControlFrame) and frame.message.get("re") == 2:
                offer = frame.message["result"]
                assert offer["route"] == "tcp" and len(offer["token"]) == 32
                return raw, offer


async def _dial(offer: dict[str, Any], identity: Identity, token: bytes) -> SecureStream | None:
    """Connect, prove ``identity``, present ``token``: the stream if the target kept it."""
    transport = await trio.open_tcp_stream(offer["host"], offer["port"])
    stream = SecureStream.client(transport, identity, PLUGIN.public_key)
    try:
        with trio.fail_after(10):
            await stream.do_handshake()
            await stream.send_all(token)
            await stream.send_all(b"ping")
            if await stream.receive_some() == b"ping":  # the target echoes: we are its channel
                return stream
    except (trio.BrokenResourceError, HandshakeError):
        pass
    await trio.aclose_forcefully(stream)
    return None


async def _closed_by_peer(stream: trio.SocketStream) -> bool:
    """True once the other end closed ``stream`` (a squatter that was dropped)."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass
    return True


async def test_silent_local_connections_do_not_stop_a_direct_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyless local processes connect to the target's listener first and say nothing (or
    nonsense); route="direct" still gets through at once, and they are dropped in time."""
    async with pair(tmp_path, "tcp") as (_, service, client):
        service.handle_channels("raw", echo)
        squatters: list[trio.SocketStream] = []
        dial = client._routes._dial_direct

        async def squat_then_dial(result: dict[str, Any], protocol: str) -> Channel:
            for _ in range(5):
                squatters.append(await trio.open_tcp_stream(result["host"], result["port"]))
            await squatters[-1].send_all(b"\x00" * 64)  # not even a valid msg1
            await trio.testing.wait_all_tasks_blocked()  # the listener has taken them in
            return await dial(result, protocol)

        monkeypatch.setattr(client._routes, "_dial_direct", squat_then_dial)
        with trio.fail_after(20):
            ch = await client.open_channel("org.example.Echo", route="direct")
        assert ch.route == "tcp"
        assert await round_trip(ch, b"through") == b"through"
        await ch.aclose()
        with trio.fail_after(20):  # the squatters were closed when their time was up (or at the win)
            for squatter in squatters:
                assert await _closed_by_peer(squatter)
                await squatter.aclose()


async def test_wrong_key_and_wrong_token_are_refused_while_the_opener_gets_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clients.channel_routes, "DIRECT_TIMEOUT", 30.0)  # this test is about the order, not the clock
    async with pair(tmp_path, "tcp") as (rb, service, _):
        reached: list[Channel] = []

        async def keep(ch: Channel) -> None:
            reached.append(ch)
            await echo(ch)

        service.handle_channels("raw", keep)
        raw, offer = await _offer(rb.tcp_address)
        # Connected before the opener and still connected after it got in: a silent one, one
        # that proves the right key but never sends the token, and a third party.
        silent = await trio.open_tcp_stream(offer["host"], offer["port"])
        no_token = SecureStream.client(await trio.open_tcp_stream(offer["host"], offer["port"]), FRIEND, PLUGIN.public_key)
        await no_token.do_handshake()
        with trio.fail_after(20):
            assert await _dial(offer, OWNER, offer["token"]) is None  # not the announced opener
            assert await _dial(offer, FRIEND, b"x" * 32) is None  # the right key, a wrong token
            assert not reached
            opener = await _dial(offer, FRIEND, offer["token"])
        assert opener is not None and len(reached) == 1
        with pytest.raises(OSError):  # the token worked once: the listener is gone
            await trio.open_tcp_stream(offer["host"], offer["port"])
        with trio.fail_after(20):
            assert await _closed_by_peer(silent)
            with pytest.raises(trio.BrokenResourceError):
                while await no_token.receive_some():
                    pass
        await opener.aclose()
        await trio.aclose_forcefully(no_token)
        await silent.aclose()
        await raw.aclose()


async def test_candidates_beyond_the_bound_are_refused_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients.channel_routes, "DIRECT_TIMEOUT", 30.0)
    bound = clients.channel_routes.MAX_DIRECT_CANDIDATES
    async with pair(tmp_path, "tcp") as (rb, service, _):
        service.handle_channels("raw", echo)
        raw, offer = await _offer(rb.tcp_address)
        held = [await trio.open_tcp_stream(offer["host"], offer["port"]) for _ in range(bound)]
        extra = await trio.open_tcp_stream(offer["host"], offer["port"])
        with trio.fail_after(20):
            assert await _closed_by_peer(extra)  # refused as soon as it was accepted ...
        for stream in held:  # ... while the others are still being given their chance
            with pytest.raises(BlockingIOError):
                os.read(stream.socket.fileno(), 1)
        with trio.fail_after(20):  # their time runs out; then the opener gets through
            for stream in held:
                assert await _closed_by_peer(stream)
                await stream.aclose()
            opener = await _dial(offer, FRIEND, offer["token"])
        assert opener is not None
        await opener.aclose()
        await extra.aclose()
        await raw.aclose()


# -- a client on an encrypted link refuses a plain relay ------------------------------------------


@asynccontextmanager
async def _fake_broker(tmp: Path, kind: str) -> AsyncIterator[tuple[str, trio.MemoryReceiveChannel[FramedStream]]]:
    """A broker played by hand on the real framing, over TCP or an encrypted Unix socket: it
    completes the handshake and answers hello, then hands the connection to the test."""
    if kind == "tcp":
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        ep = Endpoint("tcp", OWNER.public_key, host="127.0.0.1", port=listener.socket.getsockname()[1])
    else:
        path = str(tmp / "fake.sock")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen()
        listener = trio.SocketListener(sock)
        ep = Endpoint("unix", OWNER.public_key, path=path, encrypted=True)
    connections, accepted = trio.open_memory_channel[FramedStream](1)
    opened: list[trio.abc.Stream] = []

    async def serve() -> None:
        transport = await listener.accept()
        opened.append(transport)
        secure = SecureStream.server(transport, OWNER)  # box-stream, as the address says
        await secure.do_handshake()
        framed = FramedStream(secure)
        hello = await framed.receive_frame()
        assert isinstance(hello, ControlFrame) and hello.message["op"] == "hello"
        await framed.send_message({"re": hello.message["id"], "result": {"unique_id": ":1"}})
        await connections.send(framed)

    try:
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield format_address([ep]), accepted
            nursery.cancel_scope.cancel()
    finally:
        for stream in opened:
            await trio.aclose_forcefully(stream)


async def _next_control(framed: FramedStream, match: Any) -> dict[str, Any]:
    """The next control message for which ``match(frame)`` holds (others are skipped)."""
    with trio.fail_after(10):
        while True:
            frame = await framed.receive_frame()
            assert frame is not None, "the client closed its connection"
            if isinstance(frame, ControlFrame) and match(frame):
                return frame.message


@pytest.mark.parametrize("kind", ["tcp", "encrypted-unix"])
async def test_a_client_on_an_encrypted_link_refuses_a_relayed_channel_called_plain(tmp_path: Path, kind: str) -> None:
    async with _fake_broker(tmp_path, kind) as (address, accepted):
        async with open_bus(address, identity=FRIEND, reconnect=False) as client:
            broker = await accepted.receive()
            served: list[Channel] = []

            async def serve(ch: Channel) -> None:
                served.append(ch)

            client.handle_channels("raw", serve)
            opener = {"unique_id": ":2", "identity": PLUGIN.id, "names": []}
            # As a target: a channel_request that calls a relay plain is rejected, and the
            # handler never runs.
            request = {"op": "channel_request", "id": 900, "channel": 7, "protocol": "raw", "route": "relay"}
            await broker.send_message({**request, "encrypted": False, "name": "org.example.Me", "opener": opener})
            answer = await _next_control(broker, lambda f: f.message.get("re") == 900)
            assert answer["error"]["code"] == ChannelRejected.wire_code
            assert "plaintext" in answer["error"]["message"]
            # The same request, encrypted, is accepted (the client then awaits the handshake).
            await broker.send_message({**request, "id": 901, "encrypted": True, "name": "org.example.Me", "opener": opener})
            assert await _next_control(broker, lambda f: f.message.get("re") == 901) == {"re": 901, "result": {}}

            # As an opener: a plain relay offered in reply to open_channel fails the open with
            # a typed error, and the client gives the channel back.
            async def offer_plain() -> None:
                ask = await _next_control(broker, lambda f: f.message.get("op") == "open_channel")
                peer = {"unique_id": ":2", "identity": PLUGIN.id, "names": ["org.example.Echo"]}
                result = {"route": "relay", "channel": 5, "encrypted": False, "peer": peer}
                await broker.send_message({"re": ask["id"], "result": result})

            async with trio.open_nursery() as nursery:
                nursery.start_soon(offer_plain)
                with pytest.raises(RemoteProtocolError, match="plaintext"):
                    await client.open_channel("org.example.Echo", route="relay")
            closed = await _next_control(broker, lambda f: f.channel == 5 and "credit" not in f.message)
            assert closed == {"close": True}
            assert not served
