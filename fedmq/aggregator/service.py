"""``fedmq serve``: the thin asyncio shell around the pure coordinator.

The service owns the IO the coordinator asks for and nothing else::

    MQTT message --> coordinator (under one lock) --> commands and events
        SaveState/SaveCheckpoint/SaveRecord/PruneUpdates  written before the lock is released
        Publish/PublishBlob/ClearBlob                     queued, sent in order (outbound)
        VerifyUpdate                                      decoded in a worker thread
        PersistUpdate                                     batched, fsync'd, then reported back
        ArmTimer                                          re-arms the timer task
        StatusChanged                                     status published
        RoundClosed/UpdateRejected/Noted/…                counted, logged, measured (reporting)

At start the coordinator comes from the state directory (:mod:`~fedmq.aggregator.recovery`).
Every task reaches the coordinator through one :class:`~fedmq.aggregator.feed.Feed`;
the session is set up by :mod:`~fedmq.aggregator.broker_session`, the background loops
are in :mod:`~fedmq.aggregator.loops` and model builds in
:mod:`~fedmq.aggregator.model_builder`.

Durable actions run while the lock is held, so the disk never lags behind a later
decision; network actions are queued, so a broker outage never blocks the state
machine (the session reconnects and everything retained is published again).

One shutdown path: SIGTERM/SIGINT (or the federation finishing) set one event; the
service stops taking updates, finishes storing and acking those in flight (bounded by
``shutdown_grace_s``), publishes its offline status and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from fedmq.aggregator.broker_session import broker_chunk_size, open_session
from fedmq.aggregator.config import AggregatorSettings
from fedmq.aggregator.devices import DeviceRegistry
from fedmq.aggregator.feed import Feed, InFlight
from fedmq.aggregator.loops import WakeupTimer, commit_loop, registry_loop, status_loop
from fedmq.aggregator.model_builder import ModelBuilder
from fedmq.aggregator.outbound import Outbound
from fedmq.aggregator.recovery import load_coordinator
from fedmq.aggregator.reporting import Reporter
from fedmq.aggregator.statistics import AggregatorStatistics
from fedmq.aggregator.store import StateStore
from fedmq.aggregator.supervision import notify_systemd
from fedmq.aggregator.warm_start import InitialModel
from fedmq.bundle import Bundle
from fedmq.coordinator.actions import (
    Action,
    ArmTimer,
    BuildInferenceModel,
    ClearBlob,
    FederationFinished,
    Noted,
    PersistUpdate,
    PruneUpdates,
    Publish,
    PublishBlob,
    RoundClosed,
    SaveCheckpoint,
    SaveRecord,
    SaveState,
    StatusChanged,
    Ticket,
    UpdateRejected,
    VerifyUpdate,
)
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.validation import UpdateSchema, verify_assembled
from fedmq.errors import ConfigError, DecodeError, InvalidTopicError, StateError, TransportError
from fedmq.strategies.config import build_strategy
from fedmq.systemd import Notifier
from fedmq.timeouts import within
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.archive import pack_files
from fedmq.wire.control import AgentStatus, decode_control, encode_control
from fedmq.wire.topics import BlobChunkTopic, StatusTopic, UpdateChunkTopic

log = logging.getLogger(__name__)

VERIFY_WORKERS = 2  # concurrent update decodes: numpy/zstd release the GIL, 2 cores typical
OFFLINE_PUBLISH_TIMEOUT = 5.0  # seconds: the last status on shutdown is best effort


class AggregatorService:
    """One federation's aggregator: coordinator + state directory + MQTT session.

    Args:
        settings: the validated configuration.
        clock: unix-time source (tests may pass a shifted clock).
    """

    def __init__(
        self, settings: AggregatorSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._reporter = Reporter(settings, clock=clock)  # counters, logs, metrics
        self._fatal: ConfigError | None = None  # a setting the broker cannot honour
        self.finished = False
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._accepting = True
        self._broken: BaseException | None = None
        self._timer = WakeupTimer()
        self._status_event = asyncio.Event()
        self._outbound: Outbound | None = None
        self._commits: asyncio.Queue[Ticket] = asyncio.Queue()
        self._work = InFlight()  # what a shutdown waits for
        self._verify_slots = asyncio.Semaphore(VERIFY_WORKERS)
        # Every coordinator input goes through this, under one lock; it reads self.clock
        # at each call, as the service itself does.
        now = lambda: self.clock()  # noqa: E731, PLW0108
        self._feed = Feed(lambda: self.coordinator, now, self._apply)
        self._lock = self._feed.lock
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loose: set[asyncio.Task[Any]] = set()
        self._group: asyncio.TaskGroup | None = None
        self._store: StateStore | None = None
        self._coordinator: Coordinator | None = None
        self._session: MqttSession | None = None
        self._replayed: list[Action] = []
        self._models = ModelBuilder(settings.state_dir, self._feed, self._work)  # for devices

    # ------------------------------------------------------------------ accessors

    @property
    def coordinator(self) -> Coordinator:
        """The state machine (available once :meth:`run` has prepared it)."""
        if self._coordinator is None:
            raise StateError("the service has not loaded its state yet")
        return self._coordinator

    @property
    def metrics_port(self) -> int | None:
        """The port Prometheus metrics are served on (None: ``metrics_port`` unset)."""
        return self._reporter.metrics_port

    @property
    def store(self) -> StateStore:
        """The state directory."""
        if self._store is None:
            raise StateError("the service has not opened its state directory yet")
        return self._store

    def statistics(self) -> AggregatorStatistics:
        """A frozen snapshot of the service's counters."""
        connections = self._session.connections if self._session is not None else 0
        return AggregatorStatistics.collect(
            self._coordinator, self._reporter.counters, connections, finished=self.finished
        )

    async def wait_started(self) -> None:
        """Wait until the service is connected and has (re)started its round."""
        await self._started.wait()

    def request_stop(self) -> None:
        """Begin the graceful shutdown (safe to call from a signal handler)."""
        self._stop.set()

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        """Load the bundle and the state directory; rebuild the coordinator.

        Raises:
            BundleError: the bundle is missing or inconsistent.
            ConfigError: the state directory belongs to another federation/bundle, has run
                more rounds than ``rounds``, or (new) ``initial`` does not fit the bundle.
            StateError: the state directory is unusable or corrupt.
        """
        settings = self.settings
        bundle = Bundle.load(settings.bundle)
        archive = pack_files(bundle.files())
        schema = UpdateSchema.from_manifest(settings.federation, bundle.manifest)
        config = settings.coordinator_config()
        strategy = build_strategy(settings.strategy)
        store = StateStore(settings.state_dir, settings.retention.policy())
        initial = InitialModel(settings.initial, bundle)  # read for a new state_dir only
        try:
            self._coordinator, self._replayed = load_coordinator(
                store, config, strategy, schema, archive, initial, self.clock()
            )
            initial.settle(store, self._coordinator.round)
        except BaseException:
            store.close()  # a failed start must not keep the directory locked
            raise
        self._store = store

    # ------------------------------------------------------------------ main loop

    async def run(self) -> None:
        """Serve until stopped or finished.

        Raises:
            StateError: the state directory could not be written (exit and restart:
                everything acknowledged is on disk).
        """
        if self._coordinator is None:
            self.prepare()
        coordinator = self.coordinator
        session = open_session(self.settings, coordinator, self._on_connect, self.clock)
        self._session = session
        outbound = Outbound(session, coordinator.topics, self.settings.client_id)
        self._outbound = outbound
        self._reporter.bind(coordinator, session, self.store)
        try:
            await self._reporter.start()  # the metrics endpoint (ConfigError: port taken)
            async with asyncio.TaskGroup() as group:
                self._spawn(group, self._reporter.run(self._lock.locked), "report")
                self._group = group
                self._spawn(group, session.run(self._on_message), "receive")
                self._spawn(group, outbound.run(), "send")
                commits = commit_loop(
                    self._commits, self.store, self._reporter, self._feed, self._work
                )
                self._spawn(group, commits, "commit")
                self._spawn(group, self._timer.run(self._started, self._feed), "timer")
                interval = self.settings.status_interval_s
                status = status_loop(self._status_event, interval, self._queue_status)
                self._spawn(group, status, "status")
                self._spawn(group, self._startup(), "startup")
                if self.settings.security is not None:
                    registry = DeviceRegistry(self.settings.security.devices)
                    self._spawn(group, registry_loop(registry, self._feed), "registry")
                await self._stop.wait()
                await self._shutdown()
                for task in [*self._tasks, *self._loose]:
                    task.cancel()
        finally:
            await self._reporter.close()
            self.store.close()
        if self._broken is not None:
            raise StateError(f"stopped after a state directory failure: {self._broken}")
        if self._fatal is not None:
            raise self._fatal

    def _spawn(self, group: asyncio.TaskGroup, coro: Any, name: str) -> None:
        task = group.create_task(coro, name=f"fedmq[{self.settings.client_id}].{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _background(self, coro: Any, name: str) -> None:
        # In the task group: a bug in a worker fails the service loudly, never silently.
        if self._group is None:
            raise StateError("the service is not running")
        task = self._group.create_task(coro, name=f"fedmq[{self.settings.client_id}].{name}")
        self._loose.add(task)
        task.add_done_callback(self._loose.discard)

    async def _startup(self) -> None:
        session = self._session
        assert session is not None
        while True:
            try:
                await session.wait_connected(timeout=30)
                break
            except TransportError as exc:
                log.warning("%s; still trying", exc)
        async with self._lock:
            if not await self._fit_chunks(session):
                return
            # The released inference models' bytes, before start() publishes them again.
            await self._models.restore(self.coordinator)
            actions = [*self._replayed, *self.coordinator.start(self.clock())]
            self._replayed = []
            await self._apply(actions)
        self._started.set()

    async def _fit_chunks(self, session: MqttSession) -> bool:
        """Chunk to fit the broker's packet cap; False (and stopping) if the config cannot."""
        cap, topics = session.max_packet_size, self.coordinator.topics
        try:
            size = broker_chunk_size(self.settings.chunk_size, cap, topics)
        except ConfigError as exc:
            log.critical("%s; stopping", exc)
            self._fatal = exc
            self._stop.set()
            return False
        if size is None:
            return True  # the configured chunk size fits
        now, started = self.clock(), self._started.is_set()
        await self._apply(self.coordinator.set_chunk_size(size, now, announce=started))
        return True

    async def _shutdown(self) -> None:
        grace = self.settings.shutdown_grace_s
        self._accepting = False
        log.info("stopping: no new updates; finishing %d in flight", self._work.count)
        try:
            await within(self._work.idle.wait(), grace)
        except TimeoutError:
            log.warning(
                "%d updates still in flight after %g s; they are not acked and will be re-sent",
                self._work.count,
                grace,
            )
        with contextlib.suppress(TimeoutError):
            await within(self._out().wait_sent(), grace)
        session = self._session
        if session is not None and session.is_connected and self._coordinator is not None:
            for action in self.coordinator.shutdown(self.clock()):
                if isinstance(action, Publish):
                    with contextlib.suppress(TransportError):
                        await session.publish(
                            action.topic,
                            action.payload,
                            retain=action.retain,
                            timeout=OFFLINE_PUBLISH_TIMEOUT,
                        )

    # ------------------------------------------------------------------ inputs

    async def _on_connect(self, session: MqttSession) -> None:
        if session.connections > 1 and self._started.is_set():
            async with self._lock:  # the broker may have come back with another cap
                await self._fit_chunks(session)
            # The broker may have lost retained blobs and announcements (no persistence).
            self._background(self._republish(), "republish")

    async def _republish(self) -> None:
        await self._feed(lambda coordinator, now: coordinator.republish(now))

    async def _on_message(self, message: Message) -> None:
        if not self._started.is_set():
            await self._started.wait()
        coordinator = self.coordinator
        topic = message.topic
        payload = message.payload
        try:
            parsed = coordinator.topics.parse(topic)
        except InvalidTopicError as exc:
            log.debug("ignoring message: %s", exc)
            return
        if isinstance(parsed, UpdateChunkTopic):
            if not self._accepting:
                return
            async with self._lock:
                await self._apply(coordinator.receive_chunk(parsed, payload, self.clock()))
        elif isinstance(parsed, BlobChunkTopic):
            async with self._lock:
                await self._apply(coordinator.on_blob_chunk(parsed, payload, self.clock()))
        elif isinstance(parsed, StatusTopic):
            status: AgentStatus | None = None
            if payload:
                try:
                    status = decode_control(payload, AgentStatus)
                except DecodeError as exc:
                    log.warning("ignoring status of %s: %s", parsed.client, exc)
                    return
            async with self._lock:
                await self._apply(coordinator.on_status(parsed.client, status, self.clock()))

    # ------------------------------------------------------------------ actions

    async def _apply(self, actions: Sequence[Action]) -> None:
        """Execute actions in order; call with the lock held."""
        store, persist = self.store, self._reporter.persist
        for action in actions:
            if self._broken is not None:
                return  # the disk is behind the coordinator: act on nothing more
            try:
                match action:
                    case SaveState():
                        await persist("state", store.save_snapshot, action.snapshot)
                    case SaveCheckpoint():
                        await persist(
                            "checkpoint",
                            store.save_checkpoint,
                            action.round,
                            action.params,
                            action.optimizer,
                        )
                    case SaveRecord():
                        await persist("record", store.save_record, action.record)
                        self._reporter.recorded(action.record)
                    case PruneUpdates():
                        await persist("prune", store.prune_updates, action.before)
                    case _:
                        self._dispatch(action)
            except (OSError, StateError) as exc:
                log.critical("cannot write the state directory: %s; stopping", exc)
                self._broken = exc
                self._accepting = False
                self._stop.set()
                return

    def _dispatch(self, action: Action) -> None:
        match action:
            case Publish() | PublishBlob() | ClearBlob():
                self._out().put(action)
            case BuildInferenceModel():
                self._models.asked(action)
                self._background(self._models.build(action), "model")
            case VerifyUpdate():
                self._work.begin()
                self._background(self._verify(action), "verify")
            case PersistUpdate():
                self._work.begin()
                self._commits.put_nowait(action.ticket)
            case ArmTimer():
                self._timer.arm(action.at)
            case StatusChanged():
                self._status_event.set()
                self._reporter.status_changed()
            case UpdateRejected() | Noted() | RoundClosed():
                self._reporter.event(action)
            case FederationFinished():
                self.finished = True
                self._reporter.event(action)
                # The final status goes out before a service that exits now stops.
                self._queue_status()
                if self.settings.exit_when_finished:
                    self._background(self._stop_when_sent(), "finish")

    def _out(self) -> Outbound:
        if self._outbound is None:
            raise StateError("the service is not running")
        return self._outbound

    async def _stop_when_sent(self) -> None:
        await self._out().wait_sent()
        self.request_stop()

    async def _verify(self, action: VerifyUpdate) -> None:
        try:
            async with self._verify_slots:
                schema = self.coordinator.schema
                result = await asyncio.to_thread(
                    verify_assembled, action.key, action.assembler, schema
                )
            await self._feed(lambda coordinator, now: coordinator.verified(result, now))
        finally:
            self._work.end()

    # ------------------------------------------------------------------ status

    def _queue_status(self) -> None:
        # Once stopping, the offline status must be the last one published.
        if self._coordinator is None or not self._accepting:
            return
        status = self.coordinator.status(self.clock())
        topic = self.coordinator.topics.aggregator_status()
        payload = encode_control(status, self.coordinator.config.signer)
        self._out().put(Publish(topic, payload, retain=True))


async def serve(
    settings: AggregatorSettings, *, notifier: Notifier | None = None
) -> AggregatorService:
    """Run the aggregator until SIGTERM/SIGINT or the last round; return the service.

    Under systemd (``Type=notify``) it sends READY=1, WATCHDOG=1 and STOPPING=1
    (:mod:`~fedmq.aggregator.supervision`); ``notifier`` defaults to the environment's.

    Raises:
        BundleError, ConfigError: configuration problems (before anything is served).
        StateError: the state directory is unusable.
    """
    service = AggregatorService(settings)
    service.prepare()
    notifier = Notifier() if notifier is None else notifier
    loop = asyncio.get_running_loop()

    def stop() -> None:
        notifier.stopping("stopping")
        service.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    supervisor = asyncio.create_task(
        notify_systemd(service, notifier), name=f"fedmq[{settings.client_id}].systemd"
    )
    try:
        await service.run()
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    if service.finished:
        notifier.stopping("federation finished")
    return service
