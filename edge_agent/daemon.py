"""The agent daemon: one MQTT session, one round at a time, an outbox that survives crashes.

:class:`Agent` opens what a run needs (state directory, blob cache, MQTT session, blob
receiver: one :class:`~edge_agent.context.AgentContext`) and runs its jobs as tasks of
one ``asyncio.TaskGroup``, named ``fedmq[<client>].<job>``:

``session``    the reconnecting MQTT session; every message goes to :meth:`Agent._handle`,
               which decodes it and hands it to the job it concerns
``rounds``     :class:`~edge_agent.rounds.RoundRunner`: takes the newest announcement,
               downloads, trains on a worker thread, commits the update to the outbox
``outbox``     :class:`~edge_agent.uploader.Uploader`: (re)sends committed updates until
               acked (:func:`~edge_agent.decisions.outbox_action`)
``heartbeat``  publishes the retained status every ``heartbeat_s`` and on state changes
``watchdog``   pings systemd's watchdog from the event loop (proves the loop is alive)
``install``    with ``[install]``: :class:`~edge_agent.install.ModelInstaller` installs the
               announced inference model for local use (downloads, atomic replace, hooks)

:meth:`Agent.wait_ready` returns once the first connection is up and messages flow
(when systemd hears READY=1).

Shutdown has one path: :meth:`Agent.request_stop` (SIGTERM/SIGINT) stops intake, asks
training to stop between batches, waits briefly for the worker, publishes an offline
status and cancels the tasks.  Nothing needs saving at that point: every accepted fact
(committed update, answered round, residual, cached blob) is on disk when it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.blob_cache import BlobCache, CacheDisk
from edge_agent.config import AgentSettings
from edge_agent.context import AgentContext, Counters
from edge_agent.decisions import Finished
from edge_agent.install import ModelInstaller
from edge_agent.rounds import TRAIN_THREAD_PREFIX, RoundRunner, TrainRunner
from edge_agent.state import StateDir
from edge_agent.status import StatusBoard
from edge_agent.systemd import Notifier
from edge_agent.training import run_in_thread
from edge_agent.trust import ControlTrust
from edge_agent.uploader import Uploader
from fedmq.errors import DecodeError, RemoteProtocolError, TransportError
from fedmq.timeouts import wait_event, within
from fedmq.transport.blob_receiver import BlobReceiver
from fedmq.transport.broker_settings import LastWill
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import AgentState, ResendRequest, encode_control
from fedmq.wire.signing import SignatureError
from fedmq.wire.topics import AckTopic, AggregatorStatusTopic, BlobChunkTopic, RoundTopic, Topics

__all__ = [
    "OFFLINE_PUBLISH_TIMEOUT",
    "STOP_GRACE",
    "TRAIN_THREAD_PREFIX",
    "Agent",
    "AgentStatistics",
    "TrainRunner",
]

log = logging.getLogger(__name__)

STOP_GRACE = 5.0  # seconds for the worker to notice its cancel flag: systemd waits 10
OFFLINE_PUBLISH_TIMEOUT = 2.0  # seconds: the last status is best effort at shutdown


@dataclass(frozen=True)
class AgentStatistics:
    """A snapshot of the agent's counters (for tests, logs and benchmarks)."""

    state: AgentState
    connections: int
    rounds_trained: int
    rounds_failed: int
    updates_committed: int
    updates_acked: int
    updates_dropped: int
    uploads: int
    refused_messages: int
    rejected_chunks: int
    refetches: int
    corrupt_cache_reads: int
    last_answered_round: int | None
    last_error: str | None


@dataclass(frozen=True)
class _Jobs:
    """What one :meth:`Agent.run` works with: the context and the jobs built on it."""

    context: AgentContext
    rounds: RoundRunner
    uploader: Uploader
    installer: ModelInstaller | None = None  # [install]: the model for local inference


class Agent:
    """An edge agent for one federation.

    Args:
        settings: validated configuration.
        notifier: systemd notifier (default: from the environment; no-op without systemd).
        clock: wall-clock time source (unix seconds).
        train_runner: runs a round's blocking work off the event loop (default: a new
            daemon thread per round, :func:`run_in_thread`).  ``fedmq simulate`` passes
            a bounded pool shared by hundreds of in-process agents.
        cache_disk: the blob cache's file-system calls (tests pass a disk that fills up).

    Raises:
        ConfigError: (from :meth:`run`) the state directory is unusable or locked.
    """

    def __init__(
        self,
        settings: AgentSettings,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.time,
        train_runner: TrainRunner = run_in_thread,
        cache_disk: CacheDisk | None = None,
    ) -> None:
        self.settings = settings
        self.client = settings.client_id
        self.topics = Topics(settings.federation, settings.topic_root)
        self.notifier = notifier or Notifier()
        self.status = StatusBoard(self.client, settings.heartbeat_s)
        self._clock = clock
        self._train_runner = train_runner
        self._cache_disk = cache_disk
        self._counters = Counters()
        self._stop = asyncio.Event()
        self._stopping = False
        self._status_changed = asyncio.Event()
        self._outbox_kick = asyncio.Event()
        self._ready = False
        self._settled = asyncio.Event()  # set once ready, or once run() ended before that
        self._run_error: Exception | None = None
        self._jobs: _Jobs | None = None

    # -- public -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin shutdown (safe to call from a signal handler via the loop)."""
        if not self._stopping:
            log.info("stopping: no new rounds; cancelling training")
        self._stopping = True
        if self._jobs is not None:
            current = self._jobs.rounds.current
            if current is not None and current.addresses(self.client):
                # The last status tells the aggregator not to wait for this round's update.
                self.status.decline(current.round, "stopping", "the agent stopped")
            self._jobs.rounds.cancel_training()
        self._stop.set()

    def abort(self) -> None:
        """Vanish like a device losing power: no offline status, no MQTT DISCONNECT.

        Training stops at its next batch and the connection is dropped, so the broker
        publishes the last will (``offline``).  Cancel the task running :meth:`run`
        right after.  What was committed stays on disk, as after a real crash.  Used by
        ``fedmq simulate --drop-rate`` for in-process agents.
        """
        self._stopping = True
        if self._jobs is not None:
            self._jobs.rounds.cancel_training()
            self._jobs.context.session.abort()

    @property
    def installer(self) -> ModelInstaller | None:
        """The ``[install]`` job (None: not configured, or not running)."""
        return self._jobs.installer if self._jobs is not None else None

    @property
    def connected(self) -> bool:
        """True while the MQTT session is up."""
        return self._jobs is not None and self._jobs.context.session.is_connected

    async def wait_ready(self) -> None:
        """Wait until the agent first connected and serves its jobs (systemd's READY=1).

        Call it while :meth:`run` runs (or is about to).  It returns at once after that
        point even when the connection is down again.

        Raises:
            Exception: the exception :meth:`run` failed with before it was ready.
            TransportError: :meth:`run` ended (stopped or cancelled) before it was ready.
        """
        await self._settled.wait()
        if self._ready:
            return
        if self._run_error is not None:
            raise self._run_error  # the same exception run() raised, as Future.result() does
        raise TransportError(
            f"agent {self.client} stopped before it connected to {self.settings.broker.url}"
        )

    def statistics(self) -> AgentStatistics:
        """A frozen snapshot of what the agent has done so far."""
        context = self._jobs.context if self._jobs is not None else None
        return AgentStatistics(
            state=self.status.state,
            connections=context.session.connections if context else 0,
            rejected_chunks=context.receiver.rejected_chunks if context else 0,
            refetches=context.receiver.refetches if context else 0,
            corrupt_cache_reads=context.cache.corrupt_reads if context else 0,
            last_answered_round=context.state_dir.state.last_answered_round if context else None,
            last_error=self.status.last_error,
            **dataclasses.asdict(self._counters),
        )

    async def run(self) -> None:
        """Run until :meth:`request_stop`; return after a clean shutdown.

        Raises:
            ConfigError: the state directory is unusable or another agent holds it.
        """
        try:
            await self._run()
        except Exception as exc:
            self._run_error = exc
            raise
        finally:
            self._settled.set()

    # -- setup ------------------------------------------------------------------------

    async def _run(self) -> None:
        settings = self.settings
        settings.broker_settings().tls_context()  # unreadable TLS files: ConfigError now
        state_dir = StateDir(settings.state_dir, settings.federation)
        try:
            state_dir.recover()
            context = self._open(state_dir)
            jobs = _Jobs(
                context,
                RoundRunner(context, self._train_runner),
                Uploader(context),
                self._installer(context),
            )
            self._jobs = jobs
            context.set_state("idle")
            await self._run_tasks(jobs)
        finally:
            state_dir.close()

    def _installer(self, context: AgentContext) -> ModelInstaller | None:
        """The ``install`` job, downloading through the round's cache and receiver."""
        config = self.settings.install
        if config is None:
            return None
        timeout = self.settings.limits.download_timeout_s

        async def fetch(ref: BlobRef) -> bytearray:
            cached = context.cache.get(ref, context.limits)
            if cached is not None:
                return cached
            ref.check_limits(context.limits)
            try:
                return await context.receiver.fetch(ref, timeout)
            except BaseException:
                await context.receiver.cancel(ref)  # chunks on disk stay for the retry
                raise

        def on_error(message: str) -> None:
            context.status.error(message)
            context.status_changed.set()

        return ModelInstaller(
            config,
            self.settings.federation,
            self.client,
            fetch,
            on_error=on_error,
            clock=self._clock,
            keep=context.protected_blobs,
        )

    def _open(self, state_dir: StateDir) -> AgentContext:
        """Build what the jobs share, around the recovered state directory."""
        settings = self.settings
        self.status.bundle = state_dir.state.bundle
        self.status.round = state_dir.state.last_answered_round
        limits = settings.limits.decode_limits()
        security = settings.security
        trusted = security.trusted_keys() if security is not None else None
        if trusted is None:
            log.warning(
                "no [security] table: obeying unsigned control messages from anyone on the "
                "broker (development brokers only; see docs/deploy.md)"
            )
        else:
            log.info("pinned aggregator key(s) %s", ", ".join(trusted.ids))
        cache = BlobCache(
            state_dir.cache_dir,
            settings.limits.cache_max_mb * 1024**2,
            reserve_bytes=settings.limits.min_free_mb * 1024**2,
            disk=self._cache_disk,
        )
        will = LastWill(
            self.topics.status(self.client),
            encode_control(self.status.snapshot(self._clock(), "offline")),
        )
        session = MqttSession(
            settings.broker_settings(),
            subscriptions=[
                (self.topics.round(), 1),
                (self.topics.ack(self.client), 1),
                (self.topics.aggregator_status(), 1),  # uploads wait for it to be online
            ],
            will=will,
            on_connect=self._on_connect,
        )
        receiver = BlobReceiver(
            session,
            self.topics,
            limits,
            self._on_blob_progress,
            store_factory=cache.store_factory,
        )
        return AgentContext(
            settings=settings,
            topics=self.topics,
            limits=limits,
            clock=self._clock,
            status=self.status,
            counters=self._counters,
            state_dir=state_dir,
            cache=cache,
            session=session,
            receiver=receiver,
            status_changed=self._status_changed,
            outbox_kick=self._outbox_kick,
            is_stopping=lambda: self._stopping,
            trust=ControlTrust(trusted, state_dir),
            device_key=security.device_key() if security is not None else None,
        )

    # -- task orchestration -----------------------------------------------------------

    async def _run_tasks(self, jobs: _Jobs) -> None:
        context = jobs.context
        session = context.session
        name = context.task_name
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    session.run(functools.partial(self._handle, jobs)), name=name("session")
                ),
                group.create_task(jobs.rounds.run(), name=name("rounds")),
                group.create_task(jobs.uploader.run(), name=name("outbox")),
                group.create_task(self._heartbeat_loop(session), name=name("heartbeat")),
            ]
            if self.notifier.watchdog_interval is not None:
                tasks.append(group.create_task(self._watchdog_loop(), name=name("watchdog")))
            if jobs.installer is not None:
                tasks.append(group.create_task(jobs.installer.run(), name=name("install")))
            await self._stop.wait()
            self.notifier.stopping("stopping")
            await jobs.rounds.finish(STOP_GRACE)
            await self._publish_offline(session)
            for task in tasks:
                task.cancel()
        log.info("agent %s stopped", self.client)

    async def _publish_offline(self, session: MqttSession) -> None:
        if not session.is_connected:
            return
        payload = encode_control(self.status.snapshot(self._clock(), "offline"))
        with contextlib.suppress(TransportError, TimeoutError):
            await within(
                session.publish(
                    self.topics.status(self.client),
                    payload,
                    retain=True,
                    timeout=OFFLINE_PUBLISH_TIMEOUT,
                ),
                OFFLINE_PUBLISH_TIMEOUT,
            )

    async def _on_connect(self, session: MqttSession) -> None:
        # Runs inside the session loop before messages flow: only set flags here.
        self._outbox_kick.set()
        self._status_changed.set()
        if not self._ready:
            self._ready = True
            self._settled.set()
            self.notifier.ready(f"connected to {self.settings.broker.url}")

    # -- status -----------------------------------------------------------------------

    async def _heartbeat_loop(self, session: MqttSession) -> None:
        topic = self.topics.status(self.client)
        interval = self.settings.heartbeat_s
        while True:
            await wait_event(self._status_changed, interval)
            self._status_changed.clear()
            if not session.is_connected:
                continue
            payload = encode_control(self.status.snapshot(self._clock()))
            try:
                await session.publish(topic, payload, retain=True, timeout=interval)
            except TransportError as exc:
                log.debug("status not published: %s", exc)

    async def _watchdog_loop(self) -> None:
        interval = self.notifier.watchdog_interval
        assert interval is not None  # the task is only started when systemd asks for it
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _on_blob_progress(self, ref: BlobRef, received: int) -> None:
        self.status.report_progress(received, ref.count)

    # -- incoming messages ------------------------------------------------------------

    async def _handle(self, jobs: _Jobs, message: Message) -> None:
        topic = message.topic
        payload = message.payload
        try:
            parsed = self.topics.parse(topic)
        except RemoteProtocolError as exc:
            log.debug("ignoring message on %s: %s", topic, exc)
            return
        if isinstance(parsed, BlobChunkTopic):
            await jobs.context.receiver.feed(message, parsed)
        elif isinstance(parsed, RoundTopic):
            if payload:  # an empty retained message clears the topic
                self._on_announcement(jobs, payload)
        elif isinstance(parsed, AckTopic) and parsed.client == self.client:
            self._on_ack(jobs, payload)
        elif isinstance(parsed, AggregatorStatusTopic) and payload:
            self._on_aggregator_status(jobs, payload)

    def _on_announcement(self, jobs: _Jobs, payload: bytes | bytearray) -> None:
        try:
            announcement = jobs.context.trust.announcement(payload)
        except SignatureError as exc:
            # Changes nothing: no state, no status (a hostile client must not be able to
            # write into our status), only the log and a counter.
            self._counters.refused_messages += 1
            log.warning("refusing round announcement: %s", exc)
            return
        except DecodeError as exc:
            log.warning("ignoring malformed round announcement: %s", exc)
            if not jobs.context.trust.signed:
                self.status.error(f"malformed round announcement: {exc}")
            return
        if self._stopping:
            return
        if jobs.installer is not None:  # its own task: never in the way of training
            jobs.installer.offer(announcement)
        if isinstance(jobs.rounds.offer(announcement), Finished):
            jobs.uploader.drop_outbox("the federation finished")
            jobs.context.set_state("idle")

    def _on_aggregator_status(self, jobs: _Jobs, payload: bytes | bytearray) -> None:
        context = jobs.context
        try:
            status = context.trust.aggregator_status(payload)
        except SignatureError as exc:
            self._counters.refused_messages += 1
            log.warning("refusing aggregator status: %s", exc)
            return
        except DecodeError as exc:
            log.debug("ignoring malformed aggregator status: %s", exc)
            return
        if context.aggregator.update(status.state, context.session.connections):
            # It is subscribed (again): whatever it has not acknowledged goes out now.
            jobs.uploader.resume(f"the aggregator is {status.state}")

    def _on_ack(self, jobs: _Jobs, payload: bytes | bytearray) -> None:
        try:
            ack = jobs.context.trust.ack(payload)
        except SignatureError as exc:
            self._counters.refused_messages += 1
            log.warning("refusing ack: %s", exc)
            return
        except DecodeError as exc:
            log.warning("ignoring malformed ack: %s", exc)
            return
        if isinstance(ack, ResendRequest):
            jobs.uploader.on_resend(ack)
        else:
            jobs.uploader.on_ack(ack)
