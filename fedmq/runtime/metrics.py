"""Losses and metrics in numpy, for evaluating model outputs on the device."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedmq.bundle.manifest import LossName

FloatArray = npt.NDArray[np.float32]


def per_example_loss(
    loss: LossName, output: FloatArray, label: npt.NDArray[np.generic]
) -> npt.NDArray[np.float64]:
    """Each example's loss (mean over its elements), as the train step's loss averages.

    For ``cross_entropy`` with extra dimensions (``(batch, classes, d1, ...)``) the loss
    averages over positions, like ``F.cross_entropy``.
    """
    out = output.astype(np.float64)
    batch = out.shape[0]
    if loss == "cross_entropy":
        shifted = out - out.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        picked = np.take_along_axis(log_probs, label.astype(np.int64)[:, None], axis=1)
        return np.asarray(-picked.reshape(batch, -1).mean(axis=1), dtype=np.float64)
    target = label.astype(np.float64)
    if loss == "bce_with_logits":
        # log(1 + exp(-|z|)) form: stable for large |z|.
        elementwise = np.maximum(out, 0) - out * target + np.log1p(np.exp(-np.abs(out)))
    elif loss == "mse":
        elementwise = (out - target) ** 2
    else:
        elementwise = np.abs(out - target)
    return np.asarray(elementwise.reshape(batch, -1).mean(axis=1), dtype=np.float64)


def correct_fraction(
    loss: LossName, output: FloatArray, label: npt.NDArray[np.generic]
) -> npt.NDArray[np.float64]:
    """Per-example fraction of correct predictions (argmax, or logit > 0 for binary)."""
    batch = output.shape[0]
    if loss == "cross_entropy":
        hits = output.argmax(axis=1) == label
    else:
        hits = (output > 0) == (np.asarray(label, dtype=np.float32) > 0.5)
    return np.asarray(hits.reshape(batch, -1).mean(axis=1), dtype=np.float64)
