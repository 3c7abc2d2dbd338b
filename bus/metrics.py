"""busd's Prometheus endpoint: ``GET /metrics`` over HTTP/1.1, for a Prometheus server to scrape.

Theory of operation
-------------------
:class:`MetricsServer` listens on its own TCP address (``busd --metrics HOST:PORT``), apart
from the bus's sockets.  HTTP is h11's sans-io state machine fed from a trio socket; the
exposition format is prometheus-client's (:func:`prometheus_client.generate_latest` over a
private :class:`~prometheus_client.CollectorRegistry`).  :class:`BrokerCollector` reads the
broker's figures when a scrape asks for them (:meth:`bus.core.broker.BrokerCore.stats_totals`),
inside the broker's own trio thread, so nothing is locked and nothing is added to the path of
a message.

A scraper cannot hurt the broker:

* at most ``metrics_scrapers`` connections at once: one more is closed as soon as it is
  accepted, before a byte is read;
* a connection lives at most ``metrics_timeout`` seconds, however many requests it makes
  (keep-alive is fine within it): an idle or trickling one is closed at the deadline;
* a request's head is at most ``metrics_request_bytes`` (``431`` over it), a request has no
  body, and anything h11 calls malformed gets ``400``; either way the connection is closed;
* the figures are computed at most every :data:`REFRESH_INTERVAL` seconds: a scraper that
  asks faster gets the same page again, so scraping costs the broker a bounded share of its
  time however hard it is done.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from collections.abc import Iterable

import h11
import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import __version__
from .broker import Broker
from .core.stats import HANDSHAKE_FAILURES

__all__ = ["MetricsServer", "BrokerCollector", "CannotServeMetrics", "METRICS_PATH", "REFRESH_INTERVAL"]

log = logging.getLogger("minibus.metrics")

METRICS_PATH = "/metrics"
#: The figures are computed at most this often; faster scrapes get the last page again.
REFRESH_INTERVAL = 0.1
#: Bytes read from a scraper at a time.
_READ_SIZE = 16 * 1024
#: After an error response: how long, and how much, the rest of a bad request is read before
#: the socket closes (closing with unread bytes would reset the connection, and the client
#: might lose the response).
_DRAIN_SECONDS = 1.0
_DRAIN_BYTES = 64 * 1024


class CannotServeMetrics(Exception):
    """The metrics address cannot be listened on (one line for busd's stderr)."""


class BrokerCollector:
    """The broker's figures as Prometheus metric families (see docs/operations.md#metrics)."""

    def __init__(self, broker: Broker, server: MetricsServer | None = None) -> None:
        self._broker = broker
        self._server = server

    def collect(self) -> Iterable[Metric]:
        t = self._broker.core.stats_totals()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        def labelled(family: GaugeMetricFamily | CounterMetricFamily, values: dict[str, int]) -> Metric:
            for label, value in sorted(values.items()):
                family.add_metric([label], value)
            return family

        info = GaugeMetricFamily("minibus_info", "The broker's version (always 1).", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield gauge("minibus_start_time_seconds", "When busd started, in seconds since the Unix epoch.", t["started"])
        yield labelled(
            GaugeMetricFamily("minibus_connections", "Authenticated connections now, by transport.", labels=["transport"]),
            t["connections"],
        )
        yield labelled(
            CounterMetricFamily(
                "minibus_connections_admitted", "Connections admitted after their handshake, by transport.", labels=["transport"]
            ),
            t["connections_admitted"],
        )
        yield labelled(
            GaugeMetricFamily(
                "minibus_handshakes_in_progress", "Connections still in the shs1 handshake, by listener.", labels=["transport"]
            ),
            t["handshakes_in_progress"],
        )
        yield counter("minibus_handshakes", "Handshakes completed (the peer proved its key and policy let it in).", t["handshakes"])
        yield labelled(
            CounterMetricFamily(
                "minibus_handshake_failures",
                "Handshakes that did not complete, by reason (timeout, refused, protocol, lost, dropped).",
                labels=["reason"],
            ),
            {**dict.fromkeys(HANDSHAKE_FAILURES, 0), **t["handshake_failures"]},
        )
        yield gauge("minibus_names", "Well-known names with an owner.", t["names"])
        yield gauge("minibus_watches", "Watches on names, all connections together.", t["watches"])
        yield gauge("minibus_subscriptions", "Event subscriptions, all connections together.", t["subscriptions"])
        yield labelled(
            GaugeMetricFamily("minibus_channels", "Open channels, by route (relay, unix-fd, tcp).", labels=["route"]),
            t["channels"],
        )
        yield gauge("minibus_channels_pending", "Channel openings waiting for their target's answer.", t["channels_pending"])
        yield counter("minibus_received_bytes", "Frame bytes received from connections.", t["bytes_in"])
        yield counter("minibus_sent_bytes", "Frame bytes queued or written to connections.", t["bytes_out"])
        yield counter("minibus_received_messages", "Frames received from connections (control and data).", t["messages_in"])
        yield counter("minibus_sent_messages", "Frames queued or written to connections (control and data).", t["messages_out"])
        yield gauge("minibus_queued_bytes", "Bytes waiting in outbound queues, all connections together.", t["queued_bytes"])
        yield gauge("minibus_queued_messages", "Frames waiting in outbound queues, all connections together.", t["queued_messages"])
        yield gauge("minibus_queued_bytes_max", "Bytes waiting in the fullest connection's outbound queue.", t["queued_bytes_max"])
        yield counter(
            "minibus_slow_consumer_disconnects", "Connections cut because their outbound queue was full.", t["slow_consumer_disconnects"]
        )
        yield labelled(
            CounterMetricFamily(
                "minibus_limit_refusals", "Refusals by a limit (QuotaExceeded and the pre-auth caps), by its [limits] name.", labels=["limit"]
            ),
            t["refusals"],
        )
        plugins: dict[str, dict[str, int]] = t["plugins"]
        for what, doc in (
            ("launches", "Starts of an installed plugin's process (restarts included)."),
            ("restarts", "Starts of an installed plugin's process by its restart policy."),
            ("failures", "Failed starts or bad exits of an installed plugin's process."),
        ):
            yield labelled(
                CounterMetricFamily(f"minibus_plugin_{what}", doc, labels=["plugin"]),
                {name: counts[what] for name, counts in plugins.items()},
            )
        if self._server is not None:
            yield labelled(
                CounterMetricFamily("minibus_metrics_responses", "Responses of this endpoint, by HTTP status.", labels=["code"]),
                {str(code): n for code, n in self._server.responses.items()},
            )
            yield labelled(
                CounterMetricFamily(
                    "minibus_metrics_dropped",
                    "Scraper connections closed without a response: busy (over metrics_scrapers), timeout.",
                    labels=["reason"],
                ),
                {"busy": 0, "timeout": 0, **self._server.dropped},
            )


class MetricsServer:
    """Serves ``/metrics`` for one broker (see the module's docstring for the limits)."""

    def __init__(
        self, broker: Broker, *, timeout: float = 10.0, max_scrapers: int = 4, max_request_bytes: int = 8192
    ) -> None:
        self.timeout = timeout
        self.max_scrapers = max_scrapers
        self.max_request_bytes = max_request_bytes
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(BrokerCollector(broker, self))
        ProcessCollector(registry=self.registry)  # busd's own CPU, memory and descriptors
        #: Responses sent, by status code; connections dropped without one, by reason.
        self.responses: dict[int, int] = {}
        self.dropped: dict[str, int] = {}
        self.active = 0
        self._page = b""
        self._page_time = -1e9

    def page(self) -> bytes:
        """The exposition text, computed at most every :data:`REFRESH_INTERVAL` seconds."""
        now = trio.current_time()
        if now - self._page_time >= REFRESH_INTERVAL:
            self._page = generate_latest(self.registry)
            self._page_time = now
        return self._page

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host:port`` (port 0 picks one), report the bound address, serve until cancelled."""
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise CannotServeMetrics(f"cannot serve metrics on {where}: {exc.strerror or exc}") from exc
        bound = listeners[0].socket.getsockname()
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started((host, int(bound[1])))

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError:  # out of descriptors: back off, keep serving
                    await trio.sleep(0.1)
                    continue
                if self.active >= self.max_scrapers:
                    self.dropped["busy"] = self.dropped.get("busy", 0) + 1
                    stream.socket.close()
                    continue
                self.active += 1
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request_bytes)
        try:
            with trio.move_on_after(self.timeout) as deadline:
                await self._converse(conn, stream)
            # Counted only when a request was under way: a kept-alive connection that was
            # merely idle between scrapes at its deadline is the normal end of one.
            if deadline.cancelled_caught and (conn.their_state is not h11.IDLE or conn.trailing_data[0]):
                self.dropped["timeout"] = self.dropped.get("timeout", 0) + 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the scraper went away
        except Exception:
            # A bug met by one scraper ends that scraper's connection, never the broker.
            log.exception("metrics: a scraper's connection hit an internal error")
        finally:
            self.active -= 1
            stream.socket.close()

    async def _converse(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        """Answer requests on one connection until it closes, errs, or must close."""
        while True:
            try:
                request = await self._next_event(conn, stream)
                if not isinstance(request, h11.Request):
                    return  # closed (or anything h11 might add): nothing to answer
                while True:  # the rest of the request: no body is allowed
                    event = await self._next_event(conn, stream)
                    if isinstance(event, h11.EndOfMessage):
                        break
                    if isinstance(event, h11.Data) and event.data:
                        raise h11.RemoteProtocolError("a request to this endpoint has no body", error_status_hint=400)
            except h11.RemoteProtocolError as exc:
                await self._refuse(conn, stream, exc.error_status_hint, str(exc))
                return
            await self._respond(conn, stream, request)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _next_event(self, conn: h11.Connection, stream: trio.SocketStream) -> h11.Event | None:
        """The next event from the scraper; None when h11 pauses (never here: one request
        is answered before the next is read)."""
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Event):
                return event
            if event is not h11.NEED_DATA:
                return None
            conn.receive_data(await stream.receive_some(_READ_SIZE))

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, status: int, body: bytes, headers: list[tuple[str, str]], *, head: bool = False) -> None:
        headers = [*headers, ("content-length", str(len(body))), ("server", f"busd/{__version__}")]
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)) or b""
        if body and not head:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        self.responses[status] = self.responses.get(status, 0) + 1
        await stream.send_all(data)

    async def _respond(self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request) -> None:
        path = request.target.split(b"?", 1)[0]
        method = request.method
        text = [("content-type", "text/plain; charset=utf-8")]
        if path != METRICS_PATH.encode():
            await self._send(conn, stream, 404, b"not found: the metrics are at /metrics\n", text, head=method == b"HEAD")
        elif method not in (b"GET", b"HEAD"):
            await self._send(conn, stream, 405, b"method not allowed: use GET\n", [*text, ("allow", "GET, HEAD")])
        else:
            page = self.page()
            headers = [("content-type", CONTENT_TYPE_PLAIN_0_0_4), ("cache-control", "no-store")]
            await self._send(conn, stream, 200, page, headers, head=method == b"HEAD")

    async def _refuse(self, conn: h11.Connection, stream: trio.SocketStream, status: int, why: str) -> None:
        """A malformed or oversized request: say so (when HTTP still allows), then close."""
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"bad request: {why}\n".encode("utf-8", "replace")
            await self._send(conn, stream, status, body, [("content-type", "text/plain; charset=utf-8"), ("connection", "close")])
        try:
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        with trio.move_on_after(_DRAIN_SECONDS):
            drained = 0
            while drained < _DRAIN_BYTES:
                chunk = await stream.receive_some(_READ_SIZE)
                if not chunk:
                    break
                drained += len(chunk)
