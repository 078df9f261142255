"""Bring your own ONNX model: compile, federate, export a drop-in replacement.

Two files built here: an ``onnx.helper`` MLP (input ``features``, output ``scores``,
Gemm with ``transB=1``) and a CNN with BatchNorm exported by torch's TorchScript
exporter at opset 17 (input ``pixels``, output ``logits``).  Each is compiled with
``fedmq compile --trainable`` for head-only fine-tuning, federated for two rounds on
the digits (a ``fedmq new`` project whose bundle is replaced), and exported: the export
must take the file's place unchanged (names, shapes, dtypes, initializers), load
without warnings, and differ from the file in the head only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from aggregator.export_support import check_standalone, onnxruntime_messages, session
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from fedmq.aggregator.export import export_onnx
from fedmq.bundle import Bundle
from fedmq.cli.app import app
from fedmq.compile import compile_module
from fedmq.compile.onnx_import import import_onnx
from fedmq.datasets.digits import load_digits_split
from fedmq.scaffold import create_project
from fedmq.simulate import Simulation, SimulationOptions

pytestmark = pytest.mark.compile

HIDDEN = 32
CLASSES = 10


def helper_mlp(path: Path, *, trans_b: int = 1) -> Path:
    """A 64-32-10 MLP written node by node, as a non-PyTorch tool would write it."""
    rng = np.random.default_rng(0)
    w1 = (0.1 * rng.standard_normal((HIDDEN, 64))).astype(np.float32)
    w2 = (0.1 * rng.standard_normal((CLASSES, HIDDEN))).astype(np.float32)
    if not trans_b:  # B as [in, out]
        w1, w2 = np.ascontiguousarray(w1.T), np.ascontiguousarray(w2.T)
    initializers = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "b1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(np.full(CLASSES, 0.01, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["features", "W1", "b1"], ["h"], name="fc1", transB=trans_b),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["scores"], name="fc2", transB=trans_b),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


class SmallCnn(nn.Module):
    """Conv, pool, BatchNorm (not foldable into the conv: a pool sits between), head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 4 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.bn(self.pool(torch.relu(self.conv(x))))
        logits: torch.Tensor = self.head(torch.flatten(features, 1))
        return logits


def torchscript_cnn(path: Path, *, trained_statistics: bool = True) -> Path:
    torch.manual_seed(0)
    model = SmallCnn()
    if trained_statistics:  # as in a model trained elsewhere
        with torch.no_grad():
            model.bn.running_mean.uniform_(-0.5, 0.5)
            model.bn.running_var.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns it is deprecated
        torch.onnx.export(
            model.eval(),
            (torch.randn(2, 1, 8, 8),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch_size"}, "logits": {0: "batch_size"}},
        )
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    return path


@dataclass(frozen=True)
class Case:
    """A file, the head ``--trainable`` selects in it, and the bundle compiled from it."""

    file: Path
    head: frozenset[str]  # initializer names in the file
    bundle_dir: Path


# Head-only fine-tuning: the MLP's head by fedmq state names, the CNN's by the names
# in the file (--trainable matches both); eval-mode BatchNorm keeps the backbone fixed.
COMPILES = {
    "mlp": (helper_mlp, ["--trainable", "fc2.*"], {"W2", "b2"}),
    "cnn": (
        torchscript_cnn,
        ["--trainable", "head.*", "--batchnorm", "eval"],
        {"head.weight", "head.bias"},
    ),
}


@pytest.fixture(scope="module", params=sorted(COMPILES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    build, options, head = COMPILES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    file = build(directory / f"{request.param}.onnx")
    out = directory / "bundle"
    result = CliRunner().invoke(
        app, ["compile", str(file), "--loss", "cross_entropy", *options, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "fedmq export restores the file's interface" in result.output
    return Case(file, frozenset(head), out)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _interface(model: onnx.ModelProto) -> list[tuple[str, onnx.TypeProto]]:
    return [(v.name, v.type) for v in (*model.graph.input, *model.graph.output)]


def test_manifest_records_the_file_interface(case: Case) -> None:
    manifest = Bundle.load(case.bundle_dir).manifest
    original = onnx.load(str(case.file))
    assert manifest.source is not None
    assert manifest.source.input.name == original.graph.input[0].name
    assert manifest.source.output.name == original.graph.output[0].name
    names = manifest.source.original_names()
    assert {names[t] for t in manifest.trainable_names} == case.head
    assert sorted(names.values()) == sorted(i.name for i in original.graph.initializer)


def test_round_zero_export_equals_the_file(case: Case) -> None:
    bundle = Bundle.load(case.bundle_dir)
    original = onnx.load(str(case.file))
    export = check_standalone(bundle, bundle.initial_parameters(), _digits(bundle, 16))
    assert _interface(export) == _interface(original)
    got, want = _initializers(export), _initializers(original)
    assert list(got) == list(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    x = _digits(bundle, 64)
    feeds = {original.graph.input[0].name: x}
    (expected,) = session(original.SerializeToString()).run(None, feeds)
    (exported,) = session(export.SerializeToString()).run(None, feeds)
    np.testing.assert_allclose(exported, expected, rtol=1e-5, atol=1e-6)


def _digits(bundle: Bundle, count: int) -> np.ndarray:
    _, test = load_digits_split()
    shape = bundle.manifest.input.example_shape
    return np.ascontiguousarray(test.x[:count].reshape(count, *shape), dtype=np.float32)


@pytest.mark.slow
@pytest.mark.broker
async def test_federated_export_is_a_drop_in_replacement(case: Case, tmp_path: Path) -> None:
    project = tmp_path / "line"
    create_project(project, "digits")
    bundle = Bundle.load(case.bundle_dir)
    bundle.write(project / "bundle")  # the project now federates the imported model
    out = tmp_path / "report"
    options = SimulationOptions(agents=2, rounds=2, project=project, out=out)
    result = await Simulation(options).run()
    assert [row.outcome for row in result.rows] == ["closed", "closed"]

    original = onnx.load(str(case.file))
    data = (out / "model.onnx").read_bytes()  # the report's export of the last round
    export = onnx.load_from_string(data)
    assert _interface(export) == _interface(original)
    got, want = _initializers(export), _initializers(original)
    assert list(got) == list(want)
    for name, value in want.items():
        if name in case.head:
            assert not np.array_equal(got[name], value), f"{name} did not train"
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=f"{name} is frozen")
    x = _digits(bundle, 100)
    feeds = {original.graph.input[0].name: x}
    assert onnxruntime_messages(data, feeds) == ""
    (scores,) = session(data).run(None, feeds)
    assert scores.shape == (100, CLASSES)
    assert result.rows[-1].test_accuracy is not None
    # The round-0 export of the same state directory is the file itself again.
    first = tmp_path / "round0.onnx"
    assert export_onnx(out / "aggregator", project / "bundle", first, round_id=0) == 0
    (initial,) = session(first.read_bytes()).run(None, feeds)
    (expected,) = session(original.SerializeToString()).run(None, feeds)
    np.testing.assert_allclose(initial, expected, rtol=1e-5, atol=1e-6)


def test_initializers_the_exporter_merged_are_separate_again(tmp_path: Path) -> None:
    # A fresh BatchNorm: running_var == weight (ones), running_mean == bias (zeros).  The
    # TorchScript exporter keeps one of each pair and adds Identity nodes for the other.
    path = torchscript_cnn(tmp_path / "fresh.onnx", trained_statistics=False)
    original = onnx.load(str(path))
    merged = {n.output[0]: n.input[0] for n in original.graph.node if n.op_type == "Identity"}
    assert merged == {"bn.running_var": "bn.weight", "bn.running_mean": "bn.bias"}
    imported = import_onnx(path)
    bundle = compile_module(
        imported.module,
        input_shape=imported.example_shape,
        loss="cross_entropy",
        source=imported.source,
    )
    manifest = bundle.manifest
    names = imported.source.original_names()
    buffers = {names[t.name] for t in manifest.tensors if t.kind == "buffer" and t.name in names}
    assert buffers == {"bn.running_mean", "bn.running_var"}  # statistics, not weights
    assert {names[n] for n in manifest.updated_buffer_names if n in names} == buffers
    export = check_standalone(bundle, bundle.initial_parameters(), _digits(bundle, 16))
    got, want = _initializers(export), _initializers(original)
    assert list(got) == [*want, *merged]  # the file's, then the copies in node order
    for copy, merged_into in merged.items():
        np.testing.assert_array_equal(got[copy], want[merged_into])
    x = _digits(bundle, 32)
    (expected,) = session(original.SerializeToString()).run(None, {"pixels": x})
    (exported,) = session(export.SerializeToString()).run(None, {"pixels": x})
    np.testing.assert_allclose(exported, expected, rtol=1e-5, atol=1e-6)


def _generic_graph(path: Path) -> Path:
    """Weights fed to generic nodes, a Constant, Gemm transB=0 with alpha/beta, and
    initializers named like fedmq's own graph values (``input``, ``output``)."""
    rng = np.random.default_rng(1)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "input"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "G"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "output"),
    ]
    factor = numpy_helper.from_array(rng.uniform(0.5, 1.5, 6).astype(np.float32), "factor")
    nodes = [
        helper.make_node("MatMul", ["x", "input"], ["m"]),
        helper.make_node("Add", ["m", "B"], ["a"]),
        helper.make_node("Constant", [], ["c"], value=factor),
        helper.make_node("Mul", ["a", "c"], ["s"]),
        helper.make_node("Gemm", ["s", "G", "output"], ["y"], alpha=0.3, beta=2.0),
    ]
    graph = helper.make_graph(
        nodes,
        "generic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_generic_weights_and_gemm_layouts_round_trip(tmp_path: Path) -> None:
    path = _generic_graph(tmp_path / "generic.onnx")
    imported = import_onnx(path)
    layouts = {i.name: (i.transpose, i.scale) for i in imported.source.initializers}
    assert layouts == {
        "input": (False, 1.0),
        "B": (False, 1.0),
        "G": (True, pytest.approx(0.3)),
        "output": (False, 2.0),
        "c": (False, 1.0),  # a Constant node's tensor: trainable like an initializer
    }
    bundle = compile_module(
        imported.module,
        input_shape=imported.example_shape,
        loss="mse",
        source=imported.source,
        trainable=["G", "output"],  # original names
    )
    assert len(bundle.manifest.trainable_names) == 2
    x = np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)
    export = check_standalone(bundle, bundle.initial_parameters(), x)
    original = onnx.load(str(path))
    want = {**_initializers(original), "c": numpy_helper.to_array(factor_of(original))}
    got = _initializers(export)
    assert set(got) == set(want)
    for name in ("input", "B", "output", "c"):  # exact layouts: bit for bit
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # G went through * 0.3 and back: within one float32 rounding.
    np.testing.assert_allclose(got["G"], want["G"], rtol=2**-23, atol=0)
    (expected,) = session(original.SerializeToString()).run(None, {"x": x})
    (exported,) = session(export.SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(exported, expected, rtol=1e-5, atol=1e-6)


def factor_of(model: onnx.ModelProto) -> onnx.TensorProto:
    [node] = [n for n in model.graph.node if n.op_type == "Constant"]
    return node.attribute[0].t


def test_list_params_prints_names_without_writing_a_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = helper_mlp(tmp_path / "t0.onnx", trans_b=0)
    result = CliRunner().invoke(app, ["compile", str(path), "--list-params", "--trainable", "W2"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines()]
    assert rows[0] == ["name", "shape", "dtype", "kind", "trained", "onnx", "initializer"]
    assert rows[1:] == [
        ["fc1.weight", "[32,", "64]", "float32", "parameter", "no", "W1", "(transposed)"],
        ["fc1.bias", "[32]", "float32", "parameter", "no", "b1"],
        ["fc2.weight", "[10,", "32]", "float32", "parameter", "yes", "W2", "(transposed)"],
        ["fc2.bias", "[10]", "float32", "parameter", "no", "b2"],
    ]
    assert list(tmp_path.iterdir()) == [path]  # nothing written
