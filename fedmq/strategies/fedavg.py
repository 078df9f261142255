"""FedAvg (McMahan et al. 2017): the example-weighted mean of the deltas, folded as it arrives.

Each update is folded into a running weighted sum the moment it is accepted, so memory
is two model-sized float32 buffers (sum and scratch) however many clients report.  The
sum is float32 like the updates: a float64 sum costs three times the memory bandwidth
(measured in ``bench/aggregate.py``) while the deltas of one round are of similar
magnitude, so float32 loses nothing that matters to SGD.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from fedmq.errors import LocalProtocolError
from fedmq.strategies.aggregator import Aggregator, check_weight
from fedmq.strategies.layout import Array, TensorMap
from fedmq.strategies.server_optimizer import ServerOptimizer


class WeightedMean(Aggregator):
    """Streaming weighted mean: O(model) memory, one fused pass per update."""

    name: ClassVar[str] = "mean"
    streaming: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._sum: dict[str, Array] = {}
        self._scratch: dict[str, Array] = {}
        self._total_weight = 0.0
        self._count = 0

    def _reset(self) -> None:
        self._sum = self.layout.zeros()
        self._scratch = self.layout.zeros()
        self._total_weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """Updates folded since :meth:`begin`."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights folded so far."""
        return self._total_weight

    def add(self, delta: TensorMap, weight: float) -> None:
        """Fold ``weight * delta`` into the running sum."""
        check_weight(weight)
        scale = np.float32(weight)
        for name, total in self._sum.items():
            # Multiply into a preallocated scratch buffer, then add in place: the same two
            # memory passes as ``a += w * b`` without allocating a temporary per update.
            scratch = self._scratch[name]
            np.multiply(delta[name], scale, out=scratch)
            np.add(total, scratch, out=total)
        self._total_weight += float(weight)
        self._count += 1

    def result(self) -> dict[str, Array]:
        """The weighted mean of the folded deltas."""
        self._check_nonempty()
        inverse = np.float32(1.0 / self._total_weight)
        return {name: total * inverse for name, total in self._sum.items()}


class ServerSgd(ServerOptimizer):
    """``params + server_lr * delta``: plain FedAvg when ``server_lr`` is 1."""

    name: ClassVar[str] = "sgd"

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise LocalProtocolError(f"server_lr {server_lr} must be positive")
        self.server_lr = server_lr

    def step(self, params: TensorMap, delta: TensorMap) -> dict[str, Array]:
        """Apply the delta scaled by the server learning rate."""
        lr = np.float32(self.server_lr)
        return {name: params[name] + lr * d for name, d in delta.items()}

    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        """Plain SGD keeps no state."""
        super().load_state_dict(state)
