"""The report directory: refusing foreign directories, CSV/JSON/summary/plot contents."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from fedmq.errors import ConfigError
from fedmq.simulate.progress import round_line
from fedmq.simulate.report import prepare_out_dir, rows_csv, summary_text, write_report
from fedmq.simulate.rounds import COLUMNS, RoundRow


def row(number: int, accuracy: float | None = 0.5) -> RoundRow:
    return RoundRow(
        round=number,
        outcome="closed",
        reason="target",
        wall_time_s=0.25,
        selected=4,
        updates_accepted=3,
        updates_rejected=1,
        dropped_agents=1,
        train_loss=1.0 / number,
        test_loss=2.0 / number,
        test_accuracy=accuracy,
        test_auroc=None,
        test_mse=None,
        bytes_up=3000 * number,
        bytes_down=5000,
        close_lag_s=None,
    )


def summary(rows: list[RoundRow]) -> dict[str, object]:
    return {
        "title": "t",
        "run": {
            "workload": "digits_mlp",
            "agents": 4,
            "processes": False,
            "rounds": len(rows),
            "partition": "iid",
            "codec": "raw",
            "strategy": "fedavg",
            "drop_rate": 0.25,
        },
        "broker": {"kind": "mosquitto", "reason": "found it"},
        "wall_time_s": 1.5,
        "rounds_closed": len(rows),
        "rounds_failed": 0,
        "initial": {"test_accuracy": 0.1, "test_loss": 2.3},
        "final": {"test_accuracy": 0.5},
        "bytes": {
            "up": sum(r.bytes_up for r in rows),
            "down": sum(r.bytes_down for r in rows),
        },
    }


def test_out_dir_refuses_foreign_files_and_files(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match=r"thesis\.tex"):
        prepare_out_dir(tmp_path)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    with pytest.raises(ConfigError, match="is a file"):
        prepare_out_dir(tmp_path / "thesis.tex")


def test_out_dir_replaces_a_previous_report_but_keeps_the_log(tmp_path: Path) -> None:
    out = tmp_path / "report"
    prepare_out_dir(out)
    (out / "rounds.csv").write_text("old")
    (out / "aggregator").mkdir()
    (out / "aggregator" / "state.json").write_text("{}")
    (out / "simulate.log").write_text("being written")
    prepare_out_dir(out)
    assert sorted(p.name for p in out.iterdir()) == ["simulate.log"]


def test_csv_has_every_column_and_blank_cells_for_missing_values() -> None:
    rows = [row(1), row(2, accuracy=None)]
    parsed = list(csv.DictReader(io.StringIO(rows_csv(rows))))
    assert tuple(parsed[0]) == COLUMNS
    assert parsed[0]["test_accuracy"] == "0.5"
    assert parsed[1]["test_accuracy"] == ""
    assert parsed[1]["bytes_up"] == "6000"
    assert float(parsed[1]["train_loss"]) == pytest.approx(0.5)


def test_summary_text_lists_bytes_per_round() -> None:
    rows = [row(1), row(2)]
    text = summary_text(summary(rows), rows)
    lines = text.splitlines()
    assert any(line.split()[:3] == ["1", "2.9", "KiB"] for line in lines)
    assert any(line.split()[:3] == ["2", "5.9", "KiB"] for line in lines)
    assert lines[-1].split()[:3] == ["total", "8.8", "KiB"]
    assert "drop rate 0.25" in text


def test_write_report_writes_every_file(tmp_path: Path) -> None:
    rows = [row(1), row(2), row(3)]
    write_report(tmp_path, rows, summary(rows))
    document = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["round"] for r in document["rounds"]] == [1, 2, 3]
    assert document["initial"]["test_accuracy"] == 0.1
    assert json.loads((tmp_path / "summary.json").read_text())["bytes"]["up"] == 18000
    png = (tmp_path / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000  # two panels with lines, not an empty canvas


def test_the_round_line_says_what_happened() -> None:
    text = round_line(row(2), 5, "test_accuracy", 12.5).plain
    assert text.startswith("round 2/5 closed (target) · 3/4 updates · 1 dropped · 1 rejected")
    assert "accuracy 0.5000" in text
    assert text.endswith("elapsed 12.5 s")
