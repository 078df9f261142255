"""Run one simulated federation: broker, aggregator, agents, chaos, report.

::

    broker (Mosquitto or amqtt, a child process)
      ├── aggregator   in this event loop (AggregatorService, state in <out>/aggregator)
      ├── observer     a passive MQTT client counting bytes and acks
      └── agents       in this event loop, or fedmq-agent subprocesses

Every round, ``--drop-rate`` of the selected agents vanish the moment the round is
announced (before they can answer): the round must close without them.  They come
back, like rebooted devices, after that round closes; the next round opens once the
whole fleet is online again (``min_agents``).

Whatever happens — success, an error, Ctrl-C — everything this class started is
stopped before :meth:`Simulation.run` returns or raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fedmq
from fedmq.aggregator.config import AggregatorSettings
from fedmq.aggregator.export import export_onnx
from fedmq.aggregator.service import AggregatorService
from fedmq.aggregator.store import read_records
from fedmq.broker.process import BrokerProcess
from fedmq.coordinator.records import RoundRecord
from fedmq.errors import ConfigError, FedmqError, SimulationError, StateError, TrainingError
from fedmq.simulate.brokers import BrokerPlan, make_broker, plan_broker
from fedmq.simulate.fleet import Fleet, InProcessFleet, ProcessFleet
from fedmq.simulate.observer import Observer
from fedmq.simulate.options import SimulationOptions
from fedmq.simulate.progress import ProgressView, Snapshot
from fedmq.simulate.project import project_workload
from fedmq.simulate.report import prepare_out_dir, write_report
from fedmq.simulate.rounds import RoundRow, build_row
from fedmq.simulate.settings import (
    agent_document,
    agent_settings,
    aggregator_settings,
    check_environment,
    client_ids,
)
from fedmq.simulate.toml_text import dumps
from fedmq.simulate.workloads import Workload, builtin_workload
from fedmq.transport.mqtt import BrokerSettings
from fedmq.wire.control import Ack, RoundAnnouncement
from fedmq.wire.topics import Topics

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.1  # seconds between looks at the aggregator (progress, new records)
START_TIMEOUT = 60.0  # seconds for the aggregator to connect and start
ONLINE_TIMEOUT = 60.0  # seconds for the fleet's statuses to arrive (subprocess start-up)
ONLINE_TIMEOUT_PER_AGENT = 0.05  # seconds added per in-process agent
ONLINE_TIMEOUT_PER_PROCESS = 1.0  # seconds per subprocess agent: ~1 s of CPU to import
STALL_MARGIN = 60.0  # seconds beyond deadline + extension before a round counts as stuck
STOP_TIMEOUT = 20.0  # seconds for the aggregator to stop at cleanup
REPORTS_DIR = Path("reports")
SHARED_MEMORY = "/dev/shm"  # tmpfs on Linux
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


def work_dir() -> Path:
    """A fresh directory for the agents' data and state directories.

    On tmpfs (``/dev/shm``) when there is one: every simulated device still writes its
    outbox and state durably (write, fsync, rename) exactly as on a device, but here a
    thousand devices share one disk, where their fsyncs would queue behind each other
    (profiled: a third of a 1000-agent round's CPU samples were in the agents' commits).
    """
    shm = Path(SHARED_MEMORY)
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="fedmq-sim-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="fedmq-sim-"))


def require_packages(options: SimulationOptions) -> None:
    """Fail before starting anything when a package the run will need is missing.

    Raises:
        ConfigError: naming the package and the extra that installs it.
    """
    needed = ["matplotlib"]  # the report's plot
    if options.project is None and options.model.startswith("digits"):
        needed.append("sklearn")  # the bundled digits
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"fedmq simulate needs {', '.join(missing)}: pip install 'fedmq[simulate]'"
        )


def _version() -> str:
    return fedmq.__version__


class Simulation:
    """One simulated federation on this machine.

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
        self.service: AggregatorService | None = None
        self.fleet: Fleet | None = None
        self.observer: Observer | None = None
        self.dropped: dict[int, list[str]] = {}
        self._service_task: asyncio.Task[None] | None = None
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
        options = self.options
        check_environment()
        require_packages(options)
        self._started = time.monotonic()
        started_at = time.time()
        work = work_dir()
        try:
            clients = client_ids(options.agents)
            workload = await asyncio.to_thread(self._workload, clients, work / "data")
            out = prepare_out_dir(options.out or default_out(workload.name))
            self._metric = workload.evaluator.primary if workload.evaluator else None
            for note in workload.notes:
                self._say(f"note: {note}", "yellow")
            # Validate the aggregator's settings before starting anything (the broker's
            # address is not known yet: any will do for validation).
            self._settings(workload, out, PLACEHOLDER_URL, "5")
            plan = await self._start_broker(out)
            broker = self._broker()
            settings = self._settings(workload, out, broker.url, broker.protocol)
            self._say(
                f"simulating {options.agents} {'subprocess' if options.processes else 'in-process'}"
                f" agents x {settings.rounds} rounds of {workload.name} "
                f"(partition {options.partition}, codec {settings.codec}, "
                f"strategy {settings.strategy.name}); broker: {plan.kind} at "
                f"{broker.url}, {plan.reason}"
            )
            await self._start_observer(settings, out)
            self.fleet = self._make_fleet(workload, settings, clients, work, out)
            if self.view is not None:
                self.view.start()
            # Devices first, as in a plant: the aggregator then finds the whole fleet in
            # the retained statuses and round 1 includes everyone.
            await self.fleet.start()
            await self._wait_online(settings)
            await self._start_aggregator(settings)
            assert self.observer is not None
            await self.observer.stop_watching_statuses()
            await self._monitor(workload, settings)
            return await self._finish(workload, settings, plan, out, started_at)
        finally:
            if self.view is not None:
                self.view.stop()
            await self._cleanup()
            shutil.rmtree(work, ignore_errors=True)

    def _say(self, text: str, style: str | None = None) -> None:
        log.info("%s", text)
        if self.view is not None:
            self.view.message(text, style)

    def _workload(self, clients: list[str], data_dir: Path) -> Workload:
        options = self.options
        if options.project is not None:
            return project_workload(options.project, clients, options.partition, options.seed)
        return builtin_workload(options.model, clients, options.partition, options.seed, data_dir)

    def _broker(self) -> BrokerProcess:
        if self.broker is None:
            raise SimulationError("the broker is not running")
        return self.broker

    async def _start_broker(self, out: Path) -> BrokerPlan:
        if self._external_broker is not None:
            self.broker = self._external_broker
            return BrokerPlan(self.broker.name, "given by the caller")
        plan = plan_broker(self.options.broker)
        broker = make_broker(plan, Path(tempfile.mkdtemp(prefix="fedmq-sim-broker-")))
        self.broker = broker  # set first: cleanup stops a half-started broker too
        await asyncio.to_thread(broker.start)
        return plan

    def _settings(
        self, workload: Workload, out: Path, url: str, protocol: str
    ) -> AggregatorSettings:
        return aggregator_settings(
            workload,
            self.options,
            broker_url=url,
            protocol=protocol,
            state_dir=out / "aggregator",
            log_level=self.log_level,
        )

    async def _start_aggregator(self, settings: AggregatorSettings) -> None:
        service = AggregatorService(settings)
        await asyncio.to_thread(service.prepare)
        self.service = service
        self._service_task = asyncio.create_task(service.run(), name="fedmq-sim.aggregator")
        started = asyncio.create_task(service.wait_started())
        done, _ = await asyncio.wait(
            {started, self._service_task},
            timeout=START_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if started not in done:
            started.cancel()
            if self._service_task in done:
                self._service_task.result()  # raises what stopped it
            raise SimulationError(f"the aggregator did not start within {START_TIMEOUT:g} s")

    async def _start_observer(self, settings: AggregatorSettings, out: Path) -> None:
        broker = self._broker()
        keep = out / "updates" if self.options.keep_updates else None
        observer = Observer(
            BrokerSettings(url=broker.url, client_id="observer", protocol=broker.protocol),
            Topics(settings.federation, settings.topic_root),
            on_announcement=self._on_announcement,
            on_ack=self._on_ack,
            keep_dir=keep,
        )
        self.observer = observer
        await observer.start()

    def _make_fleet(
        self,
        workload: Workload,
        settings: AggregatorSettings,
        clients: list[str],
        work: Path,
        out: Path,
    ) -> Fleet:
        broker = self._broker()
        agent_level = "INFO" if len(clients) <= 20 else "WARNING"  # 1000 agents log a lot
        common: dict[str, Any] = {
            "broker_url": broker.url,
            "protocol": broker.protocol,
            "topic_root": settings.topic_root,
            "log_level": agent_level,
        }
        # Validate every agent's configuration with the agent's own loader first.
        settings_list = [
            agent_settings(
                workload,
                self.options,
                index=index,
                client=client,
                state_dir=work / "agents" / client,
                **common,
            )
            for index, client in enumerate(clients)
        ]
        if not self.options.processes:
            return InProcessFleet(settings_list)
        configs: dict[str, Path] = {}
        config_dir = out / "agents"  # beside each agent's log: how it was started
        config_dir.mkdir(parents=True, exist_ok=True)
        for index, client in enumerate(clients):
            document = agent_document(
                workload,
                self.options,
                index=index,
                client=client,
                state_dir=work / "agents" / client,
                **common,
            )
            path = config_dir / f"{client}.toml"
            path.write_text(dumps(document), encoding="utf-8")
            configs[client] = path
        return ProcessFleet(configs, out / "agents")

    async def _wait_online(self, settings: AggregatorSettings) -> None:
        fleet, observer = self.fleet, self.observer
        assert fleet is not None
        assert observer is not None
        wanted = set(fleet.clients)
        per_agent = (
            ONLINE_TIMEOUT_PER_PROCESS if self.options.processes else ONLINE_TIMEOUT_PER_AGENT
        )
        timeout = ONLINE_TIMEOUT + per_agent * len(wanted)
        deadline = time.monotonic() + timeout
        while not wanted <= observer.online:
            problems = fleet.failures()
            if problems:
                raise SimulationError("an agent failed: " + "; ".join(problems[:3]))
            if time.monotonic() > deadline:
                missing = sorted(wanted - observer.online)
                raise SimulationError(
                    f"{len(missing)} agents (e.g. {missing[0]}) did not come online "
                    f"within {timeout:.0f} s"
                )
            self._show(settings)
            await asyncio.sleep(POLL_INTERVAL)

    # ------------------------------------------------------------------ chaos

    def _on_announcement(self, announcement: RoundAnnouncement) -> None:
        if announcement.status != "open" or announcement.round in self.dropped:
            return
        self.dropped[announcement.round] = []
        if self._on_round_open is not None:
            self._on_round_open(announcement)
        fleet = self.fleet
        if fleet is None:
            return
        selected = announcement.selected if announcement.selected is not None else fleet.clients
        alive = [client for client in selected if fleet.is_alive(client)]
        count = min(self.options.victims(len(selected)), len(alive) - 1)
        if count <= 0:
            return
        rng = random.Random(f"{self.options.seed}/{announcement.round}")
        victims = sorted(rng.sample(alive, count))
        for client in victims:
            fleet.crash(client)
        self.dropped[announcement.round] = victims
        log.info("round %d: made %s vanish", announcement.round, ", ".join(victims))

    # ------------------------------------------------------------------ monitoring

    def _service(self) -> AggregatorService:
        if self.service is None:
            raise SimulationError("the aggregator is not running")
        return self.service

    async def _monitor(self, workload: Workload, settings: AggregatorSettings) -> None:
        task = self._service_task
        assert task is not None
        assert self.fleet is not None
        stall = 2 * settings.round.deadline_s + STALL_MARGIN
        last_progress = time.monotonic()
        while not task.done():
            problems = self.fleet.failures()
            if problems:
                raise SimulationError("an agent failed: " + "; ".join(problems[:3]))
            if await self._collect(workload, settings):
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > stall:
                raise SimulationError(self._stall_message(settings, stall))
            self._show(settings)
            await asyncio.sleep(POLL_INTERVAL)
        try:
            task.result()
        except (FedmqError, OSError) as exc:
            raise SimulationError(f"the aggregator failed: {exc}") from exc
        await self._collect(workload, settings)

    def _stall_message(self, settings: AggregatorSettings, stall: float) -> str:
        coordinator = self._service().coordinator
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

    async def _collect(self, workload: Workload, settings: AggregatorSettings) -> bool:
        """Turn newly recorded rounds into rows; True if there were any."""
        service = self._service()
        known = len(self._rows)
        if service.coordinator.checkpoint <= known and not self._service_task_done():
            return False
        records = [r for r in read_records(settings.state_dir) if r.round > known]
        for record in records:
            row = await self._row(workload, settings, record)
            self._rows.append(row)
            if self.view is not None:
                self.view.round_closed(row, settings.rounds, self._metric, self._elapsed())
            if record.round < settings.rounds:
                for client in self.dropped.get(record.round, []):
                    assert self.fleet is not None
                    await self.fleet.revive(client)
        return bool(records)

    def _service_task_done(self) -> bool:
        return self._service_task is not None and self._service_task.done()

    async def _row(
        self, workload: Workload, settings: AggregatorSettings, record: RoundRecord
    ) -> RoundRow:
        test: dict[str, float] = {}
        evaluator = workload.evaluator
        if evaluator is not None:
            try:
                test = await asyncio.to_thread(
                    evaluator.evaluate_checkpoint, settings.state_dir, record.round
                )
            except (StateError, TrainingError) as exc:
                log.warning("round %d: central evaluation failed: %s", record.round, exc)
        self._tests[record.round] = test
        assert self.observer is not None
        return build_row(record, test, self.observer, len(self.dropped.get(record.round, [])))

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    def _show(self, settings: AggregatorSettings) -> None:
        if self.view is None:
            return
        if self.service is None:
            online = len(self.observer.online) if self.observer is not None else 0
            self.view.update(
                Snapshot(
                    0,
                    settings.rounds,
                    "waiting",
                    0,
                    0,
                    online,
                    self.options.agents,
                    self._elapsed(),
                    None,
                    None,
                )
            )
            return
        coordinator = self.service.coordinator
        now = time.time()
        status = coordinator.status(now)
        last = self._rows[-1] if self._rows else None
        value = getattr(last, self._metric) if last is not None and self._metric else None
        self.view.update(
            Snapshot(
                round=status.round or 0,
                rounds=settings.rounds,
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
        workload: Workload,
        settings: AggregatorSettings,
        plan: BrokerPlan,
        out: Path,
        started_at: float,
    ) -> SimulationResult:
        if self.fleet is not None:
            await self.fleet.stop()
        rows = self._rows
        initial: dict[str, float] = {}
        if workload.evaluator is not None:
            initial = await asyncio.to_thread(
                workload.evaluator.evaluate_checkpoint, settings.state_dir, 0
            )
        await asyncio.to_thread(
            export_onnx, settings.state_dir, settings.bundle, out / "model.onnx"
        )
        summary = self._summary(workload, settings, plan, rows, initial, started_at)
        await asyncio.to_thread(write_report, out, rows, summary)
        return SimulationResult(out, rows, summary, plan, list(workload.notes))

    def _summary(
        self,
        workload: Workload,
        settings: AggregatorSettings,
        plan: BrokerPlan,
        rows: list[RoundRow],
        initial: dict[str, float],
        started_at: float,
    ) -> dict[str, Any]:
        options = self.options
        final = self._tests.get(rows[-1].round, {}) if rows else {}
        broker = self._broker()
        return {
            "fedmq_version": _version(),
            "title": f"{workload.name}: {options.agents} agents, partition {options.partition}",
            "run": {
                "workload": workload.name,
                "project": str(options.project) if options.project else None,
                "federation": settings.federation,
                "agents": options.agents,
                "processes": options.processes,
                "rounds": settings.rounds,
                "partition": str(options.partition),
                "codec": settings.codec,
                "strategy": settings.strategy.name,
                "drop_rate": options.drop_rate,
                "seed": options.seed,
                "deadline_s": settings.round.deadline_s,
                "training": settings.training.model_dump(),
            },
            "broker": {"kind": plan.kind, "reason": plan.reason, "url": broker.url},
            "started_at": started_at,
            "wall_time_s": time.time() - started_at,
            "rounds_closed": sum(1 for row in rows if row.outcome == "closed"),
            "rounds_failed": sum(1 for row in rows if row.outcome != "closed"),
            "initial": initial,
            "final": final,
            "bytes": {
                "up": sum(row.bytes_up for row in rows),
                "down": sum(row.bytes_down for row in rows),
                "per_round": [
                    {"round": row.round, "up": row.bytes_up, "down": row.bytes_down} for row in rows
                ],
            },
            "dropped": {str(k): v for k, v in sorted(self.dropped.items()) if v},
            "notes": workload.notes,
        }

    async def _cleanup(self) -> None:
        """Stop everything this simulation started, in reverse order; never raises."""
        if self.fleet is not None:
            with contextlib.suppress(Exception):
                await self.fleet.stop()
        task = self._service_task
        if self.service is not None and task is not None and not task.done():
            self.service.request_stop()
            await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        if self.observer is not None:
            with contextlib.suppress(Exception):
                await self.observer.stop()
        if self.broker is not None and self._external_broker is None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.broker.close)
            shutil.rmtree(self.broker.state_dir, ignore_errors=True)
