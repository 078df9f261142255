"""The report directory a simulation leaves behind.

::

    <out>/
      rounds.csv        one row per round (columns: fedmq.simulate.rounds.COLUMNS)
      rounds.json       the same rows, plus the run's settings and the initial model's metrics
      summary.json      the run at a glance: settings, broker, final metrics, bytes per round,
                        and (--evaluate-final) each agent's figures for the final model
      summary.txt       the same for people, with a bytes-per-round table
      metrics.png       loss and accuracy (or AUROC) per round
      model.onnx        the final global model, standalone (fedmq export)
      aggregator/       the aggregator's state directory (checkpoints, round records)
      agents/           agent logs (subprocess agents)
      simulate.log      log of the run (fedmq simulate)
      updates/          every update envelope seen on the wire (--keep-updates)

A directory holding anything but the files of a previous report is refused, so a typo
in ``--out`` cannot wipe unrelated files.  :func:`build_summary` makes the summary
document from what a run knows at its end; :func:`write_report` writes the files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fedmq
from fedmq.errors import ConfigError
from fedmq.report.formatting import cell, human_bytes
from fedmq.simulate.rounds import COLUMNS, RoundRow

if TYPE_CHECKING:
    from fedmq.aggregator.config import AggregatorSettings
    from fedmq.coordinator.records import RoundRecord
    from fedmq.simulate.brokers import BrokerPlan
    from fedmq.simulate.options import SimulationOptions
    from fedmq.simulate.workloads import Workload

SUMMARY_JSON = "summary.json"
REPORT_FILES = (
    "rounds.csv",
    "rounds.json",
    SUMMARY_JSON,
    "summary.txt",
    "metrics.png",
    "model.onnx",
)
REPORT_DIRS = ("aggregator", "agents", "updates")
LOG_FILE = "simulate.log"


def prepare_out_dir(out: Path) -> Path:
    """Create ``out``, or empty it if it holds a previous report.

    Raises:
        ConfigError: ``out`` is a file, or a non-empty directory that is not a report.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if out.is_dir():
        known = {*REPORT_FILES, *REPORT_DIRS, LOG_FILE}
        strangers = sorted(p.name for p in out.iterdir() if p.name not in known)
        if strangers:
            raise ConfigError(
                f"--out {out} holds files that are not part of a fedmq report "
                f"({', '.join(strangers[:3])}): choose another directory"
            )
        # The log is left alone: the command may already be writing to it.
        for name in REPORT_FILES:
            (out / name).unlink(missing_ok=True)
        for name in REPORT_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def final_devices(records: Sequence[RoundRecord]) -> dict[str, Any] | None:
    """Each agent's figures for the final model, if the last round was evaluate-only.

    ``{"round", "checkpoint", "overall": {eval_loss, eval_accuracy, …, examples,
    devices}, "devices": {client: {eval_loss, eval_accuracy, …, eval_examples}}}``.
    """
    if not records or records[-1].task != "evaluate":
        return None
    last = records[-1]
    devices = last.device_evaluations()
    if not devices:
        return None
    return {
        "round": last.round,
        "checkpoint": last.round - 1,
        "overall": dict(last.evaluation),
        "devices": {client: devices[client] for client in sorted(devices)},
    }


def build_summary(
    *,
    options: SimulationOptions,
    workload: Workload,
    settings: AggregatorSettings,
    plan: BrokerPlan,
    broker_url: str,
    rows: Sequence[RoundRow],
    initial: dict[str, float],
    final: dict[str, float],
    dropped: Mapping[int, list[str]],
    started_at: float,
    ended_at: float,
    devices: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` document of a run (:func:`summary_text` shows it to people).

    Args:
        options: what was simulated.
        workload: the model and data.
        settings: the aggregator's settings.
        plan: the broker that ran and why.
        broker_url: where it listened.
        rows: one per recorded round.
        initial: the initial model's central metrics (empty: no evaluator).
        final: the last round's central metrics.
        dropped: the agents made to vanish, per round.
        started_at: Unix time the run started.
        ended_at: Unix time it ended.
        devices: each agent's figures for the final model (:func:`final_devices`).
    """
    return {
        "fedmq_version": fedmq.__version__,
        "title": f"{workload.name}: {options.agents} agents, partition {options.partition}",
        "run": {
            "workload": workload.name,
            "project": str(options.project) if options.project else None,
            "federation": settings.federation,
            "agents": options.agents,
            "processes": options.processes,
            "rounds": settings.rounds,
            "partition": str(options.partition),
            "codec": settings.codec,
            "strategy": settings.strategy.name,
            "drop_rate": options.drop_rate,
            "seed": options.seed,
            "deadline_s": settings.round.deadline_s,
            "training": settings.training.model_dump(),
        },
        "broker": {"kind": plan.kind, "reason": plan.reason, "url": broker_url},
        "started_at": started_at,
        "wall_time_s": ended_at - started_at,
        "rounds_closed": sum(1 for row in rows if row.outcome == "closed"),
        "rounds_failed": sum(1 for row in rows if row.outcome != "closed"),
        "initial": initial,
        "final": final,
        "bytes": {
            "up": sum(row.bytes_up for row in rows),
            "down": sum(row.bytes_down for row in rows),
            "per_round": [
                {"round": row.round, "up": row.bytes_up, "down": row.bytes_down} for row in rows
            ],
        },
        "dropped": {str(k): v for k, v in sorted(dropped.items()) if v},
        "notes": workload.notes,
        "final_devices": devices,
    }


def rows_csv(rows: Sequence[RoundRow]) -> str:
    """The rows as CSV text with a header line."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        values = row.as_dict()
        writer.writerow([cell(values[name]) for name in COLUMNS])
    return buffer.getvalue()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def summary_text(summary: dict[str, Any], rows: Sequence[RoundRow]) -> str:
    """The human-readable summary, ending with bytes per round."""
    run = summary["run"]
    lines = [
        f"fedmq simulation of {run['workload']}: {run['agents']} agents "
        f"({'subprocesses' if run['processes'] else 'in-process'}), {run['rounds']} rounds, "
        f"partition {run['partition']}, codec {run['codec']}, strategy {run['strategy']}, "
        f"drop rate {run['drop_rate']:g}",
        f"broker: {summary['broker']['kind']} ({summary['broker']['reason']})",
        f"wall time: {summary['wall_time_s']:.1f} s; rounds closed {summary['rounds_closed']}, "
        f"failed {summary['rounds_failed']}",
    ]
    for label, key in (("initial model", "initial"), ("final model", "final")):
        metrics = summary.get(key) or {}
        if metrics:
            shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
            lines.append(f"{label}: {shown}")
    lines += _device_lines(summary.get("final_devices"))
    lines += ["", "bytes per round (up: update chunks sent; down: fetched, estimated)"]
    lines.append(f"{'round':>5}  {'up':>12}  {'down':>12}  {'per agent up':>12}")
    for row in rows:
        per_agent = row.bytes_up / row.updates_accepted if row.updates_accepted else 0
        lines.append(
            f"{row.round:>5}  {human_bytes(row.bytes_up):>12}  {human_bytes(row.bytes_down):>12}"
            f"  {human_bytes(per_agent):>12}"
        )
    totals = summary["bytes"]
    lines.append(
        f"{'total':>5}  {human_bytes(totals['up']):>12}  {human_bytes(totals['down']):>12}"
    )
    return "\n".join(lines) + "\n"


def _device_lines(table: Mapping[str, Any] | None) -> list[str]:
    """The per-agent table of the final model (empty without one)."""
    if not table:
        return []
    devices: Mapping[str, Mapping[str, float]] = table["devices"]
    names = sorted({n for figures in devices.values() for n in figures} - {"eval_examples"})
    width = max(len("all (weighted)"), *(len(client) for client in devices))
    lines = [
        "",
        f"final model (checkpoint {table['checkpoint']}) on each agent's evaluation data "
        f"(round {table['round']}, evaluate-only)",
        f"{'agent':<{width}}  {'examples':>8}" + "".join(f"  {n:>14}" for n in names),
    ]

    def line(label: str, examples: float | None, figures: Mapping[str, float]) -> str:
        shown = "".join(f"  {figures[n]:>14.4f}" if n in figures else f"  {'':>14}" for n in names)
        count = f"{int(examples):>8}" if examples is not None else f"{'':>8}"
        return f"{label:<{width}}  {count}{shown}"

    for client, figures in devices.items():
        lines.append(line(client, figures.get("eval_examples"), figures))
    overall = table["overall"]
    lines.append(line("all (weighted)", overall.get("examples"), overall))
    return lines


def write_report(
    out: Path,
    rows: Sequence[RoundRow],
    summary: dict[str, Any],
) -> None:
    """Write ``rounds.csv``, ``rounds.json``, ``summary.json``, ``summary.txt``, ``metrics.png``."""
    from fedmq.simulate.plot import plot_rounds  # noqa: PLC0415 - matplotlib is slow to import

    (out / "rounds.csv").write_text(rows_csv(rows), encoding="utf-8")
    document = {
        "run": summary["run"],
        "initial": summary.get("initial"),
        "rounds": [row.as_dict() for row in rows],
    }
    (out / "rounds.json").write_text(
        json.dumps(_json_safe(document), indent=1) + "\n", encoding="utf-8"
    )
    (out / SUMMARY_JSON).write_text(
        json.dumps(_json_safe(summary), indent=1) + "\n", encoding="utf-8"
    )
    (out / "summary.txt").write_text(summary_text(summary, rows), encoding="utf-8")
    plot_rounds(rows, summary.get("initial") or {}, out / "metrics.png", title=summary["title"])
