"""Update envelopes: a model delta plus what the aggregator needs to weigh and dedupe it.

An update is a frame of kind ``update``; its body is a tensor set
(:mod:`fedmq.wire.tensors`) holding the delta ``trained - global`` for every tensor the
bundle federates.  The envelope travels as a blob of update chunks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt

from fedmq.buffers import Buffer
from fedmq.errors import LimitExceededError, LocalProtocolError, MalformedMessageError
from fedmq.wire.framing import decode_frame, encode_frame, require, require_int
from fedmq.wire.ids import id_problem, validate_id
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits
from fedmq.wire.tensors import decode_tensors
from fedmq.wire.topics import MAX_ROUND

KIND = "update"
# Metrics of the global model the agent received, evaluated before it trained (federated
# evaluation): ``global_eval_loss``, ``global_eval_accuracy``, …, and the examples they
# are means over.  An update without tensors carries only these: an evaluation report.
GLOBAL_METRIC_PREFIX = "global_"
GLOBAL_EVAL_EXAMPLES = "global_eval_examples"
MAX_METRICS = 64  # entries: loss/accuracy/… per update; more is a misbehaving agent
MAX_METRIC_NAME = 64  # characters
MAX_EXAMPLES = 2**53


@dataclass(frozen=True)
class UpdateMeta:
    """Who trained an update, on what, and how it went.

    Args:
        federation: federation id.
        client: id of the agent that trained it.
        round: round the update answers.
        base_round: round whose global model the agent started from (== round unless stale).
        update_id: unique per (client, training run); re-sends carry the same id.
        num_examples: local training examples, the FedAvg weight.
        metrics: finite floats such as ``train_loss`` or ``eval_accuracy``.
        created_at: unix time the agent finished training.
    """

    federation: str
    client: str
    round: int
    base_round: int
    update_id: str
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    created_at: float = 0.0


def _check_metrics(metrics: Any, error: type[Exception]) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise error(f"metrics must be a map, got {type(metrics).__name__}")
    if len(metrics) > MAX_METRICS:
        raise error(f"{len(metrics)} metrics, over the limit of {MAX_METRICS}")
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME:
            raise error(f"metric name {name!r} must be a string of 1-{MAX_METRIC_NAME} chars")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise error(f"metric {name!r} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise error(f"metric {name!r} is not finite ({value})")
        checked[name] = float(value)
    return checked


def encode_update(meta: UpdateMeta, tensor_set: Buffer) -> bytes:
    """Wrap an encoded tensor set (the delta) in an update envelope.

    Raises:
        LocalProtocolError: an id, round, example count or metric is invalid.
    """
    validate_id(meta.federation, "federation id")
    validate_id(meta.client, "client id")
    validate_id(meta.update_id, "update id")
    for name, value in (("round", meta.round), ("base_round", meta.base_round)):
        if not 0 <= value < MAX_ROUND:
            raise LocalProtocolError(f"{name} {value} out of range")
    if meta.base_round > meta.round:
        raise LocalProtocolError(f"base round {meta.base_round} is after round {meta.round}")
    if not 0 < meta.num_examples < MAX_EXAMPLES:
        raise LocalProtocolError(f"num_examples {meta.num_examples} must be positive")
    header = {
        "fed": meta.federation,
        "client": meta.client,
        "round": meta.round,
        "base_round": meta.base_round,
        "uid": meta.update_id,
        "examples": meta.num_examples,
        "metrics": _check_metrics(meta.metrics, LocalProtocolError),
        "created": float(meta.created_at),
    }
    return encode_frame(KIND, header, tensor_set)


def _id_field(header: dict[str, Any], name: str, what: str) -> str:
    value = require(header, name, str)
    problem = id_problem(value)
    if problem is not None:
        raise MalformedMessageError(f"{what} {value!r} {problem}")
    return value


def decode_update_meta(
    data: Buffer, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[UpdateMeta, memoryview]:
    """Decode an update envelope's metadata; return it with a view of the tensor set.

    Raises:
        DecodeError: (a subclass naming the problem) for any malformed envelope.
    """
    view = memoryview(data).cast("B")
    if len(view) > limits.max_blob_bytes:
        raise LimitExceededError("update size", len(view), limits.max_blob_bytes)
    header, body = decode_frame(view, limits, expected_kind=KIND)
    round_id = require_int(header, "round", 0, MAX_ROUND)
    base_round = require_int(header, "base_round", 0, round_id + 1)
    created = require(header, "created", float)
    if not math.isfinite(created):
        raise MalformedMessageError("update creation time is not finite")
    meta = UpdateMeta(
        federation=_id_field(header, "fed", "federation id"),
        client=_id_field(header, "client", "client id"),
        round=round_id,
        base_round=base_round,
        update_id=_id_field(header, "uid", "update id"),
        num_examples=require_int(header, "examples", 1, MAX_EXAMPLES),
        metrics=_check_metrics(header.get("metrics", {}), MalformedMessageError),
        created_at=created,
    )
    return meta, body


def decode_update(
    data: Buffer, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[UpdateMeta, dict[str, npt.NDArray[Any]]]:
    """Decode an update envelope and its delta tensors."""
    meta, body = decode_update_meta(data, limits)
    return meta, decode_tensors(body, limits)
