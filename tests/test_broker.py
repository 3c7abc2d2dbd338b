"""The broker over real Unix and TCP sockets, with the client library and raw peers."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from bus.broker import Broker, BrokerAlreadyRunning
from bus.errors import AccessDenied, NameNotFound, UnknownOperation
from bus.io.framed import FramedStream
from bus.io.secure import SecureStream
from bus.wire.address import parse_address
from bus.wire.frames import HEADER, ControlFrame
from clients.bus import Bus, CannotConnect, NameEvent, open_bus

from .brokers import FRIEND, OWNER, PLUGIN, STRANGER, make_config, running_broker, start_broker


async def next_event(events: Any) -> NameEvent:
    with trio.fail_after(10):
        return await events.__anext__()  # type: ignore[no-any-return]


async def raw_connect(address: str, identity: Any = OWNER) -> FramedStream:
    """A hand-driven client: handshake only, then frames by hand."""
    ep = parse_address(address)[0]
    if ep.transport == "unix":
        transport = await trio.open_unix_socket(ep.path or "")
    else:
        transport = await trio.open_tcp_stream(ep.host or "", ep.port or 0)
    stream = SecureStream.client(transport, identity, ep.key, encrypted=ep.transport == "tcp")
    await stream.do_handshake()
    return FramedStream(stream)


async def read_until_closed(framed: FramedStream) -> list[dict[str, Any]]:
    messages = []
    with trio.fail_after(10):
        while True:
            try:
                frame = await framed.receive_frame()
            except trio.BrokenResourceError:
                break
            if frame is None:
                break
            assert isinstance(frame, ControlFrame)
            messages.append(frame.message)
    await framed.aclose()
    return messages


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_register_over_both_transports(tmp_path: Path, transport: str) -> None:
    async with running_broker(tmp_path) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        async with open_bus(address, identity=PLUGIN, name="org.example.Echo", info={"description": "echo", "version": "1.0"}) as bus:
            assert bus.unique_id.startswith(":")
            async with open_bus(address, identity=FRIEND) as other:
                entry = await other.resolve("org.example.Echo")
                assert entry.unique_id == bus.unique_id
                assert entry.identity == PLUGIN.id
                assert entry.transport == transport
                assert entry.info["description"] == "echo"
                if transport == "unix":
                    assert entry.pid == os.getpid() and entry.uid == os.getuid()
                else:
                    assert entry.pid is None


async def test_address_file_and_cleanup(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        address_file = tmp_path / "run" / "address"
        assert address_file.read_text().strip() == rb.address
        assert (tmp_path / "run" / "bus.sock").exists()
    assert not address_file.exists()
    assert not (tmp_path / "run" / "bus.sock").exists()


async def test_second_broker_on_the_same_socket_is_refused(tmp_path: Path) -> None:
    async with running_broker(tmp_path):
        with pytest.raises(BrokerAlreadyRunning, match="already listening"):
            await Broker(make_config(tmp_path, tcp=None)).serve()


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "bus.sock"
    path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a SIGKILLed broker leaves
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER) as bus:
            await bus.ping()


async def test_unknown_identity_is_refused_in_the_handshake(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        for address in (rb.unix_address, rb.tcp_address):
            with pytest.raises(CannotConnect, match="refused our identity"):
                async with open_bus(address, identity=STRANGER, reconnect=False):
                    pass


async def test_policy_denial_names_the_rule(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=PLUGIN) as bus:
            with pytest.raises(AccessDenied, match="may not own 'com.other.Name'.*plugins"):
                await bus.request_name("com.other.Name")
            with pytest.raises(AccessDenied, match="admin"):
                await bus.list_names(all=True)
        with pytest.raises(AccessDenied, match="may not own"):
            async with open_bus(rb.unix_address, identity=PLUGIN, name="com.other.Name"):
                pass


async def test_unknown_operation_is_answered_and_the_connection_stays(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.tcp_address, identity=OWNER) as bus:
            with pytest.raises(UnknownOperation, match="frobnicate"):
                await bus.request("frobnicate", x=1)
            await bus.ping()
            assert bus.connected


async def test_name_queue_hand_over_and_replacement(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        addr = rb.unix_address
        async with open_bus(addr, identity=FRIEND) as watcher, watcher.watch(["org.example.Svc"]) as events:
            async with open_bus(addr, identity=PLUGIN) as first:
                assert await first.request_name("org.example.Svc", ["allow-replacement"]) == "primary-owner"
                ev = await next_event(events)
                assert (ev.kind, ev.owner and ev.owner.unique_id) == ("connected", first.unique_id)
                async with open_bus(addr, identity=PLUGIN) as second:
                    assert await second.request_name("org.example.Svc") == "in-queue"
                    async with open_bus(addr, identity=PLUGIN) as third:
                        assert await third.request_name("org.example.Svc", ["replace-existing"]) == "primary-owner"
                        ev = await next_event(events)
                        assert (ev.kind, ev.owner and ev.owner.unique_id, ev.old_owner) == ("owner-changed", third.unique_id, first.unique_id)
                    # third left: first was put back at the head of the queue
                    ev = await next_event(events)
                    assert (ev.kind, ev.owner and ev.owner.unique_id) == ("owner-changed", first.unique_id)
            ev = await next_event(events)
            assert (ev.kind, ev.owner) == ("disconnected", None)
            assert await watcher.list_names() == []


async def test_watch_snapshot_then_deltas_without_gaps(tmp_path: Path) -> None:
    """Names keep changing while the watch starts: snapshot + deltas = the truth, no gaps, no doubles."""
    async with running_broker(tmp_path) as rb:
        addr = rb.unix_address
        async with open_bus(addr, identity=PLUGIN) as churner, open_bus(addr, identity=OWNER) as watcher:
            stop = trio.Event()

            async def churn() -> None:
                i = 0
                while not stop.is_set():
                    name = f"org.example.N{i % 7}"
                    if await churner.request_name(name) == "already-owner":
                        await churner.release_name(name)
                    i += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(churn)
                await trio.sleep(0.05)
                async with watcher.watch(["org.example.*"]) as events:
                    state: dict[str, str] = {}
                    seen = 0
                    async for ev in events:
                        if ev.kind in ("present", "connected"):
                            assert ev.name not in state, f"duplicate {ev}"
                            assert ev.owner is not None
                            state[ev.name] = ev.owner.unique_id
                        elif ev.kind == "disconnected":
                            assert ev.name in state, f"gap: {ev}"
                            del state[ev.name]
                        seen += 1
                        if seen == 300:
                            stop.set()
                            break
                    # let the churner finish its last step, then compare with the broker's truth
                    await trio.sleep(0.05)
                    while True:
                        with trio.move_on_after(0.2):
                            ev = await events.__anext__()
                            if ev.kind == "connected" and ev.owner:
                                state[ev.name] = ev.owner.unique_id
                            elif ev.kind == "disconnected":
                                del state[ev.name]
                            continue
                        break
                    truth = {e.name: e.unique_id for e in await watcher.list_names()}
                    assert state == truth


async def test_client_killed_hard_is_seen_as_disconnected(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER) as watcher, watcher.watch(["org.example.*"]) as events:
            victim = await raw_connect(rb.unix_address, PLUGIN)
            await victim.send_message({"op": "hello", "id": 1, "name": "org.example.Victim"})
            ev = await next_event(events)
            assert ev.kind == "connected"
            # No goodbye, no close handshake: the socket just goes away, as with SIGKILL.
            assert isinstance(victim.stream, SecureStream)
            victim.stream.transport.socket.close()  # type: ignore[attr-defined]
            ev = await next_event(events)
            assert (ev.kind, ev.name) == ("disconnected", "org.example.Victim")
            await trio.aclose_forcefully(victim.stream)


async def test_spoofing_attempt_changes_nothing(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=OWNER) as admin:
            raw = await raw_connect(rb.unix_address, PLUGIN)
            await raw.send_message(
                {"op": "hello", "id": 1, "identity": OWNER.id, "unique_id": admin.unique_id, "name": "org.example.Spoof"}
            )
            frame = await raw.receive_frame()
            assert isinstance(frame, ControlFrame)
            assert frame.message["result"]["identity"] == PLUGIN.id
            assert frame.message["result"]["unique_id"] != admin.unique_id
            entry = await admin.resolve("org.example.Spoof")
            assert entry.identity == PLUGIN.id
            await raw.aclose()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_garbage_frame_gets_an_error_frame_then_close(tmp_path: Path, transport: str) -> None:
    async with running_broker(tmp_path) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        async with open_bus(address, identity=OWNER) as bystander:
            raw = await raw_connect(address)
            await raw.stream.send_all(b"\x07this is no frame at all")
            messages = await read_until_closed(raw)
            assert messages[-1]["event"] == "error"
            assert messages[-1]["code"] == "minibus.Error.Frame"
            assert "unknown frame kind 7" in messages[-1]["message"]
            await bystander.ping()  # others are untouched


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest.mark.parametrize("body", [b"bytes", b""])
async def test_a_data_frame_on_the_control_channel_is_a_framing_violation(tmp_path: Path, transport: str, body: bytes) -> None:
    """Channel 0 carries control messages only: a DATA frame there, alone in its read or not,
    empty or not, ends that connection with a typed error (as a client treats one from busd)."""
    from bus.wire.frames import HEADER, FrameKind

    async with running_broker(tmp_path) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        async with open_bus(address, identity=OWNER) as bystander:
            raw = await raw_connect(address)
            await raw.send_message({"op": "hello", "id": 1})
            await raw.stream.send_all(HEADER.pack(FrameKind.DATA, 0, 0, len(body)) + body)
            messages = await read_until_closed(raw)
            assert messages[-1]["event"] == "error"
            assert messages[-1]["code"] == "minibus.Error.Frame"
            assert "control channel" in messages[-1]["message"]
            await bystander.ping()  # others are untouched


async def test_oversized_frame_is_refused_before_its_body(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        raw = await raw_connect(rb.tcp_address)
        await raw.stream.send_all(HEADER.pack(1, 0, 0, 100 * 1024 * 1024))
        messages = await read_until_closed(raw)
        assert messages[-1]["code"] == "minibus.Error.FrameTooLarge"


async def test_malformed_requests_keep_the_connection(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        raw = await raw_connect(rb.unix_address)
        await raw.send_message({"op": "hello", "id": 1})
        await raw.send_message({"op": 5, "id": 2})
        await raw.send_message({"op": "request_name", "id": 3, "name": ["not", "a", "string"]})
        await raw.send_message({"op": "ping", "id": 4})
        replies = []
        with trio.fail_after(10):
            while len(replies) < 4:
                frame = await raw.receive_frame()
                assert isinstance(frame, ControlFrame)
                replies.append(frame.message)
        assert [r["re"] for r in replies] == [1, 2, 3, 4]
        assert replies[1]["error"]["code"] == "minibus.Error.BadRequest"
        assert replies[2]["error"]["code"] == "minibus.Error.BadRequest"
        assert replies[3]["result"] == {}
        await raw.aclose()


async def test_silent_peer_is_declared_dead(tmp_path: Path) -> None:
    async with running_broker(tmp_path, keepalive_interval=0.1, keepalive_timeout=0.3) as rb:
        raw = await raw_connect(rb.tcp_address)
        await raw.send_message({"op": "hello", "id": 1})
        messages = await read_until_closed(raw)  # we never answer the pings
        assert any(m.get("op") == "ping" for m in messages)
        assert messages[-1]["code"] == "minibus.Error.Disconnected"
        assert "keepalive" in messages[-1]["message"]


async def test_client_library_answers_pings(tmp_path: Path) -> None:
    async with running_broker(tmp_path, keepalive_interval=0.05, keepalive_timeout=0.5) as rb:
        async with open_bus(rb.tcp_address, identity=OWNER, reconnect=False) as bus:
            await trio.sleep(1.0)
            assert bus.connected
            await bus.ping()


async def fill_until_cut(rb: Any, slow: FramedStream, other: Bus) -> None:
    """Make ``slow`` a slow consumer: it asks for 12 KiB answers and never reads them (the
    broker must run meanwhile: ``other`` pings it)."""
    await slow.send_message({"op": "hello", "id": 1, "info": {"description": "d" * 12000}})
    slow_session = min(rb.broker.sessions.values(), key=lambda s: s.conn_id)
    target = f":{slow_session.conn_id}"
    with trio.fail_after(30):
        for n in range(2, 5000):  # bounded: overflow comes long before
            await slow.send_message({"op": "info", "id": n, "target": target})
            await other.ping()
            if slow_session.stop_writing:
                break
    assert slow_session.stop_writing


async def test_slow_consumer_is_disconnected_with_the_reason(tmp_path: Path) -> None:
    """A client that asks and asks but stops reading the answers fills its queue: it is cut
    off and told why, nothing dropped silently, and nobody else notices."""
    async with running_broker(tmp_path, outbound_queue=4) as rb:
        slow = await raw_connect(rb.unix_address)
        async with open_bus(rb.unix_address, identity=OWNER) as other:
            await fill_until_cut(rb, slow, other)
            # The consumer catches up now: it gets what was queued, then the reason.
            messages = await read_until_closed(slow)
            assert messages[-1]["code"] == "minibus.Error.Disconnected"
            assert "slow consumer" in messages[-1]["message"]
            answers = [m for m in messages if "re" in m]
            assert [m["re"] for m in answers] == list(range(1, len(answers) + 1))  # in order, none lost in between
            assert len(answers) >= 4
            await other.ping()  # the broker and the other client carry on
            assert list(rb.broker.sessions) == [int(other.unique_id[1:])]


async def test_broker_restart_client_reconnects_and_restores(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        first = await start_broker(nursery, tmp_path)
        unix = first.unix_address
        async with (
            open_bus(unix, identity=PLUGIN, name="org.example.Survivor") as bus,
            open_bus(unix, identity=FRIEND) as watcher,
            watcher.watch(["org.example.*"]) as events,
        ):
            assert (await next_event(events)).kind == "present"
            await bus.request_name("org.example.Second")
            assert (await next_event(events)).name == "org.example.Second"
            old_id = bus.unique_id
            await first.stop()
            second = await start_broker(nursery, tmp_path)
            assert second.unix_address == unix
            with trio.fail_after(15):
                while not (bus.reconnects and watcher.reconnects and bus.connected and watcher.connected):
                    await trio.sleep(0.05)
                # The same objects work: both names are back and the watch goes on.
                while {e.name for e in await watcher.list_names()} != {"org.example.Survivor", "org.example.Second"}:
                    await trio.sleep(0.05)
            # The watch goes on: what it reports (the restored snapshot diffed against what it
            # knew, then live changes) converges on the new owners, whichever client came back first.
            state = {"org.example.Survivor": old_id, "org.example.Second": old_id}
            renewed: set[str] = set()
            kinds = []
            want = {"org.example.Survivor": bus.unique_id, "org.example.Second": bus.unique_id}
            with trio.fail_after(10):
                while state != want or renewed != set(want):
                    ev = await next_event(events)
                    kinds.append(ev.kind)
                    if ev.kind == "disconnected":
                        assert state.pop(ev.name) == ev.old_owner
                    else:
                        assert ev.kind in ("connected", "owner-changed") and ev.owner is not None
                        state[ev.name] = ev.owner.unique_id
                        renewed.add(ev.name)
            assert "present" not in kinds
            # Requests in flight at the moment of loss are not replayed; new ones just work.
            await bus.ping()
            await second.stop()


async def test_abandoned_and_overflowing_watches_are_dropped_on_the_broker(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND) as bus:
            me = rb.broker.core.connections[int(bus.unique_id[1:])]
            for _ in range(40):  # more than the 32-watch quota: leaks would hit it
                with trio.move_on_after(0):  # the caller gives up before the reply
                    async with bus.watch(["*"]):
                        pass
            with trio.fail_after(10):
                while me.watches:
                    await trio.sleep(0.01)
            async with bus.watch(["*"]) as w:
                assert len(me.watches) == 1
                await w.aclose()
            with trio.fail_after(10):
                while me.watches:
                    await trio.sleep(0.01)


async def test_watch_opened_right_after_a_reconnect_leaves_older_watches_working(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        first = await start_broker(nursery, tmp_path)
        unix = first.unix_address
        async with open_bus(unix, identity=FRIEND, name="org.example.A") as bus:
            for i in range(10):
                await bus.request_name(f"org.example.B{i}")  # restoring these takes a while
            async with bus.watch(["org.test.*"]) as old:
                await first.stop()
                second = await start_broker(nursery, tmp_path)
                with trio.fail_after(15):
                    while not (bus.reconnects and bus.connected):
                        await trio.sleep(0)
                async with bus.watch(["org.other.*"]) as new:
                    async with open_bus(unix, identity=PLUGIN) as plugin:
                        with pytest.raises(AccessDenied):
                            await plugin.request_name("org.test.X")  # PLUGIN may own only org.example.*
                    async with open_bus(unix, identity=OWNER, name="org.test.X"):
                        ev = await next_event(old)
                        assert (ev.kind, ev.name) == ("connected", "org.test.X")
                    async with open_bus(unix, identity=OWNER, name="org.other.Y"):
                        ev = await next_event(new)
                        assert (ev.kind, ev.name) == ("connected", "org.other.Y")
                await second.stop()


async def test_a_slow_consumer_that_never_reads_is_cut_within_close_timeout(tmp_path: Path) -> None:
    """Its writer task (started when its first answer had to wait) is stuck inside a frame:
    after close_timeout the session ends anyway, that writer task is cancelled and waited
    for, the connection is closed and freed, and the broker carries on."""
    async with running_broker(tmp_path, outbound_queue=4, close_timeout=0.5) as rb:
        slow = await raw_connect(rb.unix_address)
        try:
            async with open_bus(rb.unix_address, identity=OWNER) as other:
                await fill_until_cut(rb, slow, other)
                slow_session = min(rb.broker.sessions.values(), key=lambda s: s.conn_id)
                assert slow_session._writer_done is not None  # the writer task was needed
                with trio.fail_after(10):
                    await slow_session._writer_done.wait()
                    while slow_session.conn_id in rb.broker.sessions:
                        await trio.sleep(0.01)
                assert "slow consumer" in slow_session.reason
                await other.ping()
                assert list(rb.broker.sessions) == [int(other.unique_id[1:])]
        finally:
            await trio.aclose_forcefully(slow)


async def test_a_short_connection_runs_no_writer_task_in_busd(tmp_path: Path) -> None:
    """Answers the socket takes at once need no writer task; the session opens no nursery."""
    async with running_broker(tmp_path) as rb:
        async with open_bus(rb.unix_address, identity=FRIEND) as bus:
            await bus.ping()
            await bus.list_names()
            session = rb.broker.sessions[int(bus.unique_id[1:])]
            assert session._writer_done is None


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_bug_in_a_sessions_reader_ends_its_writer_before_the_connection_is_released(
    tmp_path: Path, transport: str
) -> None:
    """The writer task (run in the broker's nursery once a frame has to wait) never outlives
    its session: when the reader ends by an error of ours, the writer -- here stuck inside a
    frame to a peer that does not read -- is cancelled and waited for before the connection
    is released (names, counters, the teardown turn)."""
    async with running_broker(tmp_path, outbound_queue=100_000) as rb:
        address = rb.unix_address if transport == "unix" else rb.tcp_address
        slow = await raw_connect(address)  # (it never reads what busd sends it)
        await slow.send_message({"op": "hello", "id": 1, "info": {"description": "d" * 12000}})
        with trio.fail_after(10):
            while not rb.broker.sessions:
                await trio.sleep(0.01)
        session = next(iter(rb.broker.sessions.values()))
        n = 2
        with trio.fail_after(30):
            while not (session.out.mid_frame and session._writer_done is not None):
                await slow.send_message({"op": "info", "id": n, "target": f":{session.conn_id}"})
                n += 1
                await trio.sleep(0.001)
        core = rb.broker.core
        receive, disconnect = core.receive, core.disconnect
        seen: dict[str, bool] = {}

        def buggy(conn_id: int, message: Any) -> Any:
            if conn_id == session.conn_id:
                raise RuntimeError("a bug of ours")
            return receive(conn_id, message)

        def released(conn_id: int) -> Any:
            if conn_id == session.conn_id:
                assert session._writer_done is not None
                seen["writer ended before release"] = session._writer_done.is_set()
            return disconnect(conn_id)

        core.receive = buggy  # type: ignore[method-assign]
        core.disconnect = released  # type: ignore[method-assign]
        await slow.send_message({"op": "ping", "id": n})
        with trio.fail_after(10):
            while session.conn_id in rb.broker.sessions:
                await trio.sleep(0.01)
        assert seen == {"writer ended before release": True}
        await trio.aclose_forcefully(slow)


async def test_a_bug_in_a_sessions_writer_ends_that_connection_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bus import broker as broker_module

    async def buggy_writer(self: Any) -> None:
        await trio.sleep(0)
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(broker_module._Session, "writer", buggy_writer)
    async with running_broker(tmp_path, outbound_queue=100_000) as rb:
        slow = await raw_connect(rb.unix_address)  # (it never reads: its frames wait, the writer starts)
        await slow.send_message({"op": "hello", "id": 1, "info": {"description": "d" * 12000}})
        with trio.fail_after(10):
            while not rb.broker.sessions:
                await trio.sleep(0.01)
        session = next(iter(rb.broker.sessions.values()))
        async with open_bus(rb.unix_address, identity=OWNER) as other:
            with trio.fail_after(30):
                n = 2
                while session.conn_id in rb.broker.sessions:
                    try:
                        await slow.send_message({"op": "info", "id": n, "target": f":{session.conn_id}"})
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    n += 1
                    await trio.sleep(0.001)
                while session.conn_id in rb.broker.sessions:
                    await trio.sleep(0.01)
            assert "internal error" in session.reason
            await other.ping()  # the broker goes on
        await trio.aclose_forcefully(slow)


class _TurnsWatched:
    """The broker's teardown turns (the real CapacityLimiter), noting at each turn given back
    whether that session's socket was already closed."""

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter
        self.closed_at_release: list[bool] = []

    @property
    def borrowed_tokens(self) -> int:
        return self.limiter.borrowed_tokens

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.limiter.acquire_on_behalf_of(borrower)

    def release_on_behalf_of(self, borrower: Any) -> None:
        stream = borrower.framed.stream
        assert isinstance(stream, SecureStream)
        self.closed_at_release.append(stream.transport.socket.fileno() == -1)
        self.limiter.release_on_behalf_of(borrower)


async def test_a_teardown_turn_is_given_back_once_the_socket_is_closed(tmp_path: Path) -> None:
    """A crowd that ends at once takes turns to be torn down; each turn is given back only once
    that connection's socket is closed (as the session's comment says)."""
    from bus.broker import TEARDOWNS_AT_ONCE
    from bus.core.broker import Limits

    n = 3 * TEARDOWNS_AT_ONCE
    async with running_broker(tmp_path, limits=Limits(connections_per_identity=n + 1)) as rb:
        watched = _TurnsWatched(rb.broker.teardown)
        rb.broker.teardown = watched  # type: ignore[assignment]
        peers = []
        with trio.fail_after(60):
            for i in range(n):
                peer = await raw_connect(rb.unix_address, FRIEND)
                await peer.send_message({"op": "hello", "id": 1, "info": {}, "name": f"org.example.Turn{i}"})
                assert isinstance(await peer.receive_frame(), ControlFrame)
                peers.append(peer)
        for peer in peers:  # all at once: no checkpoint in between
            assert isinstance(peer.stream, SecureStream) and peer.stream.close_nowait()
        with trio.fail_after(30):
            while rb.broker.sessions:
                await trio.sleep(0)
        assert watched.closed_at_release and all(watched.closed_at_release), watched.closed_at_release
        assert not watched.borrowed_tokens


class _SessionsPerPass(trio.abc.Instrument):
    """How many sessions the broker holds after each wait for I/O (one per scheduler pass)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.sizes: list[int] = []

    def after_io_wait(self, timeout: float) -> None:
        self.sizes.append(len(self.broker.sessions))


async def test_connections_that_end_together_are_torn_down_a_few_per_scheduler_pass(tmp_path: Path) -> None:
    """A connection that ends while no other is being torn down goes at once (no turn to wait
    for); a crowd that ends in the same pass still goes a few at a time: TEARDOWNS_AT_ONCE
    without a turn, then the rest take turns, so every pass in between serves everyone else.
    Every one of them is released (its name too)."""
    from bus.broker import TEARDOWNS_AT_ONCE
    from bus.core.broker import Limits

    n = 6 * TEARDOWNS_AT_ONCE
    async with running_broker(tmp_path, limits=Limits(connections_per_identity=n + 1)) as rb:
        peers = []
        with trio.fail_after(60):
            for i in range(n):
                peer = await raw_connect(rb.unix_address, FRIEND)
                await peer.send_message({"op": "hello", "id": 1, "info": {}, "name": f"org.example.Crowd{i}"})
                frame = await peer.receive_frame()
                assert isinstance(frame, ControlFrame) and frame.message["result"]["name_result"] == "primary-owner"
                peers.append(peer)
        lone = await raw_connect(rb.unix_address, FRIEND)
        await lone.send_message({"op": "hello", "id": 1, "info": {}, "name": "org.example.Lone"})
        assert isinstance(await lone.receive_frame(), ControlFrame)
        await lone.aclose()
        with trio.fail_after(10):
            while len(rb.broker.sessions) > n:
                await trio.sleep(0.01)
        assert rb.broker.quick_teardowns >= 1 and not rb.broker.teardown.borrowed_tokens
        counter = _SessionsPerPass(rb.broker)
        trio.lowlevel.add_instrument(counter)
        try:
            for peer in peers:  # all at once: no checkpoint in between
                assert isinstance(peer.stream, SecureStream) and peer.stream.close_nowait()
            with trio.fail_after(30):
                while rb.broker.sessions:
                    await trio.sleep(0)
        finally:
            trio.lowlevel.remove_instrument(counter)
        counter.sizes.append(len(rb.broker.sessions))
        assert counter.sizes[0] == n and counter.sizes[-1] == 0
        drops = [a - b for a, b in zip(counter.sizes, counter.sizes[1:])]
        assert max(drops) <= 2 * TEARDOWNS_AT_ONCE, drops
        assert len([d for d in drops if d]) >= 3, drops
        async with open_bus(rb.unix_address, identity=OWNER, reconnect=False) as bus:
            assert [info.name for info in await bus.list_names()] == []
