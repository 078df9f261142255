"""Checking a reassembled update against the bundle before it may count.

:func:`verify_update` is pure and CPU-bound (zstd, finite checks, the update's norm):
services run it off the event loop.  It checks everything that depends only on the
update's bytes and the bundle manifest; whether the update fits the current round
(known agent, round, duplicate, norm screen) is the coordinator's decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedmq.buffers import Buffer
from fedmq.errors import DecodeError, IntegrityError, LimitExceededError, MalformedMessageError
from fedmq.strategies.clipping import update_norm
from fedmq.strategies.layout import ModelLayout
from fedmq.wire.blobs import BlobAssembler
from fedmq.wire.control import AckReason
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits, KiB, MiB
from fedmq.wire.tensors import decode_tensors
from fedmq.wire.update import MAX_METRICS, UpdateMeta, decode_update_meta

if TYPE_CHECKING:
    from fedmq.bundle.manifest import Manifest

UPDATE_DTYPE = np.dtype(np.float32)  # every update tensor (parameters, float buffers)
HEADER_ALLOWANCE = 64 * KiB  # bytes: envelope header with metrics, tensor set header
PER_TENSOR_ALLOWANCE = 512  # bytes of header per tensor entry (name, shape, codec fields)
# topk:1 stores a 4-byte index next to every 4-byte value: twice the raw size before zstd.
CODEC_EXPANSION = 2
# Decoding memory beyond the arrays (fedmq.wire.tensors: one step's scratch, zstd's window
# ring): at most ~1 MiB for the level-1 frames agents send.
DECODE_ALLOWANCE = 2 * MiB
EXTRA_TENSORS = 64  # tensors beyond the schema still decoded, to name them in the rejection


@dataclass(frozen=True)
class UpdateKey:
    """Identifies one update across re-sends: (client, round, update id)."""

    client: str
    round: int
    update_id: str


@dataclass(frozen=True)
class UpdateSchema:
    """What a valid update of one federation looks like.

    Args:
        federation: federation id.
        shapes: update tensor name to shape, in manifest order (all float32).
        trainable: names of trainable parameters (server optimizers move these).
        max_update_bytes: largest update envelope accepted (checked before reassembly).
        limits: decode limits applied to the envelope and its tensor set.
    """

    federation: str
    shapes: Mapping[str, tuple[int, ...]]
    trainable: frozenset[str]
    max_update_bytes: int
    limits: DecodeLimits = field(default=DEFAULT_LIMITS)

    @classmethod
    def create(
        cls,
        federation: str,
        shapes: Mapping[str, tuple[int, ...]],
        trainable: frozenset[str] | None = None,
        base_limits: DecodeLimits = DEFAULT_LIMITS,
    ) -> UpdateSchema:
        """Derive size limits from the shapes: no update may be larger than the model needs."""
        raw = sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values()) * UPDATE_DTYPE.itemsize
        max_bytes = CODEC_EXPANSION * raw + HEADER_ALLOWANCE + PER_TENSOR_ALLOWANCE * len(shapes)
        largest = max((int(np.prod(s, dtype=np.int64)) for s in shapes.values()), default=0)
        limits = replace(
            base_limits,
            max_blob_bytes=max_bytes,
            # Headroom over the exact model size, so an update with an extra or misshapen
            # tensor is reported as ``wrong_shape`` rather than ``too_large``; decoding
            # never allocates more than this (arrays, scratch and zstd's window together).
            max_decoded_bytes=2 * raw + HEADER_ALLOWANCE + DECODE_ALLOWANCE,
            max_tensors=len(shapes) + EXTRA_TENSORS,
            max_elements_per_tensor=max(largest, 1),
            max_header_bytes=min(
                base_limits.max_header_bytes,
                HEADER_ALLOWANCE + PER_TENSOR_ALLOWANCE * len(shapes),
            ),
        )
        return cls(
            federation,
            dict(shapes),
            frozenset(shapes if trainable is None else trainable),
            max_bytes,
            limits,
        )

    @classmethod
    def from_manifest(cls, federation: str, manifest: Manifest) -> UpdateSchema:
        """The schema of a :class:`~fedmq.bundle.Manifest`'s update tensors."""
        shapes = {name: tuple(manifest.tensor(name).shape) for name in manifest.update_names}
        return cls.create(federation, shapes, frozenset(manifest.trainable_names))

    @property
    def layout(self) -> ModelLayout:
        """The strategies' view of the same tensors."""
        return ModelLayout(self.shapes, self.trainable)


@dataclass(frozen=True)
class VerifiedUpdate:
    """An update whose bytes are valid for the federation's model.

    Args:
        key: (client, round, update id) from the chunks, equal to the envelope's.
        meta: the envelope metadata.
        delta: float32, finite, manifest-shaped tensors; empty for an evaluation report
            (the answer to an evaluate-only round: metrics only, nothing to fold).
        data: the envelope bytes, persisted as received.
        norm: L2 norm of ``delta`` over all its tensors (what the norm screen judges).
    """

    key: UpdateKey
    meta: UpdateMeta
    delta: dict[str, npt.NDArray[np.float32]] = field(repr=False)
    data: Buffer = field(repr=False)
    norm: float = 0.0

    @property
    def is_report(self) -> bool:
        """An evaluation report: an update without tensors (evaluate-only rounds)."""
        return not self.delta


@dataclass(frozen=True)
class UpdateRejection:
    """Why an update was refused, as an ack reason and a readable detail."""

    key: UpdateKey
    reason: AckReason
    detail: str


def _reject(key: UpdateKey, reason: AckReason, detail: str) -> UpdateRejection:
    return UpdateRejection(key, reason, detail[:1000])


def check_tensors(
    delta: Mapping[str, npt.NDArray[Any]], schema: UpdateSchema
) -> tuple[AckReason, str] | None:
    """Return ``(reason, detail)`` if ``delta`` does not fit the schema, else None."""
    missing = [name for name in schema.shapes if name not in delta]
    extra = [name for name in delta if name not in schema.shapes]
    if missing or extra:
        return "wrong_shape", f"tensors missing {missing[:5]}, unexpected {extra[:5]}"
    for name, shape in schema.shapes.items():
        array = delta[name]
        if array.dtype != UPDATE_DTYPE:
            return "wrong_shape", f"tensor {name!r} is {array.dtype}, expected float32"
        if tuple(array.shape) != shape:
            return (
                "wrong_shape",
                f"tensor {name!r} has shape {list(array.shape)}, expected {list(shape)}",
            )
    for name, array in delta.items():
        if not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            return "non_finite", f"tensor {name!r} holds {bad} NaN/Inf values"
    return None


def verify_update(
    key: UpdateKey, data: Buffer, schema: UpdateSchema
) -> VerifiedUpdate | UpdateRejection:
    """Decode and validate one reassembled update envelope.

    Never raises for bad input: every problem becomes an :class:`UpdateRejection` with
    the ack reason (``too_large``, ``malformed``, ``wrong_federation``, ``wrong_shape``,
    ``non_finite``).
    """
    blob = memoryview(data).cast("B")
    if len(blob) > schema.max_update_bytes:
        return _reject(
            key, "too_large", f"update is {len(blob)} bytes, limit {schema.max_update_bytes}"
        )
    try:
        meta, body = decode_update_meta(blob, schema.limits)
        if len(meta.metrics) > MAX_METRICS:  # decode checks it too; keep the bound explicit
            return _reject(key, "malformed", f"{len(meta.metrics)} metrics")
        if meta.federation != schema.federation:
            return _reject(key, "wrong_federation", f"update is for federation {meta.federation!r}")
        said = UpdateKey(meta.client, meta.round, meta.update_id)
        if said != key:
            return _reject(
                key,
                "malformed",
                f"envelope says client {meta.client!r} round {meta.round} update "
                f"{meta.update_id!r}; its chunks say {key.client!r} round {key.round} "
                f"update {key.update_id!r}",
            )
        delta = decode_tensors(body, schema.limits)
    except LimitExceededError as exc:
        return _reject(key, "too_large", str(exc))
    except DecodeError as exc:
        return _reject(key, "malformed", str(exc))
    if not delta:  # an evaluation report; whether the round wants one is not ours to say
        return VerifiedUpdate(key, meta, {}, data, 0.0)
    problem = check_tensors(delta, schema)
    if problem is not None:
        return _reject(key, *problem)
    ordered = {name: delta[name] for name in schema.shapes}
    return VerifiedUpdate(key, meta, ordered, data, update_norm(ordered))


def verify_assembled(
    key: UpdateKey, assembler: BlobAssembler, schema: UpdateSchema
) -> VerifiedUpdate | UpdateRejection:
    """Check a completely reassembled update's sha256, then :func:`verify_update` it.

    The bytes are the assembler's own buffer (no copy).  A sha256 mismatch is an
    ``integrity`` rejection: the agent's chunks were consistent (each passed its crc32)
    but do not make the blob they announced.
    """
    try:
        data = assembler.finish()
    except (IntegrityError, MalformedMessageError) as exc:
        return _reject(key, "integrity", str(exc))
    return verify_update(key, data, schema)
