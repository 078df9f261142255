"""Krum and Multi-Krum (Blanchard et al. 2017).

Each update is scored by the sum of squared distances to its ``n - f - 2`` nearest
neighbours (``f``: Byzantine updates tolerated); Krum returns the update with the lowest
score, Multi-Krum the plain mean of the ``m`` lowest-scoring updates.  Pairwise
distances come from a float64 Gram matrix accumulated block by block.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt

from fedmq.errors import LocalProtocolError
from fedmq.strategies.aggregator import CohortAggregator
from fedmq.strategies.layout import Array


def krum_scores(distances: npt.NDArray[np.float64], byzantine: int) -> npt.NDArray[np.float64]:
    """Krum score of every update from the matrix of squared pairwise distances.

    Args:
        distances: ``n x n`` squared distances (diagonal ignored).
        byzantine: ``f``, the number of Byzantine updates tolerated.

    Raises:
        LocalProtocolError: fewer than ``f + 3`` updates (Krum needs ``n > f + 2``).
    """
    n = distances.shape[0]
    neighbours = n - byzantine - 2
    if neighbours < 1:
        raise LocalProtocolError(
            f"Krum with f={byzantine} needs at least {byzantine + 3} updates, got {n}"
        )
    off_diagonal = distances[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    nearest = np.partition(off_diagonal, neighbours - 1, axis=1)[:, :neighbours]
    scores: npt.NDArray[np.float64] = nearest.sum(axis=1)
    return scores


class Krum(CohortAggregator):
    """Krum (``multi = 1``) or Multi-Krum (``multi > 1``).

    Args:
        byzantine: ``f``, Byzantine updates tolerated.
        multi: ``m``, updates averaged (1 = classic Krum); capped at ``n - f``.
    """

    name: ClassVar[str] = "krum"

    def __init__(self, byzantine: int = 1, multi: int = 1) -> None:
        super().__init__()
        if byzantine < 0 or multi < 1:
            raise LocalProtocolError(f"Krum needs f >= 0 and m >= 1 (got f={byzantine}, m={multi})")
        self.byzantine = byzantine
        self.multi = multi
        self.selected: list[int] = []

    def distances(self) -> npt.NDArray[np.float64]:
        """Squared pairwise distances between the held updates."""
        n = self.count
        gram = np.zeros((n, n), np.float64)
        for _columns, block in self.blocks():
            wide = block.astype(np.float64)
            gram += wide @ wide.T
        norms = np.diag(gram)
        squared = norms[:, None] + norms[None, :] - 2 * gram
        return np.maximum(squared, 0.0)  # rounding can make a zero distance slightly negative

    def _reduce(self) -> Array:
        scores = krum_scores(self.distances(), self.byzantine)
        keep = min(self.multi, self.count - self.byzantine)
        # Stable sort: equal scores resolve to the earlier update, deterministically.
        self.selected = sorted(int(i) for i in np.argsort(scores, kind="stable")[:keep])
        chosen = np.stack([self._rows[i] for i in self.selected]).astype(np.float64)
        mean: Array = chosen.mean(axis=0).astype(np.float32)
        return mean
