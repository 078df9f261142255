"""The life of an update in the coordinator: admission, verdicts, acks, acceptance.

Chunks are reassembled by :class:`~fedmq.coordinator.intake.UpdateIntake`; this desk
decides on the first chunk whether buffering the update is worth it, on the verified
update whether it counts (:func:`~fedmq.coordinator.admission.decide`, then the norm
screen of :mod:`~fedmq.coordinator.screening`), folds accepted updates into the round
once durable (weighted by their capped example count, clipped in ``clip`` mode), and
writes every ack.  A rejection of an agent the round is waiting for lets the round flow
re-check whether it can close.

The coordinator's update inputs (``receive_chunk``, ``verified``, ``persisted``,
``persist_failed``, ``replay``) hand their work to this desk and keep only the
end-of-input step, which the desk knows nothing of.
"""

from __future__ import annotations

import numpy as np

from fedmq.coordinator.actions import (
    Action,
    Noted,
    PersistUpdate,
    Publish,
    Ticket,
    UpdateRejected,
    VerifyUpdate,
)
from fedmq.coordinator.admission import Ignore, decide
from fedmq.coordinator.intake import Answered, ChunkProblem, IntakeEvent, ResendDue, Verdict
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.records import Contribution
from fedmq.coordinator.roster import Roster
from fedmq.coordinator.round_flow import RoundFlow
from fedmq.coordinator.rules import Accept
from fedmq.coordinator.screening import NormBound, NormScreen
from fedmq.coordinator.staleness import staleness_weight
from fedmq.coordinator.state import FederationState
from fedmq.coordinator.validation import UpdateKey, UpdateRejection, VerifiedUpdate
from fedmq.errors import StateError
from fedmq.strategies.layout import TensorMap
from fedmq.strategies.strategy import Strategy
from fedmq.wire.chunks import ChunkHeader
from fedmq.wire.control import Ack, ResendRequest, encode_control
from fedmq.wire.topics import Topics


class UpdateDesk:
    """Verdicts and acks for one federation's updates.

    Args:
        config: federation policy (its id, the allow list).
        topics: the federation's topics (acks).
        roster: which agents are known.
        strategy: folds accepted updates.
        state: the federation state (round, history).
        flow: the round flow (re-checked when a waited-for agent is refused).
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        topics: Topics,
        roster: Roster,
        strategy: Strategy,
        state: FederationState,
        flow: RoundFlow,
    ) -> None:
        self.config = config
        self.topics = topics
        self.roster = roster
        self.strategy = strategy
        self.state = state
        self.flow = flow
        self.screen = NormScreen(config.screening, flow.schema.shapes)

    def known(self, client: str) -> bool:
        """Whether ``client`` may send updates (its status was seen, or it took part)."""
        if self.roster.is_known(client):
            return True
        # Selected or contributing agents were known when it mattered; after a restart
        # their retained status may simply not have arrived yet.
        return self.roster.allowed is None and self.state.history.remembers(client)

    def admit(self, header: ChunkHeader, now: float) -> Verdict | None:
        """Early verdict on the first chunk of an update (None: reassemble it)."""
        assert header.update_id is not None
        decision = self.decide(UpdateKey(header.sender, header.round, header.update_id), None, now)
        return decision if isinstance(decision, Verdict) else None

    def decide(
        self, key: UpdateKey, base_round: int | None, now: float
    ) -> Accept | Verdict | Ignore:
        """Whether update ``key`` (trained on ``base_round``; None: unknown yet) counts."""
        return decide(
            key,
            base_round,
            state=self.state.round,
            history=self.state.history,
            rules=self.flow.rules,
            known=self.known(key.client),
            settling=now < self.flow.not_before,
        )

    def answer(self, key: UpdateKey, verdict: Verdict, now: float) -> list[Action]:
        """Ack ``verdict``; a refusal is counted and ends the wait for that agent."""
        r = self.state.round
        actions: list[Action] = [self.ack(key, verdict, now)]
        if not verdict.accepted:
            r.rejected[verdict.reason] += 1
            actions.append(
                UpdateRejected(key.client, key.round, key.update_id, verdict.reason, verdict.detail)
            )
            if (
                r.phase == "collecting"
                and key.round == r.number
                and r.selected is not None
                and key.client in r.selected
            ):
                # A rejected agent will not send again this round: stop waiting for it.
                r.answered.add(key.client)
                actions.extend(self.flow.maybe_close(now))
        return actions

    def settle(self, event: IntakeEvent, now: float) -> list[Action]:
        """What the intake's event means: a refusal, an early verdict, or a verify job."""
        if isinstance(event, ChunkProblem):
            return self.chunk_problem(event)
        if isinstance(event, Answered):
            return self.answer(event.key, event.verdict, now)
        return [VerifyUpdate(event.key, event.assembler)]

    def verified(
        self, result: VerifiedUpdate | UpdateRejection, now: float
    ) -> list[Action] | Ignore:
        """The ack of a verified update, or its reservation to persist (Ignore: drop it)."""
        if isinstance(result, UpdateRejection):
            verdict = Verdict(False, result.reason, result.detail)
            return self.answer(result.key, verdict, now)
        decision = self.decide(result.key, result.meta.base_round, now)
        if isinstance(decision, Ignore):
            return decision
        if isinstance(decision, Verdict):
            return self.answer(result.key, decision, now)
        misfit = self.task_misfit(result, decision.staleness)  # report vs training
        if misfit is not None:
            return self.answer(result.key, misfit, now)
        outlier = self.screened(result)  # the norm screen (fedmq.coordinator.screening)
        if outlier is not None:
            return self.answer(result.key, outlier, now)
        ticket = self.reserve(result, decision.staleness)
        self.state.round.reserved[(result.key.client, result.key.update_id)] = ticket
        return [*self.notes(ticket), PersistUpdate(ticket)]

    def persist_failed(self, ticket: Ticket, error: str) -> list[Action]:
        """Forget a ticket whose update could not be stored, unacked (the agent re-sends)."""
        self.state.round.reserved.pop((ticket.key.client, ticket.key.update_id), None)
        self.state.round.rejected["persist_failed"] += 1
        return [
            Noted(
                "warning",
                f"could not store update {ticket.key.update_id} of "
                f"{ticket.key.client}: {error}; not acked, the agent re-sends",
            )
        ]

    def replay(self, update: VerifiedUpdate, seq: int, now: float) -> list[Action]:
        """Fold an update stored before a restart under its old ``seq``; its ack again.

        Raises:
            StateError: no round is open, or the update cannot belong to it.
        """
        r = self.state.round
        if self.flow.started or r.phase == "finished":
            raise StateError("replay() needs a restored, unfinished, not yet started round")
        staleness = r.number - update.meta.base_round
        if staleness < 0:
            raise StateError(f"stored update {update.key.update_id} is from a future round")
        if self.state.history.accepted_in(update.key.client, update.key.update_id) is not None:
            return []  # stored twice (crash between rename and bookkeeping): count once
        return self.commit(self.reserve(update, staleness, seq), now)

    def chunk_problem(self, problem: ChunkProblem) -> list[Action]:
        """Count and report a chunk that could not join any update."""
        self.state.round.rejected[problem.reason] += 1
        return [UpdateRejected(problem.client, problem.round, None, problem.reason, problem.detail)]

    def ack(self, key: UpdateKey, verdict: Verdict, now: float) -> Publish:
        """The ack of ``verdict``, on the agent's ack topic."""
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
        return Publish(self.topics.ack(key.client), encode_control(ack, self.config.signer))

    def resend_request(self, due: ResendDue, now: float) -> Publish:
        """Ask an agent for the chunks of its update that never arrived (signed)."""
        request = ResendRequest(
            federation=self.config.federation,
            client=due.key.client,
            round=due.key.round,
            update_id=due.key.update_id,
            sha256=due.ref.sha256,
            chunk_size=due.ref.chunk_size,
            missing=due.missing,
            ts=now,
        )
        payload = encode_control(request, self.config.signer)
        return Publish(self.topics.ack(due.key.client), payload)

    def commit(self, ticket: Ticket, now: float) -> list[Action]:
        """Fold a durable ticket's update into the round, remember it, ack it."""
        r = self.state.round
        update = ticket.update
        meta = update.meta
        r.reserved.pop((ticket.key.client, ticket.key.update_id), None)
        weight = ticket.weight
        scale = 1.0
        actions: list[Action] = []
        if not update.is_report:  # a report (evaluate-only round) has nothing to fold
            delta, scale, actions = self._clipped(update)
            with np.errstate(over="ignore", invalid="ignore"):  # a non-finite sum fails
                self.strategy.fold(delta, weight)
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
                counted_examples=self.config.screening.counted_examples(meta.num_examples),
                norm=None if update.is_report else update.norm,
                norm_scale=scale,
            )
        )
        self.state.history.record(meta.client, meta.update_id, meta.round, r.number)
        if ticket.staleness == 0:
            r.on_time.add(meta.client)
            r.answered.add(meta.client)
        detail = f"round {r.number}, weight {weight:.6g}"
        if update.is_report:
            detail = f"round {r.number}, evaluation report"
        if scale < 1:
            detail += f", norm clipped from {update.norm:.4g} to {update.norm * scale:.4g}"
        verdict = Verdict(True, "accepted", detail)
        return [*actions, self.ack(ticket.key, verdict, now)]

    def task_misfit(self, update: VerifiedUpdate, staleness: int) -> Verdict | None:
        """The refusal of an update that does not answer what its round asks (None: fits).

        An evaluate-only round takes evaluation reports (updates without tensors) for
        itself and nothing else: a late training update is not folded into it.  A
        training round takes no report.
        """
        r = self.state.round
        late = update.key.round != r.number or staleness > 0
        if r.task == "evaluate" and (late or not update.is_report):
            if late:
                return Verdict(
                    False,
                    "stale_round",
                    f"round {r.number} only evaluates the global model; late updates are "
                    "not folded into it",
                )
            return Verdict(
                False,
                "wrong_shape",
                f"round {r.number} only evaluates the global model: send an evaluation "
                "report (an update without tensors)",
            )
        if r.task == "train" and update.is_report:
            if late:
                return Verdict(False, "stale_round", f"round {update.key.round} is over")
            return Verdict(
                False,
                "wrong_shape",
                f"update has no tensors (an evaluation report), but round {r.number} trains",
            )
        return None

    # ------------------------------------------------------------------ screening

    def norm_bound(self) -> NormBound | None:
        """The norm screen's bound now (None: the screen is off)."""
        current = [c.folded_norm for c in self.state.round.contributions]
        return self.screen.bound(
            self.state.norms, [n for n in current if n is not None], self.state.params
        )

    def screened(self, update: VerifiedUpdate) -> Verdict | None:
        """The ``outlier`` refusal of an update above the norm bound (``reject`` mode)."""
        if self.config.screening.norm_mode != "reject":
            return None
        bound = self.norm_bound()
        if bound is None or update.norm <= bound.value:
            return None
        return Verdict(
            False,
            "outlier",
            f"update norm {update.norm:.4g} is above the bound {bound.value:.4g} ({bound.why})",
        )

    def _clipped(self, update: VerifiedUpdate) -> tuple[TensorMap, float, list[Action]]:
        # ``clip`` mode, at fold time: the bound then is what replay recomputes.
        if self.config.screening.norm_mode != "clip":
            return update.delta, 1.0, []
        bound = self.norm_bound()
        if bound is None or update.norm <= bound.value:
            return update.delta, 1.0, []
        scale = bound.value / update.norm
        factor = np.float32(scale)
        delta = {name: array * factor for name, array in update.delta.items()}
        key = update.key
        note = Noted(
            "warning",
            f"clipped update {key.update_id} of {key.client}: norm {update.norm:.4g} is "
            f"above the bound {bound.value:.4g} ({bound.why})",
        )
        return delta, scale, [note]

    def notes(self, ticket: Ticket) -> list[Action]:
        """What is worth a log line about an update just accepted (a capped example count)."""
        meta = ticket.update.meta
        counted = self.config.screening.counted_examples(meta.num_examples)
        if counted == meta.num_examples:
            return []
        return [
            Noted(
                "warning",
                f"{meta.client} claims {meta.num_examples} examples for update "
                f"{meta.update_id}; weighted as {counted} ([screening] max_examples)",
            )
        ]

    def reserve(self, update: VerifiedUpdate, staleness: int, seq: int | None = None) -> Ticket:
        """Reserve the next sequence number (or ``seq``, replaying) for an accepted update.

        The update counts only once :meth:`commit` runs on the ticket, after it is durable.
        """
        state = self.state
        examples = self.config.screening.counted_examples(update.meta.num_examples)
        weight = 0.0 if update.is_report else examples * staleness_weight(staleness)
        number = state.seq if seq is None else seq
        state.seq = max(state.seq, number + 1)
        return Ticket(number, state.round.number, update, weight, staleness)
