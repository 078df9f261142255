"""``fedmq report``: a state directory (even one a service holds) becomes an HTML page with
PNG plots; unreadable files are skipped and named; nothing in the state directory changes."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fedmq import exit_codes
from fedmq.aggregator.store import StateStore, read_round_stats
from fedmq.cli.commands import app
from fedmq.coordinator.records import Contribution, RoundRecord
from fedmq.report.build import FIGURES, rounds_csv, write_report
from fedmq.report.history import read_history

DEVICES = ("press-1", "press-2", "press-3")


def contribution(client: str, round_id: int) -> Contribution:
    accuracy = 0.5 + 0.1 * round_id + 0.01 * DEVICES.index(client)
    return Contribution(
        client=client,
        update_id=f"{client}-{round_id}",
        round=round_id,
        base_round=round_id - 1,
        examples=100,
        weight=100.0,
        staleness=0,
        metrics={"train_loss": 1.0 / round_id, "eval_accuracy": accuracy},
    )


def record(round_id: int, *, failed: bool = False) -> RoundRecord:
    contributors = () if failed else DEVICES[: 2 + round_id % 2]
    return RoundRecord(
        round=round_id,
        outcome="failed" if failed else "closed",
        reason="no_quorum" if failed else "target",
        opened_at=1_700_000_000.0 + 60 * round_id,
        closed_at=1_700_000_000.0 + 60 * round_id + 12.5,
        deadline=1_700_000_000.0 + 60 * round_id + 30,
        extended=failed,
        selected=DEVICES,
        contributions=tuple(contribution(c, round_id) for c in contributors),
        rejected={"outlier": 1} if round_id == 2 else {},
        metrics={}
        if failed
        else {"train_loss": 1.0 / round_id, "eval_accuracy": 0.5 + 0.1 * round_id},
        strategy="fedavg",
    )


def state_dir(root: Path) -> tuple[Path, StateStore]:
    """A state directory of 4 rounds (round 3 failed), still locked by its "service"."""
    store = StateStore(root)
    store.save_snapshot(
        {
            "v": 2,
            "federation": "line-3",
            "mode": "sync",
            "round": 5,
            "phase": "collecting",
            "finish_reason": None,
        }
    )
    for round_id in range(1, 5):
        store.save_record(record(round_id, failed=round_id == 3))
        store.save_round_stats(
            round_id,
            {
                "v": 1,
                "round": round_id,
                "bytes_in": 40_000 * round_id,
                "bytes_out": 90_000,
                "no_answer": ["press-3"] if round_id == 3 else [],
                "gone": ["press-3"] if round_id == 3 else [],
            },
        )
    return root, store


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_a_report_of_a_running_federation_leaves_its_state_directory_alone(tmp_path: Path) -> None:
    root, store = state_dir(tmp_path / "state")
    before = tree_digest(root)
    try:
        report = write_report(root, tmp_path / "out")
    finally:
        store.close()
    assert tree_digest(root) == before
    history = report.history
    assert history.federation == "line-3"
    assert history.status == "running or stopped: round 5 collecting"
    assert [v.number for v in history.rounds] == [1, 2, 3, 4]
    assert history.quality_metric == "eval_accuracy"
    assert history.devices == list(DEVICES)
    third = history.rounds[2]
    assert (third.record.outcome, third.no_answer, third.dropouts) == (
        "failed",
        ["press-3"],
        ["press-3"],
    )
    page = report.page.read_text(encoding="utf-8")
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images == list(FIGURES)
    for name in images:
        png = (tmp_path / "out" / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(png) > 10_000, name  # panels with data, not empty canvases
    assert "line-3" in page
    assert "no_quorum" in page
    assert "press-2" in page  # the devices table


def test_rounds_csv_has_a_row_per_round_with_traffic_and_metrics(tmp_path: Path) -> None:
    root, store = state_dir(tmp_path / "state")
    store.close()
    lines = rounds_csv(read_history(root)).splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["round", "outcome", "reason", "opened_at"]
    assert {"bytes_in", "bytes_out", "train_loss", "eval_accuracy"} <= set(header)
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert [r["round"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[1]["bytes_in"] == "80000"
    assert rows[1]["rejected"] == "1"
    assert rows[2]["eval_accuracy"] == ""  # the failed round reports none
    assert rows[0]["duration_s"] == "12.5"


def test_unreadable_files_are_skipped_and_named(tmp_path: Path) -> None:
    root, store = state_dir(tmp_path / "state")
    store.close()
    (root / "rounds" / "000002" / "record.json").write_text('{"round": 2, "outc', encoding="utf-8")
    (root / "rounds" / "000004" / "stats.json").write_text("{", encoding="utf-8")
    result = CliRunner().invoke(app, ["report", str(root), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    history = read_history(root)
    assert [v.number for v in history.rounds] == [1, 3, 4]
    assert len(history.problems) == 1
    assert "000002/record.json" in history.problems[0]
    assert history.rounds[2].bytes_in is None  # its stats did not parse
    assert "skipped" in result.output
    assert "3 rounds" in result.output
    assert set(read_round_stats(root)) == {1, 2, 3}


def test_the_report_refuses_to_write_into_the_state_directory(tmp_path: Path) -> None:
    root, store = state_dir(tmp_path / "state")
    store.close()
    result = CliRunner().invoke(app, ["report", str(root), "--out", str(root / "report")])
    assert result.exit_code == exit_codes.CONFIG_ERROR
    assert "inside the state directory" in result.output
    assert not (root / "report").exists()


def test_a_directory_that_is_no_state_directory_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == exit_codes.STATE_FAILURE
    assert "not an aggregator state directory" in result.output


def test_an_empty_federation_still_gets_a_page(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.save_snapshot({"federation": "new", "round": 1, "phase": "waiting"})
    store.close()
    report = write_report(tmp_path / "state", tmp_path / "out")
    assert report.history.rounds == []
    assert "no contributions yet" in report.page.read_text(encoding="utf-8")
    assert all((tmp_path / "out" / name).stat().st_size > 0 for name in FIGURES)


def test_without_matplotlib_the_command_names_the_extra(tmp_path: Path) -> None:
    root, store = state_dir(tmp_path / "state")
    store.close()
    code = "import sys\nsys.modules['matplotlib'] = None\nfrom fedmq.cli.app import main\nmain()\n"
    result = subprocess.run(
        [sys.executable, "-c", code, "report", str(root), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == exit_codes.CONFIG_ERROR, result.stderr
    assert "pip install 'fedmq[simulate]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
