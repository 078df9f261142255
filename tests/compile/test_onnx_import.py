"""Compiling forward-only ONNX files: TorchScript exporter (opset 17) and dynamo exporter."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from aggregator.export_support import check_standalone, example_input, session
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fedmq.compile.onnx_import import _torchvision_works, import_onnx, module_from_onnx
from fedmq.errors import UnsupportedOperatorError

if TYPE_CHECKING:
    from compile.conftest import CompileCache, Compiled

pytestmark = pytest.mark.compile


def source_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()


def export(path: Path, exporter: str) -> Path:
    model = source_model()
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both exporters warn about their own deprecations
        if exporter == "torchscript":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["x"],
                dynamic_axes={"x": {0: "n"}},
            )
        else:
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=True,
                opset_version=18,
                input_names=["x"],
                verbose=False,
                dynamic_shapes=({0: torch.export.Dim("n")},),
            )
    return path


@pytest.fixture(scope="session", params=["torchscript", "dynamo"])
def imported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, compiled: CompileCache
) -> tuple[Path, Compiled]:
    path = export(tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx", request.param)
    imported = import_onnx(path)
    assert imported.example_shape == (1, 8, 8)
    item = compiled.get(
        f"onnx_{request.param}",
        lambda: imported.module,
        input_shape=imported.example_shape,
        loss="cross_entropy",
        source=imported.source,
    )
    return path, item


def test_dynamo_export_uses_reshape_allowzero(tmp_path: Path) -> None:
    model = onnx.load(str(export(tmp_path / "d.onnx", "dynamo")))
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert any(a.name == "allowzero" and a.i == 1 for n in reshapes for a in n.attribute)


def test_converted_module_equals_source_onnx(imported: tuple[Path, Compiled]) -> None:
    path, item = imported
    x = np.random.default_rng(0).standard_normal((6, 1, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        got = item.model(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The compiled inference graph, fed the bundle's initial state, agrees as well.
    model = ort.InferenceSession(item.bundle.model_onnx, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(model.run(None, {"input": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_imported_train_step_matches_autograd(
    imported: tuple[Path, Compiled], train_step_check: Callable[[Compiled], None]
) -> None:
    _, item = imported
    manifest = item.bundle.manifest
    # Every weight is trainable, state names are valid, no initializer became state.
    assert len(manifest.trainable_names) == 6
    assert all(t.kind == "parameter" for t in manifest.tensors)
    train_step_check(item)


def test_round_zero_export_is_the_source_file(imported: tuple[Path, Compiled]) -> None:
    path, item = imported
    original = onnx.load(str(path))
    bundle = item.bundle
    # Weights under their file names (the check also proves: initializers only, no
    # warnings, same outputs as model.onnx).
    export = check_standalone(bundle, bundle.initial_parameters(), example_input(bundle))
    assert [v.name for v in export.graph.input] == ["x"]
    assert export.graph.input[0].type == original.graph.input[0].type
    assert [v.name for v in export.graph.output] == [v.name for v in original.graph.output]
    weights = {
        i.name: numpy_helper.to_array(i)
        for i in original.graph.initializer
        if i.data_type == TensorProto.FLOAT and np.prod(i.dims) > 1
    }
    exported = {i.name: numpy_helper.to_array(i) for i in export.graph.initializer}
    assert list(exported) == list(weights)  # names and order; shape constants are nodes
    for name, value in weights.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    x = np.random.default_rng(3).standard_normal((4, 1, 8, 8)).astype(np.float32)
    (expected,) = session(original.SerializeToString()).run(None, {"x": x})
    (got,) = session(export.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _write(tmp_path: Path, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_reshape_allowzero_with_zero_in_shape_is_rejected(tmp_path: Path) -> None:
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [0, 4])
    node = helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)
    with pytest.raises(UnsupportedOperatorError, match=r"Reshape\(allowzero=1\)"):
        module_from_onnx(_write(tmp_path, [node], [shape]))


def test_torchvision_ops_are_named_when_torchvision_is_unusable(tmp_path: Path) -> None:
    if _torchvision_works():
        pytest.skip("a working torchvision is installed: onnx2torch converts NMS itself")
    inits = [
        helper.make_tensor("scores", TensorProto.FLOAT, [1, 1, 1], [1.0]),
    ]
    node = helper.make_node("NonMaxSuppression", ["x", "scores"], ["y"])
    with pytest.raises(UnsupportedOperatorError, match="NonMaxSuppression"):
        module_from_onnx(_write(tmp_path, [node], inits))
    assert "torchvision" not in sys.modules  # the stand-in never leaks
