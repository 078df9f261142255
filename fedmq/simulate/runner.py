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
(``die_with_parent``).  While the parts run, :mod:`~fedmq.simulate.watch` follows the
rounds and shows the progress.
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
from fedmq.simulate.brokers import BrokerPlan, make_broker, plan_broker
from fedmq.simulate.chaos import choose_victims
from fedmq.simulate.external import Cleanup, run_name, use_external
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
from fedmq.simulate.progress import ProgressView
from fedmq.simulate.project import project_workload
from fedmq.simulate.report import build_summary, final_devices, prepare_out_dir, write_report
from fedmq.simulate.rounds import RoundRow
from fedmq.simulate.settings import (
    aggregator_settings,
    check_environment,
    client_ids,
    make_fleet,
    require_packages,
)
from fedmq.simulate.watch import RoundWatch, Running
from fedmq.simulate.workloads import Workload, builtin_workload
from fedmq.transport.broker_config import BrokerSection
from fedmq.wire.control import Ack, RoundAnnouncement
from fedmq.wire.topics import Topics

log = logging.getLogger(__name__)

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


def default_out(name: str) -> Path:
    """``reports/<name>-<UTC timestamp>``."""
    return REPORTS_DIR / f"{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


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
        self._started = time.monotonic()

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
        metric = workload.evaluator.primary if workload.evaluator else None
        watch = RoundWatch(options, self.view, self.dropped, metric, self._started)
        for note in workload.notes:
            self._say(f"note: {note}", "yellow")
        if external is not None:
            broker = external
            settings = self._settings(workload, out, broker)  # ConfigError before any IO
            plan = await use_external(
                stack,
                broker,
                Topics(settings.federation, settings.topic_root),
                name=self.name,
                session_clients=[*clients, settings.client_id, self._observer_id],
                on_cleaned=self._cleaned,
            )
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
            await watch.wait_online(fleet, observer, settings)
            service = self.service = AggregatorService(settings)
            await asyncio.to_thread(service.prepare)
            task = await start_aggregator(stack, service)
            await observer.stop_watching_statuses()
            running = Running(workload, settings, fleet, observer, service, task)
            await watch.follow(running)
            return await self._finish(running, watch, plan, broker, out, started_at)

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

    def _say(self, text: str, style: str | None = None, *, level: int = logging.INFO) -> None:
        log.log(level, "%s", text)
        if self.view is not None:
            self.view.message(text, style)

    @property
    def _observer_id(self) -> str:
        return f"{self.name}-observer"

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

    def _cleaned(self, cleanup: Cleanup, text: str) -> None:
        """What :func:`~fedmq.simulate.external.use_external` cleared, once it has."""
        self.cleanup = cleanup
        if cleanup.complete:
            self._say(text)
        else:
            self._say(text, "yellow", level=logging.WARNING)

    def _observer(
        self, broker: BrokerSection, settings: AggregatorSettings, out: Path, fleet: Fleet
    ) -> Observer:
        keep = out / "updates" if self.options.keep_updates else None
        return Observer(
            broker.session_settings(self._observer_id),
            Topics(settings.federation, settings.topic_root),
            on_announcement=functools.partial(self._on_announcement, fleet),
            on_ack=self._on_ack,
            keep_dir=keep,
        )

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

    # ------------------------------------------------------------------ the end

    async def _finish(
        self,
        running: Running,
        watch: RoundWatch,
        plan: BrokerPlan,
        broker: BrokerSection,
        out: Path,
        started_at: float,
    ) -> SimulationResult:
        await running.fleet.stop()
        workload, settings, rows = running.workload, running.settings, watch.rows
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
            final=watch.tests.get(rows[-1].round, {}) if rows else {},
            dropped=self.dropped,
            started_at=started_at,
            ended_at=time.time(),
            devices=final_devices(list(read_records(settings.state_dir))),
        )
        await asyncio.to_thread(write_report, out, rows, summary)
        return SimulationResult(out, rows, summary, plan, list(workload.notes))
