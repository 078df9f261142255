"""FedAvgM (Hsu et al. 2019): server momentum on the aggregated delta.

``v <- momentum * v + delta``; ``x <- x + server_lr * v``.  With ``momentum = 0`` and
``server_lr = 1`` it is FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from fedmq.errors import LocalProtocolError
from fedmq.strategies.layout import Array, TensorMap
from fedmq.strategies.server_optimizer import ServerOptimizer


class ServerMomentum(ServerOptimizer):
    """Heavy-ball momentum on the server.

    Args:
        server_lr: step size applied to the velocity.
        momentum: velocity decay in [0, 1).
    """

    name: ClassVar[str] = "momentum"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        if not server_lr > 0:
            raise LocalProtocolError(f"server_lr {server_lr} must be positive")
        if not 0 <= momentum < 1:
            raise LocalProtocolError(f"momentum {momentum} must be in [0, 1)")
        self.server_lr = server_lr
        self.momentum = momentum
        self._velocity: dict[str, Array] = {}

    def step(self, params: TensorMap, delta: TensorMap) -> dict[str, Array]:
        """Update the velocity with ``delta`` and move along it."""
        beta = np.float32(self.momentum)
        lr = np.float32(self.server_lr)
        result: dict[str, Array] = {}
        for name, d in delta.items():
            previous = self._velocity.get(name)
            velocity = d.copy() if previous is None else beta * previous + d
            self._velocity[name] = velocity
            result[name] = params[name] + lr * velocity
        return result

    def state_dict(self) -> dict[str, Array]:
        """The velocity per tensor."""
        return {f"velocity/{name}": v for name, v in self._velocity.items()}

    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        """Restore the velocity."""
        velocity: dict[str, Array] = {}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind != "velocity" or not name:
                raise LocalProtocolError(f"unexpected momentum state entry {key!r}")
            velocity[name] = np.array(value, np.float32)
        self._velocity = velocity
