"""The agent daemon: one MQTT session, one round at a time, an outbox that survives crashes.

Tasks (one ``asyncio.TaskGroup``, named ``fedmq[<client>].<job>``):

``session``    the reconnecting MQTT session; every message goes to :meth:`Agent._handle`
``rounds``     takes the newest announcement, downloads, trains on a worker thread,
               commits the update to the outbox
``outbox``     (re)sends committed updates until acked (:func:`protocol.outbox_action`)
``heartbeat``  publishes the retained status every ``heartbeat_s`` and on state changes
``watchdog``   pings systemd's watchdog from the event loop (proves the loop is alive)

Shutdown has one path: :meth:`Agent.request_stop` (SIGTERM/SIGINT) stops intake, asks
training to stop between batches, waits briefly for the worker, publishes an offline
status and cancels the tasks.  Nothing needs saving at that point: every accepted fact
(committed update, answered round, residual, cached blob) is on disk when it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from edge_agent.blob_cache import BlobCache
from edge_agent.config import AgentSettings
from edge_agent.decisions import (
    Finished,
    IgnoreAck,
    SendRecord,
    Skip,
    Train,
    decide_ack,
    decide_round,
    outbox_action,
)
from edge_agent.outbox import OutboxEntry
from edge_agent.state import StateDir
from edge_agent.status import StatusBoard
from edge_agent.systemd import Notifier
from edge_agent.training import (
    ModelCache,
    RoundInputs,
    RoundOutput,
    run_in_thread,
    train_and_commit,
)
from fedmq.errors import (
    BundleError,
    ConfigError,
    DecodeError,
    IntegrityError,
    RemoteProtocolError,
    TrainingCancelled,
    TrainingError,
    TransportError,
)
from fedmq.timeouts import wait_event, within
from fedmq.transport.blobs import BlobReceiver, publish_chunks
from fedmq.transport.message import Message
from fedmq.transport.mqtt import LastWill, MqttSession
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import Ack, AgentState, RoundAnnouncement, decode_control, encode_control
from fedmq.wire.topics import AckTopic, BlobChunkTopic, RoundTopic, Topics

log = logging.getLogger(__name__)

STOP_GRACE = 5.0  # seconds for the worker to notice its cancel flag: systemd waits 10
OFFLINE_PUBLISH_TIMEOUT = 2.0  # seconds: the last status is best effort at shutdown
ROUND_RETRY_MAX = 600.0  # seconds: cap of the back-off between attempts at a failed round
TRAIN_THREAD_PREFIX = "fedmq-train"

TrainRunner = Callable[[Callable[[], RoundOutput], str], Awaitable[RoundOutput]]
"""Runs ``function`` (a round's blocking work) off the event loop; ``str`` names it."""


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
    rejected_chunks: int
    refetches: int
    corrupt_cache_reads: int
    last_answered_round: int | None
    last_error: str | None


class Agent:
    """An edge agent for one federation.

    Args:
        settings: validated configuration.
        notifier: systemd notifier (default: from the environment; no-op without systemd).
        clock: wall-clock time source (unix seconds).
        train_runner: runs a round's blocking work off the event loop (default: a new
            daemon thread per round, :func:`run_in_thread`).  ``fedmq simulate`` passes
            a bounded pool shared by hundreds of in-process agents.

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
    ) -> None:
        self.settings = settings
        self._train_runner = train_runner
        self.client = settings.client_id
        self.topics = Topics(settings.federation, settings.topic_root)
        self.notifier = notifier or Notifier()
        self._clock = clock
        self._limits = settings.limits.decode_limits()
        self.status = StatusBoard(self.client, settings.heartbeat_s)
        self._stop = asyncio.Event()
        self._stopping = False
        self._status_changed = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._outbox_kick = asyncio.Event()
        self._pending: RoundAnnouncement | None = None
        self._current: RoundAnnouncement | None = None
        self._round_task: asyncio.Task[None] | None = None
        self._cancel_training = threading.Event()
        self._send_records: dict[str, SendRecord] = {}
        self._retry_delays: dict[int, float] = {}
        self._uploading = False
        self._state_dir: StateDir | None = None
        self._session: MqttSession | None = None
        self._receiver: BlobReceiver | None = None
        self._cache: BlobCache | None = None
        self._models = ModelCache(settings.threads)
        self._ready = False
        self._counters = dict.fromkeys(
            (
                "rounds_trained",
                "rounds_failed",
                "updates_committed",
                "updates_acked",
                "updates_dropped",
                "uploads",
            ),
            0,
        )

    # -- public -----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin shutdown (safe to call from a signal handler via the loop)."""
        if not self._stopping:
            log.info("stopping: no new rounds; cancelling training")
        self._stopping = True
        self._cancel_training.set()
        self._stop.set()

    def abort(self) -> None:
        """Vanish like a device losing power: no offline status, no MQTT DISCONNECT.

        Training stops at its next batch and the connection is dropped, so the broker
        publishes the last will (``offline``).  Cancel the task running :meth:`run`
        right after.  What was committed stays on disk, as after a real crash.  Used by
        ``fedmq simulate --drop-rate`` for in-process agents.
        """
        self._stopping = True
        self._cancel_training.set()
        if self._session is not None:
            self._session.abort()

    @property
    def connected(self) -> bool:
        """True while the MQTT session is up."""
        return self._session is not None and self._session.is_connected

    def statistics(self) -> AgentStatistics:
        """A frozen snapshot of what the agent has done so far."""
        state_dir = self._state_dir
        return AgentStatistics(
            state=self.status.state,
            connections=self._session.connections if self._session else 0,
            rejected_chunks=self._receiver.rejected_chunks if self._receiver else 0,
            refetches=self._receiver.refetches if self._receiver else 0,
            corrupt_cache_reads=self._cache.corrupt_reads if self._cache else 0,
            last_answered_round=state_dir.state.last_answered_round if state_dir else None,
            last_error=self.status.last_error,
            **self._counters,
        )

    async def run(self) -> None:
        """Run until :meth:`request_stop`; return after a clean shutdown.

        Raises:
            ConfigError: the state directory is unusable or another agent holds it.
        """
        settings = self.settings
        settings.broker_settings().tls_context()  # unreadable TLS files: ConfigError now
        state_dir = StateDir(settings.state_dir, settings.federation)
        self._state_dir = state_dir
        try:
            state_dir.recover()
            self.status.bundle = state_dir.state.bundle
            self.status.round = state_dir.state.last_answered_round
            self._cache = BlobCache(state_dir.cache_dir, settings.limits.cache_max_mb * 1024**2)
            will = LastWill(
                self.topics.status(self.client),
                encode_control(self.status.snapshot(self._clock(), "offline")),
            )
            session = MqttSession(
                settings.broker_settings(),
                subscriptions=[(self.topics.round(), 1), (self.topics.ack(self.client), 1)],
                will=will,
                on_connect=self._on_connect,
            )
            self._session = session
            self._receiver = BlobReceiver(
                session,
                self.topics,
                self._limits,
                self._on_blob_progress,
                store_factory=self._cache.store_factory,
            )
            self._set_state("idle")
            await self._run_tasks(session)
        finally:
            state_dir.close()

    # -- task orchestration -----------------------------------------------------------

    def _name(self, job: str) -> str:
        return f"fedmq[{self.client}].{job}"

    async def _run_tasks(self, session: MqttSession) -> None:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(session.run(self._handle), name=self._name("session")),
                group.create_task(self._round_loop(), name=self._name("rounds")),
                group.create_task(self._outbox_loop(session), name=self._name("outbox")),
                group.create_task(self._heartbeat_loop(session), name=self._name("heartbeat")),
            ]
            if self.notifier.watchdog_interval is not None:
                tasks.append(group.create_task(self._watchdog_loop(), name=self._name("watchdog")))
            await self._stop.wait()
            self.notifier.stopping("stopping")
            await self._finish_round()
            await self._publish_offline(session)
            for task in tasks:
                task.cancel()
        log.info("agent %s stopped", self.client)

    async def _finish_round(self) -> None:
        task = self._round_task
        if task is None or task.done():
            return
        # Training stops at its next batch; a commit in progress completes (it is
        # atomic either way).  Only then is the task cancelled.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await within(asyncio.shield(task), STOP_GRACE)
        if not task.done():
            log.warning("training did not stop within %.0f s; abandoning it", STOP_GRACE)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
            self.notifier.ready(f"connected to {self.settings.broker.url}")

    # -- status -----------------------------------------------------------------------

    def _set_state(self, state: AgentState, round_id: int | None = None) -> None:
        if state == "idle" and self._uploading:
            state = "uploading"
        self.status.set(state, round_id)
        self._status_changed.set()

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
        assert interval is not None
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # -- incoming messages ------------------------------------------------------------

    async def _handle(self, message: Message) -> None:
        topic = message.topic
        payload = message.payload
        try:
            parsed = self.topics.parse(topic)
        except RemoteProtocolError as exc:
            log.debug("ignoring message on %s: %s", topic, exc)
            return
        if isinstance(parsed, BlobChunkTopic):
            assert self._receiver is not None
            await self._receiver.feed(message, parsed)
        elif isinstance(parsed, RoundTopic):
            if payload:  # an empty retained message clears the topic
                self._on_announcement(payload)
        elif isinstance(parsed, AckTopic) and parsed.client == self.client:
            self._on_ack(payload)

    def _on_announcement(self, payload: bytes | bytearray) -> None:
        try:
            announcement = decode_control(payload, RoundAnnouncement)
        except DecodeError as exc:
            log.warning("ignoring malformed round announcement: %s", exc)
            self.status.error(f"malformed round announcement: {exc}")
            return
        if self._stopping:
            return
        assert self._state_dir is not None
        current = self._current
        decision = decide_round(
            announcement,
            client=self.client,
            federation=self.settings.federation,
            last_answered=self._state_dir.state.last_answered_round,
            working_on=current.round if current is not None else None,
        )
        if isinstance(decision, Skip):
            log.log(decision.level, "ignoring announcement: %s", decision.reason)
        elif isinstance(decision, Finished):
            log.info("%s; going idle", decision.reason)
            self._pending = None
            self._abandon_current("the federation finished")
            self._drop_outbox("the federation finished")
            self._set_state("idle")
        elif isinstance(decision, Train):
            if current is not None:
                self._abandon_current(f"round {announcement.round} was announced")
            self._pending = decision.announcement
            self._wakeup.set()

    def _abandon_current(self, why: str) -> None:
        task, current = self._round_task, self._current
        if task is None or task.done() or current is None:
            return
        log.info("abandoning round %d: %s", current.round, why)
        self._cancel_training.set()
        task.cancel()

    def _on_ack(self, payload: bytes | bytearray) -> None:
        try:
            ack = decode_control(payload, Ack)
        except DecodeError as exc:
            log.warning("ignoring malformed ack: %s", exc)
            return
        assert self._state_dir is not None
        outbox = self._state_dir.outbox
        decision = decide_ack(
            ack,
            client=self.client,
            federation=self.settings.federation,
            entry=outbox.get(ack.update_id),
        )
        if isinstance(decision, IgnoreAck):
            log.log(decision.level, "ignoring ack: %s", decision.reason)
            return
        log.log(decision.level, "%s", decision.message)
        outbox.remove(decision.update_id)
        self._send_records.pop(decision.update_id, None)
        if ack.accepted:
            self._counters["updates_acked"] += 1
        else:
            self._counters["updates_dropped"] += 1
        if decision.error is not None:
            self.status.error(decision.error)
            self._status_changed.set()
        self._outbox_kick.set()

    def _drop_outbox(self, why: str) -> None:
        assert self._state_dir is not None
        outbox = self._state_dir.outbox
        for entry in outbox.entries():
            log.info("dropping update %s for round %d: %s", entry.update_id, entry.round, why)
            outbox.remove(entry.update_id)
            self._send_records.pop(entry.update_id, None)
            self._counters["updates_dropped"] += 1

    # -- rounds -----------------------------------------------------------------------

    async def _round_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            announcement, self._pending = self._pending, None
            if announcement is None or self._stopping:
                continue
            assert self._state_dir is not None
            decision = decide_round(
                announcement,
                client=self.client,
                federation=self.settings.federation,
                last_answered=self._state_dir.state.last_answered_round,
                working_on=None,
            )
            if not isinstance(decision, Train):
                continue
            self._current = announcement
            self._cancel_training = threading.Event()
            self._round_task = asyncio.create_task(
                self._do_round(announcement), name=self._name(f"round-{announcement.round}")
            )
            try:
                await self._round_task
            except asyncio.CancelledError:
                current_task = asyncio.current_task()
                if current_task is not None and current_task.cancelling():
                    raise  # the agent is shutting down
            finally:
                self._current = None
                self._round_task = None
                if self.status.state in ("downloading", "training"):
                    self._set_state("idle")

    async def _do_round(self, announcement: RoundAnnouncement) -> None:
        round_id = announcement.round
        log.info("round %d: starting", round_id)
        try:
            output = await self._download_and_train(announcement)
        except TrainingCancelled:
            log.info("round %d: training cancelled", round_id)
            return
        except (TrainingError, BundleError, IntegrityError, TransportError, DecodeError) as exc:
            self._round_failed(announcement, str(exc))
            return
        except (ConfigError, OSError) as exc:
            self._round_failed(announcement, f"{type(exc).__name__}: {exc}")
            return
        self._retry_delays.pop(round_id, None)
        self._counters["rounds_trained"] += 1
        self._counters["updates_committed"] += 1
        entry = output.entry
        log.info(
            "round %d: trained in %.1f s on %d examples (%s); update %s is %d bytes in %d chunks",
            round_id,
            output.seconds,
            output.update.meta.num_examples,
            ", ".join(f"{k}={v:.4g}" for k, v in output.update.meta.metrics.items()),
            entry.update_id,
            entry.size,
            entry.ref.count,
        )
        self.status.bundle = announcement.bundle.sha256
        assert self._cache is not None
        self._cache.evict({announcement.bundle.sha256, announcement.params.sha256})
        self._set_state("idle", round_id)
        self._outbox_kick.set()

    def _round_failed(self, announcement: RoundAnnouncement, problem: str) -> None:
        round_id = announcement.round
        self._counters["rounds_failed"] += 1
        delay = self._retry_delays.get(round_id, self.settings.limits.round_retry_s)
        self._retry_delays = {round_id: min(delay * 2, ROUND_RETRY_MAX)}
        log.error("round %d failed: %s; retrying in %.0f s", round_id, problem, delay)
        self.status.error(f"round {round_id}: {problem}")
        self._set_state("idle", round_id)
        asyncio.get_running_loop().call_later(delay, self._retry, announcement)

    def _retry(self, announcement: RoundAnnouncement) -> None:
        if self._stopping or self._pending is not None or self._current is not None:
            return  # something newer is queued or running; it decides
        self._pending = announcement
        self._wakeup.set()

    async def _download_and_train(self, announcement: RoundAnnouncement) -> RoundOutput:
        self._set_state("downloading", announcement.round)
        bundle_blob = await self._fetch(announcement.bundle)
        params_blob = await self._fetch(announcement.params)
        self.status.bundle = announcement.bundle.sha256
        self._set_state("training", announcement.round)
        assert self._state_dir is not None
        inputs = RoundInputs(
            announcement=announcement,
            client=self.client,
            bundle_blob=bundle_blob,
            params_blob=params_blob,
            data=self.settings.data,
            limits=self._limits,
        )
        cancel = self._cancel_training
        deadline = time.monotonic() + self.settings.limits.max_train_seconds
        state_dir = self._state_dir

        def should_stop() -> bool:
            if time.monotonic() > deadline:
                raise TrainingError(
                    f"training exceeded limits.max_train_seconds "
                    f"({self.settings.limits.max_train_seconds:g} s)"
                )
            return cancel.is_set()

        return await self._train_runner(
            lambda: train_and_commit(
                inputs,
                self._models,
                state_dir,
                progress=self.status.report_progress,
                should_stop=should_stop,
            ),
            f"{TRAIN_THREAD_PREFIX}-{announcement.round}",
        )

    async def _fetch(self, ref: BlobRef) -> bytearray:
        assert self._cache is not None
        assert self._receiver is not None
        cached = self._cache.get(ref, self._limits)
        if cached is not None:
            return cached
        try:
            ref.check_limits(self._limits)
        except DecodeError as exc:
            raise TrainingError(f"blob {ref.sha256[:12]}… is too large: {exc}") from exc
        try:
            return await self._receiver.fetch(ref, self.settings.limits.download_timeout_s)
        except BaseException:
            await self._receiver.cancel(ref)  # chunks on disk stay for the next attempt
            raise

    def _on_blob_progress(self, ref: BlobRef, received: int) -> None:
        self.status.report_progress(received, ref.count)

    # -- outbox -----------------------------------------------------------------------

    async def _outbox_loop(self, session: MqttSession) -> None:
        assert self._state_dir is not None
        outbox = self._state_dir.outbox
        settings = self.settings.outbox
        while True:
            wake_at: float | None = None
            sent = False
            for entry in outbox.entries():
                record = self._send_records.setdefault(entry.update_id, SendRecord())
                now = self._clock()
                action, due = outbox_action(
                    entry,
                    record,
                    now=now,
                    connection=session.connections,
                    ack_timeout=settings.ack_timeout_s,
                    max_age=settings.max_age_s,
                )
                if action == "expire":
                    log.warning(
                        "dropping update %s for round %d: unacknowledged for %.0f s",
                        entry.update_id,
                        entry.round,
                        now - entry.created_at,
                    )
                    outbox.remove(entry.update_id)
                    self._send_records.pop(entry.update_id, None)
                    self._counters["updates_dropped"] += 1
                elif action == "wait":
                    assert due is not None
                    wake_at = due if wake_at is None else min(wake_at, due)
                elif session.is_connected and not self._stopping:
                    await self._send(session, entry, record)
                    sent = True
            if sent:
                continue  # look again: acks may have come, and the next wait is now known
            self._uploading = False
            if self.status.state == "uploading":
                self._set_state("idle")
            timeout = None if wake_at is None else max(0.0, wake_at - self._clock())
            await wait_event(self._outbox_kick, timeout)
            self._outbox_kick.clear()

    async def _send(self, session: MqttSession, entry: OutboxEntry, record: SendRecord) -> None:
        assert self._state_dir is not None
        try:
            data = self._state_dir.outbox.read_update(entry)
        except FileNotFoundError:
            return  # acked (and deleted) meanwhile
        connection = session.connections
        ref = entry.ref
        self._uploading = True
        if self.status.state in ("idle", "online", "uploading"):
            self.status.set("uploading", entry.round, 0.0)
            self._status_changed.set()
        sent = 0

        def on_chunk(_index: int) -> None:
            nonlocal sent
            sent += 1
            if self.status.state == "uploading":
                self.status.report_progress(sent, ref.count)

        log.info(
            "sending update %s for round %d (%d chunks)%s",
            entry.update_id,
            entry.round,
            ref.count,
            f", attempt {record.sends + 1}" if record.sends else "",
        )
        try:
            await publish_chunks(
                session,
                data,
                ref,
                lambda index: self.topics.update(self.client, entry.round, index),
                kind="update",
                federation=entry.federation,
                sender=self.client,
                round_id=entry.round,
                update_id=entry.update_id,
                on_chunk=on_chunk,
            )
        except ExceptionGroup as group:  # publish_chunks runs a TaskGroup
            matched, rest = group.split(TransportError)
            if rest is not None or matched is None:
                raise
            log.warning("upload of %s interrupted: %s", entry.update_id, matched.exceptions[0])
            return
        self._counters["uploads"] += 1
        record.sends += 1
        record.sent_at = self._clock()
        # A reconnect during the upload may have lost chunks the old connection had
        # handed to the broker: send again on the new connection.
        record.connection = connection if session.connections == connection else None
