"""The live view of ``fedmq monitor``: a monitor snapshot drawn with rich.

:func:`render` takes the dict of :meth:`fedmq.monitor.state.MonitorState.snapshot`
(nothing else: what the terminal shows is exactly what ``--once --json`` prints) and
returns one renderable: the round and its deadline countdown, received vs expected,
stragglers, dropouts and declines, the round's traffic, one row per agent, the
rejections, and the loss/accuracy trend over the rounds seen.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

MAX_AGENT_ROWS = 40  # agents listed; the rest are counted
MAX_NAMES = 8  # ids named per line of stragglers, dropouts, declines
MAX_HISTORY_ROWS = 12  # newest rounds in the table (the sparklines use every round)
SPARK = "▁▂▃▄▅▆▇█"
STATE_STYLES = {
    "offline": "red",
    "declined": "magenta",
    "training": "cyan",
    "downloading": "blue",
    "uploading": "yellow",
    "idle": "green",
    "online": "green",
    "collecting": "cyan",
    "waiting": "yellow",
    "finished": "green",
    "closed": "green",
    "failed": "red",
}


def size(count: int | None) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """``75`` -> ``1m15s``."""
    if seconds is None:
        return "-"
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def sparkline(values: list[float | None]) -> str:
    """One character per value, scaled between the smallest and largest (gaps: space)."""
    known = [v for v in values if v is not None]
    if not known:
        return ""
    low, high = min(known), max(known)
    span = high - low
    chars = []
    for value in values:
        if value is None:
            chars.append(" ")
        elif span == 0:
            chars.append(SPARK[len(SPARK) // 2])
        else:
            chars.append(SPARK[round((value - low) / span * (len(SPARK) - 1))])
    return "".join(chars)


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f", … ({len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else "")


def _styled(word: str | None) -> Text:
    word = word or "-"
    return Text(word, style=STATE_STYLES.get(word, ""))


def _header(snapshot: dict[str, Any]) -> Panel:
    aggregator = snapshot["aggregator"]
    announcement = snapshot["round"]
    counts = snapshot["counts"]
    lines: list[Text] = []
    if aggregator is None:
        lines.append(Text("no aggregator status retained (never started, or cleared)", "yellow"))
    else:
        line = Text("aggregator ")
        line.append(aggregator["id"], "bold")
        line.append(" ")
        line.append_text(_styled(aggregator["state"]))
        rounds = f"/{aggregator['rounds']}" if aggregator["rounds"] else ""
        line.append(f"  round {aggregator['round']}{rounds}", "bold")
        if aggregator.get("task") == "evaluate":
            line.append(" evaluate-only", "cyan")
        line.append(f"  ({aggregator['signature']})", "dim")
        lines.append(line)
        deadline_in = aggregator["deadline_in_s"]
        if deadline_in is not None:
            deadline = time.strftime("%H:%M:%S", time.localtime(aggregator["deadline"]))
            if deadline_in >= 0:
                lines.append(Text(f"deadline in {duration(deadline_in)} (at {deadline})"))
            else:
                lines.append(Text(f"deadline passed {duration(deadline_in)} ago", "yellow"))
        received = Text(f"received {aggregator['received']} / expected {aggregator['expected']}")
        if aggregator["state"] == "collecting":
            received.append(f"  missing {aggregator['missing_count']}")
        lines.append(received)
        for label, names, style in (
            ("stragglers", snapshot["stragglers"], "yellow"),
            ("dropouts", snapshot["dropouts"], "red"),
            ("declined", snapshot["declined"], "magenta"),
        ):
            if names:
                lines.append(Text(f"{label}: {_names(names)}", style))
        lines.append(
            Text(
                f"this round: in {size(aggregator['bytes_in'])}, "
                f"out {size(aggregator['bytes_out'])}"
            )
        )
        evaluation = aggregator.get("evaluation")
        if evaluation is not None and evaluation["metrics"]:
            figures = ", ".join(
                f"{name.removeprefix('eval_')} {value:.4f}"
                for name, value in sorted(evaluation["metrics"].items())
            )
            devices = evaluation["devices"]
            on = f" on {devices} devices" if devices is not None else ""
            lines.append(
                Text(
                    f"federated evaluation of checkpoint {evaluation['checkpoint']}{on}: {figures}"
                )
            )
        last = aggregator["last_round"]
        if last is not None:
            text = Text(f"last round {last['round']}: ")
            text.append_text(_styled(last["outcome"]))
            text.append(
                f" ({last['reason']}) in {duration(last['duration_s'])}, "
                f"{last['updates']} updates, {last['rejected']} rejected, "
                f"in {size(last['bytes_in'])} / out {size(last['bytes_out'])}"
            )
            lines.append(text)
    if announcement is not None and announcement["status"] != "open":
        lines.append(Text(f"announcement: round {announcement['round']} {announcement['status']}"))
    if counts["ignored_agents"]:
        lines.append(Text(f"{counts['ignored_agents']} further agent statuses ignored", "yellow"))
    problems = snapshot["problems"]
    if problems["count"]:
        lines.append(
            Text(f"{problems['count']} messages refused; last: {problems['recent'][-1]}", "red")
        )
    if not snapshot["complete"]:
        lines.append(Text("waiting for the retained round and aggregator status…", "dim"))
    title = f"fedmq monitor: {snapshot['root']}/{snapshot['federation']}"
    return Panel(Group(*lines), title=title, title_align="left")


def _agents(snapshot: dict[str, Any]) -> Table:
    agents = snapshot["agents"]
    by_state = ", ".join(f"{n} {state}" for state, n in snapshot["counts"]["by_state"].items())
    table = Table(title=f"agents: {len(agents)} ({by_state or 'none'})", title_justify="left")
    for column in ("agent", "state", "round", "progress", "last seen", "note"):
        table.add_column(column, no_wrap=column != "note")
    for agent in agents[:MAX_AGENT_ROWS]:
        progress = agent["progress"]
        notes = []
        if agent["missing"]:
            notes.append("waited for")
        if agent["declined"]:
            notes.append(f"declined: {agent['declined']}")
        if agent["last_error"]:
            notes.append(agent["last_error"][:80])
        note = "; ".join(notes)
        table.add_row(
            agent["client"] + (" *" if agent["selected"] else ""),
            _styled(agent["state"]),
            "-" if agent["round"] is None else str(agent["round"]),
            "-" if progress is None else f"{progress:.0%}",
            f"{duration(agent['last_seen_s'])} ago",
            note,
        )
    if len(agents) > MAX_AGENT_ROWS:
        table.caption = f"… {len(agents) - MAX_AGENT_ROWS} more agents (* selected)"
    elif any(agent["selected"] for agent in agents):
        table.caption = "* selected this round"
    return table


def _rejections(snapshot: dict[str, Any]) -> Table | None:
    rejections = snapshot["rejections"]
    if not rejections["by_reason"] and not rejections["recent"]:
        return None
    counts = ", ".join(f"{reason} {n}" for reason, n in rejections["by_reason"].items())
    table = Table(title=f"rejections this round: {counts or 'none'}", title_justify="left")
    for column in ("agent", "round", "reason", "detail"):
        table.add_column(column)
    for rejection in reversed(rejections["recent"]):
        table.add_row(
            rejection["client"], str(rejection["round"]), rejection["reason"], rejection["detail"]
        )
    return table


def _history(snapshot: dict[str, Any]) -> RenderableType | None:
    history = snapshot["history"]
    if not history:
        return None
    losses = [point["loss"] for point in history]
    accuracies = [point["accuracy"] for point in history]
    table = Table(title="rounds", title_justify="left")
    for column in ("round", "outcome", "duration", "updates", "in", "out", "loss", "accuracy"):
        table.add_column(column, justify="left" if column == "outcome" else "right")
    for point in history[-MAX_HISTORY_ROWS:]:
        loss, accuracy = point["loss"], point["accuracy"]
        table.add_row(
            str(point["round"]),
            _styled(point["outcome"]),
            duration(point["duration_s"]),
            str(point["updates"]),
            size(point["bytes_in"]),
            size(point["bytes_out"]),
            "-" if loss is None else f"{loss:.4f}",
            "-" if accuracy is None else f"{accuracy:.2%}",
        )
    trend = Text()
    if any(v is not None for v in losses):
        trend.append(f"loss     {sparkline(losses)}\n")
    if any(v is not None for v in accuracies):
        trend.append(f"accuracy {sparkline(accuracies)}")
    return Group(table, trend) if trend else table


def render(snapshot: dict[str, Any]) -> RenderableType:
    """The whole view of one snapshot."""
    parts: list[RenderableType] = [_header(snapshot), _agents(snapshot)]
    for part in (_rejections(snapshot), _history(snapshot)):
        if part is not None:
            parts.append(part)
    return Group(*parts)
