"""The aggregator's state machine: rounds, intake, validation verdicts, aggregation.

Pure: no IO, no clock of its own.  Every input is a method taking ``now`` (unix
seconds); every method returns a list of :mod:`~fedmq.coordinator.actions` for the
service to execute in order.  The life of an update (:mod:`~fedmq.coordinator.update_desk`)::

    receive_chunk()  ->  VerifyUpdate           (bytes complete; validate off-loop)
    verified()       ->  PersistUpdate | ack    (accept: reserve a sequence number)
    persisted()      ->  ack, maybe RoundClosed (durable: fold it, count it, ack it)

The life of a round (:mod:`~fedmq.coordinator.round_flow`) follows the transition
table in :mod:`~fedmq.coordinator.lifecycle` (``waiting -> collecting -> waiting`` for
the next round, or ``finished``); when a round opens and closes is decided by the
mode's rules (:mod:`~fedmq.coordinator.rules`).  Both share one
:class:`~fedmq.coordinator.state.FederationState`.  Every input ends in one step
(:meth:`Coordinator._end_input`) that adds ``StatusChanged`` when the published status
(built by :mod:`~fedmq.coordinator.status_report`) would differ and ``ArmTimer`` when the
next wake-up moved earlier.  The inference models the service builds go through
:mod:`~fedmq.coordinator.release_desk`.

Durability contract: the service persists what the durable commands (``SaveState``,
``SaveCheckpoint``, ``SaveRecord``, ``PruneUpdates``, ``PersistUpdate``) carry before
executing later actions.  After a crash, :meth:`Coordinator.restore` plus
:meth:`Coordinator.replay` of the stored updates of the open round rebuild exactly the
pre-crash state (:mod:`~fedmq.coordinator.snapshot`); rounds close as they would have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from fedmq.buffers import Buffer
from fedmq.coordinator.actions import (
    Action,
    ArmTimer,
    Noted,
    Publish,
    SaveCheckpoint,
    SaveState,
    StatusChanged,
    Ticket,
)
from fedmq.coordinator.admission import Ignore
from fedmq.coordinator.blob_guard import BlobGuard
from fedmq.coordinator.intake import UpdateIntake
from fedmq.coordinator.ledger import BlobLedger
from fedmq.coordinator.lifecycle import Phase
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.release_desk import ReleaseDesk
from fedmq.coordinator.releases import ModelShelf
from fedmq.coordinator.roster import Roster, allowed_agents
from fedmq.coordinator.round_flow import RoundFlow
from fedmq.coordinator.rules import rules_for
from fedmq.coordinator.snapshot import Checkpoint, Snapshot
from fedmq.coordinator.state import FederationState, Params
from fedmq.coordinator.status_report import StatusKey, StatusReport, build_status, status_key
from fedmq.coordinator.update_desk import UpdateDesk
from fedmq.coordinator.validation import UpdateRejection, UpdateSchema, VerifiedUpdate
from fedmq.errors import ConfigError, StateError
from fedmq.strategies.strategy import Strategy
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import AgentStatus, AggregatorStatus, encode_control
from fedmq.wire.signing import VerifyKey
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.topics import BlobChunkTopic, Topics, UpdateChunkTopic


class Coordinator:
    """One federation's rounds, from announcement to new global model.

    Build a fresh one with the constructor, or :meth:`restore` one from a snapshot;
    then feed it :meth:`replay` (restore only), :meth:`start`, and events.

    Args:
        config: federation and round policy.
        strategy: how updates become the next model.
        schema: what a valid update looks like (from the bundle manifest).
        bundle: the bundle archive blob (``pack_files`` of the bundle files).
        params: the initial global parameters and buffers, in manifest order.
        now: current unix time.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        strategy: Strategy,
        schema: UpdateSchema,
        bundle: bytes,
        params: Mapping[str, npt.NDArray[Any]],
        *,
        now: float,
    ) -> None:
        if schema.federation != config.federation:
            raise ConfigError(
                f"update schema is for {schema.federation!r}, config for {config.federation!r}"
            )
        missing = [name for name in schema.shapes if name not in params]
        if missing:
            raise ConfigError(f"initial parameters lack update tensors {missing[:5]}")
        self.config = config
        self.rules = rules_for(config)
        self.strategy = strategy
        self.schema = schema
        self.topics = Topics(config.federation, config.root)
        devices = config.security.devices if config.security is not None else None
        self.roster = Roster(
            config.heartbeat_s,
            config.missed_heartbeats,
            allowed_agents(config.agents, devices),
            config.dropout_grace_s,
            max_agents=config.max_agents,
        )
        self.intake = UpdateIntake(
            config.federation,
            max_update_bytes=schema.max_update_bytes,
            max_pending=config.max_pending_updates,
            ttl_s=config.pending_ttl_s,
            devices=devices,
            resend_after_s=config.resend_after_s,
        )
        self.state = FederationState(
            params=dict(params),
            blobs=BlobLedger(bundle, encode_tensors(params).data, config.chunk_size),
        )
        strategy.begin_round(1, schema.layout)
        self.flow = RoundFlow(
            config,
            self.rules,
            strategy,
            schema,
            self.topics,
            self.roster,
            self.state,
            not_before=now + config.settle_s,
        )
        self.blob_guard = BlobGuard(config.aggregator_id)
        self.desk = UpdateDesk(config, self.topics, self.roster, strategy, self.state, self.flow)
        self.releases = ReleaseDesk(config, self.state, self.flow)  # the inference models
        self.report = StatusReport()  # traffic, last round, recent refusals (for the status)
        self._restored = False
        self._reported: StatusKey | None = None  # status last announced by StatusChanged
        self._armed: float | None = None  # wake-up last asked for by ArmTimer

    # ------------------------------------------------------------------ construction

    @classmethod
    def restore(
        cls,
        config: CoordinatorConfig,
        strategy: Strategy,
        schema: UpdateSchema,
        bundle: bytes,
        snapshot: Mapping[str, Any],
        params_blob: Buffer,
        optimizer_blob: Buffer,
        *,
        now: float,
    ) -> Coordinator:
        """Rebuild the coordinator a crashed or stopped service left behind.

        A finished federation restored with more ``config.rounds`` than it ran continues
        (:meth:`~fedmq.coordinator.snapshot.Snapshot.under_rounds`): its next round
        waits for agents, from its last checkpoint.

        Args:
            config: as for the constructor (must match the snapshot's federation and mode).
            strategy: a fresh strategy; its optimizer state is loaded from the checkpoint.
            schema: as for the constructor.
            bundle: the bundle archive (must be the one the snapshot names).
            snapshot: the last ``SaveState`` snapshot.
            params_blob: the checkpoint named by ``snapshot["checkpoint"]``.
            optimizer_blob: the server optimizer state saved with that checkpoint.
            now: current unix time.

        Raises:
            ConfigError: the snapshot belongs to another federation, bundle or mode, or
                ``config.rounds`` is below the rounds it ran (or the round under way).
            StateError: the snapshot or checkpoint is corrupt or inconsistent.
        """
        snap = Snapshot.from_json(snapshot)
        stored = Checkpoint.decode(params_blob, optimizer_blob)
        self = cls(config, strategy, schema, bundle, stored.params, now=now)
        self.state.resume(snap, config)
        stored.load_optimizer(strategy)
        snap.check_params(self.params_ref)
        if self.state.round.phase != "finished":
            strategy.begin_round(self.state.round.number, schema.layout)
        self._restored = True
        return self

    def snapshot(self) -> dict[str, Any]:
        """The durable state (JSON-ready): what :meth:`restore` needs besides checkpoints."""
        return self.state.snapshot(self.config).to_json()

    # ------------------------------------------------------------------ properties

    @property
    def round(self) -> int:
        """Current round number (the open one, or the next to open)."""
        return self.state.round.number

    @property
    def phase(self) -> Phase:
        """``waiting`` for agents, ``collecting`` updates, or ``finished``."""
        return self.state.round.phase

    @property
    def deadline(self) -> float:
        """Deadline of the open round (0 when none is open)."""
        return self.state.round.deadline

    @property
    def selected(self) -> tuple[str, ...] | None:
        """Agents asked in the open round (None: anyone)."""
        return self.state.round.selected

    @property
    def accepted(self) -> int:
        """Updates accepted into the open round (late ones included)."""
        return len(self.state.round.contributions)

    @property
    def pending(self) -> int:
        """Accepted updates not yet reported persisted."""
        return len(self.state.round.reserved)

    @property
    def params(self) -> Params:
        """The current global parameters (do not modify)."""
        return self.state.params

    @property
    def params_blob(self) -> bytes:
        """The current global parameters as the tensor-set blob agents download."""
        return self.state.blobs.params_blob

    @property
    def bundle_ref(self) -> BlobRef:
        """The bundle archive blob."""
        return self.state.blobs.bundle_ref

    @property
    def params_ref(self) -> BlobRef:
        """The current global parameter blob."""
        return self.state.blobs.params_ref

    @property
    def checkpoint(self) -> int:
        """Checkpoint the current global parameters were saved as."""
        return self.state.checkpoint

    @property
    def next_seq(self) -> int:
        """Sequence number the next accepted update gets."""
        return self.state.seq

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> list[Action]:
        """Begin (or resume): publish what agents need, then open or continue the round.

        Call once, after :meth:`replay` of any stored updates.
        """
        if self.flow.started:
            raise StateError("start() called twice")
        self.flow.started = True
        # Retained agent statuses arrive only after we subscribe: until the settle period
        # ends, an empty roster means "not heard yet", not "every agent dropped out".
        self.flow.not_before = now + self.config.settle_s
        actions: list[Action] = []
        if not self._restored:
            actions.append(SaveCheckpoint(0, self.params_blob, self.flow.encode_optimizer()))
            actions.append(SaveState(self.snapshot()))
        actions.extend(self.releases.start())  # before the blobs: the models are among them
        actions.extend(self.state.blobs.publish(self.round))
        actions.extend(self.flow.resume(now))  # announce, then open, continue or finish
        return self._end_input(actions, now, rearm=True)

    def republish(self, now: float) -> list[Action]:
        """Everything retained again (after a reconnect: the broker may have lost it).

        A reconnect usually means the broker restarted, which fired every agent's last
        will: dropouts and deadlines are not judged until agents had time to reconnect.
        """
        self.flow.not_before = max(self.flow.not_before, now + self.config.reconnect_settle_s)
        actions: list[Action] = [*self.state.blobs.publish(self.round, again=True)]
        actions.append(self.flow.announcement_action(now))
        self._reported = None  # the retained status may be lost too
        return self._end_input(actions, now)

    def set_devices(self, devices: Mapping[str, VerifyKey], now: float) -> list[Action]:
        """Replace the device registry (a device was enrolled or revoked).

        A revoked device is no longer known: its updates are dropped from now on and a
        round stops waiting for it.
        """
        if self.config.security is None:
            raise ConfigError("this federation has no device registry ([security] devices)")
        self.intake.devices = dict(devices)
        self.roster.set_allowed(allowed_agents(self.config.agents, devices))
        actions: list[Action] = [Noted("info", f"device registry: {len(devices)} devices")]
        if self.state.round.phase == "collecting":
            actions.extend(self.flow.maybe_close(now))
        return self._end_input(actions, now)

    def on_status(self, client: str, status: AgentStatus | None, now: float) -> list[Action]:
        """An agent's retained status arrived (None: the retained status was deleted)."""
        if status is None:
            self.roster.forget(client)
        elif status.client != client:
            return [Noted("warning", f"status on {client!r}'s topic names {status.client!r}")]
        elif status.declined is not None and status.round is not None:
            if not self.roster.update(status, now):
                return []
            return self._end_input(
                self.flow.declined(client, status.round, status.declined, now), now
            )
        elif not self.roster.update(status, now):
            # Ignored: nothing changed, so no end-of-input step.
            note = self.roster.ignored_note(client)
            return [] if note is None else [Noted("info", note)]
        return self._end_input(self.flow.apply_rules(now), now)

    def set_chunk_size(self, chunk_size: int, now: float, *, announce: bool) -> list[Action]:
        """Chunk blobs and uploads by ``chunk_size`` from now on (the broker's packet cap).

        With ``announce`` (the round was started already) the blobs and the announcement
        are published again at once; otherwise :meth:`start` publishes them.
        """
        if chunk_size == self.state.blobs.chunk_size:
            return []
        self.state.blobs.rechunk(chunk_size)
        actions: list[Action] = [
            Noted("info", f"chunk size is now {chunk_size} bytes, to fit the broker's packets")
        ]
        if announce:
            actions.extend(self.flow.announce(now))
        return self._end_input(actions, now)

    def on_blob_chunk(self, topic: BlobChunkTopic, payload: Buffer, now: float) -> list[Action]:
        """A retained blob chunk was (re)published: repair it if it is not ours."""
        return self.blob_guard.repair(
            topic, payload, self.state.blobs, self.state.round.number, now
        )

    def receive_chunk(self, topic: UpdateChunkTopic, payload: Buffer, now: float) -> list[Action]:
        """One message arrived on ``update/<client>/<round>/<i>``."""
        self.report.received(len(payload))
        event = self.intake.receive(
            topic, payload, now, lambda header: self.desk.admit(header, now)
        )
        if event is None:
            # Mid-upload: nothing changed but, for a new partial update, its expiry.
            armed = self._armed
            if (
                armed is not None
                and now + self.intake.ttl_s >= armed
                and not self.intake.grants_ready
            ):
                return []
            return self._end_input([], now)
        return self._end_input(self.desk.settle(event, now), now)

    def verified(self, result: VerifiedUpdate | UpdateRejection, now: float) -> list[Action]:
        """The outcome of a ``VerifyUpdate``: decide whether the update counts."""
        outcome = self.desk.verified(result, now)
        if isinstance(outcome, Ignore):  # nothing changed: no end-of-input step
            key = result.key
            return [Noted("info", f"update {key.update_id} of {key.client}: {outcome.why}")]
        return self._end_input(outcome, now)

    def persisted(self, ticket: Ticket, now: float) -> list[Action]:
        """The ticket's update is durable: fold it, ack it, maybe close the round."""
        slot = (ticket.key.client, ticket.key.update_id)
        if self.state.round.reserved.get(slot) is not ticket:
            raise StateError(f"persisted() for an unknown ticket {ticket.seq}")
        actions = self.desk.commit(ticket, now)
        actions.extend(self.flow.maybe_close(now))
        return self._end_input(actions, now)

    def persist_failed(self, ticket: Ticket, error: str, now: float) -> list[Action]:
        """The ticket's update could not be stored: forget it unacked (the agent re-sends)."""
        actions = self.desk.persist_failed(ticket, error)
        actions.extend(self.flow.maybe_close(now))
        return self._end_input(actions, now)

    # ------------------------------------------------------------------ inference models

    @property
    def models(self) -> ModelShelf:
        """The inference models held for the devices (:mod:`~fedmq.coordinator.releases`)."""
        return self.releases.shelf

    def provide_models(self, models: Mapping[str, bytes]) -> None:
        """Give back the stored bytes of the models the snapshot names (before :meth:`start`).

        ``models`` maps sha256 to bytes; what does not match is ignored, and a released
        model whose bytes never came is no longer released (``start`` says so).
        """
        self.releases.provide(models)

    def set_inference_model(self, checkpoint: int, model: bytes, now: float) -> list[Action]:
        """The model a ``BuildInferenceModel`` built: hold it, publish it, announce it."""
        actions, announced = self.releases.built(checkpoint, model, now)
        # Unneeded, or held before start() (whose own end-of-input step covers it): no step.
        return self._end_input(actions, now) if announced else actions

    def inference_model_failed(self, checkpoint: int, error: str, now: float) -> list[Action]:
        """A ``BuildInferenceModel`` failed: the previous releases stay as they are."""
        return self.releases.failed(checkpoint, error)

    def replay(self, update: VerifiedUpdate, seq: int, now: float) -> list[Action]:
        """Fold an update stored before a restart (call before :meth:`start`, in seq order).

        Returns its ack again: the crash may have come between persisting and acking.

        Raises:
            StateError: no round is open, or the update cannot belong to it.
        """
        # No end-of-input step: start() follows and reports status and timer.
        return self.desk.replay(update, seq, now)

    def on_timer(self, now: float) -> list[Action]:
        """Time passed: expire partial updates and silent agents, enforce deadlines."""
        actions: list[Action] = []
        for problem in self.intake.expire(now):
            actions.extend(self.desk.chunk_problem(problem))
        for due in self.intake.resend_due(now):
            actions.append(self.desk.resend_request(due, now))
        actions.extend(self.flow.apply_rules(now))
        return self._end_input(actions, now, rearm=True)

    def shutdown(self, now: float) -> list[Action]:
        """Going away cleanly: say so on the retained status (no last will on clean exit)."""
        status = self.status(now).model_copy(update={"state": "offline"})
        payload = encode_control(status, self.config.signer)
        return [Publish(self.topics.aggregator_status(), payload, retain=True)]

    # ------------------------------------------------------------------ queries

    def status(self, now: float) -> AggregatorStatus:
        """A snapshot for the retained ``aggregator/status`` topic."""
        return build_status(self.config, self.state, self.report, now)

    def next_wakeup(self, now: float) -> float | None:
        """When :meth:`on_timer` next has something to do."""
        times: list[float] = []
        expiry = self.intake.next_expiry()
        if expiry is not None:
            times.append(expiry)
        r = self.state.round
        if r.phase != "finished" and now < self.flow.not_before:
            times.append(self.flow.not_before)
        if r.phase == "collecting" and not r.reserved:
            times.append(r.deadline)
            if r.selected is not None:
                agent_expiry = self.roster.next_gone(now, r.outstanding())
                if agent_expiry is not None:
                    times.append(agent_expiry)
        return min(times, default=None)

    # ------------------------------------------------------------------ end of input

    def _end_input(self, actions: list[Action], now: float, *, rearm: bool = False) -> list[Action]:
        """The one place ``StatusChanged`` and ``ArmTimer`` come from.

        The status is announced when what it reports changed.  The timer is re-armed on
        the timer's own input (``rearm``: it has just fired) and whenever the next
        wake-up moved earlier; a wake-up that moved later needs nothing, because waking
        early is harmless: :meth:`on_timer` finds nothing due and re-arms.
        """
        self.intake.set_upload_slots(self.flow.announced_slots)
        if self.intake.grants_ready:  # paced uploads: a grant is a resend request
            actions.extend(
                self.desk.resend_request(due, now) for due in self.intake.resend_due(now)
            )
        self.report.observe(actions)
        key = status_key(self.state.round)
        if key != self._reported:
            self._reported = key
            actions.append(StatusChanged())
        wake = self.next_wakeup(now)
        armed = self._armed
        if rearm or (wake is not None and (armed is None or wake < armed)):
            self._armed = wake
            actions.append(ArmTimer(wake))
        return actions
