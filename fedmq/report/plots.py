"""PNG plots of per-round series: the one place fedmq draws with matplotlib.

A figure is a row of :class:`Panel` objects, each with lines and/or bars against the
round number; :func:`plot_panels` draws and saves it.  ``fedmq report`` (a state
directory) and ``fedmq simulate`` (its ``metrics.png``) describe their figures as panels
and leave the drawing to this module.  matplotlib runs on the Agg backend (no display
needed) and is imported only here: the rest of fedmq, and every agent, works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # before pyplot: servers and CI have no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

PANEL_SIZE = (5.0, 4.0)  # inches per panel
DPI = 110
MAX_LEGEND = 12  # series beyond this are drawn without a legend entry

LegendPlace = Literal["best", "lower right", "upper right", "upper left", "lower left"]


@dataclass(frozen=True)
class Series:
    """One line or one set of bars: ``ys[i]`` at round ``xs[i]``."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]


@dataclass(frozen=True)
class Panel:
    """One plot of a figure.

    Args:
        title: above the plot.
        lines: drawn as lines with markers.
        bars: drawn as bars, side by side per round (``stacked``: on top of each other).
        ylabel: the y axis label.
        ylim: fixed y range (None: automatic).
        legend: matplotlib legend location.
        stacked: stack the bars instead of grouping them.
        counts: the values are whole numbers (integer ticks on the y axis).
        empty: shown in the middle of the panel when it has no data.
    """

    title: str
    lines: Sequence[Series] = ()
    bars: Sequence[Series] = ()
    ylabel: str = ""
    ylim: tuple[float, float] | None = None
    legend: LegendPlace = "best"
    stacked: bool = False
    counts: bool = False
    empty: str = "no data"

    @property
    def has_data(self) -> bool:
        """Whether any series has a point."""
        return any(series.xs for series in (*self.lines, *self.bars))


def _draw(axes: Axes, panel: Panel) -> None:
    axes.set_title(panel.title)
    axes.set_xlabel("round")
    if panel.ylabel:
        axes.set_ylabel(panel.ylabel)
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    if panel.counts:
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not panel.has_data:
        axes.text(0.5, 0.5, panel.empty, ha="center", va="center", transform=axes.transAxes)
        return
    labelled = 0
    bars = [series for series in panel.bars if series.xs]
    width = 0.8 if panel.stacked else 0.8 / max(1, len(bars))
    bottoms: dict[float, float] = {}
    for index, series in enumerate(bars):
        label = series.label if labelled < MAX_LEGEND else None
        labelled += 1
        if panel.stacked:
            base = [bottoms.get(x, 0.0) for x in series.xs]
            axes.bar(series.xs, series.ys, width, bottom=base, label=label)
            for x, y in zip(series.xs, series.ys, strict=True):
                bottoms[x] = bottoms.get(x, 0.0) + y
        else:
            offset = (index - (len(bars) - 1) / 2) * width
            axes.bar([x + offset for x in series.xs], series.ys, width, label=label)
    for series in panel.lines:
        if not series.xs:
            continue
        label = series.label if labelled < MAX_LEGEND else None
        labelled += 1
        axes.plot(series.xs, series.ys, marker="o", markersize=3, label=label)
    if panel.ylim is not None:
        axes.set_ylim(*panel.ylim)
    elif bars:
        axes.set_ylim(bottom=0)
    if labelled:
        axes.legend(loc=panel.legend, fontsize="small")


def plot_panels(path: Path, panels: Sequence[Panel], *, title: str = "") -> None:
    """Draw ``panels`` side by side and save the figure as a PNG at ``path``."""
    figure, axes = plt.subplots(
        1, len(panels), figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), squeeze=False
    )
    try:
        for ax, panel in zip(axes[0], panels, strict=True):
            _draw(ax, panel)
        if title:
            figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, dpi=DPI)
    finally:
        plt.close(figure)
