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
was added within version 1: a snapshot without it loads with an empty history.  So were
``task`` (the round's: ``train`` or ``evaluate``), ``final_round`` (the last round, when
``[target_metric]`` was reached and an evaluate-only round follows) and ``evaluations``
(``{"<checkpoint>": {metric: value}}``, the federated evaluations): without them a
snapshot loads as a training round, no early end, no evaluations.  And ``models``
(``{"held": [...], "latest": <checkpoint>, "best": <checkpoint>}``, the released inference
models of :mod:`~fedmq.coordinator.releases`; their bytes are files of the service):
without it nothing is released until the next model is built.

The checkpoint a snapshot names is read with :class:`Checkpoint`, and
:meth:`Snapshot.check_params` refuses parameters that are not that checkpoint's: a
corrupt or mismatched checkpoint fails the restore with :class:`~fedmq.errors.StateError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedmq.buffers import Buffer
from fedmq.coordinator.history import History
from fedmq.coordinator.ledger import ref_from, ref_json
from fedmq.coordinator.lifecycle import PHASES, Phase, transition
from fedmq.coordinator.releases import ShelfState
from fedmq.errors import ConfigError, DecodeError, StateError
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import RoundTask
from fedmq.wire.tensors import decode_tensors

if TYPE_CHECKING:
    from fedmq.strategies.strategy import Strategy

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
    task: RoundTask = "train"
    final_round: int | None = None
    evaluations: Mapping[int, Mapping[str, float]] = field(default_factory=dict)
    models: ShelfState = field(default_factory=ShelfState)

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
            "task": self.task,
            "final_round": self.final_round,
            "evaluations": {str(c): dict(m) for c, m in sorted(self.evaluations.items())},
            "models": self.models.to_json(),
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
                **_evaluation(data),
                models=ShelfState.from_json(data.get("models")),
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
                "state directory was created with another model bundle: the bundle of a "
                "federation cannot change. Restore the original bundle, or start a new "
                "federation (new federation id and state_dir) with initial = <this "
                "state directory> to carry its weights over"
            )
        if self.mode != mode:
            raise ConfigError(f"state directory runs in {self.mode} mode, config says {mode}")

    def check_params(self, params: BlobRef) -> None:
        """Refuse a checkpoint whose parameters are not the ones this snapshot names.

        Raises:
            StateError: the checkpoint belongs to another state (a partial restore).
        """
        if params.sha256 != self.params.sha256:
            raise StateError(
                "checkpoint does not match the snapshot's parameters: the state directory "
                "was modified or partially restored"
            )

    def under_rounds(self, rounds: int, *, target_reached: bool) -> Snapshot:
        """This snapshot under a configuration of ``rounds`` rounds (a restart may change it).

        A finished federation restarted with more ``rounds`` than it ran continues: the
        result waits for the agents of the next round (move ``continue``), with the last
        checkpoint as its model.  It stays finished with as many rounds as it ran, or
        while ``target_reached`` (the last closed round's metrics still reach
        ``[target_metric]``).  An unfinished one is returned as it is.

        Raises:
            ConfigError: ``rounds`` is below the rounds a finished federation ran, or
                below the round an unfinished one has already started (the message
                names both numbers).
        """
        if self.phase != "finished":
            if rounds < self.round:
                raise ConfigError(
                    f"rounds = {rounds} is below round {self.round}, which federation "
                    f"{self.federation!r} has already started ({self.round - 1} rounds ran): "
                    f"set rounds >= {self.round} (rounds = {self.round} ends it after this "
                    "round)"
                )
            return self
        if rounds < self.round:
            raise ConfigError(
                f"rounds = {rounds} is below the {self.round} rounds federation "
                f"{self.federation!r} has already run: set rounds = {self.round} to leave it "
                "finished, or more to continue it"
            )
        if rounds == self.round or target_reached:
            return self
        return replace(
            self,
            round=self.round + 1,
            phase=transition(self.phase, "continue"),
            opened_at=0.0,
            deadline=0.0,
            extended=False,
            selected=None,
            target=0,
            finish_reason=None,
            task="train",  # the continued rounds train; no early end is pending
            final_round=None,
        )


@dataclass(frozen=True)
class Checkpoint:
    """The checkpoint a snapshot names, decoded: global parameters and optimizer state."""

    params: dict[str, npt.NDArray[Any]]
    optimizer: dict[str, npt.NDArray[Any]]

    @classmethod
    def decode(cls, params_blob: Buffer, optimizer_blob: Buffer) -> Checkpoint:
        """Decode the two blobs ``SaveCheckpoint`` stored.

        Raises:
            StateError: either does not decode.
        """
        try:
            return cls(decode_tensors(params_blob), decode_tensors(optimizer_blob))
        except DecodeError as exc:
            raise StateError(f"checkpoint does not decode: {exc}") from exc

    def load_optimizer(self, strategy: Strategy) -> None:
        """Give ``strategy`` the server optimizer state saved with the parameters.

        Raises:
            StateError: the state does not fit the strategy's optimizer.
        """
        try:
            strategy.load_state_dict(
                {name: np.asarray(value, np.float32) for name, value in self.optimizer.items()}
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"state snapshot is inconsistent: {exc!r}") from exc


def _evaluation(data: Mapping[str, Any]) -> dict[str, Any]:
    """The federated evaluation's fields of a snapshot (absent before they existed)."""
    task = data.get("task", "train")
    if task not in ("train", "evaluate"):
        raise ValueError(f"unknown round task {task!r}")
    final = data.get("final_round")
    evaluations: dict[int, dict[str, float]] = {}
    for checkpoint, metrics in (data.get("evaluations") or {}).items():
        figures = {str(name): float(value) for name, value in metrics.items()}
        if not all(math.isfinite(value) for value in figures.values()):
            raise ValueError(f"evaluation of checkpoint {checkpoint} is not finite")
        evaluations[int(checkpoint)] = figures
    return {
        "task": task,
        "final_round": None if final is None else int(final),
        "evaluations": evaluations,
    }


def _screen(value: Any) -> dict[str, Any]:
    """The norm screen's fields of a snapshot (absent before they existed: empty)."""
    if value is None:
        return {}
    norms = tuple(float(norm) for norm in value["norms"])
    if not all(math.isfinite(norm) and norm >= 0 for norm in norms):
        raise ValueError("norm history holds a negative or non-finite norm")
    training = value["training"]
    return {"norms": norms, "norms_training": None if training is None else str(training)}
