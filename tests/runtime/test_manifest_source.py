"""``manifest.source``: the ONNX interface a bundle records, validated like the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmq.bundle import Manifest
from fedmq.errors import BundleError

MANIFEST = Path(__file__).resolve().parents[2] / "examples/bundles/digits_mlp/manifest.json"


def _source(**changes: Any) -> dict[str, Any]:
    source: dict[str, Any] = {
        "input": {"name": "features", "dtype": "float32", "shape": ["N", 64]},
        "output": {"name": "scores", "dtype": "float32", "shape": ["N", 10]},
        "initializers": [
            {"tensor": "0.weight", "name": "W1", "transpose": True},
            {"tensor": "2.bias", "name": "b2", "scale": 0.5},
        ],
    }
    source.update(changes)
    return source


def _parse(source: dict[str, Any]) -> Manifest:
    raw = json.loads(MANIFEST.read_text())
    return Manifest.from_json(json.dumps({**raw, "source": source}))


def test_a_source_round_trips_through_json() -> None:
    manifest = _parse(_source(output={"name": "scores", "dtype": "float32"}))
    assert manifest.source is not None
    assert manifest.source.original_names() == {"0.weight": "W1", "2.bias": "b2"}
    assert manifest.source.output.shape is None  # the file declared none
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"initializers": [{"tensor": "nope", "name": "W"}]}, "unknown tensor 'nope'"),
        ({"initializers": [{"tensor": "0.bias", "name": "b", "transpose": True}]}, "not 2-d"),
        ({"initializers": [{"tensor": "0.bias", "name": "b", "scale": 0.0}]}, "non-zero"),
        (
            {"initializers": [{"tensor": "0.bias", "name": "features"}]},
            "distinct names",
        ),
        (
            {
                "initializers": [
                    {"tensor": "0.bias", "name": "a"},
                    {"tensor": "0.bias", "name": "b"},
                ]
            },
            "one initializer at most",
        ),
        ({"input": {"name": "x", "dtype": "int64", "shape": ["N", 64]}}, "is int64"),
        ({"input": {"name": "x", "dtype": "float32", "shape": ["N", 63]}}, "declares shape"),
        ({"output": {"name": "y", "dtype": "float32", "shape": ["N"]}}, "has rank 1"),
    ],
)
def test_a_source_that_disagrees_with_the_model_is_refused(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        _parse(_source(**changes))
