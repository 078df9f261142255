"""Max pooling through onnxruntime routes the gradient to the same tap as PyTorch.

ReLU zeros make ties common, but a ReLU in front of the pool hides the routing: its
mask zeroes the gradient of every tied zero anyway.  Here an elementwise learnable
scale (ones) feeds the pools and the inputs are small integers, so windows hold
several equal maxima and each tap's gradient lands in its *own* scale entry: routing
to any maximum but the first would change ``grad/scale``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedmq.bundle import Bundle
from fedmq.compile import compile_module, decompositions
from fedmq.compile.export import tracing_context
from fedmq.compile.losses import LOSSES
from fedmq.compile.translations import translation_table

if TYPE_CHECKING:
    from compile.conftest import CompileCache

pytestmark = pytest.mark.compile

RTOL, ATOL = 1e-5, 1e-6
CLASSES = 3


class ScaledPools(nn.Module):
    """``x * scale`` through several max pools side by side, then a linear head."""

    def __init__(self, shape: tuple[int, ...], pools: Sequence[nn.Module], features: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(shape))
        self.pools = nn.ModuleList(pools)
        self.head = nn.Linear(features, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x * self.scale
        logits: torch.Tensor = self.head(
            torch.cat([pool(scaled).flatten(1) for pool in self.pools], dim=1)
        )
        return logits


class PoolUnpool(nn.Module):
    """Pooling indices used by the model itself (``MaxUnpool2d``), in both graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.head = nn.Linear(2 * 8 * 8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, indices = self.pool(torch.relu(self.conv(x)))
        unpooled = self.unpool(2 * pooled, indices, output_size=x.shape[-2:])
        logits: torch.Tensor = self.head(unpooled.flatten(1))
        return logits


def pools_2d() -> nn.Module:
    # On 9x9: floor-cropped SpaceToDepth, overlapping + padded, ceil mode past the end
    # (non-overlapping, so MaxUnpool), dilated with gaps.
    pools = [
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.MaxPool2d(2, stride=3, padding=1, dilation=2),
    ]
    features = 2 * (4 * 4 + 5 * 5 + 5 * 5 + 3 * 3)
    return ScaledPools((2, 9, 9), pools, features)


def pools_1d() -> nn.Module:
    pools = [nn.MaxPool1d(2), nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True)]
    return ScaledPools((3, 17), pools, 3 * (8 + 9))


MODELS = {
    "pools_2d": (pools_2d, (2, 9, 9)),
    "pools_1d": (pools_1d, (3, 17)),
    "pool_unpool": (PoolUnpool, (1, 8, 8)),
}


@pytest.fixture(scope="module")
def bundles(compiled: CompileCache) -> dict[str, tuple[nn.Module, Bundle]]:
    # The session cache: test_export_families.py exports these same bundles.
    built = {}
    for name, (factory, shape) in MODELS.items():
        item = compiled.get(name, factory, input_shape=shape, loss="cross_entropy")
        built[name] = (item.model, item.bundle)
    return built


def _check_against_autograd(model: nn.Module, bundle: Bundle, shape: tuple[int, ...]) -> None:
    session = ort.InferenceSession(bundle.train_step_onnx, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    state = bundle.initial_parameters()  # scale stays exactly one: ties survive
    for batch in (3, 8):
        rng = np.random.default_rng(batch)
        x = rng.integers(0, 3, (batch, *shape)).astype(np.float32)
        y = rng.integers(0, CLASSES, batch)
        got = dict(zip(outputs, session.run(None, {"input": x, "label": y, **state}), strict=True))
        params = {n: torch.tensor(v, requires_grad=True) for n, v in state.items()}
        output = functional_call(model, params, (torch.tensor(x),))
        loss = LOSSES["cross_entropy"](output, torch.tensor(y))
        grads = torch.autograd.grad(loss, list(params.values()))
        np.testing.assert_allclose(got["loss"], float(loss.detach()), rtol=RTOL, atol=ATOL)
        for param, grad in zip(params, grads, strict=True):
            np.testing.assert_allclose(
                got[f"grad/{param}"], grad.numpy(), rtol=RTOL, atol=ATOL, err_msg=param
            )


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tied_maxima_route_like_pytorch(
    bundles: dict[str, tuple[nn.Module, Bundle]], name: str
) -> None:
    _check_against_autograd(*bundles[name], MODELS[name][1])


def test_planes_too_large_for_float_indices_keep_the_exporters_pooling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Planes of 2**24 pixels are impractical here; pretend float32 cannot index 9x9.
    monkeypatch.setattr(decompositions, "_EXACT_INTEGERS", {})
    torch.manual_seed(0)
    model = pools_2d()
    bundle = compile_module(model, input_shape=(2, 9, 9), loss="cross_entropy")
    ops = {n.op_type for n in onnx.load_from_string(bundle.train_step_onnx).graph.node}
    assert "MaxPool" in ops
    _check_against_autograd(model, bundle, (2, 9, 9))


def test_pool_unpool_inference_graph(bundles: dict[str, tuple[nn.Module, Bundle]]) -> None:
    model, bundle = bundles["pool_unpool"]
    session = ort.InferenceSession(bundle.model_onnx, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    (got,) = session.run(["output"], {"input": x})
    with torch.no_grad():
        expected = model.eval()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-5)


def test_common_pooling_exports_without_index_kernels(
    bundles: dict[str, tuple[nn.Module, Bundle]],
) -> None:
    # onnxruntime's MaxPool with an Indices output is ~15x slower than the plain one.
    ops = {
        n.op_type for n in onnx.load_from_string(bundles["pools_2d"][1].train_step_onnx).graph.node
    }
    assert "MaxPool" not in ops
    assert {"SpaceToDepth", "MaxUnpool"} <= ops


class _Unpool(nn.Module):
    def forward(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        unpooled: torch.Tensor = torch.ops.aten.max_unpool2d(values, indices, [5, 7])
        return unpooled


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 5, 7)], ids=["batched", "unbatched"])
def test_max_unpool2d_translation(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    values, indices = torch.nn.functional.max_pool2d(x, 2, ceil_mode=True, return_indices=True)
    with tracing_context():  # silences the exporter's known-harmless warnings
        program = torch.onnx.export(
            _Unpool().eval(),
            (values, indices),
            dynamo=True,
            opset_version=18,
            custom_translation_table=translation_table(),
            verbose=False,
        )
    assert program is not None
    assert "MaxUnpool" in {node.op_type for node in program.model_proto.graph.node}
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, dict(zip(names, (values.numpy(), indices.numpy()), strict=True)))
    expected = torch.ops.aten.max_unpool2d(values, indices, [5, 7])
    np.testing.assert_array_equal(got, expected.numpy())
