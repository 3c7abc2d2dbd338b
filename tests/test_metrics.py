"""busd's metrics: /metrics scraped from a real busd while traffic flows, hostile HTTP, busctl stats."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from bus.core.broker import BrokerCore, Limits
from bus.core.policy import Policy
from bus.core.stats import MAX_LABELS, ConnectionIo
from bus.metrics import MetricsServer
from bus.wire.identity import Identity, save_identity
from clients import Channel, QuotaExceeded, open_bus
from tests.brokers import OWNER as BROKER_OWNER, running_broker
from tests.test_broker import fill_until_cut, raw_connect, read_until_closed

OWNER = Identity.from_seed(b"m" * 32)  # the broker's key: every right, admin
PLUGIN = Identity.from_seed(b"q" * 32)  # may connect and own org.example.*, no admin

CONFIG = f"""
[broker]
metrics = "127.0.0.1:0"

[limits]
metrics_timeout = 2.0
metrics_scrapers = 3
metrics_request_bytes = 4096

[[rule]]
name = "plugins"
identities = ["{PLUGIN.id}"]
connect = true
own = ["org.example.*"]
see = ["org.example.*"]
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    e["XDG_CONFIG_HOME"] = str(tmp_path / "cfg")
    e["HOME"] = str(tmp_path / "home")
    e.pop("MINIBUS_ADDRESS", None)
    e.pop("MINIBUS_NETWORK_KEY", None)
    e["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    (tmp_path / "run").mkdir(mode=0o700)
    return e


class Busd:
    def __init__(self, proc: subprocess.Popen[str], address: str, metrics_url: str) -> None:
        self.proc = proc
        self.address = address
        self.unix = address.split(";")[0]
        self.tcp = address.split(";")[1]
        self.url = metrics_url
        host_port = metrics_url.removeprefix("http://").split("/")[0]
        self.port = int(host_port.rsplit(":", 1)[1])


@contextmanager
def running_busd(env: dict[str, str], tmp_path: Path, *args: str, config: str = CONFIG) -> Iterator[Busd]:
    key = tmp_path / "owner.key"
    if not key.exists():
        save_identity(key, OWNER)
    conf = tmp_path / "busd.toml"
    conf.write_text(config)
    conf.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0", "--key", str(key), "--config", str(conf), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        assert first.startswith("MINIBUS_ADDRESS="), (first, proc.stderr.read() if proc.poll() is not None else "")
        assert second.startswith("MINIBUS_METRICS=http://127.0.0.1:"), second
        yield Busd(proc, first.strip().split("=", 1)[1], second.strip().split("=", 1)[1])
        assert proc.poll() is None, "busd died"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def busctl(env: dict[str, str], address: str, *args: str, identity: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--identity", str(identity)] if identity is not None else []
    return subprocess.run(
        [sys.executable, "-m", "clients.busctl", "--address", address, *extra, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- HTTP, with h11 on the client side too --------------------------------------------------------


async def http(port: int, target: str = "/metrics", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(
            (conn.send(h11.Request(method=method, target=target, headers=[("host", "busd")])) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )
        status, headers, body = 0, {}, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (sample name, sorted labels), parsed by prometheus-client."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = await http(port)
    assert status == 200, (status, body)
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(body.decode())


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def scrape_until(port: int, check: Callable[[dict[Any, float]], bool], seconds: float = 20) -> dict[Any, float]:
    """Scrape until ``check`` holds (the page is refreshed at most every 0.1 s)."""
    with trio.fail_after(seconds):
        while True:
            try:
                found = await scrape(port)
            except (h11.RemoteProtocolError, trio.BrokenResourceError):
                found = None  # turned away (all scraper slots still taken): try again
            if found is not None and check(found):
                return found
            await trio.sleep(0.05)


async def raw_exchange(port: int, data: bytes, seconds: float = 10) -> bytes:
    """Send raw bytes, read until the server closes: what it answered (within a deadline)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        got = b""
        with trio.fail_after(seconds):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break  # a reset after the answer: the server closed
                if not chunk:
                    break
                got += chunk
        return got


async def echo(ch: Channel) -> None:
    async with ch:
        while data := await ch.receive_some(65536):
            await ch.send_all(data)


@asynccontextmanager
async def traffic(busd: Busd) -> AsyncIterator[tuple[Any, Any, Any, Channel]]:
    """A service on Unix, a watcher on Unix, a client on TCP with a relayed channel to the service."""
    async with (
        open_bus(busd.unix, identity=OWNER, name="org.example.Metered") as service,
        open_bus(busd.unix, identity=OWNER) as watcher,
        open_bus(busd.tcp, identity=OWNER) as client,
    ):
        service.handle_channels("raw", echo)
        async with watcher.watch(["org.example.*"]):
            ch = await client.open_channel("org.example.Metered", route="relay")
            async with ch:
                yield service, watcher, client, ch


async def round_trip(ch: Channel, size: int) -> None:
    blob = os.urandom(size)
    got = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ch.send_all, blob)
        while len(got) < size:
            got += await ch.receive_some(65536)
    assert bytes(got) == blob


# -- the figures ------------------------------------------------------------------------------------


async def test_scrape_while_traffic_flows(env: dict[str, str], tmp_path: Path) -> None:
    with running_busd(env, tmp_path) as busd:
        before = await scrape(busd.port)
        assert value(before, "minibus_connections", transport="unix") == 0
        assert value(before, "minibus_names") == 0
        assert value(before, "minibus_info", version="0.1.0") == 1
        async with traffic(busd) as (service, watcher, client, ch):

            def settled(found: dict[Any, float]) -> bool:
                return (
                    value(found, "minibus_connections", transport="unix") == 2
                    and value(found, "minibus_connections", transport="tcp") == 1
                    and value(found, "minibus_channels", route="relay") == 1
                )

            during = await scrape_until(busd.port, settled)
            assert value(during, "minibus_names") == 1
            assert value(during, "minibus_watches") == 1
            assert value(during, "minibus_subscriptions") == 0
            assert value(during, "minibus_channels", route="unix-fd") == 0
            assert value(during, "minibus_handshakes_total") == 3
            assert value(during, "minibus_connections_admitted_total", transport="tcp") == 1
            received = value(during, "minibus_received_bytes_total")
            sent = value(during, "minibus_sent_bytes_total")
            messages = value(during, "minibus_received_messages_total")

            size = 2 * 1024 * 1024
            await round_trip(ch, size)  # through the broker twice: client -> service -> client
            after = await scrape_until(
                busd.port, lambda found: value(found, "minibus_received_bytes_total") >= received + 2 * size
            )
            assert value(after, "minibus_sent_bytes_total") >= sent + 2 * size
            assert value(after, "minibus_received_messages_total") > messages + 2 * size // 65536
            assert ("minibus_queued_bytes", ()) in after  # the gauge is there (its value moves)
            assert value(after, "minibus_slow_consumer_disconnects_total") == 0

            # A refusal by a limit is counted under the limit's [limits] name.
            with pytest.raises(QuotaExceeded, match="^patterns_per_watch"):
                await client.request("watch", patterns=[f"p{i}" for i in range(33)])
            refused = await scrape_until(
                busd.port, lambda found: ("minibus_limit_refusals_total", (("limit", "patterns_per_watch"),)) in found
            )
            assert value(refused, "minibus_limit_refusals_total", limit="patterns_per_watch") == 1
        # Everyone left: totals stay, live figures go back to 0.
        gone = await scrape_until(busd.port, lambda found: value(found, "minibus_connections", transport="unix") == 0)
        assert value(gone, "minibus_names") == 0 and value(gone, "minibus_channels", route="relay") == 0
        assert value(gone, "minibus_received_bytes_total") >= value(after, "minibus_received_bytes_total")
        # Plugin supervision's counters exist (no installed plugin yet: no samples).
        families = {f.name for f in text_string_to_metric_families((await http(busd.port))[2].decode())}
        assert {"minibus_plugin_launches", "minibus_plugin_restarts", "minibus_plugin_failures"} <= families
        assert "process_resident_memory_bytes" in families


async def test_handshake_failures_by_reason(env: dict[str, str], tmp_path: Path) -> None:
    config = CONFIG.replace("[limits]\n", "[limits]\nhandshake_timeout = 1.0\nmax_handshakes = 2\n")
    with running_busd(env, tmp_path, config=config) as busd:
        stranger = Identity.from_seed(b"z" * 32)  # no rule lets it in
        with pytest.raises(Exception, match="refused|denied|Denied"):
            async with open_bus(busd.unix, identity=stranger, reconnect=False):
                pass
        # Garbage instead of msg1 on TCP, and a hang-up mid-handshake on TCP.
        host, port = busd.tcp.split("host=")[1].split(",")[0], int(busd.tcp.split("port=")[1].split(",")[0])
        with socket.create_connection((host, port)) as s:
            s.sendall(b"\xff" * 64)
            s.settimeout(10)
            assert s.recv(100) == b""
        with socket.create_connection((host, port)) as s:
            s.sendall(b"\x01" * 10)
        found = await scrape_until(
            busd.port,
            lambda f: value(f, "minibus_handshake_failures_total", reason="lost") >= 1
            and value(f, "minibus_handshake_failures_total", reason="protocol") >= 1
            and value(f, "minibus_handshake_failures_total", reason="refused") >= 1,
        )
        assert value(found, "minibus_handshake_failures_total", reason="timeout") == 0
        assert value(found, "minibus_handshakes_total") == 0
        # Three silent TCP connections with room for two handshakes: the oldest is dropped to
        # make room, the other two time out (handshake_timeout = 1 s).
        silent = [socket.create_connection((host, port)) for _ in range(3)]
        try:
            for s in silent:
                s.settimeout(20)
                try:
                    assert s.recv(100) == b""
                except ConnectionResetError:
                    pass
        finally:
            for s in silent:
                s.close()
        found = await scrape_until(busd.port, lambda f: value(f, "minibus_handshake_failures_total", reason="timeout") >= 2)
        assert value(found, "minibus_handshake_failures_total", reason="timeout") == 2
        assert value(found, "minibus_handshake_failures_total", reason="dropped") == 1
        assert value(found, "minibus_limit_refusals_total", limit="max_handshakes") == 1
        assert value(found, "minibus_handshakes_in_progress", transport="tcp") == 0


# -- a hostile scraper ----------------------------------------------------------------------------


async def test_bad_http_is_refused_and_harms_nothing(env: dict[str, str], tmp_path: Path) -> None:
    with running_busd(env, tmp_path) as busd:
        port = busd.port
        answer = await raw_exchange(port, b"garbage\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        big = b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20000 + b"\r\n\r\n"
        answer = await raw_exchange(port, big)
        assert answer.startswith(b"HTTP/1.1 431 "), answer
        answer = await raw_exchange(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc")
        assert answer.startswith(b"HTTP/1.1 400 ") and b"no body" in answer, answer
        status, _, body = await http(port, "/")
        assert status == 404 and b"/metrics" in body
        status, headers, _ = await http(port, "/metrics", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, headers, body = await http(port, "/metrics", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
        status, _, body = await http(port, "/metrics?name[]=minibus_names")
        assert status == 200 and b"minibus_names" in body
        # Keep-alive: a 404 and then the metrics on one connection.
        answer = await raw_exchange(
            port,
            b"GET /nothing HTTP/1.1\r\nhost: x\r\n\r\nGET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 404 ") and b"HTTP/1.1 200 " in answer and b"minibus_connections" in answer

        # A slowloris connection is closed at the deadline (metrics_timeout = 2 s), and while it
        # hangs, other scrapes and the bus are served.
        async with trio.open_nursery() as nursery:
            closed = trio.Event()

            async def slowloris() -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"GET /metrics HTTP/1.1\r\n")
                    with trio.fail_after(20):
                        assert await stream.receive_some(100) == b""
                closed.set()

            async def kept_alive() -> None:
                # One whole scrape, then idle until the deadline closes it: the normal end of
                # a kept-alive connection, not counted as a timeout.
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                    received = b""
                    with trio.fail_after(20):
                        while True:
                            chunk = await stream.receive_some(65536)
                            if not chunk:
                                break
                            received += chunk
                    assert received.startswith(b"HTTP/1.1 200 ")

            nursery.start_soon(slowloris)
            nursery.start_soon(kept_alive)
            await scrape(port)
            async with open_bus(busd.unix, identity=OWNER, name="org.example.Alive") as bus:
                assert [e.name for e in await bus.list_names()] == ["org.example.Alive"]
            await closed.wait()
        found = await scrape(port)
        assert value(found, "minibus_metrics_dropped_total", reason="timeout") == 1
        assert value(found, "minibus_metrics_responses_total", code="400") == 2
        assert value(found, "minibus_metrics_responses_total", code="431") == 1
        assert value(found, "minibus_metrics_responses_total", code="404") == 2


async def test_scrapers_over_the_cap_are_closed_at_once(env: dict[str, str], tmp_path: Path) -> None:
    with running_busd(env, tmp_path) as busd:
        idle = [await trio.open_tcp_stream("127.0.0.1", busd.port) for _ in range(3)]  # metrics_scrapers = 3
        try:
            async with await trio.open_tcp_stream("127.0.0.1", busd.port) as extra:
                with trio.fail_after(10):
                    try:
                        assert await extra.receive_some(100) == b""  # closed unread, no answer
                    except trio.BrokenResourceError:
                        pass  # (or reset: the same)
        finally:
            for stream in idle:
                await stream.aclose()
        found = await scrape_until(busd.port, lambda f: value(f, "minibus_metrics_dropped_total", reason="busy") >= 1)
        assert value(found, "minibus_metrics_dropped_total", reason="timeout") == 0  # closed for being busy, not late


# -- busctl stats ---------------------------------------------------------------------------------


async def test_busctl_stats_admin_and_not(env: dict[str, str], tmp_path: Path) -> None:
    plugin_key = tmp_path / "plugin.key"
    save_identity(plugin_key, PLUGIN)
    with running_busd(env, tmp_path) as busd:
        async with traffic(busd) as (service, watcher, client, ch):
            await round_trip(ch, 300_000)
            owner_key = tmp_path / "owner.key"
            admin = await trio.to_thread.run_sync(lambda: busctl(env, busd.unix, "stats", "--json", identity=owner_key))
            assert admin.returncode == 0, admin.stderr
            stats = json.loads(admin.stdout)
            rows = {row["unique_id"]: row for row in stats["connections"]}
            assert len(rows) == 4  # service, watcher, client, and busctl itself
            assert rows[service.unique_id]["name"] == "org.example.Metered"
            assert rows[client.unique_id]["transport"] == "tcp"
            assert rows[client.unique_id]["channels"] == 1 and rows[watcher.unique_id]["watches"] == 1
            assert rows[client.unique_id]["bytes_out"] >= 300_000 and rows[service.unique_id]["bytes_in"] >= 300_000
            for row in rows.values():
                assert isinstance(row["queued_bytes"], int) and row["messages_in"] >= 1
            totals = stats["totals"]
            assert totals["connections"] == {"unix": 3, "tcp": 1}
            assert totals["names"] == 1 and totals["watches"] == 1
            assert totals["channels"] == {"relay": 1, "unix-fd": 0, "tcp": 0}
            assert totals["bytes_in"] >= 600_000 and totals["plugins"] == {}

            # The same figures in text, with one row per connection.
            text = await trio.to_thread.run_sync(lambda: busctl(env, busd.unix, "stats", identity=owner_key))
            assert text.returncode == 0, text.stderr
            assert "connections:     4 now (tcp 1, unix 3)" in text.stdout
            assert "channels:        1 (relay 1, tcp 0, unix-fd 0), 0 opening" in text.stdout
            assert "org.example.Metered" in text.stdout and text.stdout.count("\n:") == 4

            # Someone without the admin right gets the totals and its own row only.
            other = await trio.to_thread.run_sync(
                lambda: busctl(env, busd.unix, "stats", "--json", identity=plugin_key)
            )
            assert other.returncode == 0, other.stderr
            mine = json.loads(other.stdout)
            assert [row["identity"] for row in mine["connections"]] == [PLUGIN.id]
            assert mine["totals"]["connections"] == {"unix": 3, "tcp": 1}  # (the admin's busctl has left)


async def test_stats_request_by_hand(env: dict[str, str], tmp_path: Path) -> None:
    with running_busd(env, tmp_path) as busd:
        async with open_bus(busd.unix, identity=PLUGIN) as plugin, open_bus(busd.tcp, identity=OWNER) as admin:
            reply = await plugin.request("stats")
            assert set(reply) == {"totals", "connections", "next"} and reply["next"] is None
            assert [row["unique_id"] for row in reply["connections"]] == [plugin.unique_id]
            everything = await admin.stats()
            assert {row["unique_id"] for row in everything["connections"]} == {plugin.unique_id, admin.unique_id}


# -- in process: slow consumers, plugin counters, the stats request's pages --------------------------


async def test_slow_consumer_and_plugin_counters_in_process(tmp_path: Path) -> None:
    """The counters the supervisor and the slow-consumer policy bump show up on /metrics."""

    async with running_broker(tmp_path, outbound_queue=4) as rb, trio.open_nursery() as nursery:
        server = MetricsServer(rb.broker, timeout=5)
        _, port = await nursery.start(server.serve, "127.0.0.1", 0)
        plugins = rb.broker.core.stats.plugins
        plugins.known("org.example.Idle")
        plugins.launched("org.example.Flaky")
        plugins.failed("org.example.Flaky")
        plugins.launched("org.example.Flaky")
        plugins.restarted("org.example.Flaky")

        slow = await raw_connect(rb.unix_address)
        async with open_bus(rb.unix_address, identity=BROKER_OWNER) as churner:
            await fill_until_cut(rb, slow, churner)
            messages = await read_until_closed(slow)
            assert "slow consumer" in messages[-1]["message"]
            found = await scrape_until(port, lambda f: value(f, "minibus_slow_consumer_disconnects_total") == 1)
            assert value(found, "minibus_plugin_launches_total", plugin="org.example.Flaky") == 2
            assert value(found, "minibus_plugin_restarts_total", plugin="org.example.Flaky") == 1
            assert value(found, "minibus_plugin_failures_total", plugin="org.example.Flaky") == 1
            assert value(found, "minibus_plugin_launches_total", plugin="org.example.Idle") == 0
            stats = await churner.stats()
            assert stats["totals"]["slow_consumer_disconnects"] == 1
            assert stats["totals"]["plugins"]["org.example.Flaky"] == {"launches": 2, "restarts": 1, "failures": 1}
        nursery.cancel_scope.cancel()


def test_stats_pages_and_admin_rows_sans_io() -> None:

    owner, plugin = OWNER.public_key, PLUGIN.public_key
    rules = {"rule": [{"name": "plugins", "identities": [PLUGIN.id], "connect": True, "own": ["org.example.*"]}]}
    limits = Limits(message_bytes=4096, reply_bytes=4096, info_bytes=1024)
    core = BrokerCore(Policy.from_mapping(owner, rules), limits, clock=lambda: 1000.0)

    class Io:
        def connection_io(self, conn_id: int) -> ConnectionIo:
            return ConnectionIo(10 * conn_id, 20 * conn_id, conn_id, 2 * conn_id, 5, 1)

        def handshakes_in_progress(self) -> dict[str, int]:
            return {"tcp": 2}

    core.io_view = Io()
    ids = [core.connect(owner if i == 0 else plugin, "unix" if i % 2 else "tcp").id for i in range(40)]
    request = 0

    def ask(conn: int, **args: Any) -> Any:
        nonlocal request
        request += 1
        out = core.receive(conn, {"op": "stats", "id": request, **args})
        assert len(out) == 1
        reply = out[0][1]
        assert "result" in reply, reply
        return reply["result"]

    for conn in ids:
        core.receive(conn, {"op": "hello", "id": 1_000_000})  # (its reply is not looked at)
    pages, after = [], None
    while True:
        page = ask(ids[0], **({"after": after} if after is not None else {}))
        pages.append(page)
        after = page["next"]
        if after is None:
            break
    assert len(pages) > 1, "a small message_bytes cuts the list into pages"
    listed = [row["unique_id"] for page in pages for row in page["connections"]]
    assert listed == [f":{i}" for i in ids]
    totals = pages[0]["totals"]
    assert totals["connections"] == {"unix": 20, "tcp": 20}
    assert totals["bytes_in"] == sum(10 * i for i in ids) and totals["queued_bytes_max"] == 5
    assert totals["handshakes_in_progress"] == {"unix": 0, "tcp": 2}
    # Not an admin: the totals and its own row.
    mine = ask(ids[1])
    assert [row["unique_id"] for row in mine["connections"]] == [f":{ids[1]}"] and mine["next"] is None
    assert mine["connections"][0]["bytes_out"] == 20 * ids[1]
    # Refusals are counted by limit; the label set is bounded.
    out = core.receive(ids[1], {"op": "watch", "id": 99, "patterns": ["x"] * 33})
    assert out[0][1]["error"]["code"] == "minibus.Error.QuotaExceeded"
    assert core.stats.refusals == {"patterns_per_watch": 1}
    for i in range(2 * MAX_LABELS):
        core.stats.refused(f"made_up_limit_{i}: test")
    assert len(core.stats.refusals) == MAX_LABELS + 1 and core.stats.refusals["other"] > 0
    # Ended connections' traffic stays in the totals.
    core.stats.connection_ended(core.io_view.connection_io(ids[-1]))
    core.disconnect(ids[-1])
    assert ask(ids[0])["totals"]["bytes_in"] == sum(10 * i for i in ids)


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "args", "expected"),
    [
        ('[broker]\nmetrics = 5\n', (), '[broker] metrics = 5: expected a string "HOST:PORT"'),
        ('[broker]\nmetrics = "nowhere"\n', (), "[broker] metrics wants HOST:PORT"),
        ("", ("--metrics", "127.0.0.1"), "--metrics wants HOST:PORT, got '127.0.0.1'"),
        ('[limits]\nmetrics_timeout = "soon"\n', ("--metrics", "127.0.0.1:0"), "metrics_timeout"),
        ('[broker]\nmetric = "127.0.0.1:0"\n', (), "did you mean 'metrics'?"),
    ],
)
def test_bad_metrics_settings_are_one_line_and_exit_3(
    env: dict[str, str], tmp_path: Path, config: str, args: tuple[str, ...], expected: str
) -> None:
    conf = tmp_path / "busd.toml"
    conf.write_text(config)
    conf.chmod(0o600)
    done = subprocess.run(
        [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0", "--config", str(conf), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done
    assert expected in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_metrics_port_in_use(env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 3, done
    assert done.stderr.startswith(f"busd: cannot serve metrics on 127.0.0.1:{port}") and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


def test_metrics_are_off_by_default(env: dict[str, str], tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bus", "--tcp", "127.0.0.1:0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("MINIBUS_ADDRESS=")
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=15)
        assert "MINIBUS_METRICS" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stats_shows_a_non_admin_only_the_plugins_it_may_see() -> None:
    """Plugin names are names: ``stats`` lists to a non-admin only the plugins its ``see``
    rules cover (as ``list_services`` does); an admin gets them all."""
    owner, plugin = OWNER.public_key, PLUGIN.public_key
    rules = {"rule": [{"name": "plugins", "identities": [PLUGIN.id], "connect": True, "see": ["org.example.*"]}]}
    core = BrokerCore(Policy.from_mapping(owner, rules), clock=lambda: 1000.0)
    for name in ("org.example.Echo", "com.private.Secret"):
        core.stats.plugins.launched(name)
    admin, other = core.connect(owner, "unix").id, core.connect(plugin, "unix").id
    for conn in (admin, other):
        core.receive(conn, {"op": "hello", "id": 1})

    def plugins(conn: int) -> set[str]:
        reply = core.receive(conn, {"op": "stats", "id": 2})[0][1]
        return set(reply["result"]["totals"]["plugins"])

    assert plugins(admin) == {"org.example.Echo", "com.private.Secret"}
    assert plugins(other) == {"org.example.Echo"}
