"""A federation's history as its aggregator's state directory tells it, read-only.

Reads ``state.json`` (where the federation is), ``rounds/*/record.json`` (how every
round ended, with each contribution's metrics) and ``rounds/*/stats.json`` (bytes and
agents that never answered, when the service wrote them) without taking the
directory's lock and without writing anything, so it works beside a running service.
Every file there is replaced atomically, so a file is complete or absent; one that
cannot be read anyway (a damaged disk, a newer format) is skipped and named in
:attr:`FederationHistory.problems`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.aggregator.store import (
    STATE_FILE,
    checkpoint_rounds,
    read_records,
    read_round_stats,
)
from fedmq.coordinator.records import EVALUATION_COUNTS, RoundRecord
from fedmq.errors import StateError

QUALITY_METRICS = ("eval_accuracy", "eval_auroc", "eval_mse", "eval_mae")
"""The first of these the rounds report is the report's quality metric."""
LOSS_METRICS = ("train_loss", "eval_loss")
COUNT_METRICS = ("updates", "examples", "num_batches")


@dataclass(frozen=True)
class RoundView:
    """One ended round: its record and what the service measured of it."""

    record: RoundRecord
    stats: Mapping[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> int:
        """The round number."""
        return self.record.round

    @property
    def duration_s(self) -> float | None:
        """Announcement to end (None: never opened, e.g. restored records)."""
        record = self.record
        if not record.opened_at:
            return None
        return max(0.0, record.closed_at - record.opened_at)

    @property
    def selected(self) -> int | None:
        """Agents asked (None: open to everyone, async)."""
        return None if self.record.selected is None else len(self.record.selected)

    @property
    def accepted(self) -> int:
        """Updates folded into the round."""
        return len(self.record.contributions)

    @property
    def rejected(self) -> int:
        """Rejections (updates and chunks), every reason."""
        return sum(self.record.rejected.values())

    @property
    def no_answer(self) -> list[str]:
        """Selected agents that had not answered when it ended (needs ``stats.json``)."""
        value = self.stats.get("no_answer")
        if isinstance(value, list):
            return [str(c) for c in value]
        # Without stats: the selected agents without an accepted update (rejected included).
        selected = self.record.selected or ()
        done = {c.client for c in self.record.contributions}
        return [c for c in selected if c not in done]

    @property
    def dropouts(self) -> list[str]:
        """Selected agents that were gone (offline, silent) when it ended."""
        value = self.stats.get("gone")
        return [str(c) for c in value] if isinstance(value, list) else []

    @property
    def bytes_in(self) -> int | None:
        """Update chunk bytes received during the round (needs ``stats.json``)."""
        value = self.stats.get("bytes_in")
        return int(value) if isinstance(value, int | float) else None

    @property
    def bytes_out(self) -> int | None:
        """Blob and control bytes published during the round (needs ``stats.json``)."""
        value = self.stats.get("bytes_out")
        return int(value) if isinstance(value, int | float) else None

    def metric(self, name: str) -> float | None:
        """The round's example-weighted ``name`` (None: not reported or not finite)."""
        value = self.record.metrics.get(name)
        return value if value is not None and math.isfinite(value) else None

    @property
    def task(self) -> str:
        """``train``, or ``evaluate`` (an evaluate-only round)."""
        return self.record.task

    def evaluation(self, name: str) -> float | None:
        """The federated evaluation's ``name`` of checkpoint ``number - 1`` (None: none)."""
        value = self.record.evaluation.get(name)
        return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class FederationHistory:
    """What a state directory says about its federation."""

    state_dir: Path
    federation: str | None
    mode: str | None
    phase: str | None
    round: int | None
    finish_reason: str | None
    rounds: Sequence[RoundView]
    checkpoints: Sequence[int]
    problems: Sequence[str]

    @property
    def quality_metric(self) -> str | None:
        """The accuracy-like metric the rounds report (``eval_accuracy``, ``eval_mse``, …)."""
        for name in QUALITY_METRICS:
            if any(view.metric(name) is not None for view in self.rounds):
                return name
        return None

    @property
    def metric_names(self) -> list[str]:
        """Every weighted metric some round reports, losses and quality first."""
        found = {name for view in self.rounds for name in view.record.metrics}
        first = [n for n in (*LOSS_METRICS, *QUALITY_METRICS) if n in found]
        rest = sorted(found - set(first) - set(COUNT_METRICS))
        return first + rest

    @property
    def evaluation_names(self) -> list[str]:
        """Every federated evaluation metric some round reports, loss and quality first."""
        found = {name for view in self.rounds for name in view.record.evaluation}
        found -= set(EVALUATION_COUNTS)
        first = [n for n in ("eval_loss", *QUALITY_METRICS) if n in found]
        return first + sorted(found - set(first))

    @property
    def evaluation_quality(self) -> str | None:
        """The accuracy-like metric of the federated evaluations (``eval_accuracy``, …)."""
        names = self.evaluation_names
        return next((name for name in QUALITY_METRICS if name in names), None)

    @property
    def latest_evaluation(self) -> RoundView | None:
        """The newest round whose devices evaluated the global model it started from."""
        return next((v for v in reversed(self.rounds) if v.record.device_evaluations()), None)

    @property
    def final_checkpoint(self) -> int:
        """The newest global model: the checkpoint of the last training round that closed.

        Failed and evaluate-only rounds keep the model (their checkpoints repeat it).
        """
        made = [v.number for v in self.rounds if v.task == "train" and v.record.outcome == "closed"]
        return max(made, default=0)

    @property
    def devices(self) -> list[str]:
        """Every agent that contributed, sorted."""
        return sorted({c.client for view in self.rounds for c in view.record.contributions})

    @property
    def status(self) -> str:
        """``finished (ran 20 rounds)``, ``running: round 7 collecting``, or ``unknown``."""
        if self.phase == "finished":
            return f"finished ({self.finish_reason})" if self.finish_reason else "finished"
        if self.phase is not None and self.round is not None:
            return f"running or stopped: round {self.round} {self.phase}"
        return "unknown (no state.json)"


def _snapshot(state_dir: Path, problems: list[str]) -> Mapping[str, Any]:
    path = state_dir / STATE_FILE
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        problems.append(f"{path}: {exc}")
        return {}
    return data if isinstance(data, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def read_history(state_dir: Path) -> FederationHistory:
    """Read ``state_dir`` without locking or changing it.

    Raises:
        StateError: ``state_dir`` is not an aggregator state directory.
    """
    if not state_dir.is_dir():
        raise StateError(f"{state_dir} is not a directory")
    if not (state_dir / STATE_FILE).exists() and not (state_dir / "rounds").is_dir():
        raise StateError(
            f"{state_dir} is not an aggregator state directory (no {STATE_FILE}, no rounds/): "
            "pass the state_dir of federation.toml"
        )
    problems: list[str] = []
    snapshot = _snapshot(state_dir, problems)
    records: list[RoundRecord] = list(
        read_records(state_dir, on_error=lambda _path, exc: problems.append(str(exc)))
    )
    stats = read_round_stats(state_dir)
    round_number = snapshot.get("round")
    return FederationHistory(
        state_dir=state_dir,
        federation=_text(snapshot.get("federation")),
        mode=_text(snapshot.get("mode")),
        phase=_text(snapshot.get("phase")),
        round=round_number if isinstance(round_number, int) else None,
        finish_reason=_text(snapshot.get("finish_reason")),
        rounds=[RoundView(record, stats.get(record.round, {})) for record in records],
        checkpoints=checkpoint_rounds(state_dir),
        problems=problems,
    )
