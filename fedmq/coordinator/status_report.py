"""What the aggregator status tells an operator beyond the round state.

The round state says where the round is; an operator watching the retained
``aggregator/status`` (``fedmq monitor``, ``mosquitto_sub``) also wants to know how
many bytes the round moved, how the last round ended and which updates were refused
lately.  :class:`StatusReport` keeps that, pure like the rest of the coordinator: the
coordinator tells it the size of every update chunk it receives, and passes every
action list it returns through :meth:`StatusReport.observe`, which counts what is
published (``Publish``, ``PublishBlob``), remembers refusals (``UpdateRejected``) and
closes the round's account when the round's record is saved (``SaveRecord``; the
actions before it in the same list still belong to that round).

None of it is durable: after a restart the traffic counts start from zero and the last
round's summary appears when the next round ends (its metrics are in the snapshot, and
so are the federated evaluations, without their device and example counts).

:func:`build_status` puts the round state and the report together into the published
``AggregatorStatus``; :func:`status_key` is what the coordinator compares to decide
whether that status changed (beside it: a field added to the status may belong in the key).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from fedmq.coordinator.actions import Action, Publish, PublishBlob, SaveRecord, UpdateRejected
from fedmq.coordinator.lifecycle import Phase
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.records import RoundRecord, evaluation_metrics
from fedmq.coordinator.round_state import RoundState
from fedmq.coordinator.state import FederationState
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import (
    MAX_MISSING_LISTED,
    MAX_RECENT_REJECTIONS,
    AggregatorStatus,
    FederatedEvaluation,
    RecentRejection,
    RoundSummary,
)
from fedmq.wire.ids import id_problem

REASON_CHARS = 64  # RecentRejection.reason
DETAIL_CHARS = 200  # RecentRejection.detail
ROUND_REASON_CHARS = 128  # RoundSummary.reason

StatusKey = tuple[Phase, int, float, int, int, int]


@dataclass
class Traffic:
    """Bytes received (update chunks) and published (blobs, control messages)."""

    bytes_in: int = 0
    bytes_out: int = 0


def _blob_bytes(action: PublishBlob) -> int:
    ref: BlobRef = action.ref
    if action.indices is None:
        return ref.size
    return sum(ref.chunk_length(index) for index in action.indices if 0 <= index < ref.count)


class StatusReport:
    """Traffic of the current round and since start, the last round, recent refusals."""

    def __init__(self) -> None:
        self.round = Traffic()
        self.total = Traffic()
        self.last_round: RoundSummary | None = None
        self.last_evaluation: FederatedEvaluation | None = None
        self._rejections: deque[RecentRejection] = deque(maxlen=MAX_RECENT_REJECTIONS)

    @property
    def recent_rejections(self) -> list[RecentRejection]:
        """The newest refusals, oldest first (any round: each names its round)."""
        return list(self._rejections)

    def received(self, size: int) -> None:
        """An update chunk of ``size`` bytes arrived."""
        self.round.bytes_in += size
        self.total.bytes_in += size

    def observe(self, actions: Iterable[Action]) -> None:
        """Account for the actions the coordinator is about to return, in order."""
        for action in actions:
            match action:
                case Publish():
                    self._sent(len(action.payload))
                case PublishBlob():
                    self._sent(_blob_bytes(action))
                case UpdateRejected():
                    self._rejected(action)
                case SaveRecord():
                    self._round_ended(action.record)

    def _sent(self, size: int) -> None:
        self.round.bytes_out += size
        self.total.bytes_out += size

    def _rejected(self, event: UpdateRejected) -> None:
        if id_problem(event.client) is not None:
            return  # topics are parsed before anything is rejected; never expected
        self._rejections.append(
            RecentRejection(
                client=event.client,
                round=event.round,
                reason=event.reason[:REASON_CHARS],
                detail=event.detail[:DETAIL_CHARS],
            )
        )

    def _round_ended(self, record: RoundRecord) -> None:
        self.last_round = RoundSummary(
            round=record.round,
            outcome=record.outcome,
            reason=record.reason[:ROUND_REASON_CHARS],
            duration_s=max(0.0, record.closed_at - record.opened_at),
            updates=len(record.contributions),
            rejected=sum(record.rejected.values()),
            bytes_in=self.round.bytes_in,
            bytes_out=self.round.bytes_out,
        )
        self.round = Traffic()
        evaluation = record.evaluation
        if evaluation:
            self.last_evaluation = FederatedEvaluation(
                round=record.round,
                checkpoint=record.round - 1,
                task=record.task,
                metrics=evaluation_metrics(evaluation),
                devices=int(evaluation.get("devices", 0)),
                examples=int(evaluation.get("examples", 0)),
            )


def build_status(
    config: CoordinatorConfig, state: FederationState, report: StatusReport, now: float
) -> AggregatorStatus:
    """A snapshot for the retained ``aggregator/status`` topic."""
    r = state.round
    collecting = r.phase == "collecting"
    missing = sorted(r.outstanding()) if collecting else []
    return AggregatorStatus(
        aggregator=config.aggregator_id,
        state=r.phase,
        round=r.number,
        deadline=r.deadline if collecting else None,
        received=len(r.contributions),
        expected=r.target,
        rejected=dict(r.rejected),
        metrics=dict(state.last_metrics),
        ts=now,
        rounds=config.rounds,
        opened_at=r.opened_at if collecting else None,
        missing=missing[:MAX_MISSING_LISTED],
        missing_count=len(missing),
        bytes_in=report.round.bytes_in,
        bytes_out=report.round.bytes_out,
        last_round=report.last_round,
        recent_rejections=report.recent_rejections,
        task=r.task,
        evaluation=last_evaluation(report, state),
    )


def last_evaluation(report: StatusReport, state: FederationState) -> FederatedEvaluation | None:
    """The newest federated evaluation (after a restart: from the snapshot, no counts)."""
    latest = report.last_evaluation
    evaluations = state.evaluations
    if latest is not None or not evaluations:
        return latest
    checkpoint = max(evaluations)
    return FederatedEvaluation(
        round=checkpoint + 1, checkpoint=checkpoint, metrics=evaluations[checkpoint]
    )


def status_key(r: RoundState) -> StatusKey:
    """What ``StatusChanged`` compares: the round state :func:`build_status` reports."""
    # Everything the status reports but the clock; metrics change only with the round.
    return (
        r.phase,
        r.number,
        r.deadline,
        len(r.contributions),
        r.target,
        sum(r.rejected.values()),
    )
