"""The round being collected: who was asked, what arrived, what was refused.

Mutable on purpose: the coordinator updates it on every accepted, reserved or rejected
update.  Its phase changes only through :func:`fedmq.coordinator.lifecycle.transition`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fedmq.coordinator.actions import Ticket
from fedmq.coordinator.lifecycle import Phase
from fedmq.coordinator.records import (
    Contribution,
    RoundRecord,
    federated_evaluation,
    weighted_metrics,
)
from fedmq.coordinator.rules import Progress
from fedmq.wire.control import RoundTask


@dataclass
class RoundState:
    """The round being collected (or waited for, or the last one once finished)."""

    number: int
    phase: Phase
    opened_at: float = 0.0
    deadline: float = 0.0
    extended: bool = False
    selected: tuple[str, ...] | None = None
    target: int = 0
    contributions: list[Contribution] = field(default_factory=list)
    on_time: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    reserved: dict[tuple[str, str], Ticket] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    declined: dict[str, str] = field(default_factory=dict)  # agent -> reason
    task: RoundTask = "train"  # or "evaluate": agents evaluate the global model only

    def outstanding(self) -> tuple[str, ...]:
        """Selected agents that have not answered (contributed or been refused) yet."""
        return tuple(c for c in self.selected or () if c not in self.answered)

    def progress(self, is_gone: Callable[[str], bool], *, settled: bool) -> Progress:
        """What the close rules look at (``is_gone``: the roster's verdict on an agent)."""
        outstanding = self.outstanding()
        return Progress(
            number=self.number,
            deadline=self.deadline,
            extended=self.extended,
            target=self.target,
            accepted=len(self.contributions),
            on_time=len(self.on_time),
            outstanding=outstanding,
            outstanding_gone=all(is_gone(c) for c in outstanding),
            settled=settled,
        )

    def record(
        self,
        now: float,
        outcome: Literal["closed", "failed"],
        reason: str,
        strategy: str,
        *,
        max_examples: int | None = None,
    ) -> RoundRecord:
        """The durable record of this round ending now.

        ``max_examples`` caps the evaluation examples a device's figures weigh.
        """
        metrics = weighted_metrics(self.contributions)
        metrics["updates"] = float(len(self.contributions))
        metrics["examples"] = float(sum(c.counted for c in self.contributions))
        return RoundRecord(
            round=self.number,
            outcome=outcome,
            reason=reason,
            opened_at=self.opened_at,
            closed_at=now,
            deadline=self.deadline,
            extended=self.extended,
            selected=self.selected,
            contributions=tuple(self.contributions),
            rejected=dict(self.rejected),
            metrics=metrics,
            strategy=strategy,
            declined=dict(self.declined),
            task=self.task,
            evaluation=federated_evaluation(self.contributions, self.number, max_examples),
        )
