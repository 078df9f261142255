"""Staleness discount for updates trained on an older global model (FedBuff)."""

from __future__ import annotations

import math


def staleness_weight(staleness: int) -> float:
    """``1 / sqrt(1 + staleness)``: FedBuff's polynomial discount (Nguyen et al. 2022).

    Raises:
        ValueError: negative staleness.
    """
    if staleness < 0:
        raise ValueError(f"staleness {staleness} must be >= 0")
    return 1.0 / math.sqrt(1.0 + staleness)
