"""Turn a training result into the update envelope the aggregator receives (pure).

Error feedback: the residual a lossy codec left last round is added to this round's
delta before encoding, and what this encoding loses becomes the next residual, so
nothing the device learned is dropped for good, only delayed (Seide et al. 2014;
Karimireddy et al. 2019).
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.bundle.manifest import Manifest
from fedmq.errors import LocalProtocolError, TrainingError
from fedmq.wire.blobs import BlobRef, blob_ref
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.training import TrainingConfig
from fedmq.wire.update import UpdateMeta, encode_update

Array = npt.NDArray[Any]
_SEED_BITS = 63  # numpy seeds are non-negative; 63 bits stay a positive int64


@dataclass(frozen=True)
class BuiltUpdate:
    """An encoded update, its blob reference and the residual its encoding left."""

    data: bytes
    ref: BlobRef
    meta: UpdateMeta
    residual: dict[str, Array]


def new_update_id() -> str:
    """A fresh update id: unique per (round, training run), kept across re-sends."""
    return uuid.uuid4().hex


def local_training_config(config: TrainingConfig, client: str, round_id: int) -> TrainingConfig:
    """The round's config with seeds mixed with the client id and round.

    The aggregator sends one seed to everyone; mixing keeps agents from shuffling their
    data identically and makes a re-run of the same round on the same device repeat.
    """

    def mix(seed: int) -> int:
        digest = hashlib.sha256(f"{seed}/{client}/{round_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)

    update: dict[str, Any] = {"seed": mix(config.seed)}
    if config.dropout_seed is not None:
        update["dropout_seed"] = mix(config.dropout_seed)
    return config.model_copy(update=update)


def with_residual(
    delta: Mapping[str, Array], residual: Mapping[str, Array], manifest: Manifest
) -> dict[str, Array]:
    """``delta + residual`` over the manifest's update tensors, in manifest order.

    Raises:
        TrainingError: the delta lacks an update tensor or holds NaN/Inf.
    """
    combined: dict[str, Array] = {}
    for name in manifest.update_names:
        if name not in delta:
            raise TrainingError(f"training produced no delta for {name!r}")
        value = np.asarray(delta[name], dtype=np.float32)
        if not np.isfinite(value).all():
            raise TrainingError(f"delta of {name!r} is not finite: training diverged")
        extra = residual.get(name)
        if extra is not None and extra.shape == value.shape:
            value = value + extra.astype(np.float32, copy=False)
        combined[name] = value
    return combined


def build_update(
    *,
    delta: Mapping[str, Array],
    residual: Mapping[str, Array],
    manifest: Manifest,
    codec: CodecSpec,
    federation: str,
    client: str,
    round_id: int,
    num_examples: int,
    metrics: Mapping[str, float],
    chunk_size: int,
    update_id: str | None = None,
    created_at: float | None = None,
) -> BuiltUpdate:
    """Encode ``delta`` (+ ``residual``) with ``codec`` into an update envelope.

    Returns:
        The envelope bytes, their blob reference for chunking, the metadata, and the
        new residual (empty for a lossless codec).

    Raises:
        TrainingError: the delta is incomplete, non-finite, or the codec refuses it
            (e.g. fp16 overflow).
    """
    to_send = with_residual(delta, residual, manifest)
    try:
        encoded = encode_tensors(to_send, codec)
    except LocalProtocolError as exc:
        raise TrainingError(f"cannot encode the update with {codec}: {exc}") from exc
    meta = _meta(federation, client, round_id, num_examples, metrics, update_id, created_at)
    try:
        data = encode_update(meta, encoded.data)
    except LocalProtocolError as exc:
        raise TrainingError(f"cannot build the update envelope: {exc}") from exc
    return BuiltUpdate(data, blob_ref(data, chunk_size), meta, dict(encoded.lost))


def _meta(
    federation: str,
    client: str,
    round_id: int,
    num_examples: int,
    metrics: Mapping[str, float],
    update_id: str | None,
    created_at: float | None,
) -> UpdateMeta:
    """The envelope metadata of a fresh answer to ``round_id`` (a new id unless given)."""
    return UpdateMeta(
        federation=federation,
        client=client,
        round=round_id,
        base_round=round_id,
        update_id=update_id or new_update_id(),
        num_examples=num_examples,
        metrics=dict(metrics),
        created_at=time.time() if created_at is None else created_at,
    )


def build_report(
    *,
    residual: Mapping[str, Array],
    federation: str,
    client: str,
    round_id: int,
    num_examples: int,
    metrics: Mapping[str, float],
    chunk_size: int,
    update_id: str | None = None,
    created_at: float | None = None,
) -> BuiltUpdate:
    """The answer to an evaluate-only round: an update envelope without tensors.

    It travels, is acked and re-sent exactly like an update (same outbox, same update
    id across re-sends); the aggregator counts it and folds nothing.  ``num_examples``
    is the evaluation examples; ``residual`` is kept as it is (nothing was encoded).

    Raises:
        TrainingError: an id, the example count or a metric is invalid.
    """
    meta = _meta(federation, client, round_id, num_examples, metrics, update_id, created_at)
    try:
        data = encode_update(meta, encode_tensors({}).data)
    except LocalProtocolError as exc:
        raise TrainingError(f"cannot build the evaluation report: {exc}") from exc
    return BuiltUpdate(data, blob_ref(data, chunk_size), meta, dict(residual))
