"""``metrics.png``: loss and accuracy (or AUROC) of the global model per round.

Drawn by :mod:`fedmq.report.plots` (matplotlib, imported only there), which also draws
``fedmq report``'s figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedmq.report.plots import Panel, Series, plot_panels
from fedmq.simulate.rounds import RoundRow


def _series(rows: Sequence[RoundRow], name: str, label: str, initial: dict[str, float]) -> Series:
    xs: list[float] = []
    ys: list[float] = []
    if name in initial:
        xs.append(0)
        ys.append(initial[name])
    for row in rows:
        value = getattr(row, name)
        if value is not None:
            xs.append(row.round)
            ys.append(value)
    return Series(label, xs, ys)


def plot_rounds(
    rows: Sequence[RoundRow], initial: dict[str, float], path: Path, *, title: str
) -> None:
    """Draw losses (left) and the quality metric (right) against the round number."""
    losses = Panel(
        "loss",
        lines=[
            _series(rows, "train_loss", "train loss (agents)", initial),
            _series(rows, "test_loss", "test loss", initial),
        ],
        ylabel="loss",
    )
    quality = [
        series
        for series in (
            _series(rows, "test_accuracy", "test accuracy", initial),
            _series(rows, "test_auroc", "anomaly AUROC", initial),
        )
        if series.xs
    ]
    held_out = "global model on the held-out test set"
    if quality:
        right = Panel(held_out, lines=quality, ylim=(0.0, 1.0), legend="lower right")
    else:
        right = Panel(held_out, lines=[_series(rows, "test_mse", "test MSE", initial)])
    plot_panels(path, [losses, right], title=title)
