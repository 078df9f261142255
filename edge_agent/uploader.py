"""The outbox's way out: send committed updates until an ack settles each one.

The life of an update in :class:`Uploader`, once the round runner committed it to the
outbox (on disk, so all of this resumes after a restart):

1. **Send.**  The ``outbox`` task (:meth:`Uploader.run`) asks
   :func:`~edge_agent.decisions.outbox_action` about every entry: send it now (once per
   broker connection: a reconnect may have lost chunks the broker had acknowledged),
   wait (no ack yet, within the doubling ack timeout) or expire it (unacknowledged past
   ``outbox.max_age_s``).  Chunks go out with QoS 1 on ``update/<client>/<round>/<i>``.
2. **Ack.**  The agent hands every decoded ack to :meth:`Uploader.on_ack`;
   :func:`~edge_agent.decisions.decide_ack` says whether it settles an entry we hold.
   Whatever the verdict, a settled entry leaves the outbox.
   A resend request (the aggregator saw the upload stall with chunks missing: a broker
   dropped them) makes :meth:`Uploader.on_resend` queue just those chunks.
   When the round paces uploads (``upload_slots`` in its announcement,
   :mod:`fedmq.coordinator.pacing`), a send is only chunk 0, and the aggregator's resend
   request for the rest is the grant of an upload slot.
3. **Finished.**  When the federation is over, :meth:`Uploader.drop_outbox` drops every
   entry: no aggregator will ever ack them.

The loop sleeps until the next entry is due or :attr:`AgentContext.outbox_kick` is set
(a commit, an ack, a reconnect).  It sends nothing once shutdown began.
"""

from __future__ import annotations

import logging
import random

from edge_agent.context import AgentContext
from edge_agent.decisions import IgnoreAck, SendRecord, decide_ack, outbox_action
from edge_agent.outbox import OutboxEntry
from fedmq.errors import TransportError
from fedmq.timeouts import wait_event
from fedmq.transport.blobs import fit_chunk_size, publish_chunks
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import Ack, ResendRequest
from fedmq.wire.signing import update_statement

log = logging.getLogger(__name__)


class Uploader:
    """Sends the outbox's updates and settles them by their acks.

    Args:
        context: the running agent's resources.
    """

    def __init__(self, context: AgentContext) -> None:
        self._context = context
        self._outbox = context.state_dir.outbox
        self._records: dict[str, SendRecord] = {}  # in memory: a restart sends again
        self._resends: dict[str, tuple[BlobRef, set[int]]] = {}  # chunks asked for again
        self._waiting_since: float | None = None  # for the aggregator to be online

    # -- called by the agent --------------------------------------------------------

    def on_ack(self, ack: Ack) -> None:
        """Settle the outbox entry ``ack`` names, if it names one of ours."""
        context = self._context
        decision = decide_ack(
            ack,
            client=context.client,
            federation=context.settings.federation,
            entry=self._outbox.get(ack.update_id),
        )
        if isinstance(decision, IgnoreAck):
            log.log(decision.level, "ignoring ack: %s", decision.reason)
            return
        log.log(decision.level, "%s", decision.message)
        self._remove(decision.update_id)
        if ack.accepted:
            context.counters.updates_acked += 1
        else:
            context.counters.updates_dropped += 1
        if decision.error is not None:
            context.status.error(decision.error)
            context.status_changed.set()
        context.outbox_kick.set()

    def on_resend(self, request: ResendRequest) -> None:
        """Queue the chunks the aggregator says it is missing, if we hold that update."""
        entry = self._outbox.get(request.update_id)
        context = self._context
        if (
            entry is None
            or request.client != context.client
            or request.federation != context.settings.federation
            or entry.round != request.round
            or entry.ref.sha256 != request.sha256
        ):
            log.debug("ignoring resend request for update %s: not ours", request.update_id)
            return
        ref = BlobRef(entry.ref.sha256, entry.ref.size, request.chunk_size)
        wanted = {index for index in request.missing if index < ref.count}
        if not wanted:
            return
        _, queued = self._resends.get(request.update_id, (ref, set()))
        self._resends[request.update_id] = (ref, queued | wanted)
        log.info(
            "the aggregator is missing %d chunk(s) of update %s: sending them again",
            len(wanted),
            request.update_id,
        )
        context.outbox_kick.set()

    def resume(self, why: str) -> None:
        """Send every unacknowledged update again now (the aggregator resubscribed)."""
        if self._records:
            log.info("%s: re-sending %d unacknowledged update(s)", why, len(self._records))
        for record in self._records.values():
            record.connection = None
        self._context.outbox_kick.set()

    def drop_outbox(self, why: str) -> None:
        """Drop every entry (the federation finished: nobody will ack them)."""
        for entry in self._outbox.entries():
            self._drop(entry, why)

    # -- the outbox task ------------------------------------------------------------

    async def run(self) -> None:
        """The ``outbox`` task: (re)send entries until acked; expire the forgotten ones."""
        context = self._context
        session = context.session
        settings = context.settings.outbox
        while True:
            wake_at: float | None = None
            sent = await self._send_requested()
            if not self._aggregator_ready():
                await wait_event(context.outbox_kick, settings.ack_timeout_s)
                context.outbox_kick.clear()
                continue
            for entry in self._outbox.entries():
                record = self._records.setdefault(entry.update_id, SendRecord())
                now = context.clock()
                action, due = outbox_action(
                    entry,
                    record,
                    now=now,
                    connection=session.connections,
                    ack_timeout=settings.ack_timeout_s,
                    max_age=settings.max_age_s,
                )
                if action == "expire":
                    age = now - entry.created_at
                    self._drop(entry, f"unacknowledged for {age:.0f} s", logging.WARNING)
                elif action == "wait":
                    assert due is not None  # outbox_action gives a due time with "wait"
                    wake_at = due if wake_at is None else min(wake_at, due)
                elif session.is_connected and not context.is_stopping():
                    await self._send(entry, record)
                    sent = True
            if sent:
                continue  # look again: acks may have come, and the next wait is now known
            context.uploading = False
            if context.status.state == "uploading":
                context.set_state("idle")
            timeout = None if wake_at is None else max(0.0, wake_at - context.clock())
            await wait_event(context.outbox_kick, timeout)
            context.outbox_kick.clear()

    def _aggregator_ready(self) -> bool:
        context = self._context
        session = context.session
        if context.aggregator.ready(session.connections) or not self._outbox.entries():
            self._waiting_since = None
            return True
        # Not heard of since our (re)connect: wait for its status, but never longer than
        # an ack timeout (its status may be lost with a broker that kept no retained state).
        now = context.clock()
        if self._waiting_since is None:
            self._waiting_since = now
            log.info("waiting for the aggregator to be online before uploading")
        return now - self._waiting_since >= context.settings.outbox.ack_timeout_s

    async def _send_requested(self) -> bool:
        """Send the chunks asked for by resend requests; True if anything was sent."""
        context = self._context
        sent = False
        while self._resends and context.session.is_connected and not context.is_stopping():
            update_id, (ref, indices) = self._resends.popitem()
            entry = self._outbox.get(update_id)
            if entry is None:
                continue
            record = self._records.setdefault(update_id, SendRecord())
            await self._send(entry, record, ref=ref, indices=indices)
            sent = True
        return sent

    def _remove(self, update_id: str) -> None:
        self._outbox.remove(update_id)
        self._records.pop(update_id, None)
        self._resends.pop(update_id, None)

    def _drop(self, entry: OutboxEntry, why: str, level: int = logging.INFO) -> None:
        log.log(level, "dropping update %s for round %d: %s", entry.update_id, entry.round, why)
        self._remove(entry.update_id)
        self._context.counters.updates_dropped += 1

    def _signature(self, entry: OutboxEntry) -> bytes | None:
        key = self._context.device_key
        if key is None:
            return None
        statement = update_statement(
            entry.federation,
            self._context.client,
            entry.round,
            entry.update_id,
            bytes.fromhex(entry.ref.sha256),
            entry.ref.size,
        )
        return key.sign(statement)

    async def _send(
        self,
        entry: OutboxEntry,
        record: SendRecord,
        *,
        ref: BlobRef | None = None,
        indices: set[int] | None = None,
    ) -> None:
        """Send ``entry`` (only chunks ``indices`` of ``ref``, for a resend request)."""
        context = self._context
        session = context.session
        try:
            data = self._outbox.read_update(entry)
        except FileNotFoundError:
            return  # acked (and deleted) meanwhile
        connection = session.connections
        if ref is None:
            # The announced chunk size may not fit this device's view of the broker's cap.
            fitted = fit_chunk_size(entry.ref.chunk_size, session.max_packet_size, context.topics)
            ref = BlobRef(entry.ref.sha256, entry.ref.size, fitted)
        if indices is None and entry.paced and ref.count > 1:
            indices = {0}  # ask for an upload slot: the rest follows the aggregator's grant
        total = ref.count if indices is None else len(indices)
        context.uploading = True
        if context.status.state in ("idle", "online", "uploading"):
            context.status.set("uploading", entry.round, 0.0)
            context.status_changed.set()
        sent = 0

        def on_chunk(_index: int) -> None:
            nonlocal sent
            sent += 1
            if context.status.state == "uploading":
                context.status.report_progress(sent, total)

        log.info(
            "sending update %s for round %d (%d of %d chunks)%s",
            entry.update_id,
            entry.round,
            total,
            ref.count,
            f", attempt {record.sends + 1}" if record.sends else "",
        )
        try:
            await publish_chunks(
                session,
                data,
                ref,
                lambda index: context.topics.update(context.client, entry.round, index),
                kind="update",
                federation=entry.federation,
                sender=context.client,
                round_id=entry.round,
                update_id=entry.update_id,
                signature=self._signature(entry),
                indices=indices,
                on_chunk=on_chunk,
            )
        except ExceptionGroup as group:  # publish_chunks runs a TaskGroup
            matched, rest = group.split(TransportError)
            if rest is not None or matched is None:
                raise
            log.warning("upload of %s interrupted: %s", entry.update_id, matched.exceptions[0])
            return
        context.counters.uploads += 1
        record.sends += 1
        record.sent_at = context.clock()
        record.jitter = random.uniform(0.5, 1.0)
        # A reconnect during the upload may have lost chunks the old connection had
        # handed to the broker: send again on the new connection.
        record.connection = connection if session.connections == connection else None
