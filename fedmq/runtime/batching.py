"""Seeded shuffling and batching over numpy arrays."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one pass (the last batch may be smaller)."""
    return -(-num_examples // batch_size)


def batch_indices(
    num_examples: int, batch_size: int, epochs: int, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.int64]]:
    """Yield index arrays: every epoch a fresh permutation cut into batches.

    The last batch of an epoch holds the remainder (never dropped, never padded), so
    every example counts once per epoch.
    """
    for _ in range(epochs):
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, batch_size):
            yield order[start : start + batch_size]
