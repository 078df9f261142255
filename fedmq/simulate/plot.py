"""``metrics.png``: loss and accuracy (or AUROC) of the global model per round.

matplotlib runs on the Agg backend (no display needed) and is imported only here: the
rest of fedmq, and every agent, works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: servers and CI have no display

import matplotlib.pyplot as plt

from fedmq.simulate.rounds import RoundRow

FIGURE_SIZE = (10.0, 4.0)  # inches
DPI = 110


def _series(
    rows: Sequence[RoundRow], name: str, initial: dict[str, float]
) -> tuple[list[int], list[float]]:
    xs: list[int] = []
    ys: list[float] = []
    if name in initial:
        xs.append(0)
        ys.append(initial[name])
    for row in rows:
        value = getattr(row, name)
        if value is not None:
            xs.append(row.round)
            ys.append(value)
    return xs, ys


def plot_rounds(
    rows: Sequence[RoundRow], initial: dict[str, float], path: Path, *, title: str
) -> None:
    """Draw losses (left) and the quality metric (right) against the round number."""
    figure, (left, right) = plt.subplots(1, 2, figsize=FIGURE_SIZE)
    try:
        for name, label in (("train_loss", "train loss (agents)"), ("test_loss", "test loss")):
            xs, ys = _series(rows, name, initial)
            if xs:
                left.plot(xs, ys, marker="o", markersize=3, label=label)
        left.set_xlabel("round")
        left.set_ylabel("loss")
        left.set_title("loss")
        left.grid(alpha=0.3)
        left.legend()
        quality = [
            (name, label)
            for name, label in (
                ("test_accuracy", "test accuracy"),
                ("test_auroc", "anomaly AUROC"),
            )
            if _series(rows, name, initial)[0]
        ]
        for name, label in quality:
            xs, ys = _series(rows, name, initial)
            right.plot(xs, ys, marker="o", markersize=3, label=label)
        if quality:
            right.set_ylim(0.0, 1.0)
            right.legend(loc="lower right")
        else:
            xs, ys = _series(rows, "test_mse", initial)
            right.plot(xs, ys, marker="o", markersize=3, label="test MSE")
        right.set_xlabel("round")
        right.set_title("global model on the held-out test set")
        right.grid(alpha=0.3)
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, dpi=DPI)
    finally:
        plt.close(figure)
