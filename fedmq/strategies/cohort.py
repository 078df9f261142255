"""Aggregators that need every update of the round at once (robust rules).

The cohort is held as one flat float32 vector per update; reductions run over column
blocks so the working set stays ``updates x BLOCK`` instead of a second copy of the
whole cohort.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from fedmq.strategies.base import Aggregator, Array, TensorMap, check_weight

BLOCK = 1 << 16  # columns per block: 20 updates x 64 Ki floats = 5 MiB, cache-friendly


class CohortAggregator(Aggregator):
    """Keeps every update of the round; subclasses reduce the stacked cohort."""

    streaming: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._rows: list[Array] = []
        self._weights: list[float] = []

    def _reset(self) -> None:
        self._rows = []
        self._weights = []

    @property
    def count(self) -> int:
        """Updates held."""
        return len(self._rows)

    def add(self, delta: TensorMap, weight: float) -> None:
        """Keep a flat copy of ``delta``."""
        self._weights.append(check_weight(weight))
        self._rows.append(self.layout.flatten(delta))

    def blocks(self) -> Iterator[tuple[slice, Array]]:
        """Yield ``(columns, cohort[:, columns])`` over the flat parameter vector."""
        numel = self._rows[0].size if self._rows else 0
        for start in range(0, numel, BLOCK):
            columns = slice(start, min(numel, start + BLOCK))
            yield columns, np.stack([row[columns] for row in self._rows])

    def result(self) -> dict[str, Array]:
        """Reduce the cohort block by block."""
        self._check_nonempty()
        return self.layout.unflatten(self._reduce())

    @abstractmethod
    def _reduce(self) -> Array:
        """The aggregated flat delta."""
