"""Inference models for the devices: which standalone models are released, and their blobs.

Agents can install the global model for local inference (``edge_agent.install``).  A
device cannot build a standalone ONNX model itself (that needs the ``onnx`` package,
which only the server has), so the aggregator builds one per checkpoint and publishes it
as one more content-addressed retained blob.  The coordinator stays pure: it asks for a
model with a :class:`~fedmq.coordinator.actions.BuildInferenceModel` command and the
service hands the bytes back (``Coordinator.set_inference_model``).

The :class:`ModelShelf` (part of the :class:`~fedmq.coordinator.ledger.BlobLedger`)
holds the built models and names two releases in every announcement:

``latest``  the model of the newest checkpoint built;
``best``    the best held model by federated evaluation (``FederationState.evaluations``:
            per checkpoint, example-weighted metrics), by ``[delivery] best_metric``; by
            default the highest ``eval_accuracy``, or where no checkpoint has one the
            lowest ``eval_loss``.  None until a held model has been evaluated.

A checkpoint is evaluated while the next one is being trained, so the shelf keeps the
model of the checkpoint before the latest as well (the candidate whose evaluation is
coming in), besides the latest and the best: three models at most, in memory and in the
service's state directory.  Only the latest and the best are retained on the broker,
also once the federation has finished (the ``finished`` announcement names them).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedmq.errors import ConfigError
from fedmq.wire.blobs import BlobRef, blob_ref
from fedmq.wire.control import ModelRelease, ModelReleases

Evaluations = Mapping[int, Mapping[str, float]]
"""Federated evaluation: checkpoint -> metric name -> example-weighted value."""

AUTO_METRICS: tuple[tuple[str, Literal["max", "min"]], ...] = (
    ("eval_accuracy", "max"),
    ("eval_loss", "min"),
)
"""The default choice of the best model: the first of these any held model was evaluated on."""


@dataclass(frozen=True)
class DeliveryPolicy:
    """How the aggregator releases inference models (``[delivery]`` of federation.toml).

    Args:
        best_metric: the evaluation metric the best model is chosen by (None: the
            highest ``eval_accuracy``, else the lowest ``eval_loss``).
        best_mode: ``max`` or ``min`` of ``best_metric`` (ignored when it is None).
    """

    best_metric: str | None = None
    best_mode: Literal["max", "min"] = "max"

    def __post_init__(self) -> None:
        if self.best_metric is not None and not 0 < len(self.best_metric) <= 64:
            raise ConfigError(f"best_metric {self.best_metric!r} must be 1-64 characters")


@dataclass(frozen=True)
class HeldModel:
    """A built inference model: its checkpoint, its blob, the parameters it was made of."""

    checkpoint: int
    ref: BlobRef
    params: str  # sha256 of the parameter blob the model holds

    def to_json(self) -> dict[str, Any]:
        """JSON for the snapshot."""
        return {
            "checkpoint": self.checkpoint,
            "sha256": self.ref.sha256,
            "size": self.ref.size,
            "chunk_size": self.ref.chunk_size,
            "params": self.params,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HeldModel:
        """Parse :meth:`to_json` output (raises ValueError, KeyError or TypeError)."""
        ref = BlobRef(str(data["sha256"]), int(data["size"]), int(data["chunk_size"]))
        params = str(data["params"])
        if len(params) != 64:
            raise ValueError(f"parameter sha256 {params!r} is not 64 hex digits")
        return cls(int(data["checkpoint"]), ref, params)


@dataclass(frozen=True)
class ShelfState:
    """The shelf as the snapshot stores it (the model bytes live in the state directory)."""

    held: tuple[HeldModel, ...] = ()
    latest: int | None = None
    best: int | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON for the snapshot."""
        return {
            "held": [model.to_json() for model in self.held],
            "latest": self.latest,
            "best": self.best,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ShelfState:
        """Parse :meth:`to_json` output; None (a snapshot from before) is an empty shelf.

        Raises:
            ValueError, KeyError, TypeError: the object does not parse.
        """
        if data is None:
            return cls()
        held = tuple(HeldModel.from_json(item) for item in data["held"])
        checkpoints = {model.checkpoint for model in held}
        latest, best = data["latest"], data["best"]
        for name, value in (("latest", latest), ("best", best)):
            if value is not None and value not in checkpoints:
                raise ValueError(f"{name} model {value!r} is not on the shelf")
        return cls(held, latest, best)


class ModelShelf:
    """The inference models the aggregator holds, and which of them are released.

    Pure bookkeeping: :meth:`add` takes the bytes a ``BuildInferenceModel`` produced;
    the ledger publishes :meth:`refs` and serves :meth:`data`.

    Args:
        chunk_size: bytes per chunk of the model blobs.
    """

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._held: dict[int, HeldModel] = {}
        self._data: dict[str, bytes] = {}
        self.latest: int | None = None
        self.best: int | None = None
        self.pending: dict[int, str] = {}  # builds asked for: checkpoint -> params sha256

    # ------------------------------------------------------------------ changes

    def request(self, checkpoint: int, params_sha256: str) -> bool:
        """Whether ``checkpoint`` needs a model built (False: it has one already).

        A checkpoint whose parameters are those of the latest model (a failed round
        saves the unchanged model under its own number) gets the same model at once.
        """
        if checkpoint in self._held or checkpoint in self.pending:
            return False
        latest = self._held.get(self.latest) if self.latest is not None else None
        if latest is not None and latest.params == params_sha256 and checkpoint > latest.checkpoint:
            self._held[checkpoint] = HeldModel(checkpoint, latest.ref, params_sha256)
            self.latest = checkpoint
            self._prune()
            return False
        self.pending[checkpoint] = params_sha256
        return True

    def add(self, checkpoint: int, data: bytes) -> HeldModel | None:
        """Hold the model built for ``checkpoint`` (None: no build of it was asked for)."""
        params = self.pending.pop(checkpoint, None)
        if params is None:
            return None
        model = HeldModel(checkpoint, blob_ref(data, self.chunk_size), params)
        self._held[checkpoint] = model
        self._data[model.ref.sha256] = bytes(data)
        if self.latest is None or checkpoint > self.latest:
            self.latest = checkpoint
        # Older builds still pending were skipped by the service (a newer one was due).
        self.pending = {c: sha for c, sha in self.pending.items() if c > checkpoint}
        self._prune()
        return model

    def failed(self, checkpoint: int) -> bool:
        """Forget the build of ``checkpoint`` (False: none was pending)."""
        return self.pending.pop(checkpoint, None) is not None

    def choose_best(self, evaluations: Evaluations, policy: DeliveryPolicy) -> None:
        """Make the best evaluated held model the ``best`` release (ties: the newer)."""
        rules = (
            [(policy.best_metric, policy.best_mode)]
            if policy.best_metric is not None
            else list(AUTO_METRICS)
        )
        for metric, mode in rules:
            scored = [
                (value, checkpoint)
                for checkpoint in self._held
                if (value := _finite(evaluations.get(checkpoint, {}).get(metric))) is not None
            ]
            if scored:
                sign = 1.0 if mode == "max" else -1.0
                self.best = max(scored, key=lambda item: (sign * item[0], item[1]))[1]
                break
        self._prune()

    def clear(self) -> None:
        """Release nothing any more (delivery was switched off)."""
        self._held.clear()
        self._data.clear()
        self.pending.clear()
        self.latest = self.best = None

    def rechunk(self, chunk_size: int) -> None:
        """Chunk every held model by ``chunk_size`` from now on."""
        self.chunk_size = chunk_size
        self._held = {
            checkpoint: HeldModel(
                checkpoint, BlobRef(model.ref.sha256, model.ref.size, chunk_size), model.params
            )
            for checkpoint, model in self._held.items()
        }

    def _prune(self) -> None:
        """Keep the latest, the best and the candidate before the latest; drop the rest."""
        keep = {self.latest, self.best}
        older = [c for c in self._held if self.latest is not None and c < self.latest]
        if older:
            keep.add(max(older))
        self._held = {c: model for c, model in self._held.items() if c in keep}
        wanted = {model.ref.sha256 for model in self._held.values()}
        self._data = {sha: data for sha, data in self._data.items() if sha in wanted}

    # ------------------------------------------------------------------ restart

    def state(self) -> ShelfState:
        """What the snapshot keeps."""
        held = tuple(self._held[c] for c in sorted(self._held))
        return ShelfState(held, self.latest, self.best)

    def load(self, state: ShelfState) -> None:
        """Take over a stored shelf; its bytes come later (:meth:`provide`)."""
        self._held = {model.checkpoint: model for model in state.held}
        self._data = {}
        self.pending = {}
        self.latest, self.best = state.latest, state.best

    def missing(self) -> list[BlobRef]:
        """Held models whose bytes are not here (after a restart), one per blob."""
        refs = {m.ref.sha256: m.ref for m in self._held.values() if m.ref.sha256 not in self._data}
        return list(refs.values())

    def provide(self, sha256: str, data: bytes) -> bool:
        """Give back the bytes of a held model (False: not held, or other bytes)."""
        if sha256 not in {m.ref.sha256 for m in self._held.values()}:
            return False
        if hashlib.sha256(data).hexdigest() != sha256:
            return False
        self._data[sha256] = bytes(data)
        return True

    def drop_missing(self) -> list[int]:
        """Forget held models whose bytes never came back; return their checkpoints."""
        gone = sorted(c for c, m in self._held.items() if m.ref.sha256 not in self._data)
        for checkpoint in gone:
            del self._held[checkpoint]
        if self.latest in gone:
            self.latest = max(self._held, default=None)
        if self.best in gone:
            self.best = None
        return gone

    # ------------------------------------------------------------------ views

    def held(self) -> list[HeldModel]:
        """Every held model, oldest first."""
        return [self._held[c] for c in sorted(self._held)]

    def release(self, name: Literal["latest", "best"]) -> HeldModel | None:
        """The model released as ``name``, if any."""
        checkpoint = self.latest if name == "latest" else self.best
        return self._held.get(checkpoint) if checkpoint is not None else None

    def refs(self) -> list[BlobRef]:
        """The released models' blobs (retained on the broker), without repeats."""
        refs: dict[str, BlobRef] = {}
        for model in (self.release("latest"), self.release("best")):
            if model is not None:
                refs.setdefault(model.ref.sha256, model.ref)
        return list(refs.values())

    def data(self, sha256: str) -> bytes | None:
        """The bytes of a held model."""
        return self._data.get(sha256)

    def releases(self, evaluations: Evaluations) -> ModelReleases | None:
        """The announcement's ``models`` (None: nothing released yet)."""
        latest, best = self.release("latest"), self.release("best")
        if latest is None and best is None:
            return None
        return ModelReleases(latest=_release(latest, evaluations), best=_release(best, evaluations))


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _release(model: HeldModel | None, evaluations: Evaluations) -> ModelRelease | None:
    if model is None:
        return None
    metrics = {
        str(name): number
        for name, value in evaluations.get(model.checkpoint, {}).items()
        if (number := _finite(value)) is not None
    }
    return ModelRelease(checkpoint=model.checkpoint, model=model.ref, metrics=metrics)
