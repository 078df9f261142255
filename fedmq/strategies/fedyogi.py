"""FedYogi (Reddi et al. 2021): ``v <- v - (1 - beta2) * delta**2 * sign(v - delta**2)``.

Yogi's additive update keeps ``v`` from growing (or shrinking) as fast as Adam's
when the delta's scale changes between rounds.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedmq.strategies.layout import Array
from fedmq.strategies.server_optimizer import AdaptiveOptimizer


class ServerYogi(AdaptiveOptimizer):
    """Yogi on the server."""

    name: ClassVar[str] = "yogi"

    def _second_moment(self, v: Array, squared: Array) -> Array:
        rate = np.float32(1) - np.float32(self.beta2)
        updated: Array = v - rate * squared * np.sign(v - squared)
        return updated
