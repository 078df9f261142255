"""Aggregators: how the deltas of one round become one delta.

:class:`Aggregator` is the interface the strategy drives (``begin``, ``add`` per update,
``result``).  Streaming aggregators (FedAvg's weighted mean, ``fedavg.py``) keep O(model)
memory; the robust rules (``median.py``, ``trimmed_mean.py``, ``krum.py``) need every
update of the round at once and build on :class:`CohortAggregator`, which holds the
cohort as one flat float32 vector per update and reduces it over column blocks, so the
working set stays ``updates x BLOCK`` instead of a second copy of the whole cohort.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from fedmq.errors import LocalProtocolError
from fedmq.strategies.layout import Array, ModelLayout, TensorMap

BLOCK = 1 << 16  # columns per block: 20 updates x 64 Ki floats = 5 MiB, cache-friendly


def check_weight(weight: float) -> float:
    """Return ``weight`` if it is a finite positive number.

    Raises:
        LocalProtocolError: zero, negative, NaN or infinite weight.
    """
    if not np.isfinite(weight) or weight <= 0:
        raise LocalProtocolError(f"update weight {weight!r} must be finite and positive")
    return float(weight)


class Aggregator(ABC):
    """Combines the deltas of one round into one delta.

    Call :meth:`begin` once per round, :meth:`add` per accepted update, then
    :meth:`result`.  ``streaming`` aggregators keep O(model) memory whatever the number
    of updates; the others hold the cohort until :meth:`result`.
    """

    name: ClassVar[str]
    streaming: ClassVar[bool]

    def __init__(self) -> None:
        self._layout: ModelLayout | None = None

    @property
    def layout(self) -> ModelLayout:
        """The layout given to :meth:`begin`."""
        if self._layout is None:
            raise LocalProtocolError(f"{self.name}: begin() was not called")
        return self._layout

    def begin(self, layout: ModelLayout) -> None:
        """Start a round: forget every update added so far."""
        self._layout = layout
        self._reset()

    @abstractmethod
    def _reset(self) -> None: ...

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates added since :meth:`begin`."""

    @abstractmethod
    def add(self, delta: TensorMap, weight: float) -> None:
        """Fold one update's delta with a positive weight (robust rules may ignore it)."""

    @abstractmethod
    def result(self) -> dict[str, Array]:
        """The aggregated delta.

        Raises:
            LocalProtocolError: no update was added.
        """

    def _check_nonempty(self) -> None:
        if self.count == 0:
            raise LocalProtocolError(f"{self.name}: no update to aggregate")


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
