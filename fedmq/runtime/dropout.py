"""Dropout keep-masks drawn with numpy, fed to the train step as inputs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedmq.bundle.manifest import DropoutSpec


def dropout_mask(
    spec: DropoutSpec, batch: int, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    """A mask for ``batch`` examples: ``0`` with probability ``p``, else ``1 / (1 - p)``.

    The rescaling keeps the expected activation unchanged, as ``nn.Dropout`` does in
    training mode, so the inference graph needs no dropout at all.
    """
    shape = (batch, *spec.shape.example_shape)
    keep = rng.random(shape, dtype=np.float32) >= np.float32(spec.p)
    return keep.astype(np.float32) * np.float32(1.0 / (1.0 - spec.p))
