"""Coordinate-wise trimmed mean (Yin et al. 2018).

For each coordinate, drop the ``floor(beta * n)`` largest and smallest values and
average the rest.  Like the median it ignores example weights.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from fedmq.errors import LocalProtocolError
from fedmq.strategies.aggregator import CohortAggregator
from fedmq.strategies.layout import Array


class TrimmedMean(CohortAggregator):
    """Element-wise mean after trimming a fraction ``beta`` from each end.

    Args:
        beta: fraction trimmed from each side, in [0, 0.5).
    """

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        if not 0 <= beta < 0.5:
            raise LocalProtocolError(f"trimmed mean beta {beta} must be in [0, 0.5)")
        self.beta = beta

    def trimmed(self, n: int) -> int:
        """Values dropped from each end with ``n`` updates."""
        return math.floor(self.beta * n)

    def _reduce(self) -> Array:
        n = self.count
        k = self.trimmed(n)
        out = np.empty(self._rows[0].size, np.float32)
        for columns, block in self.blocks():
            # Partitioning at both cut points is O(n) per coordinate; a full sort is
            # O(n log n).  Values between the cut points are exactly the kept ones.
            ordered = np.partition(block, (k, n - k - 1), axis=0) if k else block
            out[columns] = ordered[k : n - k].mean(axis=0, dtype=np.float64)
        return out
