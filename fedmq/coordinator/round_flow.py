"""The life of a round: open, extend, close or fail, advance, finish, and announce it.

The mode's rules (:mod:`~fedmq.coordinator.rules`) decide; this class executes their
decisions on the federation state, moving the phase only through
:func:`~fedmq.coordinator.lifecycle.transition`, and returns the actions that make
each step durable and public (state first, then blobs, then the announcement).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedmq.coordinator.actions import (
    Action,
    FederationFinished,
    Noted,
    PruneUpdates,
    Publish,
    RoundClosed,
    SaveCheckpoint,
    SaveRecord,
    SaveState,
)
from fedmq.coordinator.lifecycle import ANNOUNCED, transition
from fedmq.coordinator.pacing import expected_update_bytes, upload_slots
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.records import RoundRecord, evaluation_metrics
from fedmq.coordinator.roster import Roster
from fedmq.coordinator.round_state import RoundState
from fedmq.coordinator.rules import Close, Extend, Fail, RoundRules
from fedmq.coordinator.screening import remember
from fedmq.coordinator.state import FederationState
from fedmq.coordinator.validation import UpdateSchema
from fedmq.errors import LocalProtocolError
from fedmq.strategies.strategy import Strategy
from fedmq.wire.control import ModelReleases, RoundAnnouncement, RoundTask, encode_control
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.topics import Topics


class RoundFlow:
    """Opens and ends the rounds of one federation.

    Args:
        config: federation and round policy.
        rules: the mode's open/close rules.
        strategy: how the folded updates become the next model.
        schema: the update layout (for the strategy's next round).
        topics: the federation's topics.
        roster: which agents are online or gone.
        state: the federation state this flow moves forward.
        not_before: no round opens, and no absence or deadline is judged, before this
            unix time (retained statuses may still be arriving after a (re)start).
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        rules: RoundRules,
        strategy: Strategy,
        schema: UpdateSchema,
        topics: Topics,
        roster: Roster,
        state: FederationState,
        *,
        not_before: float,
    ) -> None:
        self.config = config
        self.rules = rules
        self.strategy = strategy
        self.schema = schema
        self.topics = topics
        self.roster = roster
        self.state = state
        self.not_before = not_before
        self.started = False  # no round opens or closes before the service has started
        self.update_bytes = expected_update_bytes(schema.shapes, CodecSpec.parse(config.codec))
        self.announced_slots: int | None = None  # upload_slots of the last announcement

    def apply_rules(self, now: float) -> list[Action]:
        """Open the waiting round or close the collecting one, if its rules say so."""
        if self.state.round.phase == "waiting":
            return self.try_open(now)
        if self.state.round.phase == "collecting":
            return self.maybe_close(now)
        return []

    def resume(self, now: float) -> list[Action]:
        """At start, after the blobs: announce the round as it was, then carry it on.

        An open or finished round is announced again before anything moves; a waiting
        one opens if it can, and is otherwise announced as waiting, which replaces
        whatever announcement a previous run left retained.
        """
        actions: list[Action] = []
        if self.state.round.phase != "waiting":
            actions.append(self.announcement_action(now))
        actions.extend(self.clear_unreferenced())
        if self.state.round.phase == "waiting":
            actions.extend(self.try_open(now))
            if self.state.round.phase == "waiting":
                actions.append(self.announcement_action(now))
        elif self.state.round.phase == "collecting":
            actions.extend(self.maybe_close(now))
        else:
            actions.append(FederationFinished(self.state.finish_reason or "finished"))
        return actions

    def try_open(self, now: float) -> list[Action]:
        """Open the waiting round if the rules say enough agents are online."""
        r = self.state.round
        if r.phase != "waiting" or not self.started or now < self.not_before:
            return []
        if not r.contributions:  # (a restored or continued round: the schedule decides)
            r.task = self.task_for(r.number)
        decision = self.rules.decide_open(self.roster.online(now), r.number, now, r.task)
        if decision is None:
            return []
        # The round object is kept: late updates may already have been folded into it.
        r.phase = transition(r.phase, "open")
        r.opened_at = now
        r.deadline = decision.deadline
        r.selected = decision.selected
        r.target = decision.target
        self.state.history.select(r.number, decision.selected)
        return self.announce(now)

    def maybe_close(self, now: float) -> list[Action]:
        """Close, extend or fail the collecting round if its rules say so."""
        r = self.state.round
        if r.phase != "collecting" or r.reserved or not self.started:
            return []
        progress = r.progress(lambda c: self.roster.is_gone(c, now), settled=now >= self.not_before)
        decision = self.rules.decide_close(progress, now)
        match decision:
            case Close(reason) if r.task == "evaluate":
                return self._end_round(now, "closed", reason)  # nothing to aggregate
            case Close(reason):
                return self._close(now, reason)
            case Fail(reason):
                return self._end_round(now, "failed", reason)
            case Extend():
                r.phase = transition(r.phase, "extend")
                r.deadline = decision.deadline
                r.extended = r.extended or decision.marks_extended
                notes: list[Action] = []
                if decision.warning is not None:
                    notes.append(Noted("warning", decision.warning))
                return [*notes, *self.announce(now)]
        return []

    def _close(self, now: float, reason: str) -> list[Action]:
        # The optimizers build new state arrays on every step (never in place), so these
        # references are the state to go back to if the step has to be undone.
        optimizer_state = self.strategy.state_dict()
        try:
            with np.errstate(all="ignore"):  # an overflow is caught below, as a NaN/Inf
                new_values = self.strategy.finalize(self.state.params)
        except LocalProtocolError as exc:
            # E.g. Krum with fewer than f + 3 updates: the round fails, the service lives.
            message = f"round {self.state.round.number}: {exc}"
            return [Noted("warning", message), *self._end_round(now, "failed", "strategy")]
        broken = [name for name, value in new_values.items() if not np.isfinite(value).all()]
        # A finite step can still leave Inf in the moments (FedAdam's v), freezing the
        # model from the next round on: that state is not kept either.
        broken += [
            f"optimizer {name}"
            for name, value in self.strategy.state_dict().items()
            if not np.isfinite(value).all()
        ]
        if broken:
            # Never published: the round fails and the previous model stays the global one.
            self.strategy.load_state_dict(optimizer_state)
            message = (
                f"round {self.state.round.number}: the new global model is not finite "
                f"(NaN/Inf in {broken[:5]}); it is discarded and the model of round "
                f"{self.state.checkpoint} stays published"
            )
            return [Noted("warning", message), *self._end_round(now, "failed", "non_finite_model")]
        params = dict(self.state.params)
        params.update(new_values)
        self.state.params = params
        self.state.blobs.set_params(encode_tensors(self.state.params).data)
        return self._end_round(now, "closed", reason)

    def _end_round(
        self, now: float, outcome: Literal["closed", "failed"], reason: str
    ) -> list[Action]:
        r = self.state.round
        screening = self.config.screening
        record = r.record(
            now, outcome, reason, self.strategy.name, max_examples=screening.max_examples
        )
        # A checkpoint exists for every round number (a failed round's model is unchanged,
        # and so is an evaluate-only round's).
        self.state.checkpoint = r.number
        # The model the round was announced with is checkpoint r - 1, whatever the outcome.
        self.state.evaluated(r.number - 1, evaluation_metrics(record.evaluation))
        # An evaluate-only round is neither a new model nor a failed attempt at one: the
        # training counts, metrics and norm history stay as they were.
        if r.task == "train" and outcome == "closed":
            self.state.completed += 1
            self.state.last_metrics = dict(record.metrics)
            # The norm screen's history: the norms this round folded into its new model.
            folded = [c.folded_norm for c in r.contributions if c.folded_norm is not None]
            window = self.config.screening.norm_window
            self.state.norms = remember(self.state.norms, folded, window)
        elif r.task == "train":
            self.state.failed += 1
        actions: list[Action] = [
            RoundClosed(r.number, outcome, reason),
            SaveCheckpoint(r.number, self.state.blobs.params_blob, self.encode_optimizer()),
            SaveRecord(record),
        ]
        if self.config.delivery is not None:  # the checkpoint's inference model
            actions.extend(self.state.blobs.request_model(r.number))
        actions.extend(self._advance(now, record))
        return actions

    def _advance(self, now: float, record: RoundRecord) -> list[Action]:
        r = self.state.round
        self.state.history.forget(r.number, self.config.dedupe_rounds, self.rules.max_staleness)
        target = self.config.target_metric
        reached = (
            target is not None
            and record.task == "train"
            and record.outcome == "closed"
            and target.reached(dict(record.metrics))
        )
        if reached and self.rules.evaluate_final and r.number < self.config.rounds:
            # One evaluate-only round of the final model first, then finish.
            self.state.final_round = r.number + 1
        elif target is not None and (reached or r.number == self.state.final_round):
            return [
                *self._finish(now, f"{target.name} reached {target.value}"),
                PruneUpdates(r.number + 1),
            ]
        if r.number >= self.config.rounds:
            return [
                *self._finish(now, f"ran {self.config.rounds} rounds"),
                PruneUpdates(r.number + 1),
            ]
        self.state.round = RoundState(r.number + 1, transition(r.phase, "advance"))
        self.state.round.task = self.task_for(r.number + 1)
        self.strategy.begin_round(r.number + 1, self.schema.layout)
        actions = self.try_open(now)
        if self.state.round.phase == "waiting":
            # Not enough agents online yet.  Replace the retained announcement of the
            # round that just closed, or an agent connecting now would train it (and be
            # rejected as round_closed); this also makes the closed round durable.
            actions = self.announce(now)
        actions.append(PruneUpdates(r.number + 1))
        return actions

    def _finish(self, now: float, reason: str) -> list[Action]:
        # The last round's counts stay visible in the final status.
        self.state.round.phase = transition(self.state.round.phase, "finish")
        self.state.finish_reason = reason
        # No agent trains any more: the announcement below says "finished" and every
        # retained blob but the released inference models is cleared after it.
        self.state.blobs.retire()
        return [*self.announce(now), FederationFinished(reason)]

    # ------------------------------------------------------------------ publishing

    def _announcement(self, now: float) -> RoundAnnouncement:
        r = self.state.round
        return RoundAnnouncement(
            federation=self.config.federation,
            aggregator=self.config.aggregator_id,
            round=r.number,
            status=ANNOUNCED[r.phase],
            mode=self.config.mode,
            task=r.task,
            issued_at=now,
            deadline=r.deadline or now,
            bundle=self.state.blobs.bundle_ref,
            params=self.state.blobs.params_ref,
            training=self.strategy.training_config(self.config.training),
            codec=self.config.codec,
            chunk_size=self.state.blobs.chunk_size,
            selected=list(r.selected) if r.selected is not None else None,
            upload_slots=self.announced_slots,
            models=self.released_models(),
        )

    def upload_slots(self, now: float) -> int | None:
        """Concurrent uploads that fit the broker's queue this round (None: no pacing)."""
        r = self.state.round
        if self.config.broker_queue is None or r.phase != "collecting" or r.task == "evaluate":
            return None  # an evaluation report is one small chunk: nothing to pace
        agents = len(r.selected) if r.selected is not None else len(self.roster.online(now))
        chunks = -(-self.update_bytes // self.state.blobs.chunk_size)
        return upload_slots(self.config.broker_queue, agents, chunks)

    def task_for(self, number: int) -> RoundTask:
        """What round ``number`` asks for: the mode's schedule up to the last round.

        The last round is ``rounds``, or the evaluate-only round after ``[target_metric]``
        was reached (``final_round``).
        """
        final = self.state.final_round
        last = final if final is not None and final >= number else self.config.rounds
        return self.rules.task(number, last)

    def declined(self, client: str, round_id: int, reason: str, now: float) -> list[Action]:
        """``client`` cannot take part in ``round_id``: a dropout with a reason, at once."""
        r = self.state.round
        if r.phase != "collecting" or round_id != r.number or client in r.declined:
            return self.apply_rules(now)
        r.declined[client] = reason
        actions: list[Action] = [Noted("warning", f"{client} declined round {round_id}: {reason}")]
        if r.selected is not None and client in r.selected and client not in r.on_time:
            r.answered.add(client)  # the round no longer waits for it
        actions.extend(self.maybe_close(now))
        return actions

    def announcement_action(self, now: float) -> Publish:
        """The retained announcement of the current round, as a publish."""
        self.announced_slots = self.upload_slots(now)
        payload = encode_control(self._announcement(now), self.config.signer)
        return Publish(self.topics.round(), payload, retain=True)

    def clear_unreferenced(self) -> list[Action]:
        """Clear retained blobs no announcement names any more (then save the state)."""
        cleared = self.state.blobs.clear_stale()
        if not cleared:
            return []
        return [*cleared, SaveState(self.state.snapshot(self.config).to_json())]

    def released_models(self) -> ModelReleases | None:
        """The announcement's ``models``: the latest and best inference models, if any."""
        if self.config.delivery is None:
            return None
        return self.state.blobs.models.releases(self.state.evaluations)

    def announce(self, now: float) -> list[Action]:
        """Make the current round public: state first, then blobs, then the announcement."""
        if self.config.delivery is not None:  # evaluations may have come in: the best
            self.state.blobs.models.choose_best(self.state.evaluations, self.config.delivery)
        self.state.blobs.record_referenced()
        actions: list[Action] = [SaveState(self.state.snapshot(self.config).to_json())]
        actions.extend(self.state.blobs.publish(self.state.round.number))
        actions.append(self.announcement_action(now))
        actions.extend(self.clear_unreferenced())
        return actions

    def encode_optimizer(self) -> bytes:
        """The server optimizer state as a tensor-set blob (saved with checkpoints)."""
        return encode_tensors(self.strategy.state_dict()).data
