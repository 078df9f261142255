"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

TEST_FRACTION = 0.2  # held out for the aggregator's evaluation of the global model


@dataclass(frozen=True)
class Split:
    """Features and labels of one split."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]


def load_digits_split(*, image: bool = False, seed: int = 0) -> tuple[Split, Split]:
    """Return (train, test) digits with pixels scaled to [0, 1], stratified by label.

    Args:
        image: shape features ``(N, 1, 8, 8)`` for CNNs instead of ``(N, 64)``.
        seed: split seed.
    """
    from sklearn.datasets import load_digits  # noqa: PLC0415 - server/simulation only

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test_mask[members[: round(len(members) * TEST_FRACTION)]] = True
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return Split(x[~test_mask], y[~test_mask]), Split(x[test_mask], y[test_mask])
