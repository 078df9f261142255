"""Helpers for the model-install tests: real standalone models, announcements naming them."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from aggregator.scripted import bundle_dir

from fedmq.aggregator.standalone import standalone_model
from fedmq.bundle import Bundle
from fedmq.wire.blobs import BlobRef, blob_ref
from fedmq.wire.control import ModelRelease, ModelReleases, RoundAnnouncement

CHUNK = 4096


@dataclass(frozen=True)
class Model:
    """One standalone ONNX model and what it computes on :func:`probe_input`."""

    checkpoint: int
    data: bytes
    output: bytes  # float32 bytes of the model's output on probe_input()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def ref(self) -> BlobRef:
        return blob_ref(self.data, CHUNK)


def probe_input(bundle: str = "digits_mlp") -> np.ndarray:
    shape = Bundle.load(bundle_dir(bundle)).manifest.input.example_shape
    return np.random.default_rng(7).random((4, *shape), dtype=np.float32)


def run_model(data: bytes, x: np.ndarray) -> bytes:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x})[0], np.float32).tobytes()


def make_models(count: int, bundle: str = "digits_mlp", first: int = 1) -> list[Model]:
    """``count`` distinct global models of ``bundle`` (checkpoints ``first``…)."""
    loaded = Bundle.load(bundle_dir(bundle))
    initial = loaded.initial_parameters()
    x = probe_input(bundle)
    models = []
    for index in range(count):
        rng = np.random.default_rng(index + 100 * first)
        params = {
            name: (value + 0.1 * rng.standard_normal(value.shape)).astype(value.dtype)
            if value.dtype.kind == "f"
            else value
            for name, value in initial.items()
        }
        data = standalone_model(loaded, params)
        models.append(Model(first + index, data, run_model(data, x)))
    return models


def release(model: Model, metrics: Mapping[str, float] | None = None) -> ModelRelease:
    return ModelRelease(checkpoint=model.checkpoint, model=model.ref, metrics=dict(metrics or {}))


def announcement(
    federation: str,
    *,
    latest: Model | None = None,
    best: Model | None = None,
    round_id: int = 5,
    status: str = "waiting",
    metrics: Mapping[str, float] | None = None,
    issued_at: float | None = None,
) -> RoundAnnouncement:
    """A ``waiting`` announcement (no agent trains on it) naming ``latest`` and ``best``."""
    dummy = BlobRef("0" * 64, 1, CHUNK)
    return RoundAnnouncement(
        federation=federation,
        aggregator="agg",
        round=round_id,
        status=status,  # type: ignore[arg-type]
        issued_at=time.time() if issued_at is None else issued_at,
        deadline=time.time() + 60,
        bundle=dummy,
        params=dummy,
        models=ModelReleases(
            latest=release(latest, metrics) if latest is not None else None,
            best=release(best, metrics) if best is not None else None,
        ),
    )
