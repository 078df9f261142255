"""Per-round records: who contributed, how the round ended, and its metrics.

The aggregator stores one record per round in its state directory
(``rounds/<round>/record.json``); the simulator and dashboards read them to plot.

Federated evaluation: an agent evaluates the global model it received on its local
evaluation split before it trains, and reports the figures beside its training metrics
under the prefix ``global_`` (``global_eval_loss``, ``global_eval_accuracy``, …, with
``global_eval_examples``, the examples it evaluated on).  The model round ``r`` was
announced with is checkpoint ``r - 1``, so the on-time contributions of round ``r``
evaluate checkpoint ``r - 1``: :func:`federated_evaluation` weighs them by their
evaluation examples (the mean over every device's evaluation data pooled), and
:func:`device_evaluations` keeps each device's own figures.  An evaluate-only round
(``task = "evaluate"``) collects such reports and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fedmq.wire.update import GLOBAL_METRIC_PREFIX

RECORD_VERSION = 1
GLOBAL_PREFIX = GLOBAL_METRIC_PREFIX  # the received global model, evaluated before training


@dataclass(frozen=True)
class Contribution:
    """One accepted update as the round saw it.

    Args:
        client: the agent.
        update_id: its update id.
        round: the round it answered.
        base_round: the round of the model it trained from.
        examples: the example count it claimed.
        weight: the FedAvg weight used (counted examples x staleness discount).
        staleness: rounds between its base model and the round it joined.
        metrics: its reported metrics.
        counted_examples: the example count it was weighted by (``examples`` capped at
            ``[screening] max_examples``; None in records written before the cap).
        norm: L2 norm of its delta as received (None in older records).
        norm_scale: factor its delta was scaled by before folding (below 1 when the
            norm screen clipped it).
    """

    client: str
    update_id: str
    round: int
    base_round: int
    examples: int
    weight: float
    staleness: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    counted_examples: int | None = None
    norm: float | None = None
    norm_scale: float = 1.0

    @property
    def counted(self) -> int:
        """The example count this update was weighted by."""
        return self.examples if self.counted_examples is None else self.counted_examples

    @property
    def folded_norm(self) -> float | None:
        """The norm of the delta as folded (after any clipping)."""
        return None if self.norm is None else self.norm * self.norm_scale


def weighted_metrics(contributions: Iterable[Contribution]) -> dict[str, float]:
    """Mean of every metric weighted by counted examples, over the updates reporting it.

    The federated evaluation (``global_*`` metrics) is left out: it is of another model
    and weighted by evaluation examples (:func:`federated_evaluation`).
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for item in contributions:
        for name, value in item.metrics.items():
            if math.isfinite(value) and not name.startswith(GLOBAL_PREFIX):
                sums[name] = sums.get(name, 0.0) + value * item.counted
                weights[name] = weights.get(name, 0.0) + item.counted
    return {name: sums[name] / weights[name] for name in sorted(sums) if weights[name] > 0}


EVALUATION_COUNTS = ("examples", "devices")
"""Keys of :func:`federated_evaluation` that count rather than measure."""


def device_evaluations(
    contributions: Iterable[Contribution], round_id: int
) -> dict[str, dict[str, float]]:
    """Each device's evaluation of the global model round ``round_id`` was announced with.

    Names lose their ``global_`` prefix (``eval_accuracy``, ``eval_examples``).  Only
    updates trained on that very model count (base round ``round_id``): a late update
    evaluated an older one.
    """
    devices: dict[str, dict[str, float]] = {}
    for item in contributions:
        if item.base_round != round_id:
            continue
        figures = {
            name.removeprefix(GLOBAL_PREFIX): value
            for name, value in item.metrics.items()
            if name.startswith(GLOBAL_PREFIX) and math.isfinite(value)
        }
        if figures:
            devices[item.client] = figures
    return devices


def _evaluation_weight(item: Mapping[str, float], counted: int, cap: int | None) -> float:
    claimed = item.get("eval_examples")
    weight = float(claimed) if claimed is not None and claimed > 0 else float(counted)
    return weight if cap is None else min(weight, float(cap))


def federated_evaluation(
    contributions: Iterable[Contribution], round_id: int, max_examples: int | None = None
) -> dict[str, float]:
    """The example-weighted federated evaluation of the model round ``round_id`` started from.

    Every metric of :func:`device_evaluations` (``eval_loss``, ``eval_accuracy``, …) is
    averaged over the devices weighted by their evaluation examples (capped at
    ``max_examples``, like training examples), which makes it the metric over all their
    evaluation data pooled; ``examples`` and ``devices`` count what it covers.  Empty
    when no device reported an evaluation.
    """
    items = list(contributions)
    counted = {item.client: item.counted for item in items}
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    examples = 0.0
    devices = device_evaluations(items, round_id)
    for client, figures in devices.items():
        weight = _evaluation_weight(figures, counted[client], max_examples)
        examples += weight
        for name, value in figures.items():
            if name != "eval_examples":
                sums[name] = sums.get(name, 0.0) + value * weight
                weights[name] = weights.get(name, 0.0) + weight
    if not devices:
        return {}
    result = {name: sums[name] / weights[name] for name in sorted(sums) if weights[name] > 0}
    result["examples"] = examples
    result["devices"] = float(len(devices))
    return result


def evaluation_metrics(evaluation: Mapping[str, float]) -> dict[str, float]:
    """A :func:`federated_evaluation` without its counts: what ``state.evaluations`` keeps."""
    return {k: v for k, v in evaluation.items() if k not in EVALUATION_COUNTS}


@dataclass(frozen=True)
class RoundRecord:
    """How one round went.

    Args:
        round: round number.
        outcome: ``closed`` (new model) or ``failed`` (model unchanged).
        reason: why it ended: ``target``, ``all_reported``, ``deadline``, ``buffer``
            (async); failed: ``no_quorum``, ``strategy`` (it could not aggregate) or
            ``non_finite_model`` (the new model was not finite and was not published).
        opened_at: unix time the round was announced.
        closed_at: unix time it ended.
        deadline: final deadline (after any extension).
        extended: whether the deadline was extended.
        selected: agents asked to train (None: anyone).
        contributions: accepted updates in fold order.
        rejected: rejections by reason.
        declined: agents that said they cannot take part, with their reason.
        metrics: example-weighted means of the updates' metrics (plus ``examples``,
            the counted examples); the ``global_*`` ones are in ``evaluation``.
        strategy: strategy name.
        task: ``train``, or ``evaluate`` (an evaluate-only round: the model stayed as it
            was, its checkpoint is the previous one's model).
        evaluation: the federated evaluation of the global model the round started from,
            checkpoint ``round - 1`` (:func:`federated_evaluation`; empty: no agent
            evaluated it).  Each device's figures are in its contribution's metrics
            (:meth:`device_evaluations`).
    """

    round: int
    outcome: Literal["closed", "failed"]
    reason: str
    opened_at: float
    closed_at: float
    deadline: float
    extended: bool
    selected: tuple[str, ...] | None
    contributions: tuple[Contribution, ...]
    rejected: Mapping[str, int]
    metrics: Mapping[str, float]
    strategy: str
    declined: Mapping[str, str] = field(default_factory=dict)
    task: Literal["train", "evaluate"] = "train"
    evaluation: Mapping[str, float] = field(default_factory=dict)

    @property
    def evaluated_checkpoint(self) -> int | None:
        """The checkpoint ``evaluation`` is of (None: nobody evaluated one)."""
        return self.round - 1 if self.evaluation else None

    def device_evaluations(self) -> dict[str, dict[str, float]]:
        """Each device's figures for checkpoint ``round - 1`` (``global_`` prefix removed)."""
        return device_evaluations(self.contributions, self.round)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``v``)."""
        data = asdict(self)
        data["v"] = RECORD_VERSION
        data["selected"] = list(self.selected) if self.selected is not None else None
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        """Parse what :meth:`to_json` wrote.

        Raises:
            KeyError, TypeError, ValueError: the document is not a round record.
        """
        if data.get("v") != RECORD_VERSION:
            raise ValueError(f"round record version {data.get('v')!r} is not {RECORD_VERSION}")
        selected = data["selected"]
        task = data.get("task", "train")
        if task not in ("train", "evaluate"):
            raise ValueError(f"round record task {task!r} is not train or evaluate")
        return cls(
            round=int(data["round"]),
            outcome=data["outcome"],
            reason=str(data["reason"]),
            opened_at=float(data["opened_at"]),
            closed_at=float(data["closed_at"]),
            deadline=float(data["deadline"]),
            extended=bool(data["extended"]),
            selected=tuple(selected) if selected is not None else None,
            contributions=tuple(Contribution(**item) for item in data["contributions"]),
            rejected=dict(data["rejected"]),
            metrics=dict(data["metrics"]),
            strategy=str(data["strategy"]),
            declined=dict(data.get("declined", {})),
            task=task,
            evaluation={str(k): float(v) for k, v in data.get("evaluation", {}).items()},
        )
