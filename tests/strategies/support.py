"""Shared helpers for strategy tests: random cohorts as dicts and as stacked arrays."""

from __future__ import annotations

import numpy as np

from fedmq.strategies.layout import ModelLayout

SHAPES = {"w": (3, 4), "b": (3,), "running_var": (2,)}
LAYOUT = ModelLayout.from_shapes(SHAPES, optimized=["w", "b"])


def cohort(
    n: int, seed: int = 0, shapes: dict[str, tuple[int, ...]] = SHAPES
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        for _ in range(n)
    ]


def stacked(updates: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.stack([u[name] for u in updates]).astype(np.float64)


def params(seed: int = 99) -> dict[str, np.ndarray]:
    return cohort(1, seed)[0]
