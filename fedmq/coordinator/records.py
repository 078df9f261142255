"""Per-round records: who contributed, how the round ended, and its metrics.

The aggregator stores one record per round in its state directory
(``rounds/<round>/record.json``); the simulator and dashboards read them to plot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

RECORD_VERSION = 1


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
    """Mean of every metric weighted by counted examples, over the updates reporting it."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for item in contributions:
        for name, value in item.metrics.items():
            if math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + value * item.counted
                weights[name] = weights.get(name, 0.0) + item.counted
    return {name: sums[name] / weights[name] for name in sorted(sums) if weights[name] > 0}


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
            the counted examples).
        strategy: strategy name.
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
        )
