"""Live progress on the terminal (rich): one status line, and one line per finished round.

On a terminal the status line redraws in place (round, updates received/expected,
the latest test metric, elapsed time); elsewhere (CI logs, pipes) only the per-round
lines are printed.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.text import Text

from fedmq.simulate.rounds import RoundRow

REFRESH_PER_SECOND = 4


@dataclass(frozen=True)
class Snapshot:
    """What the status line shows."""

    round: int
    rounds: int
    state: str
    received: int
    expected: int
    online: int
    agents: int
    elapsed_s: float
    metric: str | None
    value: float | None


def _metric(name: str | None, value: float | None) -> str:
    if name is None or value is None:
        return ""
    return f" · {name.removeprefix('test_')} {value:.4f}"


def round_line(row: RoundRow, rounds: int, metric: str | None, elapsed_s: float) -> Text:
    """One finished round, e.g. ``round 3/20 closed (target) 10/10 updates … 1.2 s``."""
    value = getattr(row, metric) if metric else None
    text = Text()
    text.append(f"round {row.round}/{rounds} ", style="bold")
    style = "green" if row.outcome == "closed" else "red"
    text.append(f"{row.outcome} ({row.reason})", style=style)
    evaluating = row.task == "evaluate"
    if evaluating:
        text.append(" · evaluate-only", style="cyan")
    answers = "reports" if evaluating else "updates"
    text.append(f" · {row.updates_accepted}/{row.selected} {answers}")
    if row.dropped_agents:
        text.append(f" · {row.dropped_agents} dropped", style="yellow")
    if row.updates_rejected:
        text.append(f" · {row.updates_rejected} rejected", style="yellow")
    if row.train_loss is not None:
        text.append(f" · train loss {row.train_loss:.4f}")
    text.append(_metric(metric, value))
    federated = row.global_eval_accuracy
    if evaluating and federated is not None:  # the model under evaluation, on the agents' data
        text.append(f" · agents' accuracy {federated:.4f}")
    text.append(f" · {row.wall_time_s:.2f} s · elapsed {elapsed_s:.1f} s", style="dim")
    return text


class ProgressView:
    """The live display of one simulation.

    Args:
        console: where to draw (stderr keeps stdout for the report path).
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live = Live(
            Text(""), console=console, refresh_per_second=REFRESH_PER_SECOND, transient=True
        )
        self._running = False

    def message(self, text: str, style: str | None = None) -> None:
        """Print a line above the status line."""
        self.console.print(text, style=style, highlight=False)

    def start(self) -> None:
        """Show the status line."""
        if not self._running:
            self._live.start()
            self._running = True

    def stop(self) -> None:
        """Remove the status line."""
        if self._running:
            self._live.stop()
            self._running = False

    def update(self, snapshot: Snapshot) -> None:
        """Redraw the status line."""
        text = Text()
        if snapshot.state == "waiting" and snapshot.online < snapshot.agents:
            text.append(f"waiting for agents: {snapshot.online}/{snapshot.agents} online")
        elif snapshot.state == "waiting":
            text.append(f"round {snapshot.round}/{snapshot.rounds} ", style="bold")
            text.append(f"opening · {snapshot.online}/{snapshot.agents} agents online")
        else:
            text.append(f"round {snapshot.round}/{snapshot.rounds} ", style="bold")
            text.append(f"{snapshot.state} · {snapshot.received}/{snapshot.expected} updates")
            text.append(_metric(snapshot.metric, snapshot.value))
        text.append(f" · elapsed {snapshot.elapsed_s:.1f} s", style="dim")
        self._live.update(text)

    def round_closed(
        self, row: RoundRow, rounds: int, metric: str | None, elapsed_s: float
    ) -> None:
        """Print the line of a finished round."""
        self.console.print(round_line(row, rounds, metric, elapsed_s), highlight=False)
