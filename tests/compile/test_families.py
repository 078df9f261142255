"""Every model family of issue 3, compiled and checked against PyTorch autograd."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import onnx
import pytest
import torch
from torch import nn

if TYPE_CHECKING:  # pytest imports conftest itself; this is for annotations only
    from compile.conftest import CompileCache, Compiled

pytestmark = pytest.mark.compile


class Recurrent(nn.Module):
    """Sequence classifier: an RNN over a fixed-length window, head on the last step."""

    def __init__(self, cell: type[nn.GRU] | type[nn.LSTM]) -> None:
        super().__init__()
        self.rnn = cell(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 5),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Dropout2d(0.25),
        nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d((2, 1)),  # from 3x3: overlapping rows, averaged columns
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def cnn_frozen_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def grouped_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, groups=2, dilation=2, padding=2),  # grouped + dilated
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, stride=2),  # depthwise, strided
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False, ceil_mode=True),
        nn.Conv2d(8, 2, 1),
        nn.AdaptiveAvgPool2d(2),  # 2x2 from 3x3: overlapping windows
        nn.Flatten(),
    )


def conv1d_classifier() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 8, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(8, 8, 3, stride=2, dilation=2),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def conv1d_autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(3, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv1d(8, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose1d(4, 8, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        nn.ConvTranspose1d(8, 3, 5, stride=2, padding=2, output_padding=1),
    )


FAMILIES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "mlp": (mlp, {"input_shape": (12,), "loss": "cross_entropy"}),
    "cnn": (cnn, {"input_shape": (2, 28, 28), "loss": "cross_entropy"}),
    "cnn_bn_eval_head": (
        cnn_frozen_bn,
        {
            "input_shape": (1, 8, 8),
            "loss": "bce_with_logits",
            "batchnorm": "eval",
            "trainable": ["1.*", "4.*"],
        },
    ),
    "grouped_conv": (grouped_conv, {"input_shape": (4, 11, 11), "loss": "l1"}),
    "conv1d_classifier": (conv1d_classifier, {"input_shape": (3, 32), "loss": "cross_entropy"}),
    "conv1d_autoencoder": (conv1d_autoencoder, {"input_shape": (3, 32), "loss": "mse"}),
    "gru": (lambda: Recurrent(nn.GRU), {"input_shape": (6, 4), "loss": "cross_entropy"}),
    "lstm": (lambda: Recurrent(nn.LSTM), {"input_shape": (6, 4), "loss": "cross_entropy"}),
}


def _get(compiled: CompileCache, family: str) -> Compiled:
    factory, options = FAMILIES[family]
    return compiled.get(family, factory, **options)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_step_matches_autograd(
    compiled: CompileCache, family: str, train_step_check: Callable[[Compiled], None]
) -> None:
    train_step_check(_get(compiled, family))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_graph_matches_eval_forward(
    compiled: CompileCache, family: str, model_check: Callable[[Compiled], None]
) -> None:
    model_check(_get(compiled, family))


@pytest.mark.parametrize("family", ["cnn", "lstm"])
def test_graphs_are_standard_onnx_for_old_runtimes(compiled: CompileCache, family: str) -> None:
    bundle = _get(compiled, family).bundle
    for data in (bundle.train_step_onnx, bundle.model_onnx):
        model = onnx.load_from_string(data)
        assert model.ir_version == 8
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
        assert not model.functions
        assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
        assert all(not node.metadata_props and not node.doc_string for node in model.graph.node)
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        onnx.checker.check_model(model, full_check=True)


def test_batchnorm_buffers_are_outputs_and_in_updates(compiled: CompileCache) -> None:
    manifest = _get(compiled, "cnn").bundle.manifest
    assert manifest.batchnorm == "train"
    assert set(manifest.updated_buffer_names) == {
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    }
    # Integer buffers are never sent; float running statistics are.
    assert "1.running_mean" in manifest.update_names
    assert "1.num_batches_tracked" not in manifest.update_names
    assert [d.module for d in manifest.dropout] == ["7"]
    assert manifest.dropout[0].shape.shape == ("batch", 8, 1, 1)  # channel-wise mask


def test_frozen_parameters_get_no_gradient(compiled: CompileCache) -> None:
    manifest = _get(compiled, "cnn_bn_eval_head").bundle.manifest
    assert manifest.trainable_names == ("1.weight", "1.bias", "4.weight", "4.bias")
    assert "0.weight" not in manifest.update_names
    # Eval-mode BatchNorm uses and keeps its running statistics.
    assert manifest.updated_buffer_names == ()
    assert manifest.batchnorm == "eval"
    outputs = [
        o.name
        for o in onnx.load_from_string(
            _get(compiled, "cnn_bn_eval_head").bundle.train_step_onnx
        ).graph.output
    ]
    assert outputs == ["loss", "grad/1.weight", "grad/1.bias", "grad/4.weight", "grad/4.bias"]
