"""FedAdam (Reddi et al. 2021): ``v <- beta2 * v + (1 - beta2) * delta**2``."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedmq.strategies.layout import Array
from fedmq.strategies.server_optimizer import AdaptiveOptimizer


class ServerAdam(AdaptiveOptimizer):
    """Adam on the server, without bias correction (Algorithm 2 of the paper)."""

    name: ClassVar[str] = "adam"

    def _second_moment(self, v: Array, squared: Array) -> Array:
        beta2 = np.float32(self.beta2)
        return beta2 * v + (np.float32(1) - beta2) * squared
