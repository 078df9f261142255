"""``fedmq export``: standalone models that onnxruntime loads without a warning.

Shipped bundles (examples and ``fedmq new`` templates) need no torch here; the compiled
families and imported ONNX models are checked in ``tests/compile``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from aggregator.export_support import (
    check_standalone,
    example_input,
    onnxruntime_messages,
    perturbed,
    session,
)
from fedmq.aggregator.export import export_onnx
from fedmq.bundle import Bundle, Manifest, OnnxSource
from fedmq.bundle.manifest import MANIFEST_FILE
from fedmq.errors import StateError
from fedmq.simulate import Simulation, SimulationOptions
from fedmq.simulate.workloads import builtin_bundle_dir
from fedmq.wire.tensors import decode_tensors, encode_tensors

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(
    [
        *(ROOT / "examples" / "bundles").iterdir(),
        *(ROOT / "fedmq/scaffold/templates").glob("*/bundle"),
    ]
)


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _write_checkpoints(state_dir: Path, checkpoints: dict[int, dict[str, np.ndarray]]) -> None:
    directory = state_dir / "checkpoints"
    directory.mkdir(parents=True)
    for round_id, params in checkpoints.items():
        (directory / f"{round_id:06d}.params").write_bytes(bytes(encode_tensors(params).data))


def test_the_warning_check_sees_what_onnxruntime_prints() -> None:
    # The bundle's own model.onnx takes its weights as inputs: one warning per weight.
    bundle = Bundle.load(ROOT / "examples/bundles/digits_cnn")
    x = example_input(bundle)
    messages = onnxruntime_messages(bundle.model_onnx, {"input": x})
    assert messages.count("appears in graph inputs") == len(bundle.manifest.tensors)


@pytest.mark.parametrize("directory", SHIPPED, ids=_id)
def test_shipped_bundles_export_standalone(directory: Path) -> None:
    bundle = Bundle.load(directory)
    check_standalone(bundle, perturbed(bundle, 1), example_input(bundle))
    check_standalone(bundle, bundle.initial_parameters(), example_input(bundle, seed=2))


@pytest.mark.parametrize("directory", SHIPPED, ids=_id)
def test_manifests_without_a_source_are_unchanged(directory: Path) -> None:
    text = (directory / MANIFEST_FILE).read_bytes()
    manifest = Manifest.from_json(text)
    assert manifest.source is None
    assert manifest.to_json() == text  # the optional field is not written when absent


def test_export_of_a_batchnorm_checkpoint_loads(tmp_path: Path) -> None:
    # Issue 13: `Shape of initializer 1.num_batches_tracked does not match. {} != {1}`.
    bundle_dir = ROOT / "examples/bundles/digits_cnn"
    bundle = Bundle.load(bundle_dir)
    trained = perturbed(bundle, 3)
    assert trained["1.num_batches_tracked"].shape == ()
    state_dir = tmp_path / "state"
    _write_checkpoints(state_dir, {0: bundle.initial_parameters(), 3: trained})
    out = tmp_path / "out" / "model.onnx"
    assert export_onnx(state_dir, bundle_dir, out) == 3
    x = example_input(bundle)
    assert onnxruntime_messages(out.read_bytes(), {"input": x}) == ""
    (got,) = session(out.read_bytes()).run(None, {"input": x})
    (expected,) = session(bundle.model_onnx).run(None, {"input": x, **trained})
    # Same weights bit for bit (checked above); with them as constants onnxruntime
    # folds and fuses differently, so float32 sums may differ in the last bits.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert export_onnx(state_dir, bundle_dir, out, round_id=0) == 0
    (initial,) = session(out.read_bytes()).run(None, {"input": x})
    (expected,) = session(bundle.model_onnx).run(None, {"input": x})
    np.testing.assert_allclose(initial, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(StateError, match="no checkpoint for round 2"):
        export_onnx(state_dir, bundle_dir, out, round_id=2)


def _with_source(bundle: Bundle, source: dict[str, object]) -> Bundle:
    manifest = bundle.manifest.model_copy(update={"source": OnnxSource.model_validate(source)})
    files = bundle.files()
    files[MANIFEST_FILE] = Manifest.model_validate(manifest.model_dump()).to_json()
    return Bundle.from_files(files)


def test_a_source_interface_is_restored_with_names_and_layouts() -> None:
    # digits_mlp as if imported from a file whose names clash with fedmq's own
    # (an initializer called "input", another "output") and whose first weight was
    # stored transposed, the last bias scaled (a Gemm with transB=0 and beta=0.5).
    bundle = _with_source(
        Bundle.load(ROOT / "examples/bundles/digits_mlp"),
        {
            "input": {"name": "features", "dtype": "float32", "shape": ["N", 64]},
            "output": {"name": "scores", "dtype": "float32", "shape": ["N", 10]},
            "initializers": [
                {"tensor": "0.weight", "name": "W1", "transpose": True},
                {"tensor": "0.bias", "name": "b1"},
                {"tensor": "2.weight", "name": "input"},
                {"tensor": "2.bias", "name": "output", "scale": 0.5},
            ],
        },
    )
    state = perturbed(bundle, 4)
    model = check_standalone(bundle, state, example_input(bundle))
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert list(stored) == ["W1", "b1", "input", "output"]  # the file's order
    np.testing.assert_array_equal(stored["W1"], state["0.weight"].T)
    np.testing.assert_array_equal(stored["output"], state["2.bias"] / np.float32(0.5))
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (model.graph.input[0], model.graph.output[0])
    ]
    assert dims == [["N", 64], ["N", 10]]
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.slow
@pytest.mark.broker
async def test_the_simulator_reports_a_standalone_batchnorm_model(tmp_path: Path) -> None:
    out = tmp_path / "report"
    options = SimulationOptions(model="digits_cnn", agents=2, rounds=1, out=out)
    result = await Simulation(options).run()
    assert [row.outcome for row in result.rows] == ["closed"]
    bundle = Bundle.load(builtin_bundle_dir("digits_cnn"))
    data = (out / "model.onnx").read_bytes()
    x = example_input(bundle)
    assert onnxruntime_messages(data, {"input": x}) == ""
    final = decode_tensors((out / "aggregator/checkpoints/000001.params").read_bytes())
    (got,) = session(data).run(None, {"input": x})
    (expected,) = session(bundle.model_onnx).run(None, {"input": x, **final})
    # Same weights bit for bit (checked above); with them as constants onnxruntime
    # folds and fuses differently, so float32 sums may differ in the last bits.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
