"""Models fedmq cannot compile fail with an error that names the problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fedmq.compile import compile_module
from fedmq.errors import CompileError, UnsupportedOperatorError

pytestmark = pytest.mark.compile


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(x, 0.5, training=self.training))


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), x


def test_in_graph_randomness_is_rejected_by_name() -> None:
    with pytest.raises(UnsupportedOperatorError, match=r"aten\.\w+.*nn\.Dropout modules"):
        compile_module(FunctionalDropout(), input_shape=(4,), loss="cross_entropy")


def test_rnn_interlayer_dropout_is_rejected() -> None:
    with pytest.raises(UnsupportedOperatorError, match=r"GRU\(dropout=0.2\)"):
        compile_module(nn.GRU(3, 4, num_layers=2, dropout=0.2), input_shape=(5, 3), loss="mse")


def test_batchnorm_cumulative_average_is_rejected() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None))
    with pytest.raises(CompileError, match="momentum=None"):
        compile_module(model, input_shape=(4,), loss="mse")


def test_trainable_pattern_matching_nothing_lists_parameters() -> None:
    with pytest.raises(CompileError, match=r"matches no parameter.*0\.weight"):
        compile_module(
            nn.Sequential(nn.Linear(4, 2)), input_shape=(4,), loss="mse", trainable=["head.*"]
        )


def test_float64_parameters_are_rejected() -> None:
    with pytest.raises(CompileError, match=r"torch\.float64.*model\.float\(\)"):
        compile_module(nn.Linear(4, 2).double(), input_shape=(4,), loss="mse")


def test_model_must_return_one_tensor() -> None:
    with pytest.raises(CompileError, match="one float32 tensor"):
        compile_module(TwoOutputs(), input_shape=(4,), loss="mse")


def test_cross_entropy_needs_class_dimension() -> None:
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0))
    with pytest.raises(CompileError, match="cross_entropy"):
        compile_module(model, input_shape=(4,), loss="cross_entropy")
