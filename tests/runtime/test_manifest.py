"""Manifest parsing: round trips, invariants, and only BundleError on bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.bundle import Bundle, Manifest
from fedmq.errors import BundleError

NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9_]{1,6}){0,2}", fullmatch=True).filter(
    lambda n: n not in {"input", "label", "output", "loss"}
)
SHA = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
DIMS = st.lists(st.integers(1, 64), max_size=4)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    names = draw(st.lists(NAMES, min_size=1, max_size=8, unique=True))
    tensors = []
    for index, name in enumerate(names):
        kind = "parameter" if index == 0 else draw(st.sampled_from(["parameter", "buffer"]))
        dtype = "float32" if kind == "parameter" else draw(st.sampled_from(["float32", "int64"]))
        tensors.append(
            {
                "name": name,
                "shape": draw(DIMS),
                "dtype": dtype,
                "kind": kind,
                "trainable": index == 0 or (kind == "parameter" and draw(st.booleans())),
                "updated": kind == "buffer" and draw(st.booleans()),
            }
        )
    loss = draw(st.sampled_from(["cross_entropy", "mse", "bce_with_logits", "l1"]))
    output = ["batch", draw(st.integers(1, 20)), *draw(st.lists(st.integers(1, 8), max_size=2))]
    if loss == "cross_entropy":
        label = {"shape": ["batch", *output[2:]], "dtype": "int64"}
    else:
        label = {"shape": output, "dtype": "float32"}
    raw: dict[str, Any] = {
        "name": draw(st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True)),
        "opset": 18,
        "ir_version": 8,
        "loss": loss,
        "input": {
            "shape": ["batch", *draw(DIMS)],
            "dtype": draw(st.sampled_from(["float32", "int64"])),
        },
        "label": label,
        "output": {"shape": output, "dtype": "float32"},
        "tensors": tensors,
        "dropout": [],
        "files": {f: draw(SHA) for f in ("train_step.onnx", "model.onnx", "parameters.npz")},
    }
    return Manifest.model_validate(raw)


@given(manifests())
@settings(max_examples=60, deadline=None)
def test_round_trip_is_exact_and_update_names_follow_the_rule(manifest: Manifest) -> None:
    data = manifest.to_json()
    again = Manifest.from_json(data)
    assert again == manifest
    assert again.to_json() == data
    expected = [
        t.name for t in manifest.tensors if t.trainable or (t.updated and t.dtype == "float32")
    ]
    assert list(manifest.update_names) == expected
    assert set(manifest.trainable_names) <= set(manifest.update_names)


@given(st.binary(max_size=300))
@settings(max_examples=100, deadline=None)
def test_arbitrary_bytes_raise_only_bundle_error(data: bytes) -> None:
    with pytest.raises(BundleError):
        Manifest.from_json(data)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(manifests(), st.data())
@settings(max_examples=80, deadline=None)
def test_mutated_fields_raise_only_bundle_error(manifest: Manifest, data: st.DataObject) -> None:
    raw = json.loads(manifest.to_json())
    key = data.draw(st.sampled_from(sorted(raw)))
    raw[key] = data.draw(JSON)
    try:
        parsed = Manifest.from_json(json.dumps(raw))
    except BundleError:
        return
    assert Manifest.from_json(parsed.to_json()) == parsed  # whatever parses, round-trips


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("format_version",), 2, "format version 2 is not supported"),
        (("format",), "other", "not a fedmq-bundle manifest"),
        (("tensors", 1, "name"), "0.weight", "duplicate tensor names"),
        (("tensors", 0, "name"), "input", "reserved"),
        (("tensors", 0, "name"), "a/b", "must match"),
        (("tensors", 0, "dtype"), "int64", "must be float32"),
        (("label", "dtype"), "float32", "int64 class indices"),
        (("input", "shape"), [5, "batch"], "must start with 'batch'"),
        (("files", "model.onnx"), "xyz", "pattern"),
        (("loss",), "hinge", "loss"),
    ],
)
def test_specific_invalid_manifests(
    mlp_bundle: Bundle, path: tuple[Any, ...], value: object, message: str
) -> None:
    raw = json.loads(mlp_bundle.manifest.to_json())
    target = raw
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(BundleError, match=message):
        Manifest.from_json(json.dumps(raw))


def test_no_trainable_parameter_is_invalid(mlp_bundle: Bundle) -> None:
    raw = json.loads(mlp_bundle.manifest.to_json())
    for tensor in raw["tensors"]:
        tensor["trainable"] = False
    with pytest.raises(BundleError, match="nothing to train"):
        Manifest.from_json(json.dumps(raw))
