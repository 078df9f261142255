"""One row of the simulation report per round, from the aggregator's record and the wire.

Sources: the aggregator's round record (outcome, contributors, rejections, agents'
weighted metrics, open/close times), the central evaluation of the round's checkpoint,
the observer's byte counts and acks, and the simulator's own list of devices it made
vanish.  ``global_eval_*`` is the federated evaluation: the model the round started from
(checkpoint ``round - 1``) on the agents' own evaluation data, example-weighted.

``bytes_up`` is measured: the update chunk payloads agents published.  ``bytes_down``
is derived from sizes seen on the wire: the announcement for every selected agent, the
global parameters for every agent that uploaded (it had to fetch them), the bundle for
agents uploading for the first time (later rounds hit their blob cache), and the acks.
MQTT framing (a few bytes per message) is in neither.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fedmq.coordinator.records import RoundRecord
from fedmq.simulate.observer import Observer

TEST_METRICS = ("test_loss", "test_accuracy", "test_auroc", "test_mse")
FEDERATED_METRICS = ("global_eval_loss", "global_eval_accuracy", "global_eval_mse")
COLUMNS = (
    "round",
    "outcome",
    "reason",
    "wall_time_s",
    "selected",
    "updates_accepted",
    "updates_rejected",
    "dropped_agents",
    "train_loss",
    *TEST_METRICS,
    "bytes_up",
    "bytes_down",
    "close_lag_s",
    "task",
    *FEDERATED_METRICS,
)


@dataclass(frozen=True)
class RoundRow:
    """How one round went, as the report shows it (None: not applicable or unknown).

    ``close_lag_s`` is the time from the round's last accepted update (its ack) to the
    round closing: how long the aggregator waited for agents that never answered.
    """

    round: int
    outcome: str
    reason: str
    wall_time_s: float
    selected: int
    updates_accepted: int
    updates_rejected: int
    dropped_agents: int
    train_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    test_auroc: float | None
    test_mse: float | None
    bytes_up: int
    bytes_down: int
    close_lag_s: float | None
    task: str = "train"
    global_eval_loss: float | None = None
    global_eval_accuracy: float | None = None
    global_eval_mse: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The row as a JSON-ready mapping, in column order."""
        values = asdict(self)
        return {name: values[name] for name in COLUMNS}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def build_row(
    record: RoundRecord,
    test: dict[str, float],
    observer: Observer,
    dropped: int,
) -> RoundRow:
    """Combine what is known about round ``record.round``."""
    number = record.round
    traffic = observer.rounds[number]
    selected = len(record.selected) if record.selected is not None else 0
    announcement = observer.announcements.get(number)
    bytes_down = traffic.ack_bytes
    if announcement is not None:
        bytes_down += observer.announcement_bytes.get(number, 0) * selected
        bytes_down += announcement.params.size * len(traffic.uploaders)
        bytes_down += announcement.bundle.size * observer.first_uploads(number)
    accepted_at = [
        traffic.accepted[c.update_id]
        for c in record.contributions
        if c.update_id in traffic.accepted
    ]
    close_lag = record.closed_at - max(accepted_at) if accepted_at else None
    return RoundRow(
        round=number,
        outcome=record.outcome,
        reason=record.reason,
        wall_time_s=record.closed_at - record.opened_at,
        selected=selected,
        updates_accepted=len(record.contributions),
        updates_rejected=sum(record.rejected.values()),
        dropped_agents=dropped,
        train_loss=_finite(record.metrics.get("train_loss")),
        test_loss=_finite(test.get("test_loss")),
        test_accuracy=_finite(test.get("test_accuracy")),
        test_auroc=_finite(test.get("test_auroc")),
        test_mse=_finite(test.get("test_mse")),
        bytes_up=traffic.bytes_up,
        bytes_down=bytes_down,
        close_lag_s=close_lag,
        task=record.task,
        global_eval_loss=_finite(record.evaluation.get("eval_loss")),
        global_eval_accuracy=_finite(record.evaluation.get("eval_accuracy")),
        global_eval_mse=_finite(record.evaluation.get("eval_mse")),
    )
