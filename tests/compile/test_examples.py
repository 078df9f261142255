"""The shipped example bundles are what examples/build_bundles.py produces today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from fedmq.bundle import Bundle

pytestmark = pytest.mark.compile

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"


def _build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_bundles", EXAMPLES_DIR / "build_bundles.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_bundles"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


SCRIPT = _build_script()


def _outputs(model: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)  # type: ignore[no-any-return]


@pytest.mark.parametrize("example", SCRIPT.EXAMPLES, ids=lambda e: e.name)
def test_shipped_bundle_matches_rebuild(example: object) -> None:
    shipped = Bundle.load(EXAMPLES_DIR / "bundles" / example.name)  # type: ignore[attr-defined]
    rebuilt = SCRIPT.build(example)
    # Weights and manifest (apart from graph digests) must be identical.
    assert rebuilt.parameters_npz == shipped.parameters_npz
    strip = {"files"}
    assert rebuilt.manifest.model_dump(exclude=strip) == shipped.manifest.model_dump(exclude=strip)
    # Graphs must compute the same thing.  With the pinned torch/onnxscript the bytes are
    # identical too (`build_bundles.py --check` compares bytes); a newer exporter may
    # legitimately reorder nodes, which should not fail CI on its own.
    manifest = shipped.manifest
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, *manifest.input.example_shape)).astype(np.float32)
    y = (
        rng.integers(0, int(manifest.output.shape[1]), (5, *manifest.label.example_shape))
        if manifest.loss == "cross_entropy"
        else rng.standard_normal((5, *manifest.label.example_shape)).astype(np.float32)
    )
    state = shipped.initial_parameters()
    masks = {
        d.input_name: np.ones((5, *d.shape.example_shape), np.float32) for d in manifest.dropout
    }
    train_feeds = {"input": x, "label": y, **masks, **state}
    for got, expected in zip(
        _outputs(rebuilt.train_step_onnx, train_feeds),
        _outputs(shipped.train_step_onnx, train_feeds),
        strict=True,
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        _outputs(rebuilt.model_onnx, {"input": x})[0],
        _outputs(shipped.model_onnx, {"input": x})[0],
        rtol=1e-6,
        atol=1e-7,
    )
