"""FedAdagrad (Reddi et al. 2021): ``v <- v + delta**2``."""

from __future__ import annotations

from typing import ClassVar

from fedmq.strategies.layout import Array
from fedmq.strategies.server_optimizer import AdaptiveOptimizer


class ServerAdagrad(AdaptiveOptimizer):
    """Adagrad on the server (``beta2`` is unused)."""

    name: ClassVar[str] = "adagrad"

    def _second_moment(self, v: Array, squared: Array) -> Array:
        return v + squared
