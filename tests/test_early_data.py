"""The client's early data: its first bytes of the stream (minibus's hello) sent right behind
msg3, before msg4 has proven the server (docs/protocol.md, section 2.6)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from bus.core.broker import Limits
from bus.errors import HandshakeError, HandshakeHangup, IdentityRefused, LocalProtocolError
from bus.io.fdpass import FdSocketStream
from bus.io.framed import FramedStream
from bus.io.secure import SecureStream
from bus.io.testing import tcp_stream_pair, unix_stream_pair
from bus.wire.address import Endpoint, format_address, parse_address
from bus.wire.boxstream import BoxStreamDecoder, BoxStreamEncoder
from bus.wire.frames import FrameDecoder, encode_control
from bus.wire.identity import Identity
from bus.wire.shs import ClientHandshake, ServerHandshake
from clients.bus import CannotConnect, open_bus

from .brokers import FRIEND, OWNER, running_broker

SERVER = Identity.generate()
CLIENT = Identity.generate()


async def _unix_listener(path: Path) -> tuple[trio.SocketListener, Path]:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(8)
    return trio.SocketListener(sock), path


async def _answer_msg1(transport: trio.SocketStream, identity: Identity) -> ServerHandshake:
    """A hand-driven server: msg1 read, msg2 sent; msg3 and msg4 are the test's."""
    hs = ServerHandshake(identity)
    hs.receive_data(await transport.receive_some(64))
    await transport.send_all(hs.data_to_send())  # msg2
    return hs


def _to_early_data(hs: ClientHandshake, server: ServerHandshake) -> None:
    server.receive_data(hs.data_to_send())  # msg1
    hs.receive_data(server.data_to_send())  # msg2


def test_the_early_keys_are_the_handshakes_keys() -> None:
    client, server = ClientHandshake(CLIENT, SERVER.public_key), ServerHandshake(SERVER)
    with pytest.raises(LocalProtocolError, match="once msg3 is made"):
        client.early_outcome()  # (no msg2 yet: no keys)
    _to_early_data(client, server)
    early = client.early_outcome()
    assert client.early_outcome() is early
    box = BoxStreamEncoder(early.encrypt_key, early.encrypt_nonce).encode(b"early bytes")
    server.receive_data(client.data_to_send() + box)  # msg3 with the early bytes behind it
    assert server.is_done and server.unused_data == box  # (the stream's, not the handshake's)
    decoder = BoxStreamDecoder(server.outcome.decrypt_key, server.outcome.decrypt_nonce)
    decoder.receive_data(server.unused_data)
    assert decoder.read() == b"early bytes"
    client.receive_data(server.data_to_send())  # msg4
    assert client.outcome == early
    with pytest.raises(LocalProtocolError):
        client.early_outcome()


def test_early_keys_prove_nothing_a_forged_msg4_is_refused() -> None:
    client, server = ClientHandshake(CLIENT, SERVER.public_key), ServerHandshake(SERVER)
    _to_early_data(client, server)
    client.early_outcome()
    client.data_to_send()
    with pytest.raises(HandshakeError, match="msg4"):
        client.receive_data(bytes(80))
    with pytest.raises(LocalProtocolError):
        client.outcome  # noqa: B018 (the early keys never become the outcome)


Pair = Callable[[], Awaitable[tuple[trio.abc.Stream, trio.abc.Stream]]]


async def _unix() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    return unix_stream_pair()


async def _unix_fd() -> tuple[trio.abc.Stream, trio.abc.Stream]:
    # (the client library's socket: each handshake message and its answer in one step)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return FdSocketStream(left), trio.SocketStream(trio.socket.from_stdlib_socket(right))


PAIRS: dict[str, Pair] = {"unix": _unix, "unix-fd": _unix_fd, "tcp": tcp_stream_pair}


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
async def test_early_data_is_the_streams_first_bytes(pair: str, encrypted: bool) -> None:
    left, right = await PAIRS[pair]()
    client = SecureStream.client(left, CLIENT, SERVER.public_key, encrypted=encrypted)
    server = SecureStream.server(right, SERVER, encrypted=encrypted, direct_handshake=pair != "tcp")
    asked: list[int] = []

    def early() -> bytes:
        asked.append(1)
        return b"hello, early"

    client.early_data = early
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        assert asked == [1] and client.early_data is None
        assert client.bytes_sent == len(b"hello, early")
        await client.send_all(b" and then more")  # (the encoder went on from the early box)
        got = b""
        while len(got) < 26:
            got += await server.receive_some()
        assert got == b"hello, early and then more"
        await server.send_all(b"back")
        assert await client.receive_some() == b"back"
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
async def test_early_data_goes_out_before_msg4(encrypted: bool) -> None:
    """The server holds msg4 back until the early bytes have come: the client sent them
    without waiting for it."""
    left, right = await _unix_fd()
    client = SecureStream.client(left, CLIENT, SERVER.public_key, encrypted=encrypted)
    client.early_data = lambda: b"before msg4"
    assert isinstance(right, trio.SocketStream)

    async def server() -> None:
        hs = await _answer_msg1(right, SERVER)
        got = b""
        while not hs.is_done or not got:
            got = await right.receive_some()
            if not hs.is_done:
                hs.receive_data(got[:112])
                got = got[112:]
        rest = bytearray(got)
        wanted = len(b"before msg4") + (34 if encrypted else 0)
        while len(rest) < wanted:
            rest += await right.receive_some()
        if encrypted:
            decoder = BoxStreamDecoder(hs.outcome.decrypt_key, hs.outcome.decrypt_nonce)
            decoder.receive_data(rest)
            assert decoder.read() == b"before msg4"
        else:
            assert rest == b"before msg4"
        await right.send_all(hs.data_to_send())  # msg4, only now

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            await client.do_handshake()
    await client.aclose()
    await right.aclose()


@pytest.mark.parametrize("refusal", ["wrong server key", "identity refused"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
async def test_a_server_that_hangs_up_on_early_data_is_a_refusal(pair: str, refusal: str) -> None:
    """A server that fails or refuses the handshake at msg3 closes with the early bytes unread,
    which resets the connection (TCP and Unix alike): the client reports the refusal it reports
    without early data, not a transport failure."""
    left, right = await PAIRS[pair]()
    dialled = Identity.generate().public_key if refusal == "wrong server key" else SERVER.public_key
    client = SecureStream.client(left, CLIENT, dialled)
    client.early_data = lambda: b"x" * 1000
    server = SecureStream.server(right, SERVER, authorize=lambda key: refusal != "identity refused")
    errors: dict[str, BaseException] = {}

    async def run(side: str, stream: SecureStream) -> None:
        try:
            await stream.do_handshake()
        except HandshakeError as exc:
            errors[side] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "client", client)
            nursery.start_soon(run, "server", server)
    assert isinstance(errors["client"], HandshakeHangup), errors
    assert "refused our identity, or we dialled the wrong server key" in str(errors["client"])
    if refusal == "identity refused":
        assert isinstance(errors["server"], IdentityRefused)
    else:
        assert "another server key" in str(errors["server"])
    await client.aclose()
    await server.aclose()


async def test_open_bus_sends_its_hello_behind_msg3_and_reads_the_answer_after_msg4(tmp_path: Path) -> None:
    """The client library's connect: the broker has the hello (with the name) before it sends
    msg4; the answer, written right behind msg4, is read once msg4 is checked."""
    listener, path = await _unix_listener(tmp_path / "early.sock")
    hellos: list[dict[str, object]] = []

    async def handle(transport: trio.SocketStream) -> None:
        async with transport:
            hs = await _answer_msg1(transport, SERVER)
            decoder = FrameDecoder()
            got = b""
            while not hs.is_done:
                got += await transport.receive_some()
                if len(got) >= 112:
                    hs.receive_data(got[:112])
                    got = got[112:]
            decoder.receive_data(got)  # (a Unix connection is plain: frames right behind msg3)
            while (frame := decoder.next_frame()) is None:
                decoder.receive_data(await transport.receive_some())
            hellos.append(frame.message)  # type: ignore[union-attr]
            answer = encode_control(0, {"re": 1, "result": {"unique_id": ":9", "identity": CLIENT.id}})
            await transport.send_all(hs.data_to_send() + answer)  # msg4 and the answer in one write
            assert await transport.receive_some() is not None  # (the client's goodbye or end)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        address = format_address([Endpoint("unix", SERVER.public_key, path=str(path))])
        with trio.fail_after(10):
            async with open_bus(address, identity=CLIENT, name="org.test.Early", reconnect=False) as bus:
                assert bus.unique_id == ":9"
        assert hellos and hellos[0]["op"] == "hello" and hellos[0]["name"] == "org.test.Early"
        nursery.cancel_scope.cancel()


async def test_open_bus_trusts_nothing_behind_a_forged_msg4(tmp_path: Path) -> None:
    """A server without the broker's secret key cannot make msg4: an answer to hello behind a
    forged one is never read, and the connect fails as a failed handshake."""
    listener, path = await _unix_listener(tmp_path / "forged.sock")
    impostor = Identity.generate()

    async def handle(transport: trio.SocketStream) -> None:
        async with transport:
            hs = await _answer_msg1(transport, impostor)
            await transport.receive_some(112)  # msg3 (it cannot open it: another server key)
            answer = encode_control(0, {"re": 1, "result": {"unique_id": ":6", "identity": CLIENT.id}})
            await transport.send_all(bytes(80) + answer)
            await transport.receive_some()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        address = format_address([Endpoint("unix", SERVER.public_key, path=str(path))])
        with trio.fail_after(10):
            with pytest.raises(CannotConnect, match="handshake failed.*msg4"):
                async with open_bus(address, identity=CLIENT, reconnect=False):
                    raise AssertionError("connected")
        nursery.cancel_scope.cancel()


async def test_a_framed_stream_reads_early_frames_the_server_had_before_its_session(tmp_path: Path) -> None:
    """busd's side: the hello came with msg3, so the session's first read finds it at once."""
    left, right = unix_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key, encrypted=False)
    client.early_data = lambda: encode_control(0, {"op": "hello", "id": 1})
    server = SecureStream.server(right, SERVER, encrypted=False, direct_handshake=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        framed = FramedStream(server, receive_stream=server.plain_transport())
        frame = await framed.receive_frame()
        assert frame is not None and frame.message == {"op": "hello", "id": 1}  # type: ignore[union-attr]
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("early", [b"", None], ids=["empty", "unset"])
async def test_a_reset_without_early_data_stays_a_transport_failure(early: bytes | None) -> None:
    """Only early data left unread makes a refusing server's close a reset: a client that sent
    none (a channel's own handshake, over a relay that can break) still reports a reset while
    it waits for msg4 as the transport failure it is, with its reason, not as a refusal."""
    left, right = await tcp_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    if early is not None:
        client.early_data = lambda: early
    assert isinstance(right, trio.SocketStream)

    async def server() -> None:
        hs = await _answer_msg1(right, SERVER)
        while not hs.is_done:
            hs.receive_data(await right.receive_some(hs.bytes_wanted))  # msg3, exactly
        # An abortive close with nothing unread: the client is reset, not refused.
        right.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await right.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(HandshakeError) as caught:
                await client.do_handshake()
    assert not isinstance(caught.value, HandshakeHangup), caught.value
    assert "transport failed" in str(caught.value) and "reset" in str(caught.value), caught.value
    await client.aclose()


async def test_a_refusal_after_early_hello_gives_way_to_the_next_endpoint(tmp_path: Path) -> None:
    """Over real brokers: the first endpoint (another broker on a Unix path: it cannot open
    msg3, and hangs up with the early hello unread) refuses after msg3; the next (the real
    broker, over TCP) gets a hello of its own, made again for it, and grants the name."""
    (tmp_path / "other").mkdir()
    (tmp_path / "real").mkdir()
    async with running_broker(tmp_path / "other", identity=Identity.generate()) as other:
        async with running_broker(tmp_path / "real", limits=Limits(connections_per_identity=4)) as real:
            wrong = Endpoint("unix", OWNER.public_key, path=parse_address(other.unix_address)[0].path)
            address = format_address([wrong, *parse_address(real.tcp_address)])
            with trio.fail_after(20):
                async with open_bus(address, identity=FRIEND, name="org.example.Next", reconnect=False) as bus:
                    assert bus.endpoint is not None and bus.endpoint.transport == "tcp"
                    assert [n.name for n in await bus.list_names()] == ["org.example.Next"]
                # Both refuse: each says so as the refusal it is.
                address = format_address([wrong, wrong])
                with pytest.raises(CannotConnect) as caught:
                    async with open_bus(address, identity=FRIEND, reconnect=False):
                        raise AssertionError("connected")
            assert str(caught.value).count("refused our identity, or we dialled the wrong server key") == 2, caught.value
            assert other.broker.sessions == {}


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_quota_refusal_reaches_the_client_though_its_early_hello_went_unread(tmp_path: Path, transport: str) -> None:
    """busd refuses a connection over its identity's quota right after msg4 (an error event,
    then it closes with the early hello unread: a reset); the client still reads the reason,
    every time."""
    async with running_broker(tmp_path, limits=Limits(connections_per_identity=1)) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        with trio.fail_after(30):
            async with open_bus(rb.unix_address, identity=FRIEND, reconnect=False):
                for _ in range(20):
                    with pytest.raises(CannotConnect, match="refused the connection: connections_per_identity reached"):
                        async with open_bus(address, identity=FRIEND, name="org.example.Over", reconnect=False):
                            raise AssertionError("connected")


async def test_empty_early_data_leaves_the_stream_as_without_it() -> None:
    """Nothing to send early (a hello that cannot be encoded): msg3 goes alone, the early keys
    are never asked for, and the encoder starts at the outcome's nonce."""
    left, right = await tcp_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    client.early_data = lambda: b""
    server = SecureStream.server(right, SERVER)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            nursery.start_soon(server.do_handshake)
        assert client.early_data is None and client.bytes_sent == 0
        await client.send_all(b"first")
        assert await server.receive_some() == b"first"
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_quota_refusal_ends_cleanly_though_the_hello_came_early(tmp_path: Path, transport: str) -> None:
    """busd takes in the early hello it will not answer before it closes a refused connection:
    the client reads the reason and then a clean end, not a reset (a reset discards what the
    broker had not sent yet, and on some stacks what the client had not read yet)."""
    async with running_broker(tmp_path, limits=Limits(connections_per_identity=1)) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        ep = parse_address(address)[0]
        with trio.fail_after(20):
            async with open_bus(rb.unix_address, identity=FRIEND, reconnect=False):
                if ep.transport == "unix":
                    sock: trio.abc.Stream = await trio.open_unix_socket(ep.path or "")
                else:
                    sock = await trio.open_tcp_stream(ep.host or "", ep.port or 0)
                stream = SecureStream.client(sock, FRIEND, ep.key, encrypted=ep.uses_box_stream)
                stream.early_data = lambda: encode_control(0, {"op": "hello", "id": 1, "info": {"x": "y" * 3000}})
                await stream.do_handshake()
                framed = FramedStream(stream)
                frame = await framed.receive_frame()
                assert frame is not None and frame.message["event"] == "error"  # type: ignore[union-attr]
                assert await framed.receive_frame() is None  # (a reset raises BrokenResourceError)
                await framed.aclose()


async def test_a_stall_after_the_early_hello_gives_way_to_the_next_endpoint(tmp_path: Path) -> None:
    """The first endpoint takes msg3 and the early hello and never sends msg4: its share of the
    connect deadline ends that attempt (cancelled while the hello was out), and the next
    endpoint, the real broker, gets a hello of its own."""
    listener, path = await _unix_listener(tmp_path / "stall.sock")
    got_msg3 = trio.Event()

    async def handle(transport: trio.SocketStream) -> None:
        async with transport:
            hs = await _answer_msg1(transport, OWNER)
            while not hs.is_done:
                hs.receive_data(await transport.receive_some(hs.bytes_wanted))
            got_msg3.set()
            await trio.sleep_forever()  # (no msg4)

    (tmp_path / "real").mkdir()
    async with running_broker(tmp_path / "real") as real, trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        stall = Endpoint("unix", OWNER.public_key, path=str(path))
        address = format_address([stall, *parse_address(real.tcp_address)])
        with trio.fail_after(20):
            async with open_bus(address, identity=FRIEND, name="org.example.After", reconnect=False, connect_timeout=4) as bus:
                assert got_msg3.is_set()
                assert bus.endpoint is not None and bus.endpoint.transport == "tcp"
                assert [n.name for n in await bus.list_names()] == ["org.example.After"]
        nursery.cancel_scope.cancel()
