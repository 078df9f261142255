"""Run one simulated federation: broker, aggregator, agents, chaos, report.

::

    broker (Mosquitto or amqtt, a child process)
      ├── aggregator   in this event loop (AggregatorService, state in <out>/aggregator)
      ├── observer     a passive MQTT client counting bytes and acks
      └── agents       on an event loop of their own (a thread), or fedmq-agent subprocesses

With ``--broker mqtt(s)://HOST:PORT`` there is no broker to start: the parts connect
to that one, under a topic root and client ids of their own, and what the run retained
there is cleared once everything has stopped (:mod:`~fedmq.simulate.external`).

Every round, ``--drop-rate`` of the selected agents vanish the moment the round is
announced, before they can answer (:mod:`~fedmq.simulate.chaos` says which): the round
must close without them.  They come back, like rebooted devices, after that round
closes; the next round opens once the whole fleet is online again (``min_agents``).

:meth:`Simulation.run` starts the parts in this order, each through
:mod:`~fedmq.simulate.parts`, which enters the part's stop on one
:class:`contextlib.AsyncExitStack` before starting it (a half-started part is stopped
too)::

    work directory → broker (or the external broker's clean-up) → observer → agents
    → aggregator

Whatever happens — success, an error, Ctrl-C (a cancellation) — the progress view
stops, then the stack stops the parts in reverse order, before :meth:`~Simulation.run`
returns or raises; a stop that fails is logged and hides nothing of why the run ended.
A simulator killed with SIGKILL takes its broker and agent processes along
(``die_with_parent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedmq.aggregator.config import AggregatorSettings
from fedmq.aggregator.export import export_onnx
from fedmq.aggregator.service import AggregatorService
from fedmq.aggregator.store import read_records
from fedmq.broker.process import BrokerProcess
from fedmq.coordinator.records import RoundRecord
from fedmq.errors import FedmqError, SimulationError, StateError, TrainingError
from fedmq.simulate.brokers import BrokerPlan, make_broker, plan_broker
from fedmq.simulate.chaos import choose_victims
from fedmq.simulate.external import Cleanup, check_unused, clean_up, run_name
from fedmq.simulate.fleet import Fleet
from fedmq.simulate.observer import Observer
from fedmq.simulate.options import SimulationOptions
from fedmq.simulate.parts import (
    scratch_dir,
    shared_memory,
    start_aggregator,
    start_broker,
    start_fleet,
    start_observer,
)
from fedmq.simulate.progress import ProgressView, Snapshot
from fedmq.simulate.project import project_workload
from fedmq.simulate.report import build_summary, final_devices, prepare_out_dir, write_report
from fedmq.simulate.rounds import RoundRow, build_row
from fedmq.simulate.settings import (
    aggregator_settings,
    check_environment,
    client_ids,
    make_fleet,
    require_packages,
)
from fedmq.simulate.workloads import Workload, builtin_workload
from fedmq.transport.broker_config import BrokerSection
from fedmq.wire.control import Ack, RoundAnnouncement
from fedmq.wire.topics import Topics

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.1  # seconds between looks at the aggregator (progress, new records)
ONLINE_TIMEOUT = 60.0  # seconds for the fleet's statuses to arrive (subprocess start-up)
ONLINE_TIMEOUT_PER_AGENT = 0.05  # seconds added per in-process agent
ONLINE_TIMEOUT_PER_PROCESS = 1.0  # seconds per subprocess agent: ~1 s of CPU to import
STALL_MARGIN = 60.0  # seconds beyond deadline + extension before a round counts as stuck
REPORTS_DIR = Path("reports")
PLACEHOLDER_URL = "mqtt://127.0.0.1:1883"  # validates settings before the broker exists


@dataclass
class SimulationResult:
    """What a finished simulation produced."""

    out: Path
    rows: list[RoundRow]
    summary: dict[str, Any]
    broker: BrokerPlan
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Running:
    """The parts of a simulation once all of them run: what the monitoring loop watches."""

    workload: Workload
    settings: AggregatorSettings
    fleet: Fleet
    observer: Observer
    service: AggregatorService
    task: asyncio.Task[None]


def default_out(name: str) -> Path:
    """``reports/<name>-<UTC timestamp>``."""
    return REPORTS_DIR / f"{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def _check_fleet(fleet: Fleet) -> None:
    problems = fleet.failures()
    if problems:
        raise SimulationError("an agent failed: " + "; ".join(problems[:3]))


class Simulation:
    """One simulated federation on this machine.

    After :meth:`run` (however it ended) ``broker``, ``observer``, ``fleet`` and
    ``service`` are the parts it started, stopped (None: not started), and ``dropped``
    the agents it made vanish per round.  On an external broker (``options.
    external_broker``) ``broker`` stays None, ``name`` prefixes every client id (and is
    the default topic root), and ``cleanup`` says what was cleared there at the end.

    Args:
        options: what to simulate.
        view: live progress (None: quiet).
        broker: a broker already running to use instead of starting one (tests
            restart it mid-run); it is left running.
        on_round_open: called when a round's announcement is seen, before agents are
            dropped (tests inject faults here).
        on_ack: called for every ack the aggregator sends (tests inject faults here).
        log_level: the aggregator's and agents' log level.
    """

    def __init__(
        self,
        options: SimulationOptions,
        *,
        view: ProgressView | None = None,
        broker: BrokerProcess | None = None,
        on_round_open: Callable[[RoundAnnouncement], None] | None = None,
        on_ack: Callable[[Ack], None] | None = None,
        log_level: str = "INFO",
    ) -> None:
        self.options = options
        self.view = view
        self.log_level = log_level
        self._external_broker = broker
        self._on_round_open = on_round_open
        self._on_ack = on_ack
        self.broker: BrokerProcess | None = None
        self.observer: Observer | None = None
        self.fleet: Fleet | None = None
        self.service: AggregatorService | None = None
        self.dropped: dict[int, list[str]] = {}
        self.name = run_name()  # unique per run: keeps a shared broker's clients apart
        self.cleanup: Cleanup | None = None
        self._rows: list[RoundRow] = []
        self._tests: dict[int, dict[str, float]] = {}
        self._started = time.monotonic()
        self._metric: str | None = None

    # ------------------------------------------------------------------ run

    async def run(self) -> SimulationResult:
        """Run every round and write the report.

        Raises:
            ConfigError: bad options, project or environment (nothing was started).
            BundleError: the model bundle is damaged.
            SimulationError: a part failed or rounds stalled.
            TransportError: the broker could not be started.
        """
        check_environment()
        require_packages(self.options)
        self._started = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            result = await self._run(stack, started_at=time.time())
        return result

    async def _run(self, stack: contextlib.AsyncExitStack, started_at: float) -> SimulationResult:
        """Start every part on ``stack``, run the rounds, write the report."""
        options = self.options
        external = options.external_broker
        work = stack.enter_context(scratch_dir("fedmq-sim-", shared_memory()))
        clients = client_ids(options.agents, f"{self.name}-" if external else "")
        workload = await asyncio.to_thread(self._workload, clients, work / "data")
        out = prepare_out_dir(options.out or default_out(workload.name))
        self._metric = workload.evaluator.primary if workload.evaluator else None
        for note in workload.notes:
            self._say(f"note: {note}", "yellow")
        if external is not None:
            broker = external
            settings = self._settings(workload, out, broker)  # ConfigError before any IO
            plan = await self._use_external(stack, settings, clients)
        else:
            # Validate the aggregator's settings before starting anything (the broker's
            # address is not known yet: any will do for validation).
            self._settings(workload, out, BrokerSection(url=PLACEHOLDER_URL))
            broker, plan = await self._start_broker(stack)
            settings = self._settings(workload, out, broker)
        self._say(
            f"simulating {options.agents} {'subprocess' if options.processes else 'in-process'}"
            f" agents x {settings.rounds} rounds of {workload.name} "
            f"(partition {options.partition}, codec {settings.codec}, "
            f"strategy {settings.strategy.name}); broker: {plan.kind} at "
            f"{broker.url}, {plan.reason}"
        )
        fleet = self.fleet = make_fleet(
            workload,
            options,
            clients,
            broker=broker,
            topic_root=settings.topic_root,
            work=work,
            out=out,
        )
        observer = self.observer = self._observer(broker, settings, out, fleet)
        await start_observer(stack, observer)
        with self._showing():
            # Devices first, as in a plant: the aggregator then finds the whole fleet in
            # the retained statuses and round 1 includes everyone.
            await start_fleet(stack, fleet)
            await self._wait_online(fleet, observer, settings)
            service = self.service = AggregatorService(settings)
            await asyncio.to_thread(service.prepare)
            task = await start_aggregator(stack, service)
            await observer.stop_watching_statuses()
            running = _Running(workload, settings, fleet, observer, service, task)
            await self._monitor(running)
            return await self._finish(running, plan, broker, out, started_at)

    @contextlib.contextmanager
    def _showing(self) -> Iterator[None]:
        """Live progress while the body runs (stopped first, before any part)."""
        if self.view is None:
            yield
            return
        self.view.start()
        try:
            yield
        finally:
            self.view.stop()

    def _say(self, text: str, style: str | None = None) -> None:
        log.info("%s", text)
        if self.view is not None:
            self.view.message(text, style)

    def _workload(self, clients: list[str], data_dir: Path) -> Workload:
        options = self.options
        if options.project is not None:
            return project_workload(options.project, clients, options.partition, options.seed)
        return builtin_workload(options.model, clients, options.partition, options.seed, data_dir)

    def _settings(self, workload: Workload, out: Path, broker: BrokerSection) -> AggregatorSettings:
        external = self.options.external_broker is not None
        topic_root = self.options.topic_root or (self.name if external else None)
        return aggregator_settings(
            workload,
            self.options,
            broker=broker,
            state_dir=out / "aggregator",
            client_id=f"{self.name}-aggregator" if external else None,
            topic_root=topic_root,
            log_level=self.log_level,
        )

    # ------------------------------------------------------------------ starting the parts

    async def _start_broker(
        self, stack: contextlib.AsyncExitStack
    ) -> tuple[BrokerSection, BrokerPlan]:
        if self._external_broker is not None:
            self.broker = self._external_broker
            plan = BrokerPlan(self.broker.name, "given by the caller")
        else:
            plan = plan_broker(self.options.broker)
            self.broker = make_broker(plan, stack.enter_context(scratch_dir("fedmq-sim-broker-")))
            await start_broker(stack, self.broker)
        return BrokerSection(url=self.broker.url, protocol=self.broker.protocol), plan

    async def _use_external(
        self, stack: contextlib.AsyncExitStack, settings: AggregatorSettings, clients: list[str]
    ) -> BrokerPlan:
        """Check the external broker's prefix is free; clean it up when the run ends.

        The clean-up goes on the stack before any part starts, so it runs after all of
        them stopped (their offline statuses are retained by then), however the run ends.

        Raises:
            ConfigError: the prefix holds retained messages already.
            TransportError: the broker is unreachable or refuses us.
        """
        broker = self.options.external_broker
        assert broker is not None
        topics = Topics(settings.federation, settings.topic_root)
        await check_unused(broker, topics, f"{self.name}-clear")
        persistent = [*clients, settings.client_id, f"{self.name}-observer"]
        stack.push_async_callback(self._clean_external, broker, topics, persistent)
        return BrokerPlan(
            "external",
            f"given with --broker; topic root {settings.topic_root}, client ids "
            f"{self.name}-…, cleared at the end",
        )

    async def _clean_external(
        self, broker: BrokerSection, topics: Topics, persistent: list[str]
    ) -> None:
        # A task of its own: after Ctrl-C this one is still "cancelling", and the MQTT
        # session re-raises the cancellation aiomqtt may swallow for any task that is
        # (aiomqtt_fixes.raise_if_cancelling), which would end the clean-up at its first publish.
        self.cleanup = cleanup = await asyncio.create_task(
            clean_up(broker, topics, clear_client=f"{self.name}-clear", session_clients=persistent),
            name="fedmq-sim.clean-up",
        )
        text = cleanup.summary(topics.prefix) + f" on {broker.url}"
        if cleanup.complete:
            self._say(text)
        else:
            log.warning("%s", text)
            if self.view is not None:
                self.view.message(text, "yellow")

    def _observer(
        self, broker: BrokerSection, settings: AggregatorSettings, out: Path, fleet: Fleet
    ) -> Observer:
        keep = out / "updates" if self.options.keep_updates else None
        return Observer(
            broker.session_settings(f"{self.name}-observer"),
            Topics(settings.federation, settings.topic_root),
            on_announcement=functools.partial(self._on_announcement, fleet),
            on_ack=self._on_ack,
            keep_dir=keep,
        )

    async def _wait_online(
        self, fleet: Fleet, observer: Observer, settings: AggregatorSettings
    ) -> None:
        wanted = set(fleet.clients)
        per_agent = (
            ONLINE_TIMEOUT_PER_PROCESS if self.options.processes else ONLINE_TIMEOUT_PER_AGENT
        )
        timeout = ONLINE_TIMEOUT + per_agent * len(wanted)
        deadline = time.monotonic() + timeout
        while not wanted <= observer.online:
            _check_fleet(fleet)
            if time.monotonic() > deadline:
                missing = sorted(wanted - observer.online)
                raise SimulationError(
                    f"{len(missing)} agents (e.g. {missing[0]}) did not come online "
                    f"within {timeout:.0f} s"
                )
            self._show_waiting(settings, observer)
            await asyncio.sleep(POLL_INTERVAL)

    # ------------------------------------------------------------------ chaos

    def _on_announcement(self, fleet: Fleet, announcement: RoundAnnouncement) -> None:
        if announcement.status != "open" or announcement.round in self.dropped:
            return
        self.dropped[announcement.round] = []
        if self._on_round_open is not None:
            self._on_round_open(announcement)
        selected = announcement.selected if announcement.selected is not None else fleet.clients
        victims = choose_victims(
            selected,
            {client for client in selected if fleet.is_alive(client)},
            drop_rate=self.options.drop_rate,
            seed=self.options.seed,
            round_id=announcement.round,
        )
        for client in victims:
            fleet.crash(client)
        self.dropped[announcement.round] = victims
        if victims:
            log.info("round %d: made %s vanish", announcement.round, ", ".join(victims))

    # ------------------------------------------------------------------ monitoring

    async def _monitor(self, running: _Running) -> None:
        task = running.task
        stall = 2 * running.settings.round.deadline_s + STALL_MARGIN
        last_progress = time.monotonic()
        while not task.done():
            _check_fleet(running.fleet)
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

    async def _collect(self, running: _Running) -> bool:
        """Turn newly recorded rounds into rows; True if there were any."""
        settings = running.settings
        known = len(self._rows)
        if running.service.coordinator.checkpoint <= known and not running.task.done():
            return False
        records = [r for r in read_records(settings.state_dir) if r.round > known]
        for record in records:
            row = await self._row(running, record)
            self._rows.append(row)
            if self.view is not None:
                self.view.round_closed(row, settings.rounds, self._metric, self._elapsed())
            if record.round < settings.rounds:
                for client in self.dropped.get(record.round, []):
                    await running.fleet.revive(client)
        return bool(records)

    async def _row(self, running: _Running, record: RoundRecord) -> RoundRow:
        test: dict[str, float] = {}
        evaluator = running.workload.evaluator
        if evaluator is not None:
            try:
                test = await asyncio.to_thread(
                    evaluator.evaluate_checkpoint, running.settings.state_dir, record.round
                )
            except (StateError, TrainingError) as exc:
                log.warning("round %d: central evaluation failed: %s", record.round, exc)
        self._tests[record.round] = test
        dropped = len(self.dropped.get(record.round, []))
        return build_row(record, test, running.observer, dropped)

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

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

    def _show(self, running: _Running) -> None:
        if self.view is None:
            return
        coordinator = running.service.coordinator
        now = time.time()
        status = coordinator.status(now)
        last = self._rows[-1] if self._rows else None
        value = getattr(last, self._metric) if last is not None and self._metric else None
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
                metric=self._metric,
                value=value,
            )
        )

    # ------------------------------------------------------------------ the end

    async def _finish(
        self,
        running: _Running,
        plan: BrokerPlan,
        broker: BrokerSection,
        out: Path,
        started_at: float,
    ) -> SimulationResult:
        await running.fleet.stop()
        workload, settings, rows = running.workload, running.settings, self._rows
        initial: dict[str, float] = {}
        if workload.evaluator is not None:
            initial = await asyncio.to_thread(
                workload.evaluator.evaluate_checkpoint, settings.state_dir, 0
            )
        await asyncio.to_thread(
            export_onnx, settings.state_dir, settings.bundle, out / "model.onnx"
        )
        summary = build_summary(
            options=self.options,
            workload=workload,
            settings=settings,
            plan=plan,
            broker_url=broker.url,
            rows=rows,
            initial=initial,
            final=self._tests.get(rows[-1].round, {}) if rows else {},
            dropped=self.dropped,
            started_at=started_at,
            ended_at=time.time(),
            devices=final_devices(list(read_records(settings.state_dir))),
        )
        await asyncio.to_thread(write_report, out, rows, summary)
        return SimulationResult(out, rows, summary, plan, list(workload.notes))
