"""Coordinate-wise median (Yin et al. 2018): each coordinate takes the cohort's median.

Robust to a minority of arbitrary updates; ignores example weights (a weighted median
would let one client claiming many examples decide every coordinate).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedmq.strategies.aggregator import CohortAggregator
from fedmq.strategies.layout import Array


class CoordinateMedian(CohortAggregator):
    """Element-wise median over the round's updates."""

    name: ClassVar[str] = "median"

    def _reduce(self) -> Array:
        out = np.empty(self._rows[0].size, np.float32)
        for columns, block in self.blocks():
            out[columns] = np.median(block, axis=0)
        return out
