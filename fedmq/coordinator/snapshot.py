"""The coordinator's durable state as JSON: ``state.json`` in the state directory.

A snapshot is the commit point of every round change (``SaveState``): together with the
checkpoint it names and the stored updates of the open round it rebuilds the
coordinator exactly.  The format is versioned; a snapshot of another version, or one
whose fields do not parse, is refused with :class:`~fedmq.errors.StateError` before
anything is built from it, and one of another federation, bundle or mode with
:class:`~fedmq.errors.ConfigError` (the operator pointed a service at the wrong
directory).

Version 1 layout (one flat JSON object)::

    v federation aggregator mode bundle params round phase opened_at deadline extended
    selected target seq checkpoint completed failed blobs selections ids contributed
    metrics finish_reason screen

``screen`` (``{"training": <fingerprint>, "norms": [...]}``, the norm screen's history)
was added within version 1: a snapshot without it loads with an empty history.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmq.coordinator.history import History
from fedmq.coordinator.ledger import ref_from, ref_json
from fedmq.coordinator.lifecycle import PHASES, Phase
from fedmq.errors import ConfigError, StateError
from fedmq.wire.blobs import BlobRef

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    """Everything :meth:`Coordinator.restore` needs besides the checkpoint blobs."""

    federation: str
    aggregator: str
    mode: str
    bundle: BlobRef
    params: BlobRef
    round: int
    phase: Phase
    opened_at: float
    deadline: float
    extended: bool
    selected: tuple[str, ...] | None
    target: int
    seq: int
    checkpoint: int
    completed: int
    failed: int
    blobs: tuple[BlobRef, ...]
    history: History
    metrics: dict[str, float]
    finish_reason: str | None
    norms: tuple[float, ...] = ()
    norms_training: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready object written to ``state.json``."""
        return {
            "v": SNAPSHOT_VERSION,
            "federation": self.federation,
            "aggregator": self.aggregator,
            "mode": self.mode,
            "bundle": ref_json(self.bundle),
            "params": ref_json(self.params),
            "round": self.round,
            "phase": self.phase,
            "opened_at": self.opened_at,
            "deadline": self.deadline,
            "extended": self.extended,
            "selected": list(self.selected) if self.selected is not None else None,
            "target": self.target,
            "seq": self.seq,
            "checkpoint": self.checkpoint,
            "completed": self.completed,
            "failed": self.failed,
            "blobs": [ref_json(ref) for ref in self.blobs],
            **self.history.to_json(),
            "metrics": dict(self.metrics),
            "finish_reason": self.finish_reason,
            "screen": {"training": self.norms_training, "norms": list(self.norms)},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Snapshot:
        """Parse a stored snapshot.

        Raises:
            StateError: another format version, or fields that do not parse.
        """
        if data.get("v") != SNAPSHOT_VERSION:
            raise StateError(f"state snapshot version {data.get('v')!r} is not supported")
        try:
            phase = data["phase"]
            if phase not in PHASES:
                raise ValueError(f"unknown phase {phase!r}")
            selected = data["selected"]
            return cls(
                federation=str(data["federation"]),
                aggregator=str(data["aggregator"]),
                mode=str(data["mode"]),
                bundle=ref_from(data["bundle"]),
                params=ref_from(data["params"]),
                round=int(data["round"]),
                phase=phase,
                opened_at=float(data["opened_at"]),
                deadline=float(data["deadline"]),
                extended=bool(data["extended"]),
                selected=tuple(selected) if selected is not None else None,
                target=int(data["target"]),
                seq=int(data["seq"]),
                checkpoint=int(data["checkpoint"]),
                completed=int(data["completed"]),
                failed=int(data["failed"]),
                blobs=tuple(ref_from(ref) for ref in data["blobs"]),
                history=History.from_json(data),
                metrics={str(k): float(v) for k, v in data["metrics"].items()},
                finish_reason=data.get("finish_reason"),
                **_screen(data.get("screen")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"state snapshot is inconsistent: {exc!r}") from exc

    def check_belongs(self, federation: str, bundle: BlobRef, mode: str) -> None:
        """Refuse a state directory made for another federation, bundle or mode.

        Raises:
            ConfigError: naming what differs and what to do.
        """
        if self.federation != federation:
            raise ConfigError(
                f"state directory belongs to federation {self.federation!r}, "
                f"not {federation!r}: use another state_dir"
            )
        if self.bundle.sha256 != bundle.sha256:
            raise ConfigError(
                "state directory was created with another model bundle: use a new "
                "state_dir for a new bundle (or restore the original bundle)"
            )
        if self.mode != mode:
            raise ConfigError(f"state directory runs in {self.mode} mode, config says {mode}")


def _screen(value: Any) -> dict[str, Any]:
    """The norm screen's fields of a snapshot (absent before they existed: empty)."""
    if value is None:
        return {}
    norms = tuple(float(norm) for norm in value["norms"])
    if not all(math.isfinite(norm) and norm >= 0 for norm in norms):
        raise ValueError("norm history holds a negative or non-finite norm")
    training = value["training"]
    return {"norms": norms, "norms_training": None if training is None else str(training)}
