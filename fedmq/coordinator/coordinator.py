"""The aggregator's state machine: rounds, intake, validation verdicts, aggregation.

Pure: no IO, no clock of its own.  Every input is a method taking ``now`` (unix
seconds); every method returns a list of :mod:`~fedmq.coordinator.actions` for the service
to execute in order.  The life of an update::

    receive_chunk()  ->  VerifyUpdate           (bytes complete; validate off-loop)
    verified()       ->  PersistUpdate | ack    (accept: reserve a sequence number)
    persisted()      ->  ack, maybe CloseRound  (durable: fold it, count it, ack it)

A round (sync mode)::

    waiting --enough agents online--> collecting --target / all reported / deadline-->
        closed (new model) or, below quorum after one extension, failed --> next round

In async mode (FedBuff) every ``buffer_size`` accepted updates make a new version.

Durability contract: the service persists what ``SaveState``/``SaveCheckpoint``/
``PersistUpdate`` carry before executing later actions.  After a crash,
:meth:`Coordinator.restore` plus :meth:`Coordinator.replay` of the stored updates of the
open round rebuild exactly the pre-crash state; rounds close as they would have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedmq.buffers import Buffer
from fedmq.coordinator.actions import (
    Action,
    ArmTimer,
    CloseRound,
    Finish,
    Notice,
    PersistUpdate,
    PruneUpdates,
    Publish,
    Rejected,
    SaveCheckpoint,
    SaveRecord,
    SaveState,
    StatusChanged,
    Ticket,
    VerifyUpdate,
)
from fedmq.coordinator.admission import Accept, Ignore, Phase, RoundState, decide
from fedmq.coordinator.history import History
from fedmq.coordinator.intake import Answered, Assembled, ChunkProblem, UpdateIntake, Verdict
from fedmq.coordinator.ledger import BlobLedger, ref_from, ref_json
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.records import Contribution, RoundRecord, weighted_metrics
from fedmq.coordinator.roster import Roster
from fedmq.coordinator.selection import eligible, select
from fedmq.coordinator.staleness import staleness_weight
from fedmq.coordinator.validation import UpdateKey, UpdateRejection, UpdateSchema, VerifiedUpdate
from fedmq.errors import ConfigError, DecodeError, LocalProtocolError, StateError
from fedmq.strategies.strategy import Strategy
from fedmq.wire.blobs import BlobRef
from fedmq.wire.chunks import ChunkHeader
from fedmq.wire.control import (
    Ack,
    AgentStatus,
    AggregatorState,
    AggregatorStatus,
    RoundAnnouncement,
    encode_control,
)
from fedmq.wire.tensors import decode_tensors, encode_tensors
from fedmq.wire.topics import Topics, UpdateChunkTopic

SNAPSHOT_VERSION = 1
# What the retained announcement says in each phase ("waiting" addresses no agent).
ANNOUNCED_STATUS: dict[str, Literal["open", "waiting", "finished"]] = {
    "waiting": "waiting",
    "collecting": "open",
    "finished": "finished",
}

Params = dict[str, npt.NDArray[Any]]


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
        self.strategy = strategy
        self.schema = schema
        self.topics = Topics(config.federation, config.root)
        self.roster = Roster(
            config.heartbeat_s, config.missed_heartbeats, config.agents, config.dropout_grace_s
        )
        self.intake = UpdateIntake(
            config.federation,
            max_update_bytes=schema.max_update_bytes,
            max_pending=config.max_pending_updates,
            ttl_s=config.pending_ttl_s,
        )
        self._params: Params = dict(params)
        self.blobs = BlobLedger(bundle, encode_tensors(self._params).data, config.chunk_size)
        self._round = RoundState(1, "waiting")
        self._checkpoint = 0
        strategy.begin_round(1, schema.layout)
        self.history = History()
        self._seq = 0
        self.completed = 0
        self.failed = 0
        self.last_metrics: dict[str, float] = {}
        self.finish_reason: str | None = None
        self._not_before = now + config.settle_s
        self._restored = False
        self._started = False

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
            ConfigError: the snapshot belongs to another federation, bundle or mode.
            StateError: the snapshot or checkpoint is corrupt or inconsistent.
        """
        if snapshot.get("v") != SNAPSHOT_VERSION:
            raise StateError(f"state snapshot version {snapshot.get('v')!r} is not supported")
        try:
            params = decode_tensors(params_blob)
            optimizer_state = decode_tensors(optimizer_blob)
        except DecodeError as exc:
            raise StateError(f"checkpoint does not decode: {exc}") from exc
        self = cls(config, strategy, schema, bundle, params, now=now)
        try:
            self._load_snapshot(snapshot)
            strategy.load_state_dict(
                {name: np.asarray(value, np.float32) for name, value in optimizer_state.items()}
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"state snapshot is inconsistent: {exc!r}") from exc
        if self.params_ref.sha256 != ref_from(snapshot["params"]).sha256:
            raise StateError(
                "checkpoint does not match the snapshot's parameters: the state directory "
                "was modified or partially restored"
            )
        if self._round.phase != "finished":
            strategy.begin_round(self._round.number, schema.layout)
        self._restored = True
        return self

    def _load_snapshot(self, snap: Mapping[str, Any]) -> None:
        if snap["federation"] != self.config.federation:
            raise ConfigError(
                f"state directory belongs to federation {snap['federation']!r}, "
                f"not {self.config.federation!r}: use another state_dir"
            )
        if ref_from(snap["bundle"]).sha256 != self.bundle_ref.sha256:
            raise ConfigError(
                "state directory was created with another model bundle: use a new "
                "state_dir for a new bundle (or restore the original bundle)"
            )
        if snap["mode"] != self.config.mode:
            raise ConfigError(
                f"state directory runs in {snap['mode']} mode, config says {self.config.mode}"
            )
        phase = snap["phase"]
        if phase not in ("waiting", "collecting", "finished"):
            raise ValueError(f"unknown phase {phase!r}")
        selected = snap["selected"]
        self._round = RoundState(
            number=int(snap["round"]),
            phase=phase,
            opened_at=float(snap["opened_at"]),
            deadline=float(snap["deadline"]),
            extended=bool(snap["extended"]),
            selected=tuple(selected) if selected is not None else None,
            target=int(snap["target"]),
        )
        self.blobs.load_retained(snap["blobs"])
        self.history = History.from_json(snap)
        self._seq = int(snap["seq"])
        self._checkpoint = int(snap["checkpoint"])
        self.completed = int(snap["completed"])
        self.failed = int(snap["failed"])
        self.last_metrics = {str(k): float(v) for k, v in snap["metrics"].items()}
        self.finish_reason = snap.get("finish_reason")

    def snapshot(self) -> dict[str, Any]:
        """The durable state (JSON-ready): what :meth:`restore` needs besides checkpoints."""
        r = self._round
        return {
            "v": SNAPSHOT_VERSION,
            "federation": self.config.federation,
            "aggregator": self.config.aggregator_id,
            "mode": self.config.mode,
            "bundle": ref_json(self.bundle_ref),
            "params": ref_json(self.params_ref),
            "round": r.number,
            "phase": r.phase,
            "opened_at": r.opened_at,
            "deadline": r.deadline,
            "extended": r.extended,
            "selected": list(r.selected) if r.selected is not None else None,
            "target": r.target,
            "seq": self._seq,
            "checkpoint": self._checkpoint,
            "completed": self.completed,
            "failed": self.failed,
            "blobs": self.blobs.retained(),
            **self.history.to_json(),
            "metrics": dict(self.last_metrics),
            "finish_reason": self.finish_reason,
        }

    # ------------------------------------------------------------------ properties

    @property
    def round(self) -> int:
        """Current round number (the open one, or the next to open)."""
        return self._round.number

    @property
    def phase(self) -> Phase:
        """``waiting`` for agents, ``collecting`` updates, or ``finished``."""
        return self._round.phase

    @property
    def deadline(self) -> float:
        """Deadline of the open round (0 when none is open)."""
        return self._round.deadline

    @property
    def selected(self) -> tuple[str, ...] | None:
        """Agents asked in the open round (None: anyone)."""
        return self._round.selected

    @property
    def accepted(self) -> int:
        """Updates accepted into the open round (late ones included)."""
        return len(self._round.contributions)

    @property
    def pending(self) -> int:
        """Accepted updates not yet reported persisted."""
        return len(self._round.reserved)

    @property
    def params(self) -> Params:
        """The current global parameters (do not modify)."""
        return self._params

    @property
    def params_blob(self) -> bytes:
        """The current global parameters as the tensor-set blob agents download."""
        return self.blobs.params_blob

    @property
    def bundle_ref(self) -> BlobRef:
        """The bundle archive blob."""
        return self.blobs.bundle_ref

    @property
    def params_ref(self) -> BlobRef:
        """The current global parameter blob."""
        return self.blobs.params_ref

    @property
    def checkpoint(self) -> int:
        """Checkpoint the current global parameters were saved as."""
        return self._checkpoint

    @property
    def next_seq(self) -> int:
        """Sequence number the next accepted update gets."""
        return self._seq

    # ------------------------------------------------------------------ inputs

    def start(self, now: float) -> list[Action]:
        """Begin (or resume): publish what agents need, then open or continue the round.

        Call once, after :meth:`replay` of any stored updates.
        """
        if self._started:
            raise StateError("start() called twice")
        self._started = True
        # Retained agent statuses arrive only after we subscribe: until the settle period
        # ends, an empty roster means "not heard yet", not "every agent dropped out".
        self._not_before = now + self.config.settle_s
        actions: list[Action] = []
        if not self._restored:
            actions.append(SaveCheckpoint(0, self.params_blob, self._encode_optimizer()))
            actions.append(SaveState(self.snapshot()))
        actions.extend(self.blobs.publish(self.round))
        if self._round.phase != "waiting":
            actions.append(self._announcement_action(now))
        actions.extend(self._clear_unreferenced())
        actions.append(StatusChanged())
        if self._round.phase == "waiting":
            actions.extend(self._try_open(now))
            if self._round.phase == "waiting":
                # Replaces whatever announcement a previous run left retained.
                actions.append(self._announcement_action(now))
        elif self._round.phase == "collecting":
            actions.extend(self._maybe_close(now))
        else:
            actions.append(Finish(self.finish_reason or "finished"))
        actions.append(self._timer(now))
        return actions

    def republish(self, now: float) -> list[Action]:
        """Everything retained again (after a reconnect: the broker may have lost it).

        A reconnect usually means the broker restarted, which fired every agent's last
        will: dropouts and deadlines are not judged until agents had time to reconnect.
        """
        self._not_before = max(self._not_before, now + self.config.reconnect_settle_s)
        actions: list[Action] = [*self.blobs.publish(self.round, again=True)]
        actions.append(self._announcement_action(now))
        actions.append(StatusChanged())
        return actions

    def on_status(self, client: str, status: AgentStatus | None, now: float) -> list[Action]:
        """An agent's retained status arrived (None: the retained status was deleted)."""
        actions: list[Action] = []
        if status is None:
            self.roster.forget(client)
        elif status.client != client:
            return [Notice("warning", f"status on {client!r}'s topic names {status.client!r}")]
        elif not self.roster.update(status, now):
            return [Notice("info", f"ignoring status of {client!r}: not in the agents list")]
        if self._round.phase == "waiting":
            actions.extend(self._try_open(now))
        elif self._round.phase == "collecting":
            actions.extend(self._maybe_close(now))
        actions.append(self._timer(now))
        return actions

    def receive_chunk(self, topic: UpdateChunkTopic, payload: Buffer, now: float) -> list[Action]:
        """One message arrived on ``update/<client>/<round>/<i>``."""
        event = self.intake.receive(topic, payload, now, lambda header: self._admit(header, now))
        if event is None:
            return []
        if isinstance(event, ChunkProblem):
            return self._chunk_problem(event)
        if isinstance(event, Answered):
            return self._answer(event.key, event.verdict, now)
        assert isinstance(event, Assembled)
        return [VerifyUpdate(event.key, event.assembler)]

    def verified(self, result: VerifiedUpdate | UpdateRejection, now: float) -> list[Action]:
        """The outcome of a ``VerifyUpdate``: decide whether the update counts."""
        if isinstance(result, UpdateRejection):
            return self._answer(result.key, Verdict(False, result.reason, result.detail), now)
        decision = self._decide(result.key, result.meta.base_round, now)
        if isinstance(decision, Ignore):
            return [
                Notice(
                    "info", f"update {result.key.update_id} of {result.key.client}: {decision.why}"
                )
            ]
        if isinstance(decision, Verdict):
            return self._answer(result.key, decision, now)
        weight = result.meta.num_examples * staleness_weight(decision.staleness)
        ticket = Ticket(self._seq, self._round.number, result, weight, decision.staleness)
        self._seq += 1
        self._round.reserved[(result.key.client, result.key.update_id)] = ticket
        return [PersistUpdate(ticket)]

    def persisted(self, ticket: Ticket, now: float) -> list[Action]:
        """The ticket's update is durable: fold it, ack it, maybe close the round."""
        slot = (ticket.key.client, ticket.key.update_id)
        if self._round.reserved.get(slot) is not ticket:
            raise StateError(f"persisted() for an unknown ticket {ticket.seq}")
        return self._commit(ticket, now, check_close=True)

    def persist_failed(self, ticket: Ticket, error: str, now: float) -> list[Action]:
        """The ticket's update could not be stored: forget it unacked (the agent re-sends)."""
        self._round.reserved.pop((ticket.key.client, ticket.key.update_id), None)
        self._round.rejected["persist_failed"] += 1
        actions: list[Action] = [
            Notice(
                "warning",
                f"could not store update {ticket.key.update_id} of "
                f"{ticket.key.client}: {error}; not acked, the agent re-sends",
            )
        ]
        actions.append(StatusChanged())
        actions.extend(self._maybe_close(now))
        actions.append(self._timer(now))
        return actions

    def replay(self, update: VerifiedUpdate, seq: int, now: float) -> list[Action]:
        """Fold an update stored before a restart (call before :meth:`start`, in seq order).

        Returns its ack again: the crash may have come between persisting and acking.

        Raises:
            StateError: no round is open, or the update cannot belong to it.
        """
        r = self._round
        if self._started or r.phase == "finished":
            raise StateError("replay() needs a restored, unfinished, not yet started round")
        staleness = r.number - update.meta.base_round
        if staleness < 0:
            raise StateError(f"stored update {update.key.update_id} is from a future round")
        if self.history.accepted_in(update.key.client, update.key.update_id) is not None:
            return []  # stored twice (crash between rename and bookkeeping): count once
        weight = update.meta.num_examples * staleness_weight(staleness)
        ticket = Ticket(seq, r.number, update, weight, staleness)
        self._seq = max(self._seq, seq + 1)
        return self._commit(ticket, now, check_close=False)

    def on_timer(self, now: float) -> list[Action]:
        """Time passed: expire partial updates and silent agents, enforce deadlines."""
        actions: list[Action] = []
        for problem in self.intake.expire(now):
            actions.extend(self._chunk_problem(problem))
        if self._round.phase == "waiting":
            actions.extend(self._try_open(now))
        elif self._round.phase == "collecting":
            actions.extend(self._maybe_close(now))
        actions.append(self._timer(now))
        return actions

    def shutdown(self, now: float) -> list[Action]:
        """Going away cleanly: say so on the retained status (no last will on clean exit)."""
        status = self.status(now).model_copy(update={"state": "offline"})
        return [Publish(self.topics.aggregator_status(), encode_control(status), retain=True)]

    # ------------------------------------------------------------------ queries

    def status(self, now: float) -> AggregatorStatus:
        """A snapshot for the retained ``aggregator/status`` topic."""
        r = self._round
        states: dict[Phase, AggregatorState] = {
            "waiting": "starting",
            "collecting": "collecting",
            "finished": "finished",
        }
        return AggregatorStatus(
            aggregator=self.config.aggregator_id,
            state=states[r.phase],
            round=r.number,
            deadline=r.deadline if r.phase == "collecting" else None,
            received=len(r.contributions),
            expected=r.target,
            rejected=dict(r.rejected),
            metrics=dict(self.last_metrics),
            ts=now,
        )

    def next_wakeup(self, now: float) -> float | None:
        """When :meth:`on_timer` next has something to do."""
        times: list[float] = []
        expiry = self.intake.next_expiry()
        if expiry is not None:
            times.append(expiry)
        r = self._round
        if r.phase != "finished" and now < self._not_before:
            times.append(self._not_before)
        if r.phase == "collecting" and not r.reserved:
            times.append(r.deadline)
            if r.selected is not None:
                outstanding = [c for c in r.selected if c not in r.answered]
                agent_expiry = self.roster.next_gone(now, outstanding)
                if agent_expiry is not None:
                    times.append(agent_expiry)
        return min(times, default=None)

    # ------------------------------------------------------------------ decisions

    def _known(self, client: str) -> bool:
        if self.roster.is_known(client):
            return True
        # Selected or contributing agents were known when it mattered; after a restart
        # their retained status may simply not have arrived yet.
        return self.roster.allowed is None and self.history.remembers(client)

    def _admit(self, header: ChunkHeader, now: float) -> Verdict | None:
        """Early verdict on the first chunk of an update (None: reassemble it)."""
        assert header.update_id is not None
        decision = self._decide(UpdateKey(header.sender, header.round, header.update_id), None, now)
        return decision if isinstance(decision, Verdict) else None

    def _decide(
        self, key: UpdateKey, base_round: int | None, now: float
    ) -> Accept | Verdict | Ignore:
        return decide(
            key,
            base_round,
            state=self._round,
            history=self.history,
            config=self.config,
            known=self._known(key.client),
            settling=now < self._not_before,
        )

    def _answer(self, key: UpdateKey, verdict: Verdict, now: float) -> list[Action]:
        r = self._round
        actions: list[Action] = [self._ack(key, verdict, now)]
        if not verdict.accepted:
            r.rejected[verdict.reason] += 1
            actions.append(
                Rejected(key.client, key.round, key.update_id, verdict.reason, verdict.detail)
            )
            if (
                r.phase == "collecting"
                and key.round == r.number
                and r.selected is not None
                and key.client in r.selected
            ):
                # A rejected agent will not send again this round: stop waiting for it.
                r.answered.add(key.client)
                actions.extend(self._maybe_close(now))
            actions.append(StatusChanged())
        actions.append(self._timer(now))
        return actions

    def _chunk_problem(self, problem: ChunkProblem) -> list[Action]:
        self._round.rejected[problem.reason] += 1
        return [
            Rejected(problem.client, problem.round, None, problem.reason, problem.detail),
            StatusChanged(),
        ]

    def _ack(self, key: UpdateKey, verdict: Verdict, now: float) -> Publish:
        ack = Ack(
            federation=self.config.federation,
            client=key.client,
            round=key.round,
            update_id=key.update_id,
            accepted=verdict.accepted,
            reason=verdict.reason,
            detail=verdict.detail[:1024],
            ts=now,
        )
        return Publish(self.topics.ack(key.client), encode_control(ack))

    def _commit(self, ticket: Ticket, now: float, *, check_close: bool) -> list[Action]:
        r = self._round
        update = ticket.update
        meta = update.meta
        r.reserved.pop((ticket.key.client, ticket.key.update_id), None)
        weight = ticket.weight
        self.strategy.fold(update.delta, weight)
        r.contributions.append(
            Contribution(
                client=meta.client,
                update_id=meta.update_id,
                round=meta.round,
                base_round=meta.base_round,
                examples=meta.num_examples,
                weight=weight,
                staleness=ticket.staleness,
                metrics=dict(meta.metrics),
            )
        )
        self.history.record(meta.client, meta.update_id, meta.round, r.number)
        if ticket.staleness == 0:
            r.on_time.add(meta.client)
            r.answered.add(meta.client)
        verdict = Verdict(True, "accepted", f"round {r.number}, weight {weight:.6g}")
        actions: list[Action] = [self._ack(ticket.key, verdict, now), StatusChanged()]
        if check_close:
            actions.extend(self._maybe_close(now))
            actions.append(self._timer(now))
        return actions

    # ------------------------------------------------------------------ round flow

    def _try_open(self, now: float) -> list[Action]:
        r = self._round
        if r.phase != "waiting" or not self._started or now < self._not_before:
            return []
        if self.config.mode == "async":
            selected: tuple[str, ...] | None = None
            target = self.config.buffer.buffer_size
            deadline = now + self.config.buffer.deadline_s
        else:
            policy = self.config.sync
            online = self.roster.online(now)
            if len(eligible(policy.selection, online)) < policy.agents_needed:
                return []
            selected = tuple(select(policy.selection, online, r.number, policy.min_updates))
            target = min(policy.target_updates or len(selected), len(selected))
            deadline = now + policy.deadline_s
        # The round object is kept: late updates may already have been folded into it.
        r.phase = "collecting"
        r.opened_at = now
        r.deadline = deadline
        r.selected = selected
        r.target = target
        self.history.select(r.number, selected)
        actions = self._announce(now)
        actions.append(StatusChanged())
        return actions

    def _maybe_close(self, now: float) -> list[Action]:
        r = self._round
        if r.phase != "collecting" or r.reserved or not self._started:
            return []
        count = len(r.contributions)
        if self.config.mode == "async":
            if count >= r.target:
                return self._close(now, "buffer")
            if now >= r.deadline:
                if count >= self.config.buffer.min_updates:
                    return self._close(now, "deadline")
                r.deadline = now + self.config.buffer.deadline_s
                return [*self._announce(now), StatusChanged()]
            return []
        policy = self.config.sync
        on_time = len(r.on_time)
        if on_time >= r.target:
            return self._close(now, "target")
        selected = r.selected or ()
        outstanding = [c for c in selected if c not in r.answered]
        settled = now >= self._not_before
        if settled and all(self.roster.is_gone(c, now) for c in outstanding):
            if on_time >= policy.min_updates:
                return self._close(now, "dropouts" if outstanding else "all_reported")
            if not outstanding:
                return self._fail(now, "no_quorum")
        # After a restart, give queued re-sends the settle period before judging a deadline
        # that passed while we were down.
        if now < r.deadline or not settled:
            return []
        if on_time >= policy.min_updates:
            return self._close(now, "deadline")
        if not r.extended:
            r.extended = True
            r.deadline = now + (policy.extension_s or policy.deadline_s)
            return [
                Notice(
                    "warning",
                    f"round {r.number}: {on_time}/{policy.min_updates} updates "
                    f"at the deadline; extended to {r.deadline:.0f}",
                ),
                *self._announce(now),
                StatusChanged(),
            ]
        return self._fail(now, "no_quorum")

    def _close(self, now: float, reason: str) -> list[Action]:
        r = self._round
        try:
            new_values = self.strategy.finalize(self._params)
        except LocalProtocolError as exc:
            # E.g. Krum with fewer than f + 3 updates: the round fails, the service lives.
            return [Notice("warning", f"round {r.number}: {exc}"), *self._fail(now, "strategy")]
        params = dict(self._params)
        params.update(new_values)
        self._params = params
        self.blobs.set_params(encode_tensors(self._params).data)
        self._checkpoint = r.number
        record = self._record(now, "closed", reason)
        self.completed += 1
        self.last_metrics = dict(record.metrics)
        actions: list[Action] = [
            CloseRound(r.number, "closed", reason),
            SaveCheckpoint(r.number, self.params_blob, self._encode_optimizer()),
            SaveRecord(record),
        ]
        actions.extend(self._advance(now, record))
        return actions

    def _fail(self, now: float, reason: str) -> list[Action]:
        r = self._round
        record = self._record(now, "failed", reason)
        self._checkpoint = r.number
        self.failed += 1
        actions: list[Action] = [
            CloseRound(r.number, "failed", reason),
            # The model is unchanged; the checkpoint still exists for every round number.
            SaveCheckpoint(r.number, self.params_blob, self._encode_optimizer()),
            SaveRecord(record),
        ]
        actions.extend(self._advance(now, record))
        return actions

    def _record(self, now: float, outcome: Literal["closed", "failed"], reason: str) -> RoundRecord:
        r = self._round
        metrics = weighted_metrics(r.contributions)
        metrics["updates"] = float(len(r.contributions))
        metrics["examples"] = float(sum(c.examples for c in r.contributions))
        return RoundRecord(
            round=r.number,
            outcome=outcome,
            reason=reason,
            opened_at=r.opened_at,
            closed_at=now,
            deadline=r.deadline,
            extended=r.extended,
            selected=r.selected,
            contributions=tuple(r.contributions),
            rejected=dict(r.rejected),
            metrics=metrics,
            strategy=self.strategy.name,
        )

    def _advance(self, now: float, record: RoundRecord) -> list[Action]:
        r = self._round
        self._forget_old(r.number)
        target = self.config.target_metric
        if (
            target is not None
            and record.outcome == "closed"
            and target.reached(dict(record.metrics))
        ):
            return [
                *self._finish(now, f"{target.name} reached {target.value}"),
                PruneUpdates(r.number + 1),
            ]
        if r.number >= self.config.rounds:
            return [
                *self._finish(now, f"ran {self.config.rounds} rounds"),
                PruneUpdates(r.number + 1),
            ]
        self._round = RoundState(r.number + 1, "waiting")
        self.strategy.begin_round(r.number + 1, self.schema.layout)
        actions = self._try_open(now)
        if self._round.phase == "waiting":
            # Not enough agents online yet.  Replace the retained announcement of the
            # round that just closed, or an agent connecting now would train it (and be
            # rejected as round_closed); this also makes the closed round durable.
            actions = [*self._announce(now), StatusChanged()]
        actions.append(PruneUpdates(r.number + 1))
        return actions

    def _finish(self, now: float, reason: str) -> list[Action]:
        # The last round's counts stay visible in the final status.
        self._round.phase = "finished"
        self.finish_reason = reason
        return [*self._announce(now), StatusChanged(), Finish(reason)]

    def _forget_old(self, closed: int) -> None:
        self.history.forget(closed, self.config.dedupe_rounds, self.config.max_staleness)

    # ------------------------------------------------------------------ publishing

    def _announcement(self, now: float) -> RoundAnnouncement:
        r = self._round
        return RoundAnnouncement(
            federation=self.config.federation,
            aggregator=self.config.aggregator_id,
            round=r.number,
            status=ANNOUNCED_STATUS.get(r.phase, "open"),
            mode=self.config.mode,
            issued_at=r.opened_at or now,
            deadline=r.deadline or now,
            bundle=self.bundle_ref,
            params=self.params_ref,
            training=self.strategy.training_config(self.config.training),
            codec=self.config.codec,
            chunk_size=self.config.chunk_size,
            selected=list(r.selected) if r.selected is not None else None,
        )

    def _announcement_action(self, now: float) -> Publish:
        payload = encode_control(self._announcement(now))
        return Publish(self.topics.round(), payload, retain=True)

    def _clear_unreferenced(self) -> list[Action]:
        cleared = self.blobs.clear_stale()
        if not cleared:
            return []
        return [*cleared, SaveState(self.snapshot())]

    def _announce(self, now: float) -> list[Action]:
        """Make the current round public: state first, then blobs, then the announcement."""
        self.blobs.record_referenced()
        actions: list[Action] = [SaveState(self.snapshot())]
        actions.extend(self.blobs.publish(self.round))
        actions.append(self._announcement_action(now))
        actions.extend(self._clear_unreferenced())
        return actions

    def _timer(self, now: float) -> ArmTimer:
        return ArmTimer(self.next_wakeup(now))

    # ------------------------------------------------------------------ encoding

    def _encode_optimizer(self) -> bytes:
        return encode_tensors(self.strategy.state_dict()).data
