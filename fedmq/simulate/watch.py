"""Watching a simulation while it runs: the fleet coming online, then its rounds.

Every :data:`POLL_INTERVAL` :class:`RoundWatch` looks at the fleet (an agent that
failed ends the run), at the aggregator's new round records (each becomes a
:class:`~fedmq.simulate.rounds.RoundRow`, with the central evaluation of its checkpoint,
and the agents chaos dropped in that round come back) and at the round in progress (the
live progress; a round that has not moved for twice its deadline plus
:data:`STALL_MARGIN` ends the run).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fedmq.aggregator.config import AggregatorSettings
from fedmq.aggregator.service import AggregatorService
from fedmq.aggregator.store import read_records
from fedmq.coordinator.records import RoundRecord
from fedmq.errors import FedmqError, SimulationError, StateError, TrainingError
from fedmq.simulate.fleet import Fleet
from fedmq.simulate.observer import Observer
from fedmq.simulate.options import SimulationOptions
from fedmq.simulate.progress import ProgressView, Snapshot
from fedmq.simulate.rounds import RoundRow, build_row
from fedmq.simulate.workloads import Workload

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.1  # seconds between looks at the aggregator (progress, new records)
ONLINE_TIMEOUT = 60.0  # seconds for the fleet's statuses to arrive (subprocess start-up)
ONLINE_TIMEOUT_PER_AGENT = 0.05  # seconds added per in-process agent
ONLINE_TIMEOUT_PER_PROCESS = 1.0  # seconds per subprocess agent: ~1 s of CPU to import
STALL_MARGIN = 60.0  # seconds beyond deadline + extension before a round counts as stuck


@dataclass(frozen=True)
class Running:
    """The parts of a simulation once all of them run: what :meth:`RoundWatch.follow` watches."""

    workload: Workload
    settings: AggregatorSettings
    fleet: Fleet
    observer: Observer
    service: AggregatorService
    task: asyncio.Task[None]


def check_fleet(fleet: Fleet) -> None:
    """Raise if an agent failed (a crashed subprocess, an agent task that raised).

    Raises:
        SimulationError: the first few failures.
    """
    problems = fleet.failures()
    if problems:
        raise SimulationError("an agent failed: " + "; ".join(problems[:3]))


@dataclass
class RoundWatch:
    """The rounds of one simulation as they close, and the live progress meanwhile.

    Attributes:
        options: what is simulated.
        view: live progress (None: quiet).
        dropped: the agents made to vanish per round; the simulation's chaos fills it
            when a round opens (shared, not copied), the watch revives them once the
            round is recorded.
        metric: the workload's primary test metric (None: no central evaluation).
        started: :func:`time.monotonic` when the run started (the elapsed time shown).
        rows: one per recorded round, in order.
        tests: the central evaluation of each round's checkpoint (empty: none, or it
            failed).
    """

    options: SimulationOptions
    view: ProgressView | None
    dropped: dict[int, list[str]]
    metric: str | None
    started: float
    rows: list[RoundRow] = field(default_factory=list)
    tests: dict[int, dict[str, float]] = field(default_factory=dict)

    async def wait_online(
        self, fleet: Fleet, observer: Observer, settings: AggregatorSettings
    ) -> None:
        """Return once the observer saw every agent's online status.

        Raises:
            SimulationError: an agent failed, or some did not come online in time.
        """
        wanted = set(fleet.clients)
        per_agent = (
            ONLINE_TIMEOUT_PER_PROCESS if self.options.processes else ONLINE_TIMEOUT_PER_AGENT
        )
        timeout = ONLINE_TIMEOUT + per_agent * len(wanted)
        deadline = time.monotonic() + timeout
        while not wanted <= observer.online:
            check_fleet(fleet)
            if time.monotonic() > deadline:
                missing = sorted(wanted - observer.online)
                raise SimulationError(
                    f"{len(missing)} agents (e.g. {missing[0]}) did not come online "
                    f"within {timeout:.0f} s"
                )
            self._show_waiting(settings, observer)
            await asyncio.sleep(POLL_INTERVAL)

    async def follow(self, running: Running) -> None:
        """Collect the rounds until the aggregator's task ends, then the last of them.

        Raises:
            SimulationError: an agent or the aggregator failed, or rounds stalled.
        """
        task = running.task
        stall = 2 * running.settings.round.deadline_s + STALL_MARGIN
        last_progress = time.monotonic()
        while not task.done():
            check_fleet(running.fleet)
            if await self._collect(running):
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > stall:
                raise SimulationError(self._stall_message(running.service, stall))
            self._show(running)
            await asyncio.sleep(POLL_INTERVAL)
        try:
            task.result()
        except (FedmqError, OSError) as exc:
            raise SimulationError(f"the aggregator failed: {exc}") from exc
        await self._collect(running)

    def _stall_message(self, service: AggregatorService, stall: float) -> str:
        coordinator = service.coordinator
        now = time.time()
        status = coordinator.status(now)
        online = len(coordinator.roster.online(now))
        if status.state == "waiting":
            return (
                f"round {status.round} did not open within {stall:.0f} s: "
                f"{online}/{self.options.agents} agents online"
            )
        return (
            f"round {status.round} did not close within {stall:.0f} s "
            f"({status.received}/{status.expected} updates)"
        )

    async def _collect(self, running: Running) -> bool:
        """Turn newly recorded rounds into rows; True if there were any."""
        settings = running.settings
        known = len(self.rows)
        if running.service.coordinator.checkpoint <= known and not running.task.done():
            return False
        records = [r for r in read_records(settings.state_dir) if r.round > known]
        for record in records:
            row = await self._row(running, record)
            self.rows.append(row)
            if self.view is not None:
                self.view.round_closed(row, settings.rounds, self.metric, self._elapsed())
            if record.round < settings.rounds:
                for client in self.dropped.get(record.round, []):
                    await running.fleet.revive(client)
        return bool(records)

    async def _row(self, running: Running, record: RoundRecord) -> RoundRow:
        test: dict[str, float] = {}
        evaluator = running.workload.evaluator
        if evaluator is not None:
            try:
                test = await asyncio.to_thread(
                    evaluator.evaluate_checkpoint, running.settings.state_dir, record.round
                )
            except (StateError, TrainingError) as exc:
                log.warning("round %d: central evaluation failed: %s", record.round, exc)
        self.tests[record.round] = test
        dropped = len(self.dropped.get(record.round, []))
        return build_row(record, test, running.observer, dropped)

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _show_waiting(self, settings: AggregatorSettings, observer: Observer) -> None:
        """Progress before the aggregator runs: devices coming online."""
        if self.view is None:
            return
        self.view.update(
            Snapshot(
                round=0,
                rounds=settings.rounds,
                state="waiting",
                received=0,
                expected=0,
                online=len(observer.online),
                agents=self.options.agents,
                elapsed_s=self._elapsed(),
                metric=None,
                value=None,
            )
        )

    def _show(self, running: Running) -> None:
        if self.view is None:
            return
        coordinator = running.service.coordinator
        now = time.time()
        status = coordinator.status(now)
        last = self.rows[-1] if self.rows else None
        value = getattr(last, self.metric) if last is not None and self.metric else None
        self.view.update(
            Snapshot(
                round=status.round or 0,
                rounds=running.settings.rounds,
                state=status.state,
                received=status.received,
                expected=status.expected,
                online=len(coordinator.roster.online(now)),
                agents=self.options.agents,
                elapsed_s=self._elapsed(),
                metric=self.metric,
                value=value,
            )
        )
