from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.errors import LimitExceededError, LocalProtocolError, MalformedMessageError
from fedmq.wire.framing import encode_frame
from fedmq.wire.limits import DecodeLimits
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.update import UpdateMeta, decode_update, decode_update_meta, encode_update

ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,15}", fullmatch=True)
metrics = st.dictionaries(
    st.text(min_size=1, max_size=20), st.floats(allow_nan=False, allow_infinity=False), max_size=5
)


@given(ids, ids, st.integers(0, 10**9), st.integers(0, 50), ids, st.integers(1, 10**12), metrics)
def test_update_round_trip(
    fed: str,
    client: str,
    round_id: int,
    lag: int,
    uid: str,
    examples: int,
    values: dict[str, float],
) -> None:
    meta = UpdateMeta(fed, client, round_id, max(0, round_id - lag), uid, examples, values, 1.5e9)
    delta = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    data = encode_update(meta, encode_tensors(delta, CodecSpec("fp16")).data)
    decoded, tensors = decode_update(data)
    assert decoded == meta
    np.testing.assert_array_equal(tensors["w"], delta["w"])


def _meta(**changes: object) -> UpdateMeta:
    fields: dict[str, object] = {
        "federation": "f",
        "client": "c",
        "round": 2,
        "base_round": 2,
        "update_id": "u",
        "num_examples": 10,
    }
    fields.update(changes)
    return UpdateMeta(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "meta",
    [
        _meta(client="a/b"),
        _meta(round=-1),
        _meta(base_round=3),
        _meta(num_examples=0),
        _meta(metrics={"loss": math.nan}),
        _meta(metrics={"": 1.0}),
        _meta(metrics={f"m{i}": 1.0 for i in range(65)}),
    ],
    ids=["client", "round", "base-after-round", "no-examples", "nan-metric", "empty-name", "many"],
)
def test_encode_refuses_invalid_meta(meta: UpdateMeta) -> None:
    with pytest.raises(LocalProtocolError):
        encode_update(meta, b"")


def _envelope(**overrides: object) -> bytes:
    header: dict[str, object] = {
        "fed": "f",
        "client": "c",
        "round": 2,
        "base_round": 1,
        "uid": "u",
        "examples": 5,
        "metrics": {},
        "created": 0.0,
    }
    header.update(overrides)
    return encode_frame("update", header, b"")


@pytest.mark.parametrize(
    "overrides",
    [
        {"client": "$x"},
        {"base_round": 3},
        {"examples": 0},
        {"examples": "5"},
        {"metrics": {"loss": float("inf")}},
        {"metrics": [1, 2]},
        {"created": float("nan")},
        {"uid": ""},
    ],
    ids=["client", "base-round", "zero-examples", "string-examples", "inf", "list", "nan", "uid"],
)
def test_decode_rejects_malformed_envelopes(overrides: dict[str, object]) -> None:
    with pytest.raises(MalformedMessageError):
        decode_update_meta(_envelope(**overrides))


def test_oversized_update_is_refused() -> None:
    with pytest.raises(LimitExceededError):
        decode_update_meta(_envelope(), DecodeLimits(max_blob_bytes=10))
