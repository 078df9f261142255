"""Update-norm clipping: scale an update down to at most ``max_norm`` (L2 over all tensors).

Bounds any single client's influence on the round (and is the sensitivity bound that
central differential privacy needs).
"""

from __future__ import annotations

import numpy as np

from fedmq.errors import LocalProtocolError
from fedmq.strategies.layout import Array, TensorMap


def update_norm(delta: TensorMap) -> float:
    """L2 norm of an update over all its tensors.

    Finite for every finite update: a float32 sum of squares that overflows (values
    beyond ~1e19) is summed again in float64.
    """
    total = 0.0
    for array in delta.values():
        flat = np.asarray(array, np.float32).reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            square = float(np.dot(flat, flat))
        if not np.isfinite(square):
            wide = flat.astype(np.float64)
            square = float(np.dot(wide, wide))
        total += square
    return float(np.sqrt(total))


def clip_update(delta: TensorMap, max_norm: float) -> tuple[dict[str, Array], float]:
    """Return ``delta * min(1, max_norm / ||delta||)`` and the original norm.

    The input is not modified; an update already within the bound is returned as is
    (same arrays, no copy).

    Raises:
        LocalProtocolError: ``max_norm`` is not positive.
    """
    if not max_norm > 0:
        raise LocalProtocolError(f"clip norm {max_norm} must be positive")
    norm = update_norm(delta)
    if norm <= max_norm:
        return dict(delta), norm
    scale = np.float32(max_norm / norm)
    return {name: np.asarray(array, np.float32) * scale for name, array in delta.items()}, norm
