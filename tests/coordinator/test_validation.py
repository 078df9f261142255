"""Every update is checked against the manifest before it can count; bad bytes never raise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.support import FEDERATION, SHAPES, delta, envelope, schema
from fedmq.coordinator.validation import UpdateKey, UpdateRejection, VerifiedUpdate, verify_update
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.update import UpdateMeta, encode_update

KEY_ROUND = 3


def _verify(data: bytes, client: str = "a", uid: str = "u1") -> VerifiedUpdate | UpdateRejection:
    return verify_update(UpdateKey(client, KEY_ROUND, uid), data, schema())


def _raw_envelope(tensors: dict[str, np.ndarray], **meta: object) -> bytes:
    fields: dict[str, object] = {
        "federation": FEDERATION,
        "client": "a",
        "round": KEY_ROUND,
        "base_round": KEY_ROUND,
        "update_id": "u1",
        "num_examples": 5,
    }
    fields.update(meta)
    return encode_update(UpdateMeta(**fields), encode_tensors(tensors).data)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", ["raw", "fp16", "int8", "topk:0.5"])
def test_a_valid_update_passes_with_any_codec(codec: str) -> None:
    _, data = envelope("a", KEY_ROUND, delta(1), update_id="u1", codec=codec)
    result = _verify(data)
    assert isinstance(result, VerifiedUpdate)
    assert list(result.delta) == list(SHAPES)
    assert all(v.dtype == np.float32 for v in result.delta.values())
    assert result.meta.num_examples == 10


def _bad_tensors() -> dict[str, dict[str, np.ndarray]]:
    good = delta(1)
    nan = dict(good, **{"fc.bias": np.where(np.arange(32) == 3, np.nan, 0).astype(np.float32)})
    inf = dict(good, **{"fc.bias": np.where(np.arange(32) == 3, -np.inf, 0).astype(np.float32)})
    missing = {k: v for k, v in good.items() if k != "bn.mean"}
    frozen = dict(good, **{"frozen.weight": np.zeros((2, 2), np.float32)})
    shape = dict(good, **{"fc.weight": np.zeros((16, 32), np.float32)})
    dtype = dict(good, **{"fc.bias": np.zeros(32, np.float64)})
    return {
        "nan": nan,
        "inf": inf,
        "missing_tensor": missing,
        "frozen_parameter": frozen,
        "wrong_shape": shape,
        "wrong_dtype": dtype,
    }


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("nan", "non_finite"),
        ("inf", "non_finite"),
        ("missing_tensor", "wrong_shape"),
        ("frozen_parameter", "wrong_shape"),
        ("wrong_shape", "wrong_shape"),
        ("wrong_dtype", "wrong_shape"),
    ],
)
def test_tensor_problems_are_rejected_with_their_reason(case: str, reason: str) -> None:
    result = _verify(_raw_envelope(_bad_tensors()[case]))
    assert isinstance(result, UpdateRejection)
    assert result.reason == reason, result.detail


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"federation": "other"}, "wrong_federation"),
        ({"client": "b"}, "malformed"),
        ({"round": KEY_ROUND + 1, "base_round": KEY_ROUND}, "malformed"),
        ({"update_id": "u2"}, "malformed"),
    ],
)
def test_envelopes_that_disagree_with_their_chunks_are_rejected(
    meta: dict[str, object], reason: str
) -> None:
    result = _verify(_raw_envelope(delta(1), **meta))
    assert isinstance(result, UpdateRejection)
    assert result.reason == reason


def test_an_oversized_update_is_too_large() -> None:
    big = {name: np.zeros((1000, 1000), np.float32) for name in SHAPES}
    result = _verify(_raw_envelope(big))
    assert isinstance(result, UpdateRejection)
    assert result.reason == "too_large"


def test_every_truncation_is_rejected_not_raised() -> None:
    data = _raw_envelope(delta(2))
    for cut in range(0, len(data), 7):
        result = _verify(data[:cut])
        assert isinstance(result, UpdateRejection)
        assert result.reason in ("malformed", "too_large")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_rejected_not_raised(data: bytes) -> None:
    result = _verify(data)
    assert isinstance(result, UpdateRejection)


@settings(max_examples=100, deadline=None)
@given(position=st.integers(0, 10_000), value=st.integers(0, 255))
def test_flipped_bytes_never_raise(position: int, value: int) -> None:
    data = bytearray(_raw_envelope(delta(3)))
    data[position % len(data)] = value
    result = _verify(bytes(data))
    if isinstance(result, VerifiedUpdate):  # a flip inside a value can still be valid
        assert all(np.isfinite(v).all() for v in result.delta.values())


def test_schema_limits_follow_the_model_size() -> None:
    s = schema()
    raw = sum(int(np.prod(shape)) for shape in SHAPES.values()) * 4
    assert raw * 2 < s.max_update_bytes < raw * 2 + 128 * 1024
    assert s.layout.optimized == frozenset({"fc.weight", "fc.bias"})
