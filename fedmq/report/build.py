"""``fedmq report``: an HTML page with PNG plots of a federation, from its state directory.

::

    <out>/
      index.html          the page: status, per-round and per-device tables, the plots, and
                          each device's figures for the newest evaluated global model
      metrics.png         global (example-weighted) loss and accuracy per round, with the
                          federated evaluation of each global model
      devices.png         each device's accuracy and training loss per round
      participation.png   selected, updated, rejected, unanswered, dropped agents per round
      traffic.png         bytes received and published, round durations
      rounds.csv          the per-round table

The state directory is only read (:mod:`~fedmq.report.history`): the report can be made
while the federation runs, as often as wanted.  Only the files above are written in
``out``; anything else there is left alone.
"""

from __future__ import annotations

import csv
import datetime
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fedmq
from fedmq.errors import ConfigError
from fedmq.report.formatting import cell, human_bytes
from fedmq.report.history import FederationHistory, RoundView, read_history
from fedmq.report.plots import Panel, Series, plot_panels

PAGE = "index.html"
FIGURES = ("metrics.png", "devices.png", "participation.png", "traffic.png")
CSV_FILE = "rounds.csv"
REPORT_FILES = (PAGE, *FIGURES, CSV_FILE)


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote."""

    out: Path
    page: Path
    figures: Sequence[Path]
    history: FederationHistory


def _metric_series(rounds: Sequence[RoundView], name: str, label: str | None = None) -> Series:
    points = [(view.number, view.metric(name)) for view in rounds]
    kept = [(x, y) for x, y in points if y is not None]
    return Series(label or name, [x for x, _ in kept], [y for _, y in kept])


def _device_series(rounds: Sequence[RoundView], device: str, metric: str) -> Series:
    xs: list[float] = []
    ys: list[float] = []
    for view in rounds:
        for item in view.record.contributions:
            value = item.metrics.get(metric)
            if item.client == device and value is not None:
                xs.append(view.number)
                ys.append(value)
    return Series(device, xs, ys)


def _bars(rounds: Sequence[RoundView], label: str, values: Sequence[float | None]) -> Series:
    kept = [(view.number, v) for view, v in zip(rounds, values, strict=True) if v is not None]
    return Series(label, [x for x, _ in kept], [y for _, y in kept])


def _evaluation_series(rounds: Sequence[RoundView], name: str, label: str) -> Series:
    """Federated evaluation of each global model, at the round that made it (checkpoint)."""
    points = [(view.number - 1, view.evaluation(name)) for view in rounds]
    kept = [(x, y) for x, y in points if y is not None]
    return Series(label, [x for x, _ in kept], [y for _, y in kept])


def _quality_ylim(metric: str | None) -> tuple[float, float] | None:
    return (0.0, 1.0) if metric in ("eval_accuracy", "eval_auroc") else None


def figure_panels(history: FederationHistory) -> dict[str, list[Panel]]:
    """The panels of every figure, by file name."""
    rounds = history.rounds
    quality = history.quality_metric
    losses = [_metric_series(rounds, name) for name in ("train_loss", "eval_loss")]
    quality_lines = [_metric_series(rounds, quality)] if quality else []
    federated = history.evaluation_quality
    if federated is not None:
        # x = the checkpoint: the model after that round, on the devices' evaluation data.
        quality_lines.append(
            _evaluation_series(rounds, federated, f"{federated} of the global model (federated)")
        )
    if "eval_loss" in history.evaluation_names:
        losses.append(_evaluation_series(rounds, "eval_loss", "eval_loss of the global model"))
    devices = history.devices
    unit, scale = _byte_unit(rounds)
    no_quality = "the agents report no evaluation metric"
    panels = {
        "metrics.png": [
            Panel("loss (example-weighted over the agents)", lines=losses, ylabel="loss"),
            Panel(
                f"{quality or 'quality'} (example-weighted over the agents)",
                lines=quality_lines,
                ylim=_quality_ylim(quality),
                legend="lower right",
                empty=no_quality,
            ),
        ],
        "devices.png": [
            Panel(
                f"{quality or 'quality'} per device",
                lines=[_device_series(rounds, d, quality) for d in devices] if quality else [],
                ylim=_quality_ylim(quality),
                empty=no_quality,
            ),
            Panel(
                "train loss per device",
                lines=[_device_series(rounds, d, "train_loss") for d in devices],
                ylabel="loss",
            ),
        ],
        "participation.png": [
            Panel(
                "agents per round",
                bars=[
                    _bars(rounds, "selected", [v.selected for v in rounds]),
                    _bars(rounds, "updates", [v.accepted for v in rounds]),
                    _bars(rounds, "rejected", [v.rejected for v in rounds]),
                    _bars(rounds, "no answer", [len(v.no_answer) for v in rounds]),
                ],
                counts=True,
            ),
            Panel(
                "dropouts (gone when the round ended)",
                bars=[_bars(rounds, "dropouts", [len(v.dropouts) for v in rounds])],
                counts=True,
            ),
        ],
        "traffic.png": [
            Panel(
                f"{unit} per round",
                bars=[
                    _bars(
                        rounds, "received (updates)", [_scaled(v.bytes_in, scale) for v in rounds]
                    ),
                    _bars(
                        rounds,
                        "published (models, acks)",
                        [_scaled(v.bytes_out, scale) for v in rounds],
                    ),
                ],
                ylabel=unit,
                empty="no byte counts (rounds/*/stats.json)",
            ),
            Panel(
                "round duration",
                bars=[
                    _bars(rounds, outcome, [_duration_if(v, outcome) for v in rounds])
                    for outcome in ("closed", "failed")
                ],
                ylabel="seconds",
                stacked=True,
            ),
        ],
    }
    return panels


def _byte_unit(rounds: Sequence[RoundView]) -> tuple[str, float]:
    largest = max(
        (b for v in rounds for b in (v.bytes_in, v.bytes_out) if b is not None), default=0
    )
    for unit, scale in (("GiB", 1024.0**3), ("MiB", 1024.0**2), ("KiB", 1024.0)):
        if largest >= scale:
            return unit, scale
    return "bytes", 1.0


def _scaled(value: int | None, scale: float) -> float | None:
    return None if value is None else value / scale


def _duration_if(view: RoundView, outcome: str) -> float | None:
    return view.duration_s if view.record.outcome == outcome else None


# ---------------------------------------------------------------------------- tables

ROUND_COLUMNS = (
    "round",
    "outcome",
    "reason",
    "opened_at",
    "duration_s",
    "selected",
    "updates",
    "rejected",
    "no_answer",
    "dropouts",
    "examples",
    "bytes_in",
    "bytes_out",
    "task",
)


def evaluation_columns(history: FederationHistory) -> list[str]:
    """Columns of the federated evaluation of the model each round started from."""
    names = history.evaluation_names
    if not names:
        return []
    return [*(f"global_{name}" for name in names), "global_eval_devices"]


def round_rows(history: FederationHistory) -> list[dict[str, object]]:
    """One row per round: :data:`ROUND_COLUMNS`, every weighted metric, the evaluation.

    ``global_<metric>`` is the federated evaluation of the global model the round was
    announced with (checkpoint ``round - 1``), over ``global_eval_devices`` devices.
    """
    rows = []
    for view in history.rounds:
        record = view.record
        row: dict[str, object] = {
            "round": view.number,
            "outcome": record.outcome,
            "reason": record.reason,
            "opened_at": _time(record.opened_at) if record.opened_at else None,
            "duration_s": view.duration_s,
            "selected": view.selected,
            "updates": view.accepted,
            "rejected": view.rejected,
            "no_answer": len(view.no_answer),
            "dropouts": len(view.dropouts),
            "examples": sum(c.counted for c in record.contributions),
            "bytes_in": view.bytes_in,
            "bytes_out": view.bytes_out,
            "task": record.task,
        }
        for name in history.metric_names:
            row[name] = view.metric(name)
        if history.evaluation_names:
            for name in history.evaluation_names:
                row[f"global_{name}"] = view.evaluation(name)
            devices = view.evaluation("devices")
            row["global_eval_devices"] = int(devices) if devices is not None else None
        rows.append(row)
    return rows


def rounds_csv(history: FederationHistory) -> str:
    """The per-round table as CSV text."""
    rows = round_rows(history)
    columns = [*ROUND_COLUMNS, *history.metric_names, *evaluation_columns(history)]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(name)) for name in columns])
    return buffer.getvalue()


def _time(stamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC).astimezone()
    return moment.isoformat(sep=" ", timespec="seconds")


def _html_cell(name: str, value: object) -> str:
    if value is None:
        return "<td></td>"
    if name in ("bytes_in", "bytes_out") and isinstance(value, int):
        text = human_bytes(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return f"<td>{html.escape(text)}</td>"


def _table(columns: Sequence[str], rows: Sequence[dict[str, object]]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    body = "\n".join(
        "<tr>" + "".join(_html_cell(name, row.get(name)) for name in columns) + "</tr>"
        for row in rows
    )
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


@dataclass
class _Device:
    updates: int = 0
    examples: int = 0
    first_round: int | None = None
    last_round: int | None = None
    latest: dict[str, float] = field(default_factory=dict)


def device_rows(history: FederationHistory) -> list[dict[str, object]]:
    """One row per device: rounds contributed, examples, its latest metrics."""
    quality = history.quality_metric
    reported = {k for v in history.rounds for c in v.record.contributions for k in c.metrics}
    shown = [n for n in ("train_loss", "eval_loss", quality) if n is not None and n in reported]
    devices: dict[str, _Device] = {}
    for view in history.rounds:
        if view.task == "evaluate":
            continue  # reports, not updates: in the table of the evaluated model
        for item in view.record.contributions:
            device = devices.setdefault(item.client, _Device())
            device.updates += 1
            device.examples += item.examples
            if device.first_round is None:
                device.first_round = view.number
            device.last_round = view.number
            device.latest.update({k: v for k, v in item.metrics.items() if k in shown})
    rows: list[dict[str, object]] = []
    for name in sorted(devices):
        device = devices[name]
        row: dict[str, object] = {
            "device": name,
            "updates": device.updates,
            "examples": device.examples,
            "first_round": device.first_round,
            "last_round": device.last_round,
        }
        row.update({f"last {metric}": device.latest.get(metric) for metric in shown})
        rows.append(row)
    return rows


def model_device_rows(view: RoundView) -> list[dict[str, object]]:
    """Each device's figures for the global model round ``view`` evaluated."""
    rows: list[dict[str, object]] = []
    for client, figures in sorted(view.record.device_evaluations().items()):
        examples = figures.get("eval_examples")
        row: dict[str, object] = {
            "device": client,
            "examples": int(examples) if examples is not None else None,
        }
        row.update({name: value for name, value in figures.items() if name != "eval_examples"})
        rows.append(row)
    overall: dict[str, object] = {"device": "all (example-weighted)"}
    for name, value in view.record.evaluation.items():
        if name == "examples":
            overall["examples"] = int(value)
        elif name != "devices":
            overall[name] = value
    rows.append(overall)
    return rows


def _model_section(history: FederationHistory) -> str:
    """The per-device table of the newest evaluated global model (the final one, ideally)."""
    view = history.latest_evaluation
    if view is None:
        return "<p>no federated evaluation yet: the agents report none (no evaluation data?)</p>"
    checkpoint = view.number - 1
    how = "an evaluate-only round" if view.task == "evaluate" else "before training"
    note = f"Checkpoint {checkpoint}, evaluated by each device in round {view.number} ({how})."
    final = history.final_checkpoint
    if final > checkpoint:
        note += (
            f" The newest model is checkpoint {final}: [round] evaluate_final = true "
            "evaluates the final model on every device."
        )
    rows = model_device_rows(view)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return f"<p>{html.escape(note)}</p>\n{_table(columns, rows)}"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; margin: 0.5em 0; }
.problems { color: #a00; }
"""


def page(history: FederationHistory, generated: float) -> str:
    """The report's HTML (images referenced by relative file name)."""
    rounds = history.rounds
    closed = sum(1 for v in rounds if v.record.outcome == "closed")
    title = f"fedmq federation {history.federation or history.state_dir.name}"
    quality = history.quality_metric
    last = next((v for v in reversed(rounds) if v.record.outcome == "closed"), None)
    facts = [
        ("status", history.status),
        ("mode", history.mode or "?"),
        ("rounds recorded", f"{len(rounds)} ({closed} closed, {len(rounds) - closed} failed)"),
        ("devices that contributed", str(len(history.devices))),
        ("checkpoints kept", ", ".join(map(str, history.checkpoints)) or "none"),
        ("state directory", str(history.state_dir)),
        ("generated", f"{_time(generated)} by fedmq {fedmq.__version__}"),
    ]
    if last is not None and quality is not None and last.metric(quality) is not None:
        facts.insert(3, (f"last {quality}", f"{last.metric(quality):.4f} (round {last.number})"))
    evaluated = history.latest_evaluation
    federated = history.evaluation_quality
    if evaluated is not None and federated is not None:
        value = evaluated.evaluation(federated)
        devices = evaluated.evaluation("devices")
        if value is not None:
            facts.insert(
                3,
                (
                    f"federated {federated}",
                    f"{value:.4f} (checkpoint {evaluated.number - 1}, {int(devices or 0)} devices)",
                ),
            )
    fact_rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts
    )
    images = "\n".join(
        f'<h2>{html.escape(caption)}</h2>\n<img src="{name}" alt="{html.escape(caption)}">'
        for name, caption in zip(
            FIGURES,
            ("Global model", "Per device", "Participation", "Traffic and durations"),
            strict=True,
        )
    )
    problems = ""
    if history.problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in history.problems)
        problems = f'<h2>Skipped files</h2>\n<ul class="problems">{items}</ul>'
    round_columns = [*ROUND_COLUMNS, *history.metric_names, *evaluation_columns(history)]
    device_table = device_rows(history)
    device_columns = list(dict.fromkeys(k for row in device_table for k in row))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<table>
{fact_rows}
</table>
{images}
<h2>Rounds</h2>
{_table(round_columns, round_rows(history))}
<h2>Devices</h2>
{_table(device_columns, device_table) if device_table else "<p>no contributions yet</p>"}
<h2>Global model per device (federated evaluation)</h2>
{_model_section(history)}
{problems}
</body>
</html>
"""


def write_report(state_dir: Path, out: Path, *, now: float | None = None) -> Report:
    """Write the report of the federation in ``state_dir`` to ``out``.

    Raises:
        StateError: ``state_dir`` is not an aggregator state directory.
        ConfigError: ``out`` is a file, or inside ``state_dir`` (which is never written).
    """
    history = read_history(state_dir)
    resolved = out.resolve()
    if resolved == state_dir.resolve() or state_dir.resolve() in resolved.parents:
        raise ConfigError(f"--out {out} is inside the state directory, which is only read")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    title = history.federation or state_dir.name
    figures = []
    for name, panels in figure_panels(history).items():
        path = out / name
        plot_panels(path, panels, title=title)
        figures.append(path)
    (out / CSV_FILE).write_text(rounds_csv(history), encoding="utf-8")
    generated = now if now is not None else datetime.datetime.now(datetime.UTC).timestamp()
    page_path = out / PAGE
    page_path.write_text(page(history, generated), encoding="utf-8")
    return Report(out, page_path, figures, history)
