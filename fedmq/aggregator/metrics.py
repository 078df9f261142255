"""Prometheus metrics of one aggregator, and the HTTP endpoint Prometheus scrapes.

Every service has its own :class:`~prometheus_client.CollectorRegistry` (the simulator
and the tests run many services in one process).  Counters and histograms are updated
as things happen (:mod:`~fedmq.aggregator.reporting`); what describes the present —
the round, its phase, agents online, bytes moved — is read from the running service
when Prometheus scrapes (:class:`LiveCollector`), on the event loop: the endpoint is an
asyncio server in the service's loop, so a scrape never races the state machine.

The metrics and their labels are listed in ``docs/operations.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

import fedmq
from fedmq.errors import ConfigError
from fedmq.timeouts import within

log = logging.getLogger(__name__)

ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)  # seconds
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PHASES = ("waiting", "collecting", "finished")
REQUEST_TIMEOUT = 5.0  # seconds a scraper has to send its request line and headers


@dataclass(frozen=True)
class LiveState:
    """What the service looks like right now (read at every scrape)."""

    round: int
    phase: str
    agents_online: int
    agents_known: int
    received: int
    expected: int
    deadline: float | None
    bytes_received: int
    bytes_sent: int
    connections: int
    last_metrics: Mapping[str, float] = field(default_factory=dict)
    evaluated_checkpoint: int | None = None
    evaluation: Mapping[str, float] = field(default_factory=dict)


class LiveCollector:
    """Gauges and counters computed from :class:`LiveState` when scraped.

    Args:
        source: returns the state now, or None before the service runs.
    """

    def __init__(self, source: Callable[[], LiveState | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        """The metric families of the present state."""
        state = self._source()
        if state is None:
            return
        yield _gauge(
            "fedmq_current_round", "Current round (the open one, or the next)", state.round
        )
        phase = GaugeMetricFamily(
            "fedmq_round_phase", "1 for the phase the current round is in", labels=["phase"]
        )
        for name in PHASES:
            phase.add_metric([name], 1.0 if state.phase == name else 0.0)
        yield phase
        yield _gauge(
            "fedmq_agents_online", "Agents online (status seen, not gone)", state.agents_online
        )
        yield _gauge("fedmq_agents_known", "Agents the roster tracks", state.agents_known)
        yield _gauge(
            "fedmq_round_updates_received",
            "Updates accepted into the current round",
            state.received,
        )
        yield _gauge(
            "fedmq_round_updates_expected", "Updates the current round closes at", state.expected
        )
        if state.deadline is not None:
            yield _gauge(
                "fedmq_round_deadline_timestamp_seconds",
                "Deadline of the collecting round (unix time)",
                state.deadline,
            )
        yield CounterMetricFamily(
            "fedmq_bytes_received_total",
            "Update chunk bytes received",
            value=state.bytes_received,
        )
        yield CounterMetricFamily(
            "fedmq_bytes_sent_total",
            "Blob and control message bytes published (announcements, acks, chunks)",
            value=state.bytes_sent,
        )
        yield CounterMetricFamily(
            "fedmq_broker_connections_total",
            "Successful broker connections (reconnects are this minus one)",
            value=state.connections,
        )
        metrics = GaugeMetricFamily(
            "fedmq_last_round_metric",
            "Example-weighted metrics of the last closed round (eval_accuracy, train_loss, ...)",
            labels=["metric"],
        )
        for name, value in sorted(state.last_metrics.items()):
            metrics.add_metric([name], value)
        yield metrics
        if state.evaluated_checkpoint is not None:
            yield _gauge(
                "fedmq_federated_evaluation_checkpoint",
                "Checkpoint (global model) the newest federated evaluation is of",
                state.evaluated_checkpoint,
            )
        evaluation = GaugeMetricFamily(
            "fedmq_federated_evaluation",
            "Newest federated evaluation of a global model on the agents' evaluation data, "
            "example-weighted (eval_accuracy, eval_loss, ...)",
            labels=["metric"],
        )
        for name, value in sorted(state.evaluation.items()):
            evaluation.add_metric([name], value)
        yield evaluation


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class AggregatorMetrics:
    """The registry of one service and the metrics updated as things happen.

    Args:
        federation: federation id (the ``fedmq_aggregator_info`` labels).
        aggregator: the aggregator's client id.
        live: the present state, read at every scrape.
    """

    def __init__(
        self, federation: str, aggregator: str, live: Callable[[], LiveState | None]
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        info = Info("fedmq_aggregator", "The aggregator and its federation", registry=registry)
        info.info(
            {"federation": federation, "aggregator": aggregator, "version": fedmq.__version__}
        )
        self.rounds = Counter(
            "fedmq_rounds_total",
            "Rounds ended, by outcome (closed, failed) and reason (target, no_quorum, ...)",
            ["outcome", "reason"],
            registry=registry,
        )
        self.round_duration = Histogram(
            "fedmq_round_duration_seconds",
            "Time from a round's announcement to its end",
            ["outcome"],
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.updates = Counter(
            "fedmq_updates_total",
            "Updates accepted (reason on_time or late) or rejected (reason: the ack's reason)",
            ["result", "reason"],
            registry=registry,
        )
        self.fold = Histogram(
            "fedmq_fold_duration_seconds",
            "Time to fold one durable update into the round (with the round's close, if it closes)",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.persist = Histogram(
            "fedmq_persist_duration_seconds",
            "Time to write to the state directory (updates: one fsync'd batch; state, "
            "checkpoint, record, prune)",
            ["what"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        registry.register(LiveCollector(live))

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class MetricsEndpoint:
    """``GET /metrics`` over HTTP/1.0, served by an asyncio server in the service's loop.

    Args:
        render: returns the exposition body.
        host: address to bind.
        port: port to bind (0: any free port; see :attr:`port`).
    """

    def __init__(self, render: Callable[[], bytes], host: str, port: int) -> None:
        self._render = render
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int | None:
        """The port listened on (None when not listening)."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen.

        Raises:
            ConfigError: the address cannot be bound (port in use, bad address).
        """
        try:
            self._server = await asyncio.start_server(self._accept, self._host, self._port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self._host}:{self._port} (metrics_port): {exc}"
            ) from exc
        log.info("Prometheus metrics on http://%s:%d/metrics", self._host, self.port)

    async def close(self) -> None:
        """Stop listening and drop connections still open."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if server is not None:
            await server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await within(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method = words[0] if words else ""
            path = words[1].split("?", 1)[0] if len(words) > 1 else ""
            if method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path in ("/metrics", "/"):
                status, body, kind = "200 OK", self._render(), CONTENT_TYPE_LATEST
            else:
                status, body, kind = "404 Not Found", b"try /metrics\n", "text/plain"
            header = (
                f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")
            writer.write(header if method == "HEAD" else header + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
