"""What the aggregator tells people: counters, log lines and Prometheus metrics.

The service hands the :class:`Reporter` the coordinator's informational events
(``UpdateRejected``, ``Noted``, ``RoundClosed``, ``FederationFinished``), every accepted
update, every round record it saved, and the time its writes and folds took; the
reporter counts them (``AggregatorService.statistics()``), logs them and updates the
metrics (:mod:`~fedmq.aggregator.metrics`).  At INFO the journal then reads::

    round 3 open: 5 agents selected (press-1, …), closes at 5 updates (quorum 3) or in 300 s
    round 3: accepted update 3f2a… from press-1 (412 examples), 1/5
    rejected update 9c1d… from press-9 (round 3): outlier: update norm 1.2e+04 is above …
    round 3: 4/5 updates in, waiting for 1 agent (deadline in 241 s): press-4
    round 3 closed (target) after 58.2 s: 5 updates from press-1, …; metrics eval_accuracy=0.91 …

Rejections are rate-limited per reason (:class:`~fedmq.aggregator.log_limiter.LogLimiter`),
and the "waiting for" line comes at most every :data:`WAITING_INTERVAL` seconds when
what the round waits for changed, and every :data:`WAITING_REMINDER` seconds while it
does not.  Every line about a round or an agent carries ``round`` and ``client`` as
log record fields (:mod:`fedmq.log_format` puts them into JSON lines).

When a round ends the reporter also stores what the service measured of it (bytes,
agents that never answered) beside its record (``StateStore.save_round_stats``), for
``fedmq report``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fedmq.aggregator.config import AggregatorSettings
from fedmq.aggregator.log_limiter import LogLimiter
from fedmq.aggregator.metrics import AggregatorMetrics, LiveState, MetricsEndpoint
from fedmq.aggregator.store import StateStore
from fedmq.coordinator.actions import (
    FederationFinished,
    Noted,
    RoundClosed,
    Ticket,
    UpdateRejected,
)
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.records import RoundRecord, evaluation_metrics
from fedmq.transport.mqtt import MqttSession

log = logging.getLogger(__name__)

WAITING_INTERVAL = 10.0  # seconds: at most one "waiting for" line this often
WAITING_REMINDER = 60.0  # seconds: and one at least this often while a wait goes on
TICK = 1.0  # seconds between checks of what the round waits for
NAMES_SHOWN = 10  # agent ids a line lists before "and N more"
STATS_VERSION = 1

InfoEvent = UpdateRejected | Noted | RoundClosed | FederationFinished


def names(clients: Sequence[str], limit: int = NAMES_SHOWN) -> str:
    """``a, b, c`` or ``a, b, … and 7 more``."""
    shown = ", ".join(clients[:limit])
    if len(clients) > limit:
        shown += f", … and {len(clients) - limit} more"
    return shown


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class Reporter:
    """Counts, logs and measures one aggregator service.

    Args:
        settings: the service's configuration (federation, ``metrics_port``).
        clock: unix time (the service's clock).
        monotonic: for rate limits.
    """

    def __init__(
        self,
        settings: AggregatorSettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.federation = settings.federation
        self.counters: Counter[str] = Counter()
        self._clock = clock
        self._monotonic = monotonic
        self._rejections = LogLimiter(log)
        self.metrics = AggregatorMetrics(settings.federation, settings.client_id, self._live)
        self._endpoint: MetricsEndpoint | None = None
        if settings.metrics_port is not None:
            self._endpoint = MetricsEndpoint(
                self.metrics.exposition, settings.metrics_address, settings.metrics_port
            )
        self._coordinator: Coordinator | None = None
        self._session: MqttSession | None = None
        self._store: StateStore | None = None
        self._opened: int | None = None  # round whose opening was logged
        self._deadline = 0.0  # its deadline as logged
        self._outstanding: tuple[int, tuple[str, ...]] | None = None  # latest seen
        self._wait_key: tuple[Any, ...] | None = None
        self._wait_logged = float("-inf")  # monotonic time of the last "waiting" line

    # ------------------------------------------------------------------ lifecycle

    @property
    def metrics_port(self) -> int | None:
        """The port the metrics endpoint listens on (None: not serving)."""
        return self._endpoint.port if self._endpoint is not None else None

    def bind(self, coordinator: Coordinator, session: MqttSession, store: StateStore) -> None:
        """What the running service reports on (call before :meth:`start`)."""
        self._coordinator = coordinator
        self._session = session
        self._store = store

    async def start(self) -> None:
        """Serve the metrics endpoint, if configured.

        Raises:
            ConfigError: the metrics port cannot be bound.
        """
        if self._endpoint is not None:
            await self._endpoint.start()

    async def close(self) -> None:
        """Stop serving metrics."""
        if self._endpoint is not None:
            await self._endpoint.close()

    async def run(self, busy: Callable[[], bool] = lambda: False) -> None:
        """Log what the round waits for, now and then (a task of the service).

        Args:
            busy: true while the service is executing the coordinator's actions (its
                lock is held); the round is looked at only between inputs, once every
                line about what the last input did has been logged.
        """
        while True:
            await asyncio.sleep(TICK)
            if not busy():
                self.tick()

    # ------------------------------------------------------------------ inputs

    def event(self, event: InfoEvent) -> None:
        """Count and log one of the coordinator's informational events."""
        match event:
            case UpdateRejected():
                self.counters[f"rejected.{event.reason}"] += 1
                seen = self._outstanding
                if event.update_id is not None and seen is not None and seen[0] == event.round:
                    # A refused agent has answered: the round no longer waits for it.
                    self._outstanding = (seen[0], tuple(c for c in seen[1] if c != event.client))
                self.metrics.updates.labels("rejected", event.reason).inc()
                self._rejections.log(
                    event.reason,
                    logging.WARNING,
                    "rejected %s from %s (round %d): %s: %s",
                    f"update {event.update_id}" if event.update_id else "a chunk",
                    event.client,
                    event.round,
                    event.reason,
                    event.detail,
                    extra=self._fields(
                        event.round, event.client, update_id=event.update_id, reason=event.reason
                    ),
                )
            case Noted():
                level = logging.WARNING if event.level == "warning" else logging.INFO
                log.log(level, "%s", event.message, extra=self._fields())
            case RoundClosed():
                self.counters[f"rounds.{event.outcome}"] += 1
                self.metrics.rounds.labels(event.outcome, event.reason).inc()
            case FederationFinished():
                log.info("federation finished: %s", event.reason, extra=self._fields())

    def status_changed(self) -> None:
        """The coordinator's status changed: log a round that opened or was extended."""
        if self._coordinator is not None:
            self._observe(self._coordinator)

    def _observe(self, coordinator: Coordinator) -> None:
        r = coordinator.state.round
        if r.phase == "collecting":
            self._outstanding = (r.number, r.outstanding())
            if self._opened != r.number:
                self._opened, self._deadline = r.number, r.deadline
                self._log_opening(coordinator)
            elif r.deadline != self._deadline:
                self._deadline = r.deadline
                log.info(
                    "round %d: deadline moved to %s (in %.0f s)",
                    r.number,
                    time.strftime("%H:%M:%S", time.localtime(r.deadline)),
                    r.deadline - self._clock(),
                    extra=self._fields(r.number),
                )

    def tally(self, ticket: Ticket) -> tuple[int, int] | None:
        """The count and target of the ticket's round once the ticket is folded.

        Read it *before* ``Coordinator.persisted``: the update that reaches the target
        closes the round, and by then the coordinator has moved on to the next one.
        """
        coordinator = self._coordinator
        if coordinator is None or coordinator.round != ticket.fold_round:
            return None
        r = coordinator.state.round
        return len(r.contributions) + 1, r.target

    def accepted(self, ticket: Ticket, tally: tuple[int, int] | None = None) -> None:
        """An update was stored and folded.

        Call after ``Coordinator.persisted``, with the :meth:`tally` taken before it.
        """
        self.counters["accepted"] += 1
        late = ticket.staleness > 0
        self.metrics.updates.labels("accepted", "late" if late else "on_time").inc()
        meta = ticket.update.meta
        progress = f", {tally[0]}/{tally[1]}" if tally is not None else ""
        log.info(
            "round %d: accepted update %s from %s (%d examples%s)%s",
            ticket.fold_round,
            meta.update_id,
            meta.client,
            meta.num_examples,
            f", trained on round {meta.base_round}" if late else "",
            progress,
            extra=self._fields(ticket.fold_round, meta.client, update_id=meta.update_id),
        )

    def recorded(self, record: RoundRecord) -> None:
        """A round's record is durable: log how it ended, measure it, store its stats."""
        duration = max(0.0, record.closed_at - record.opened_at) if record.opened_at else 0.0
        if record.opened_at:
            self.metrics.round_duration.labels(record.outcome).observe(duration)
        contributors = [c.client for c in record.contributions]
        silent = self._silent(record, contributors)
        gone = self._gone(silent)
        parts = [
            f"{_plural(len(contributors), 'update')}"
            + (f" from {names(contributors)}" if contributors else "")
        ]
        late = sum(1 for c in record.contributions if c.staleness > 0)
        if late:
            parts.append(f"{late} late")
        if record.rejected:
            parts.append(
                "rejected "
                + ", ".join(f"{reason} {n}" for reason, n in sorted(record.rejected.items()))
            )
        if silent:
            parts.append(
                f"no answer from {names(silent)}" + (f" ({len(gone)} gone)" if gone else "")
            )
        shown = {k: v for k, v in record.metrics.items() if k not in ("updates", "examples")}
        if shown:
            parts.append(
                "metrics " + ", ".join(f"{name}={value:.4g}" for name, value in shown.items())
            )
        evaluation = record.evaluation
        if evaluation:
            figures = ", ".join(
                f"{name}={value:.4g}" for name, value in evaluation_metrics(evaluation).items()
            )
            parts.append(
                f"checkpoint {record.round - 1} evaluated on "
                f"{_plural(int(evaluation.get('devices', 0)), 'device')}: {figures}"
            )
        log.info(
            "round %d %s%s (%s) after %.1f s: %s",
            record.round,
            "(evaluate-only) " if record.task == "evaluate" else "",
            record.outcome,
            record.reason,
            duration,
            "; ".join(parts),
            extra=self._fields(record.round),
        )
        self._save_stats(record, silent, gone)

    async def persist(self, what: str, function: Callable[..., object], *args: Any) -> None:
        """Run a state directory write off the loop and measure it (``what``: its label)."""
        started = time.perf_counter()
        await asyncio.to_thread(function, *args)
        self.metrics.persist.labels(what).observe(time.perf_counter() - started)

    @contextlib.contextmanager
    def folding(self) -> Iterator[None]:
        """Measure a fold (``Coordinator.persisted``: fold, ack, maybe close the round)."""
        started = time.perf_counter()
        yield
        self.metrics.fold.observe(time.perf_counter() - started)

    def tick(self) -> None:
        """Log what the round waits for if it changed (or a while passed)."""
        coordinator = self._coordinator
        if coordinator is None:
            return
        self._observe(coordinator)
        now = self._clock()
        r = coordinator.state.round
        if r.phase == "collecting":
            outstanding = r.outstanding()
            self._outstanding = (r.number, outstanding)
            gone = tuple(c for c in outstanding if coordinator.roster.is_gone(c, now))
            waiting = tuple(c for c in outstanding if c not in gone)
            key: tuple[Any, ...] = ("collecting", r.number, len(r.contributions), waiting, gone)
        elif r.phase == "waiting":
            online = tuple(coordinator.roster.online(now))
            key = ("waiting", r.number, online)
        else:
            return
        mono = self._monotonic()
        since = mono - self._wait_logged
        if since < (WAITING_INTERVAL if key != self._wait_key else WAITING_REMINDER):
            return
        self._wait_key, self._wait_logged = key, mono
        if r.phase == "waiting":
            needed = self._agents_needed(coordinator)
            log.info(
                "round %d waits for agents: %d online%s, %d needed to open it",
                r.number,
                len(key[2]),
                f" ({names(key[2])})" if key[2] else "",
                needed,
                extra=self._fields(r.number),
            )
            return
        _, _, received, waiting, gone = key
        line = f"round {r.number}: {received}/{r.target} updates in"
        if waiting:
            line += f", waiting for {_plural(len(waiting), 'agent')}"
        line += f" (deadline in {max(0.0, r.deadline - now):.0f} s)"
        if waiting:
            line += f": {names(waiting)}"
        if gone:
            line += f"; gone, not waited for: {names(gone)}"
        log.info("%s", line, extra=self._fields(r.number))

    # ------------------------------------------------------------------ helpers

    def _fields(
        self, round_id: int | None = None, client: str | None = None, **more: Any
    ) -> dict[str, Any]:
        fields = {"federation": self.federation, "round": round_id, "client": client, **more}
        return {name: value for name, value in fields.items() if value is not None}

    def _log_opening(self, coordinator: Coordinator) -> None:
        r = coordinator.state.round
        in_s = max(0.0, r.deadline - self._clock())
        if r.selected is None:
            who = "open to every agent"
        else:
            who = f"{_plural(len(r.selected), 'agent')} selected ({names(r.selected)})"
        quorum = (
            coordinator.config.sync.min_updates
            if coordinator.config.mode == "sync"
            else coordinator.config.buffer.min_updates
        )
        log.info(
            "round %d open: %s, closes at %s (quorum %d) or in %.0f s",
            r.number,
            who,
            _plural(r.target, "update"),
            quorum,
            in_s,
            extra=self._fields(r.number),
        )
        # The opening line says who is awaited: the next "waiting" line only on change.
        self._wait_key = ("collecting", r.number, 0, tuple(r.outstanding()), ())
        self._wait_logged = self._monotonic()

    @staticmethod
    def _agents_needed(coordinator: Coordinator) -> int:
        config = coordinator.config
        return config.sync.agents_needed if config.mode == "sync" else 1

    def _silent(self, record: RoundRecord, contributors: Sequence[str]) -> list[str]:
        # Selected agents that had not answered when the round ended (the latest view of
        # the round: the coordinator has moved on to the next one by now).
        seen = self._outstanding
        if record.selected is None or seen is None or seen[0] != record.round:
            return []
        done = set(contributors)
        return [c for c in seen[1] if c not in done]

    def _gone(self, clients: Sequence[str]) -> list[str]:
        coordinator = self._coordinator
        if coordinator is None:
            return []
        now = self._clock()
        return [c for c in clients if coordinator.roster.is_gone(c, now)]

    def _save_stats(self, record: RoundRecord, silent: list[str], gone: list[str]) -> None:
        coordinator, store = self._coordinator, self._store
        if coordinator is None or store is None:
            return
        stats: dict[str, Any] = {
            "v": STATS_VERSION,
            "round": record.round,
            "agents_online": len(coordinator.roster.online(self._clock())),
            "no_answer": silent,
            "gone": gone,
        }
        summary = coordinator.report.last_round
        if summary is not None and summary.round == record.round:
            stats["bytes_in"] = summary.bytes_in
            stats["bytes_out"] = summary.bytes_out
        try:
            store.save_round_stats(record.round, stats)
        except OSError as exc:
            log.warning("cannot store the stats of round %d: %s", record.round, exc)

    def _live(self) -> LiveState | None:
        coordinator, session = self._coordinator, self._session
        if coordinator is None or session is None:
            return None
        now = self._clock()
        r = coordinator.state.round
        evaluations = coordinator.state.evaluations
        evaluated = max(evaluations, default=None)
        return LiveState(
            round=r.number,
            phase=r.phase,
            agents_online=len(coordinator.roster.online(now)),
            agents_known=len(coordinator.roster),
            received=len(r.contributions),
            expected=r.target,
            deadline=r.deadline if r.phase == "collecting" else None,
            bytes_received=coordinator.report.total.bytes_in,
            bytes_sent=coordinator.report.total.bytes_out,
            connections=session.connections,
            last_metrics=dict(coordinator.state.last_metrics),
            evaluated_checkpoint=evaluated,
            evaluation=dict(evaluations[evaluated]) if evaluated is not None else {},
        )
