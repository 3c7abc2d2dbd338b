"""SecureStream over memory streams and real sockets: conformance, handshake failures, faults."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from bus.errors import HandshakeError, HandshakeTimeout, IdentityRefused
from bus.io.fdpass import FdSocketStream, send_with_fds
from bus.io.secure import SecureStream
from bus.io.testing import secure_stream_pair, tcp_stream_pair
from bus.io.testing import unix_stream_pair as unix_socket_stream_pair
from bus.wire.identity import Identity, PublicKey


SERVER = Identity.generate()
CLIENT = Identity.generate()

StreamPair = tuple[trio.abc.Stream, trio.abc.Stream]


async def secure_pair(transports: StreamPair, *, encrypted: bool) -> tuple[SecureStream, SecureStream]:
    """Wrap a transport pair and complete the handshake on both sides."""
    return await secure_stream_pair(transports, CLIENT, SERVER, encrypted=encrypted)


def _fill_socket(stream: trio.SocketStream, secure: SecureStream) -> None:
    """Clog a socket with bytes the receiving SecureStream will accept.

    Tiny writes are atomic on AF_UNIX stream sockets: each either goes in whole or fails
    with EAGAIN.  Encrypted ones are boxed with the stream's own encoder, whose nonce is
    restored when a write is refused, so the peer still reads a valid box-stream.
    """
    sock = stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    encoder = secure._encoder
    while True:
        if encoder is None:
            chunk, saved = b"x", None
        else:
            saved = encoder._nonce
            chunk = encoder.encode(b"x")
        try:
            sent = os.write(sock.fileno(), chunk)  # the fd is non-blocking
        except BlockingIOError:
            if encoder is not None:
                encoder._nonce = saved  # type: ignore[assignment]
            return
        assert sent == len(chunk)


def makers(kind: str, encrypted: bool) -> tuple[Callable[[], Awaitable[StreamPair]], Callable[[], Awaitable[StreamPair]]]:
    async def stream_maker() -> StreamPair:
        if kind == "memory":
            return await secure_pair(trio.testing.memory_stream_pair(), encrypted=encrypted)
        return await secure_pair(unix_socket_stream_pair(), encrypted=encrypted)

    async def clogged_stream_maker() -> StreamPair:
        if kind == "memory":
            return await secure_pair(trio.testing.lockstep_stream_pair(), encrypted=encrypted)
        left, right = unix_socket_stream_pair()
        client, server = await secure_pair((left, right), encrypted=encrypted)
        # check_two_way_stream also uses the pair flipped: clog both directions.
        _fill_socket(left, client)
        _fill_socket(right, server)
        return client, server

    return stream_maker, clogged_stream_maker


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
@pytest.mark.parametrize("kind", ["memory", "unix-socketpair"])
async def test_half_closeable_stream_conformance(kind: str, encrypted: bool) -> None:
    stream_maker, clogged = makers(kind, encrypted)
    await trio.testing.check_half_closeable_stream(stream_maker, clogged)


async def test_clogged_socket_maker_really_clogs() -> None:
    """The socket clogging above must leave send_all blocked until the peer reads."""
    _, clogged = makers("unix-socketpair", True)
    s, r = await clogged()
    with trio.move_on_after(0.2) as scope:
        await s.wait_send_all_might_not_block()
    assert scope.cancelled_caught
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.send_all, b"after the clog")
        got = bytearray()
        while not got.endswith(b"after the clog"):
            got += await r.receive_some()
    assert set(got[:-14]) == {ord("x")}
    await s.aclose()
    await r.aclose()


@pytest.mark.parametrize("encrypted", [True, False])
async def test_identities_are_exposed(encrypted: bool) -> None:
    client, server = await secure_pair(unix_socket_stream_pair(), encrypted=encrypted)
    assert client.peer_key == SERVER.public_key
    assert server.peer_key == CLIENT.public_key
    assert client.local_key == CLIENT.public_key
    await client.aclose()
    await server.aclose()


async def test_encrypted_over_tcp_carries_ciphertext_only() -> None:
    """What crosses the TCP socket is box-stream, not the plaintext."""
    left, right = await tcp_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    raw = right  # read the server side raw, after running its handshake by hand
    server = SecureStream.server(raw, SERVER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    secret = b"attack at dawn " * 100
    await client.send_all(secret)
    wire = bytearray()
    while len(wire) < len(secret) + 34:
        wire += await raw.receive_some()
    assert b"attack at dawn" not in wire
    await client.aclose()
    await raw.aclose()


async def test_eof_and_goodbye_over_tcp() -> None:
    client, server = await secure_pair(await tcp_stream_pair(), encrypted=True)
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await client.send_all(b"last words")
            await client.send_eof()

        nursery.start_soon(send)
        got = b""
        while chunk := await server.receive_some():
            got += chunk
    assert got == b"last words"
    await server.send_all(b"reply after half-close")
    assert await client.receive_some() == b"reply after half-close"
    await client.aclose()
    await server.aclose()


async def test_aclose_reads_as_clean_eof_on_the_other_side() -> None:
    client, server = await secure_pair(unix_socket_stream_pair(), encrypted=True)
    await client.send_all(b"bye")
    await client.aclose()
    assert await server.receive_some() == b"bye"
    assert await server.receive_some() == b""
    await server.aclose()


# -- handshake failures, each leaving nothing half-open ------------------------------------


async def _handshake_both(client: SecureStream, server: SecureStream) -> tuple[BaseException | None, BaseException | None]:
    errors: list[BaseException | None] = [None, None]

    async def run(i: int, stream: SecureStream) -> None:
        try:
            await stream.do_handshake()
        except (HandshakeError, trio.BrokenResourceError) as exc:
            errors[i] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 0, client)
        nursery.start_soon(run, 1, server)
    return errors[0], errors[1]


async def _assert_closed(stream: trio.SocketStream) -> None:
    """The transport under a failed SecureStream is closed."""
    assert stream.socket.fileno() == -1


async def test_wrong_network_key() -> None:
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key, network_key=os.urandom(32))
    server = SecureStream.server(right, SERVER)
    c_err, s_err = await _handshake_both(client, server)
    assert isinstance(s_err, HandshakeError) and "network key" in str(s_err)
    assert isinstance(c_err, HandshakeError) and "hung up" in str(c_err)
    await _assert_closed(left)
    await _assert_closed(right)


async def test_client_dials_wrong_server_key() -> None:
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, Identity.generate().public_key)
    server = SecureStream.server(right, SERVER)
    c_err, s_err = await _handshake_both(client, server)
    assert isinstance(s_err, HandshakeError) and "another server key" in str(s_err)
    assert isinstance(c_err, HandshakeError) and "wrong server key" in str(c_err)
    await _assert_closed(left)
    await _assert_closed(right)


async def test_server_refuses_identity() -> None:
    left, right = unix_socket_stream_pair()
    refused: list[PublicKey] = []

    def authorize(key: PublicKey) -> bool:
        refused.append(key)
        return False

    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    server = SecureStream.server(right, SERVER, authorize=authorize)
    c_err, s_err = await _handshake_both(client, server)
    assert isinstance(s_err, IdentityRefused)
    assert isinstance(c_err, HandshakeError) and "refused our identity" in str(c_err)
    assert refused == [CLIENT.public_key]
    await _assert_closed(right)
    # Using the broken streams afterwards says so.
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"x")
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()


@pytest.mark.parametrize("garbage", [os.urandom(64), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40), os.urandom(500)])
async def test_peer_sends_garbage(garbage: bytes) -> None:
    left, right = unix_socket_stream_pair()
    server = SecureStream.server(right, SERVER)
    await left.send_all(garbage)
    with pytest.raises(HandshakeError, match="bad hmac"):
        await server.do_handshake()
    await _assert_closed(right)
    await left.aclose()


async def test_peer_sends_truncated_hello_then_hangs_up() -> None:
    left, right = unix_socket_stream_pair()
    server = SecureStream.server(right, SERVER)
    await left.send_all(os.urandom(30))
    await left.send_eof()
    with pytest.raises(HandshakeError, match="hung up"):
        await server.do_handshake()
    await _assert_closed(right)
    await left.aclose()


async def test_low_order_point_with_valid_hmac_over_a_socket() -> None:
    import hmac

    from bus.wire.shs import DEFAULT_NETWORK_KEY

    left, right = unix_socket_stream_pair()
    server = SecureStream.server(right, SERVER)
    point = bytes(32)
    await left.send_all(hmac.digest(DEFAULT_NETWORK_KEY, point, "sha512")[:32] + point)
    with pytest.raises(HandshakeError):
        await server.do_handshake()
    await _assert_closed(right)
    assert await left.receive_some() == b""  # the server sent nothing and hung up
    await left.aclose()


async def test_peer_sends_nothing_deadline_fires(autojump_clock: trio.testing.MockClock) -> None:
    left, right = unix_socket_stream_pair()
    server = SecureStream.server(right, SERVER, handshake_timeout=10)
    start = trio.current_time()
    with pytest.raises(HandshakeTimeout, match="10 s"):
        await server.do_handshake()
    assert trio.current_time() - start == pytest.approx(10)
    await _assert_closed(right)
    await left.aclose()


async def test_client_deadline_when_server_stalls_after_hello(autojump_clock: trio.testing.MockClock) -> None:
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key, handshake_timeout=3)
    with pytest.raises(HandshakeTimeout):
        await client.do_handshake()
    await _assert_closed(left)
    await right.aclose()


async def test_lazy_handshake_failure_is_broken_resource() -> None:
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    await right.aclose()
    with pytest.raises(trio.BrokenResourceError) as info:
        await client.send_all(b"hello")
    assert isinstance(info.value.__cause__, HandshakeError)


# -- faults after the handshake -------------------------------------------------------------


class _Tap(trio.abc.HalfCloseableStream):
    """A transport wrapper that lets a test tamper with bytes in flight."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.tamper: Callable[[bytes], bytes] | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        data = bytes(data)
        if self.tamper is not None:
            data = self.tamper(data)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_tampered_byte_breaks_the_stream() -> None:
    left, right = unix_socket_stream_pair()
    tap = _Tap(left)
    client, server = await secure_pair((tap, right), encrypted=True)

    def flip(data: bytes) -> bytes:
        return data[:40] + bytes([data[40] ^ 1]) + data[41:]

    tap.tamper = flip
    await client.send_all(b"an important message")
    tap.tamper = None
    with pytest.raises(trio.BrokenResourceError, match="authenticate"):
        await server.receive_some()
    await _assert_closed(right)
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some()
    await client.aclose()


async def test_truncated_stream_is_broken_not_eof() -> None:
    left, right = unix_socket_stream_pair()
    client, server = await secure_pair((left, right), encrypted=True)
    await client.send_all(b"partial")
    # Cut the connection without a goodbye, as an attacker on the path could.
    await left.aclose()
    assert await server.receive_some() == b"partial"
    with pytest.raises(trio.BrokenResourceError, match="truncated"):
        await server.receive_some()


async def test_plain_stream_sees_ordinary_eof() -> None:
    left, right = unix_socket_stream_pair()
    client, server = await secure_pair((left, right), encrypted=False)
    await client.send_all(b"plain")
    await left.aclose()
    assert await server.receive_some() == b"plain"
    assert await server.receive_some() == b""
    await server.aclose()


async def test_bytes_piggybacked_on_msg4_are_not_lost() -> None:
    """The server may send box-stream data right behind msg4, in the same write."""
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    server = SecureStream.server(right, SERVER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)

        async def server_side() -> None:
            await server.do_handshake()
            await server.send_all(b"first")

        nursery.start_soon(server_side)
    assert await client.receive_some() == b"first"
    await client.aclose()
    await server.aclose()


async def test_large_transfer_both_ways_over_tcp() -> None:
    client, server = await secure_pair(await tcp_stream_pair(), encrypted=True)
    blob = os.urandom(3 * 1024 * 1024 + 17)

    async def pump(src: SecureStream, dst: SecureStream) -> None:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for i in range(0, len(blob), 65536):
                    await src.send_all(blob[i : i + 65536])
                await src.send_eof()

            nursery.start_soon(send)
            got = bytearray()
            while chunk := await dst.receive_some(100_000):
                got += chunk
            assert got == blob

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, client, server)
        nursery.start_soon(pump, server, client)
    await client.aclose()
    await server.aclose()


async def test_lazy_handshake_on_first_use_from_both_directions() -> None:
    """send_all and receive_some may both start the handshake; it runs once."""
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    server = SecureStream.server(right, SERVER)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"ping")
        nursery.start_soon(lambda: _append(got, client.receive_some()))
        assert await server.receive_some() == b"ping"
        await server.send_all(b"pong")
    assert got == [b"pong"]
    assert client.handshake_done and server.peer_key == CLIENT.public_key
    await client.aclose()
    await server.aclose()


async def _append(out: list[bytes], pending: Awaitable[bytes]) -> None:
    out.append(await pending)


async def test_plain_mode_needs_a_half_closeable_transport() -> None:
    send, _ = trio.testing.memory_stream_one_way_pair()

    class OneWay(trio.abc.Stream):
        async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...
        async def wait_send_all_might_not_block(self) -> None: ...
        async def receive_some(self, max_bytes: int | None = None) -> bytes: return b""
        async def aclose(self) -> None: ...

    with pytest.raises(TypeError, match="half-closeable"):
        SecureStream.client(OneWay(), CLIENT, SERVER.public_key, encrypted=False)
    await send.aclose()


async def test_cancelled_encrypted_send_breaks_the_stream() -> None:
    """Half a box may be on the wire after a cancelled send: the stream refuses to go on."""
    client, server = await secure_pair(trio.testing.lockstep_stream_pair(), encrypted=True)
    with trio.move_on_after(0.05):
        await client.send_all(b"x" * 100_000)
    with pytest.raises(trio.BrokenResourceError):
        await client.send_all(b"more")
    await client.aclose()
    await server.aclose()


class _FailNthSend(_Tap):
    """Delivers the first ``ok`` sends, then fails like a peer that hung up."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, ok: int) -> None:
        super().__init__(inner)
        self.ok = ok

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.ok == 0:
            raise trio.BrokenResourceError("peer hung up")
        self.ok -= 1
        await self.inner.send_all(data)


async def test_msg4_that_cannot_be_delivered_fails_the_handshake() -> None:
    """The server's machine is done once msg4 is made; failing to send it still fails cleanly."""
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    server = SecureStream.server(_FailNthSend(right, ok=1), SERVER)  # msg2 goes, msg4 does not
    c_err, s_err = await _handshake_both(client, server)
    assert isinstance(s_err, HandshakeError) and "transport failed" in str(s_err)
    assert c_err is not None
    await _assert_closed(right)
    with pytest.raises(trio.BrokenResourceError):
        await server.do_handshake()  # no second try on a broken stream


async def test_wait_send_during_a_lazy_handshake_is_not_busy() -> None:
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    server = SecureStream.server(right, SERVER)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _append(got, server.receive_some()))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(server.wait_send_all_might_not_block)
        await client.send_all(b"x")
    assert got == [b"x"]
    await client.aclose()
    await server.aclose()


async def test_aclose_gives_up_on_the_goodbye_after_a_deadline(autojump_clock: trio.testing.MockClock) -> None:
    client, server = await secure_pair(trio.testing.lockstep_stream_pair(), encrypted=True)
    start = trio.current_time()
    await client.aclose()  # the server never reads: the goodbye cannot be delivered
    assert trio.current_time() - start == pytest.approx(client.close_timeout)
    await server.aclose()


async def test_encrypted_send_eof_leaves_the_transport_open_both_ways() -> None:
    """The goodbye is the end signal; a FIN would make SSB peers stop sending too."""
    left, right = await tcp_stream_pair()
    client, server = await secure_pair((left, right), encrypted=True)
    await client.send_eof()
    assert await server.receive_some() == b""
    await server.send_all(b"still flowing")
    assert await client.receive_some() == b"still flowing"
    await server.send_eof()
    assert await client.receive_some() == b""
    await client.aclose()
    await server.aclose()


async def test_no_handshake_deadline_of_its_own_leaves_it_to_the_caller(autojump_clock: trio.testing.MockClock) -> None:
    """handshake_timeout=math.inf: no deadline of the stream's own (it waits past the default
    10 s); the caller's deadline bounds it, and a cancelled handshake still closes the
    transport.  With a peer that answers, it completes as ever."""
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key, handshake_timeout=math.inf)
    start = trio.current_time()
    with trio.move_on_after(60) as scope:
        await client.do_handshake()  # the server never answers
    assert scope.cancelled_caught and trio.current_time() - start == pytest.approx(60)
    await _assert_closed(left)
    await right.aclose()

    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key, encrypted=False, handshake_timeout=math.inf)
    server = SecureStream.server(right, SERVER, encrypted=False, handshake_timeout=math.inf)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    assert client.peer_key == SERVER.public_key and server.peer_key == CLIENT.public_key
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
async def test_close_nowait_closes_a_socket_stream_at_once(encrypted: bool) -> None:
    """No checkpoint: the peer reads the end (over box-stream after goodbye_nowait: a clean
    end) and later use of the stream raises ClosedResourceError."""
    client, server = await secure_pair(unix_socket_stream_pair(), encrypted=encrypted)
    await client.send_all(b"before")
    client.goodbye_nowait()
    assert client.close_nowait()  # (synchronous: nothing else ran in between)
    with trio.fail_after(10):
        got = b""
        while True:
            chunk = await server.receive_some()
            if not chunk:
                break
            got += chunk
    assert got == b"before"
    with pytest.raises(trio.ClosedResourceError):
        await client.send_all(b"after")
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some()
    await client.aclose()  # (closing again is a no-op)
    await server.aclose()


async def test_close_nowait_over_an_fd_socket_closes_the_descriptors_it_holds() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiving = FdSocketStream(right)
    sending = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    client, server = await secure_pair((receiving, sending), encrypted=False)
    spare_a, spare_b = socket.socketpair()
    try:
        await send_with_fds(sending.socket, b"fd", [spare_a.fileno()])
        with trio.fail_after(10):
            assert await client.receive_some() == b"fd"
        assert len(receiving.fds) == 1
        held = receiving.fds[0]
        assert client.close_nowait()
        assert not receiving.fds
        with pytest.raises(OSError):
            os.fstat(held)  # closed with the stream (nobody took it)
        assert right.fileno() == -1
        with trio.fail_after(10):
            assert await server.receive_some() == b""
    finally:
        spare_a.close()
        spare_b.close()
        await server.aclose()


async def test_close_nowait_refuses_a_transport_it_cannot_close_at_once() -> None:
    client, server = await secure_pair(trio.testing.memory_stream_pair(), encrypted=False)
    assert not client.close_nowait()  # nothing done: still usable
    await client.send_all(b"still open")
    assert await server.receive_some() == b"still open"
    await client.aclose()
    await server.aclose()


# -- direct_handshake: the server's msg2 and msg3 in one step over a trio SocketStream (busd) -----


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("encrypted", [False, True])
async def test_a_direct_handshake_server_completes_and_carries_data(kind: str, encrypted: bool) -> None:
    left, right = unix_socket_stream_pair() if kind == "unix" else await tcp_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key, encrypted=encrypted)
    server = SecureStream.server(right, SERVER, encrypted=encrypted, direct_handshake=True)
    with trio.fail_after(10):
        assert await _handshake_both(client, server) == (None, None)
        assert server.peer_key == CLIENT.public_key and client.peer_key == SERVER.public_key
        await client.send_all(b"after the handshake")
        got = b""
        while len(got) < 19:
            got += await server.receive_some()
        assert got == b"after the handshake"
        await server.send_all(b"back")
        assert await client.receive_some() == b"back"
    await client.aclose()
    await server.aclose()


async def test_a_direct_handshake_server_refuses_as_ever() -> None:
    """Wrong server key, refused identity, a peer that hangs up after msg1: the same errors,
    and the transport closed."""
    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, Identity.generate().public_key)
    server = SecureStream.server(right, SERVER, direct_handshake=True)
    c_err, s_err = await _handshake_both(client, server)
    assert isinstance(s_err, HandshakeError) and "another server key" in str(s_err)
    assert isinstance(c_err, HandshakeError)
    await _assert_closed(right)

    left, right = unix_socket_stream_pair()
    client = SecureStream.client(left, CLIENT, SERVER.public_key)
    server = SecureStream.server(right, SERVER, authorize=lambda key: False, direct_handshake=True)
    c_err, s_err = await _handshake_both(client, server)
    assert isinstance(s_err, IdentityRefused)
    assert isinstance(c_err, HandshakeError) and "refused our identity" in str(c_err)
    await _assert_closed(right)

    left, right = unix_socket_stream_pair()
    server = SecureStream.server(right, SERVER, direct_handshake=True)
    from bus.wire.shs import ClientHandshake

    await left.send_all(ClientHandshake(CLIENT, SERVER.public_key).data_to_send())  # a real msg1
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def hang_up() -> None:
                assert len(await left.receive_some(64)) == 64  # msg2 came
                await left.aclose()

            nursery.start_soon(hang_up)
            with pytest.raises(HandshakeError, match="hung up"):
                await server.do_handshake()
    await _assert_closed(right)


async def test_a_direct_handshake_stalled_after_msg2_is_cancelled_by_its_deadline(autojump_clock: trio.testing.MockClock) -> None:
    left, right = unix_socket_stream_pair()
    # (As busd has it: no deadline of its own; the caller's scope bounds the handshake.)
    server = SecureStream.server(right, SERVER, direct_handshake=True, handshake_timeout=math.inf)
    from bus.wire.shs import ClientHandshake

    await left.send_all(ClientHandshake(CLIENT, SERVER.public_key).data_to_send())
    with trio.move_on_after(30) as scope:
        await server.do_handshake()  # msg2 goes out, msg3 never comes
    assert scope.cancelled_caught
    assert len(await left.receive_some(64)) == 64
    await _assert_closed(right)
    await left.aclose()


async def test_a_direct_handshake_whose_msg4_cannot_be_delivered_fails_cleanly() -> None:
    """msg1 and msg3 come, the client is gone before msg4 is written: the server's handshake
    fails as a transport failure (not a success), and its socket is closed."""
    from bus.wire.shs import ClientHandshake

    left, right = unix_socket_stream_pair()
    server = SecureStream.server(right, SERVER, direct_handshake=True)
    hs = ClientHandshake(CLIENT, SERVER.public_key)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def client_then_gone() -> None:
                await left.send_all(hs.data_to_send())  # msg1
                msg2 = b""
                while len(msg2) < 64:
                    msg2 += await left.receive_some(64 - len(msg2))
                hs.receive_data(msg2)
                # msg3, and gone at once (no checkpoint between: the server wakes to both)
                msg3 = hs.data_to_send()
                assert os.write(left.socket.fileno(), msg3) == len(msg3)
                left.socket.close()

            nursery.start_soon(client_then_gone)
            with pytest.raises(HandshakeError, match="transport failed"):
                await server.do_handshake()
    await _assert_closed(right)
