"""A bus's life from open_bus to leaving it, against a real broker over real sockets: what a
short-lived connection runs, and that leaving at once (before the bus read anything) still
ends everything cleanly on both sides."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from bus.broker import Broker
from bus.errors import ConnectionLost
from bus.io.fdpass import FdSocketStream
from clients.bus import Bus, open_bus
from clients.link import BUS_SEND_BUFFER
from tests.brokers import FRIEND, OWNER, running_broker


async def wait_for_no_sessions(broker: Broker) -> None:
    with trio.fail_after(10):
        while broker.sessions:
            await trio.sleep(0.01)


async def test_a_short_lived_bus_runs_one_task_and_no_reporter(tmp_path: Path) -> None:
    """The reader (that would reconnect): nothing else until it is needed.  The link's writer
    task starts when a frame first has to wait (a publish queues its frame for it)."""
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND, name="org.example.Short", reconnect=False) as bus:
            nursery = bus._connection.nursery
            assert nursery is not None
            await bus.ping()  # (its request went straight to the socket)
            names = sorted(task.name.rsplit(".", 1)[-1] for task in nursery.child_tasks)
            assert names == ["_serve"]
            await bus.publish("Tick", b"x")
            await bus.ping()
            names = sorted(task.name.rsplit(".", 1)[-1] for task in nursery.child_tasks)
            assert names == ["_serve", "_writer"]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_leaving_at_once_again_and_again_frees_the_name_and_the_connection(tmp_path: Path, transport: str) -> None:
    """Entered and left with nothing awaited in between (the bus's tasks never run before it is
    left): each time the broker sees the connection end and the name released, so the next
    connect may take the same name."""
    async with running_broker(tmp_path) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        for _ in range(20):
            async with open_bus(address, identity=FRIEND, name="org.example.Again", reconnect=False) as bus:
                assert bus.unique_id.startswith(":")
        await wait_for_no_sessions(rb.broker)
        async with open_bus(address, identity=OWNER, reconnect=False) as watcher:
            assert [n.name for n in await watcher.list_names()] == []
            # (and the name is free: a plain request gets it at once)
            assert await watcher.request_name("org.example.Again") == "primary-owner"


async def test_a_bus_left_at_once_ends_its_link_and_rejects_later_use(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND, reconnect=False) as bus:
            link = bus._link
            assert link is not None
        # Its reader never ran: the link was ended for it, with the same bookkeeping.
        assert link.closed and link.closed_event.is_set() and link.send.closed
        assert not bus.connected
        with pytest.raises(ConnectionLost):
            await bus.ping()
        with pytest.raises(trio.ClosedResourceError):
            link.send.send_nowait(b"x")
        await wait_for_no_sessions(rb.broker)


async def test_a_bus_left_at_once_closes_its_stream_before_waiting_for_its_task(tmp_path: Path) -> None:
    """Left before its reader task ran: the link is ended and the stream closed as the block is
    left, before the scheduler runs anyone (the broker can read the end at once), not at the
    task's first step.  A task that runs in the first pass after the block was left sees it
    done, whichever of the two runs first in that pass."""
    async with running_broker(tmp_path) as rb:
        for _ in range(8):
            seen: list[tuple[bool, int]] = []
            async with trio.open_nursery() as nursery:
                opened = open_bus(rb.unix_address, identity=FRIEND, name="org.example.Early", reconnect=False)
                bus = await opened.__aenter__()
                link = bus._link
                assert link is not None
                transport = link.framed.stream.transport
                assert isinstance(transport, FdSocketStream)

                async def look() -> None:
                    assert link is not None
                    seen.append((link.closed, transport.socket.fileno()))

                nursery.start_soon(look)
                await opened.__aexit__(None, None, None)
            assert seen == [(True, -1)]
            assert link.closed_event.is_set() and link.reason == "the bus was closed"
        await wait_for_no_sessions(rb.broker)


async def test_a_publish_then_leave_at_once_does_not_fail(tmp_path: Path) -> None:
    """A one-way message sent just before leaving: leaving neither raises nor hangs."""
    async with running_broker(tmp_path) as rb:
        with trio.fail_after(10):
            async with open_bus(rb.unix_address, identity=FRIEND, name="org.example.Pub", reconnect=False) as bus:
                await bus.publish("Tick", b"x", source="org.example.Pub")
        await wait_for_no_sessions(rb.broker)


async def test_a_watch_left_open_ends_cleanly_when_the_bus_is_left(tmp_path: Path) -> None:
    """Leaving the block ends a watch's iteration without an error (the bus did not give up)."""
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND, reconnect=False) as bus:
            watch = bus.watch()
            await watch.__aenter__()
        assert bus.failure is None
        with trio.fail_after(10):
            async for _event in watch:  # the snapshot's events, then the end: no error raised
                pass


@pytest.mark.parametrize("wait_inside", [False, True])
async def test_a_bus_that_was_left_is_freed_without_a_garbage_collection(tmp_path: Path, wait_inside: bool) -> None:
    """Leaving a bus unties it from its capabilities' handlers and hooks (reference cycles):
    once nobody holds it, the bus, its connection, its link and its stream are freed by
    reference counting alone, whether or not its tasks ran before it was left."""
    import gc
    import weakref

    async with running_broker(tmp_path) as rb:
        gc.collect()
        gc.disable()
        try:
            async with open_bus(rb.unix_address, identity=FRIEND, name="org.example.Freed", reconnect=False) as bus:
                if wait_inside:
                    async with bus.watch(["org.*"]):
                        await bus.ping()
                    await bus.publish("Tick", b"x")  # (its frame may wait: the writer task runs)
                    await bus.ping()
                link = bus._link
                assert link is not None
                refs = [weakref.ref(x) for x in (bus, bus._connection, link, link.framed.stream)]
            del bus, link
            assert [ref() is None for ref in refs] == [True] * len(refs)
        finally:
            gc.enable()
        await wait_for_no_sessions(rb.broker)


async def test_a_bus_makes_its_capabilities_when_first_used(tmp_path: Path) -> None:
    """Connect and leave makes no names, events, calls or services part; each is made by its
    first use and then works (its broker messages reach it), and channels others open to the
    bus are answered from the start (refused here: no handler, as the opener is told)."""
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND, name="org.example.Made", reconnect=False) as bus:
            made = lambda: [x is not None for x in (bus._names_made, bus._events_made, bus._rpc_made, bus._services_made)]  # noqa: E731
            assert made() == [False] * 4
            async with open_bus(rb.unix_address, identity=OWNER, reconnect=False) as other:
                with pytest.raises(Exception) as refused:
                    await other.open_channel("org.example.Made", "nothing-here")
                assert "nothing-here" in str(refused.value) or "handler" in str(refused.value)
                assert made() == [False] * 4
                async with bus.watch(["org.example.*"]) as watch:
                    with trio.fail_after(10):
                        first = await watch.__anext__()
                    assert first.name == "org.example.Made"
                    assert await other.request_name("org.example.Second") == "primary-owner"
                    with trio.fail_after(10):
                        event = await watch.__anext__()
                    assert (event.kind, event.name) == ("connected", "org.example.Second")
                async with bus.subscribe("org.example.Second", "Tick") as events:
                    await other.emit("Tick", b"x", source="org.example.Second")
                    with trio.fail_after(10):
                        item = await events.__anext__()
                    assert item.payload == b"x"
                assert bus.rpc_max_message == 16 * 1024 * 1024
                bus.rpc_max_message = 1000
                assert not made()[2]
                assert await bus.list_services() == []
                assert made() == [True, True, False, True]
                assert bus.rpc_max_message == 1000 and bus._rpc_calls.max_message == 1000


class _Oops(Exception):
    pass


@pytest.mark.parametrize("wait_first", [False, True])
async def test_the_blocks_own_exception_comes_out_as_itself(tmp_path: Path, wait_first: bool) -> None:
    """Not wrapped in an exception group by the bus's nursery, whether or not the bus's task
    ran; the connection still ends on both sides."""
    async with running_broker(tmp_path) as rb:
        with pytest.raises(_Oops) as caught:
            async with open_bus(rb.unix_address, identity=FRIEND, name="org.example.Oops", reconnect=False) as bus:
                if wait_first:
                    await bus.ping()
                raise _Oops("from the block")
        assert str(caught.value) == "from the block"
        assert not bus.connected
        await wait_for_no_sessions(rb.broker)


async def test_a_cancelled_block_and_an_outer_deadline(tmp_path: Path) -> None:
    """A deadline around the block cancels it as any trio block (the bus ends with it); one
    inside the block is the block's own affair."""
    async with running_broker(tmp_path) as rb:
        with trio.move_on_after(0.2) as outer:
            async with open_bus(rb.unix_address, identity=FRIEND, reconnect=False) as bus:
                with trio.move_on_after(0.05) as inner:
                    await trio.sleep_forever()
                assert inner.cancelled_caught and bus.connected
                await trio.sleep_forever()
        assert outer.cancelled_caught and not bus.connected
        await wait_for_no_sessions(rb.broker)


async def test_one_open_bus_is_for_one_block(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        opening = open_bus(rb.unix_address, identity=FRIEND, reconnect=False)
        async with opening as bus:
            await bus.ping()
        with pytest.raises(RuntimeError, match="one async with"):
            async with opening:
                pass
        await wait_for_no_sessions(rb.broker)


class _Fault(Exception):
    pass


async def test_a_step_of_leaving_that_fails_still_leaves_the_bus_and_says_why(tmp_path: Path) -> None:
    """A step before the bus's nursery is left (here closing its subscriptions) raises: the
    nursery is still left (its tasks end, trio's scopes stay in order) and that error comes
    out of the block."""
    async with running_broker(tmp_path) as rb:
        with pytest.raises(_Fault, match="close step"):
            with trio.fail_after(10):
                async with open_bus(rb.unix_address, identity=FRIEND, reconnect=False) as bus:
                    async with bus.subscribe("org.example.X", "Tick"):
                        pass
                    await bus.ping()

                    def fail() -> None:
                        raise _Fault("close step")

                    assert bus._events_made is not None
                    bus._events_made.close_all_nowait = fail  # type: ignore[method-assign]
        assert not bus.connected
        await trio.sleep(0)  # (trio's own checks of its scopes: still usable)


@pytest.mark.parametrize("wait_first", [False, True])
async def test_an_exception_group_the_block_raises_comes_out_as_itself(tmp_path: Path, wait_first: bool) -> None:
    """The block's own nursery raises an ExceptionGroup: that group leaves open_bus, not the
    exception dug out of it (only the bus's own nursery's layer is taken off)."""
    async with running_broker(tmp_path) as rb:
        raised: BaseException | None = None
        with pytest.raises(BaseException) as caught:
            async with open_bus(rb.unix_address, identity=FRIEND, reconnect=False) as bus:
                if wait_first:
                    await bus.ping()
                try:
                    async with trio.open_nursery() as nursery:

                        async def fail() -> None:
                            raise ValueError("child")

                        nursery.start_soon(fail)
                except BaseException as exc:
                    raised = exc
                    raise
        assert isinstance(raised, ExceptionGroup)
        assert caught.value is raised


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_cancellation_during_the_connect_comes_out_as_itself(tmp_path: Path, transport: str) -> None:
    """A scope around open_bus cancelled while it connects: open_bus raises that scope's
    Cancelled as itself (not wrapped in the bus's nursery's exception group), and the scope
    takes it; the socket dialled for the connect is closed (the broker sees no session)."""
    async with running_broker(tmp_path) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        raised: list[BaseException] = []
        with trio.CancelScope() as outer:
            outer.cancel()  # (the connect's first wait takes it)
            try:
                async with open_bus(address, identity=FRIEND, reconnect=False):
                    raise AssertionError("connected")
            except BaseException as exc:
                raised.append(exc)
                raise
        assert outer.cancelled_caught
        assert len(raised) == 1 and type(raised[0]) is trio.Cancelled, raised
        await wait_for_no_sessions(rb.broker)


async def _relay_in_front(tmp_path: Path, unix_address: str) -> tuple[trio.SocketListener, str, str]:
    """A listener for a test's relay in front of the broker at ``unix_address``: the listener,
    the bus address through it, and the broker's own socket path."""
    from bus.wire.address import Endpoint, format_address, parse_address

    broker_path = parse_address(unix_address)[0].path
    assert broker_path is not None
    relay_path = str(tmp_path / "relay.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(relay_path)
    sock.listen()
    return trio.SocketListener(sock), format_address([Endpoint("unix", OWNER.public_key, path=relay_path)]), broker_path


#: One direction's handling of each read, given the read and how to send on: it may wait, or
#: cut the read and wait between the parts.
Step = Callable[[bytes, Callable[[bytes], Awaitable[None]]], Awaitable[None]]


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, step: Step | None) -> None:
    """``src``'s bytes to ``dst`` (through ``step``) until either ends; then ``dst`` is closed."""
    try:
        while data := await src.receive_some():
            await (dst.send_all(data) if step is None else step(data, dst.send_all))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(dst)


def _relay(
    broker_path: str,
    conns: list[tuple[trio.SocketStream, trio.SocketStream]],
    up: Callable[[], Step],
    down: Callable[[], Step],
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """The relay's handler: each connection piped to the broker (noted in ``conns``); the
    first passes bytes as they come, each later one (the reconnects) through a fresh ``up``
    (to the broker) and ``down`` (to the bus) step."""

    async def relay(client: trio.SocketStream) -> None:
        broker = await trio.open_unix_socket(broker_path)
        conns.append((client, broker))
        again = len(conns) > 1
        async with trio.open_nursery() as pipes:
            pipes.start_soon(_pipe, client, broker, up() if again else None)
            pipes.start_soon(_pipe, broker, client, down() if again else None)

    return relay


async def test_a_name_released_while_reconnecting_is_not_asked_for_in_the_new_hello(tmp_path: Path) -> None:
    """The bus reconnects through a relay to the real broker that holds the broker's first
    handshake answer until the test released the bus's first name (the release fails: not
    connected, but the name is no longer wanted).  The new hello asks for the name that is
    first now, not the one released: the bus owns exactly the names it still wants."""
    async with running_broker(tmp_path) as rb:
        listener, address, broker_path = await _relay_in_front(tmp_path, rb.unix_address)
        conns: list[tuple[trio.SocketStream, trio.SocketStream]] = []
        msg1_relayed = trio.Event()
        released = trio.Event()

        async def up(data: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
            msg1_relayed.set()
            await send(data)

        async def down(data: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
            await released.wait()
            await send(data)

        relay = _relay(broker_path, conns, lambda: up, lambda: down)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, relay, [listener])
            with trio.fail_after(30):
                async with open_bus(address, identity=FRIEND, name="org.example.First") as bus:
                    await bus.request_name("org.example.Second")
                    client, broker = conns[0]
                    await trio.aclose_forcefully(broker)  # (the relay ends the first connection)
                    await msg1_relayed.wait()  # the bus is in its new handshake
                    with pytest.raises(ConnectionLost):
                        await bus.release_name("org.example.First")
                    released.set()
                    while not (bus.reconnects and bus.connected):
                        await trio.sleep(0.01)
                    await bus.ping()
                    owned = {e.name for e in await bus.list_names() if e.unique_id == bus.unique_id}
                    assert owned == {"org.example.Second"}, owned
            nursery.cancel_scope.cancel()


async def test_a_name_released_after_the_new_hello_went_out_is_released_once_connected(tmp_path: Path) -> None:
    """The hello goes out behind msg3 (docs/protocol.md 2.6), with the first name wanted then.
    The relay holds the broker's msg4 until the test has released that name (the release fails:
    not connected yet).  Once connected, the bus lets go of the name the hello took for it: it
    owns exactly the names it still wants."""
    async with running_broker(tmp_path) as rb:
        listener, address, broker_path = await _relay_in_front(tmp_path, rb.unix_address)
        conns: list[tuple[trio.SocketStream, trio.SocketStream]] = []
        hello_sent = trio.Event()  # (msg3 and the hello passed to the broker)
        released = trio.Event()

        def up() -> Step:
            seen = 0

            async def step(data: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
                nonlocal seen
                seen += len(data)
                await send(data)
                if seen > 64 + 112:
                    hello_sent.set()

            return step

        def down() -> Step:
            passed, held = 0, False

            async def step(data: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
                nonlocal passed, held
                if not held and passed + len(data) > 64:  # msg2 passes; msg4 waits
                    cut = max(0, 64 - passed)
                    await send(data[:cut])
                    data, passed, held = data[cut:], 64, True
                    await released.wait()
                passed += len(data)
                await send(data)

            return step

        relay = _relay(broker_path, conns, up, down)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, relay, [listener])
            with trio.fail_after(30):
                async with open_bus(address, identity=FRIEND, name="org.example.First") as bus:
                    await bus.request_name("org.example.Second")
                    client, broker = conns[0]
                    await trio.aclose_forcefully(broker)  # (the relay ends the first connection)
                    await hello_sent.wait()  # the new hello, asking for First, went out
                    with pytest.raises(ConnectionLost):
                        await bus.release_name("org.example.First")
                    released.set()
                    while not (bus.reconnects and bus.connected):
                        await trio.sleep(0.01)
                    await bus.ping()
                    owned: set[str] = set()
                    for _ in range(200):  # (the release goes out as the bus restores its names)
                        owned = {e.name for e in await bus.list_names() if e.unique_id == bus.unique_id}
                        if owned == {"org.example.Second"}:
                            break
                        await trio.sleep(0.01)
                    assert owned == {"org.example.Second"}, owned
            nursery.cancel_scope.cancel()


async def test_a_name_released_while_the_names_are_restored_stays_released(tmp_path: Path) -> None:
    """After a reconnect the bus asks for its other names again, one after another.  The relay
    holds what the bus sends after the new hello's answer (restore's first request) until the
    test has released a name further down the list: restore must not ask for that name again,
    nor count it as wanted."""
    async with running_broker(tmp_path) as rb:
        listener, address, broker_path = await _relay_in_front(tmp_path, rb.unix_address)
        conns: list[tuple[trio.SocketStream, trio.SocketStream]] = []
        answered = trio.Event()  # (the broker's msg4 and hello answer are on their way to the bus)
        restoring = trio.Event()  # (the bus sent something after that: restore's first request)
        go = trio.Event()

        def up() -> Step:
            hold = True

            async def step(data: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
                nonlocal hold
                if hold and answered.is_set():
                    restoring.set()
                    await go.wait()
                    hold = False
                await send(data)

            return step

        def down() -> Step:
            passed = 0

            async def step(data: bytes, send: Callable[[bytes], Awaitable[None]]) -> None:
                nonlocal passed
                passed += len(data)
                if passed > 64 + 80:  # msg2, msg4, then the hello's answer
                    answered.set()
                await send(data)

            return step

        relay = _relay(broker_path, conns, up, down)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, relay, [listener])
            with trio.fail_after(30):
                async with open_bus(address, identity=FRIEND, name="org.example.First") as bus:
                    await bus.request_name("org.example.Second")
                    await bus.request_name("org.example.Third")
                    client, broker = conns[0]
                    await trio.aclose_forcefully(broker)  # (the relay ends the first connection)
                    await restoring.wait()  # restore asked for Second; Third comes next
                    assert bus.reconnects and bus.connected
                    async with trio.open_nursery() as user:
                        user.start_soon(bus.release_name, "org.example.Third")
                        while "org.example.Third" in bus.requested_names:
                            await trio.sleep(0)
                        go.set()
                    owned: set[str] = set()
                    for _ in range(100):  # (restore may still be at work: give it time to err)
                        owned = {e.name for e in await bus.list_names() if e.unique_id == bus.unique_id}
                        await trio.sleep(0.01)
                    assert owned == {"org.example.First", "org.example.Second"}, owned
                    assert list(bus.requested_names) == ["org.example.First", "org.example.Second"]
            nursery.cancel_scope.cancel()


async def test_a_bus_connection_on_the_unix_socket_asks_for_a_bigger_send_buffer(tmp_path: Path) -> None:
    """The client's own socket asks for BUS_SEND_BUFFER (a relayed channel's batched writes
    then go out whole and the broker reads more a wake-up; see clients.link), on the first
    connect (the socket dialled before the bus started) and on a reconnect (dialled by the
    link).  The kernel caps what is asked at wmem_max and keeps twice that; an untouched
    socket reports wmem_default, less than this."""
    with open("/proc/sys/net/core/wmem_max") as limit:
        allowed = min(BUS_SEND_BUFFER, int(limit.read()))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as untouched:
        assert untouched.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * allowed

    def send_buffer(bus: Bus) -> int:
        link = bus._connection.link
        assert link is not None
        transport = link.framed.stream.transport
        assert isinstance(transport, FdSocketStream)
        return int(transport.raw_socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND, reconnect=True) as bus:
            assert send_buffer(bus) >= 2 * allowed
            for session in list(rb.broker.sessions.values()):
                session.end("the test ends it")
            with trio.fail_after(10):
                while not (bus.reconnects and bus.connected):
                    await trio.sleep(0.01)
            assert send_buffer(bus) >= 2 * allowed
            await bus.ping()
