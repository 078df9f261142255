"""One round at a time: announcement -> download -> train -> commit.

The life of a round in :class:`RoundRunner`:

1. **Offer.**  The agent hands every decoded announcement to :meth:`RoundRunner.offer`,
   which asks :func:`~edge_agent.decisions.decide_round` what it means: skip it, train
   on it, or the federation finished.  Only the newest announcement to train on waits;
   a newer round abandons the one in progress (training stops at its next batch).
2. **Run.**  The ``rounds`` task (:meth:`RoundRunner.run`) takes the waiting
   announcement, decides again (a round may have been answered meanwhile) and runs it
   as its own task, ``fedmq[<client>].round-<n>``: fetch the bundle and the global
   parameters (blob cache first, then the retained chunks), train on a worker thread,
   commit the update to the outbox (one atomic rename) and kick the uploader.
3. **Retry.**  A round that failed (data, bundle, download, disk) is offered again after
   a jittered exponential back-off from ``limits.round_retry_s`` up to
   :data:`ROUND_RETRY_MAX`, unless something newer is waiting or running by then.
   Devices of a plant fail together (a broker outage, a bad bundle): the jitter keeps
   their retries from arriving in lockstep.
4. **Shutdown.**  :meth:`RoundRunner.finish` lets training stop at its next batch and a
   commit in progress complete, then cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from edge_agent.blob_cache import DiskFullError
from edge_agent.context import AgentContext
from edge_agent.decisions import (
    Finished,
    OutOfTimeError,
    RoundDecision,
    Skip,
    Train,
    decide_round,
    decline_reason,
)
from edge_agent.metrics_file import AgentFigures, MetricsTextfile
from edge_agent.training import (
    ModelCache,
    RoundInputs,
    RoundOutput,
    run_in_thread,
    train_and_commit,
)
from fedmq.backoff import Backoff
from fedmq.errors import (
    BundleError,
    ConfigError,
    DecodeError,
    IntegrityError,
    TrainingCancelled,
    TrainingError,
    TransportError,
)
from fedmq.log_format import log_context
from fedmq.timeouts import wait_event, within
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import DeclineReason, RoundAnnouncement

log = logging.getLogger(__name__)

ROUND_RETRY_MAX = 600.0  # seconds: cap of the back-off between attempts at a failed round
TRAIN_THREAD_PREFIX = "fedmq-train"
METRICS_REFRESH = 60.0  # seconds: the metrics textfile is rewritten this often while idle

# What can make one round fail while the agent stays healthy: the round is retried.
ROUND_FAILURES = (TrainingError, BundleError, IntegrityError, TransportError, DecodeError)
# Failures of the device itself (a full disk, a broken data entry point): retried too,
# but the message names the exception type, which says more than its text alone.
DEVICE_FAILURES = (ConfigError, OSError)

TrainRunner = Callable[[Callable[[], RoundOutput], str], Awaitable[RoundOutput]]
"""Runs ``function`` (a round's blocking work) off the event loop; ``str`` names it."""


class RoundRunner:
    """Takes announcements, runs one round at a time, retries failed ones.

    Args:
        context: the running agent's resources.
        train_runner: runs a round's blocking work off the event loop (default: a new
            daemon thread per round, :func:`~edge_agent.training.run_in_thread`).
    """

    def __init__(self, context: AgentContext, train_runner: TrainRunner = run_in_thread) -> None:
        self._context = context
        self._train_runner = train_runner
        self._models = ModelCache(context.settings.threads)
        self._wakeup = asyncio.Event()
        self._pending: RoundAnnouncement | None = None
        self._current: RoundAnnouncement | None = None
        self._task: asyncio.Task[None] | None = None
        # One flag per round: an abandoned round's thread may still be running and must
        # keep seeing its own flag set while the next round trains.
        self._cancel = threading.Event()
        self._backoff = Backoff(context.settings.limits.round_retry_s, ROUND_RETRY_MAX)
        self._backoff_round: int | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        settings = context.settings
        self._metrics = MetricsTextfile(
            settings.metrics.textfile, settings.client_id, settings.federation
        )
        self._metrics_lock = asyncio.Lock()  # one write at a time (one temporary name)

    # -- called by the agent --------------------------------------------------------

    def offer(self, announcement: RoundAnnouncement) -> RoundDecision:
        """Act on an announcement (queue it, abandon the current round); return the decision.

        On :class:`~edge_agent.decisions.Finished` the caller drops the outbox and goes
        idle: that is the uploader's business, not the runner's.
        """
        current = self._current
        decision = self._decide(announcement, current.round if current is not None else None)
        if isinstance(decision, Skip):
            log.log(decision.level, "ignoring announcement: %s", decision.reason)
        elif isinstance(decision, Finished):
            log.info("%s; going idle", decision.reason)
            self._pending = None
            self._abandon("the federation finished")
        elif isinstance(decision, Train):
            if current is not None:
                self._abandon(f"round {announcement.round} was announced")
            self._pending = decision.announcement
            self._wakeup.set()
        return decision

    @property
    def current(self) -> RoundAnnouncement | None:
        """The announcement of the round being downloaded or trained, if any."""
        return self._current

    def cancel_training(self) -> None:
        """Ask the running round's training to stop at its next batch."""
        self._cancel.set()

    async def finish(self, grace: float) -> None:
        """Shutdown: give the round in progress ``grace`` seconds to stop, then cancel it."""
        self.cancel_training()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        task = self._task
        if task is None or task.done():
            await self.write_metrics()
            return
        # Training stops at its next batch; a commit in progress completes (it is
        # atomic either way).  Only then is the task cancelled.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await within(asyncio.shield(task), grace)
        if not task.done():
            log.warning("training did not stop within %.0f s; abandoning it", grace)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.write_metrics()

    async def run(self) -> None:
        """The ``rounds`` task: run each announcement that was offered, one at a time."""
        while True:
            if not await wait_event(self._wakeup, METRICS_REFRESH):
                await self.write_metrics()  # uploads, acks and reconnects since the round
                continue
            self._wakeup.clear()
            announcement, self._pending = self._pending, None
            if announcement is None or self._context.is_stopping():
                continue
            if not isinstance(self._decide(announcement, None), Train):
                continue
            self._current = announcement
            self._cancel = threading.Event()
            with log_context(round=announcement.round):  # on every line the round logs
                self._task = asyncio.create_task(
                    self._round(announcement),
                    name=self._context.task_name(f"round-{announcement.round}"),
                )
            try:
                await self._task
            except asyncio.CancelledError:
                current_task = asyncio.current_task()
                if current_task is not None and current_task.cancelling():
                    raise  # the agent is shutting down
            finally:
                self._current = None
                self._task = None
                if self._context.status.state in ("downloading", "training"):
                    self._context.set_state("idle")
            await self.write_metrics()

    async def write_metrics(self) -> None:
        """Rewrite the ``[metrics] textfile`` (if configured) with the current figures."""
        if self._metrics.path is None:
            return
        context = self._context
        counters, session = context.counters, context.session
        figures = AgentFigures(
            rounds_trained=counters.rounds_trained,
            rounds_failed=counters.rounds_failed,
            updates_acked=counters.updates_acked,
            updates_dropped=counters.updates_dropped,
            bytes_sent=session.bytes_sent,
            bytes_received=session.bytes_received,
            connections=session.connections,
            last_round=context.state_dir.state.last_answered_round,
            times=self._metrics.times,
        )
        try:
            async with self._metrics_lock:
                await asyncio.to_thread(self._metrics.write, figures)
        except OSError as exc:
            log.warning("cannot write the metrics textfile %s: %s", self._metrics.path, exc)

    # -- one round ------------------------------------------------------------------

    def _decide(self, announcement: RoundAnnouncement, working_on: int | None) -> RoundDecision:
        context = self._context
        return decide_round(
            announcement,
            client=context.client,
            federation=context.settings.federation,
            last_answered=context.state_dir.state.last_answered_round,
            working_on=working_on,
        )

    def _abandon(self, why: str) -> None:
        task, current = self._task, self._current
        if task is None or task.done() or current is None:
            return
        log.info("abandoning round %d: %s", current.round, why)
        self._cancel.set()
        task.cancel()

    async def _round(self, announcement: RoundAnnouncement) -> None:
        context = self._context
        round_id = announcement.round
        log.info("round %d: starting", round_id)
        try:
            output = await self._download_and_train(announcement)
        except TrainingCancelled:
            log.info("round %d: training cancelled", round_id)
            return
        except ROUND_FAILURES as exc:
            self._failed(announcement, str(exc), decline_reason(exc))
            return
        except DiskFullError as exc:  # names the directory and the sizes
            self._failed(announcement, str(exc), decline_reason(exc))
            return
        except (*DEVICE_FAILURES, MemoryError) as exc:
            self._failed(announcement, f"{type(exc).__name__}: {exc}", decline_reason(exc))
            return
        if self._backoff_round == round_id:
            self._backoff_round = None
        context.counters.rounds_trained += 1
        context.counters.updates_committed += 1
        self._metrics.trained(output.seconds)
        entry = output.entry
        log.info(
            "round %d: %s in %.1f s on %d examples (%s); update %s is %d bytes in %d chunks",
            round_id,
            "evaluated the global model" if announcement.task == "evaluate" else "trained",
            output.seconds,
            output.update.meta.num_examples,
            ", ".join(f"{k}={v:.4g}" for k, v in output.update.meta.metrics.items()),
            entry.update_id,
            entry.size,
            entry.ref.count,
        )
        context.status.bundle = announcement.bundle.sha256
        context.cache.evict(
            {announcement.bundle.sha256, announcement.params.sha256, *context.protected_blobs}
        )
        context.set_state("idle", round_id)
        context.outbox_kick.set()

    def _failed(
        self, announcement: RoundAnnouncement, problem: str, declined: DeclineReason | None
    ) -> None:
        context = self._context
        round_id = announcement.round
        context.counters.rounds_failed += 1
        self._metrics.failed()
        if self._backoff_round != round_id:  # a different round starts from the bottom
            self._backoff.reset()
            self._backoff_round = round_id
        delay = self._backoff.next_delay()
        log.error("round %d failed: %s; retrying in %.3g s", round_id, problem, delay)
        if declined is not None and announcement.addresses(context.client):
            # Tell the aggregator now, so the round does not wait for this device.
            log.warning("declining round %d (%s)", round_id, declined)
            context.status.decline(round_id, declined, problem)
            context.status_changed.set()
        else:
            context.status.error(f"round {round_id}: {problem}")
            context.set_state("idle", round_id)
        if self._retry_handle is not None:
            self._retry_handle.cancel()  # an older round's retry: this one is newer
        self._retry_handle = asyncio.get_running_loop().call_later(delay, self._retry, announcement)

    def _retry(self, announcement: RoundAnnouncement) -> None:
        self._retry_handle = None
        if self._context.is_stopping() or self._pending is not None or self._current is not None:
            return  # something newer is queued or running; it decides
        self._pending = announcement
        self._wakeup.set()

    async def _download_and_train(self, announcement: RoundAnnouncement) -> RoundOutput:
        context = self._context
        settings = context.settings
        context.set_state("downloading", announcement.round)
        bundle_blob = await self._fetch(announcement.bundle)
        params_blob = await self._fetch(announcement.params)
        context.status.bundle = announcement.bundle.sha256
        context.set_state("training", announcement.round)
        inputs = RoundInputs(
            announcement=announcement,
            client=context.client,
            bundle_blob=bundle_blob,
            params_blob=params_blob,
            data=settings.data,
            limits=context.limits,
        )
        cancel = self._cancel
        max_seconds = settings.limits.max_train_seconds
        deadline = time.monotonic() + max_seconds
        state_dir = context.state_dir

        def should_stop() -> bool:  # polled by the training thread between batches
            if time.monotonic() > deadline:
                raise OutOfTimeError(
                    f"training exceeded limits.max_train_seconds ({max_seconds:g} s)"
                )
            return cancel.is_set()

        return await self._train_runner(
            lambda: train_and_commit(
                inputs,
                self._models,
                state_dir,
                progress=context.status.report_progress,
                should_stop=should_stop,
            ),
            f"{TRAIN_THREAD_PREFIX}-{announcement.round}",
        )

    async def _fetch(self, ref: BlobRef) -> bytearray:
        context = self._context
        cached = context.cache.get(ref, context.limits)
        if cached is not None:
            return cached
        try:
            ref.check_limits(context.limits)
        except DecodeError as exc:
            raise TrainingError(f"blob {ref.sha256[:12]}… is too large: {exc}") from exc
        try:
            return await context.receiver.fetch(ref, context.settings.limits.download_timeout_s)
        except BaseException:
            await context.receiver.cancel(ref)  # chunks on disk stay for the next attempt
            raise
