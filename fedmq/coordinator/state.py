"""What a federation is at any moment: the round, the model, the blobs, the counts.

One object shared by the two halves of the coordinator (the update path in
:mod:`~fedmq.coordinator.coordinator`, the round path in
:mod:`~fedmq.coordinator.round_flow`) and captured whole by every snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from fedmq.coordinator.history import History
from fedmq.coordinator.ledger import BlobLedger
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.round_state import RoundState
from fedmq.coordinator.screening import training_fingerprint
from fedmq.coordinator.snapshot import Snapshot

Params = dict[str, npt.NDArray[Any]]
# Federated evaluations kept in the snapshot (which is rewritten at every round change):
# about 100 bytes each, so even a very long federation's snapshot stays small.
MAX_EVALUATIONS = 10_000


@dataclass
class FederationState:
    """The coordinator's durable state (see :class:`~fedmq.coordinator.snapshot.Snapshot`).

    Args:
        params: the current global parameters and buffers.
        blobs: retained blobs and the current parameter blob.
        round: the open round, the one waiting to open, or the last one once finished.
        history: recent update ids, contributors and selections (duplicates, late updates).
        checkpoint: the round the current parameters were saved after.
        seq: sequence number of the next accepted update.
        completed: rounds closed with a new model.
        failed: rounds that ended without one.
        last_metrics: the last closed round's example-weighted metrics.
        finish_reason: why the federation finished (None while it runs).
        norms: L2 norms of the updates folded into recent closed rounds, oldest first
            (the norm screen's history; the open round's are in its contributions).
        evaluations: federated evaluations by checkpoint: checkpoint ``c`` (the global
            model round ``c + 1`` was announced with; 0 is the initial model) to its
            example-weighted metrics (``eval_loss``, ``eval_accuracy``, …), the newest
            :data:`MAX_EVALUATIONS` checkpoints evaluated.
        final_round: the round after which the federation finishes although ``rounds``
            are not done: ``[target_metric]`` was reached and ``evaluate_final`` asks for
            an evaluate-only round of the final model first (None: ``rounds`` decides).
    """

    params: Params
    blobs: BlobLedger
    round: RoundState = field(default_factory=lambda: RoundState(1, "waiting"))
    history: History = field(default_factory=History)
    checkpoint: int = 0
    seq: int = 0
    completed: int = 0
    failed: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None
    norms: list[float] = field(default_factory=list)
    evaluations: dict[int, dict[str, float]] = field(default_factory=dict)
    final_round: int | None = None

    def evaluated(self, checkpoint: int, metrics: dict[str, float]) -> None:
        """Remember the federated evaluation of ``checkpoint`` (newest kept, bounded)."""
        if not metrics:
            return
        self.evaluations[checkpoint] = dict(metrics)
        while len(self.evaluations) > MAX_EVALUATIONS:
            del self.evaluations[min(self.evaluations)]

    def snapshot(self, config: CoordinatorConfig) -> Snapshot:
        """Everything needed to rebuild this state, besides the checkpoint blobs."""
        r = self.round
        return Snapshot(
            federation=config.federation,
            aggregator=config.aggregator_id,
            mode=config.mode,
            bundle=self.blobs.bundle_ref,
            params=self.blobs.params_ref,
            round=r.number,
            phase=r.phase,
            opened_at=r.opened_at,
            deadline=r.deadline,
            extended=r.extended,
            selected=r.selected,
            target=r.target,
            seq=self.seq,
            checkpoint=self.checkpoint,
            completed=self.completed,
            failed=self.failed,
            blobs=tuple(self.blobs.retained()),
            history=self.history,
            metrics=dict(self.last_metrics),
            finish_reason=self.finish_reason,
            norms=tuple(self.norms),
            norms_training=training_fingerprint(config.training),
            task=r.task,
            final_round=self.final_round,
            evaluations={c: dict(m) for c, m in self.evaluations.items()},
            models=self.blobs.models.state(),
        )

    def load(self, snap: Snapshot) -> None:
        """Take over a stored snapshot (the parameters come from its checkpoint)."""
        self.round = RoundState(
            number=snap.round,
            phase=snap.phase,
            opened_at=snap.opened_at,
            deadline=snap.deadline,
            extended=snap.extended,
            selected=snap.selected,
            target=snap.target,
            task=snap.task,
        )
        if snap.phase == "finished":
            self.blobs.retire()  # its blobs were cleared (or are cleared at start)
        self.blobs.models.load(snap.models)  # released models stay retained, even finished
        self.blobs.load_retained(snap.blobs)
        self.history = snap.history
        self.seq = snap.seq
        self.checkpoint = snap.checkpoint
        self.completed = snap.completed
        self.failed = snap.failed
        self.last_metrics = dict(snap.metrics)
        self.finish_reason = snap.finish_reason
        self.norms = list(snap.norms)
        self.final_round = snap.final_round
        self.evaluations = {c: dict(m) for c, m in snap.evaluations.items()}

    def resume(self, snap: Snapshot, config: CoordinatorConfig) -> None:
        """Take over a stored snapshot under ``config`` (a restart may have changed it).

        A finished federation given more ``rounds`` continues
        (:meth:`~fedmq.coordinator.snapshot.Snapshot.under_rounds`).

        Raises:
            ConfigError: the snapshot belongs to another federation, bundle or mode, or
                ``config.rounds`` is below the rounds it ran (or the round under way).
        """
        snap.check_belongs(config.federation, self.blobs.bundle_ref, config.mode)
        target = config.target_metric
        reached = target is not None and target.reached(dict(snap.metrics))
        resumed = snap.under_rounds(config.rounds, target_reached=reached)
        self.load(resumed)
        if resumed is not snap:  # continued: its next round publishes the blobs again
            self.blobs.record_referenced()
        if snap.norms_training != training_fingerprint(config.training):
            self.norms = []  # norms under another [training] table are no reference
