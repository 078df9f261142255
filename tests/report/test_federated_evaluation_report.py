"""``fedmq report`` and the simulator's report show the federated evaluation: figures of the
global model per round, and each device's figures for the final model."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from fedmq.aggregator.store import StateStore
from fedmq.coordinator.records import Contribution, RoundRecord, federated_evaluation
from fedmq.report.build import rounds_csv, write_report
from fedmq.report.history import read_history
from fedmq.simulate.progress import round_line
from fedmq.simulate.report import final_devices, summary_text
from fedmq.simulate.rounds import COLUMNS, RoundRow

DEVICES = {"press-1": 40, "press-2": 60}  # evaluation examples


def _contribution(client: str, round_id: int, task: str) -> Contribution:
    accuracy = 0.3 + 0.2 * round_id + (0.05 if client == "press-2" else 0.0)
    metrics = {
        "global_eval_accuracy": accuracy,
        "global_eval_loss": 2.0 / round_id,
        "global_eval_examples": float(DEVICES[client]),
    }
    if task == "train":
        metrics |= {"train_loss": 1.0 / round_id, "eval_accuracy": accuracy + 0.1}
    return Contribution(
        client=client,
        update_id=f"{client}-{round_id}",
        round=round_id,
        base_round=round_id,
        examples=100 if task == "train" else DEVICES[client],
        weight=100.0 if task == "train" else 0.0,
        staleness=0,
        metrics=metrics,
    )


def _record(round_id: int, task: str) -> RoundRecord:
    contributions = tuple(_contribution(c, round_id, task) for c in DEVICES)
    metrics = {"train_loss": 1.0 / round_id, "eval_accuracy": 0.5} if task == "train" else {}
    return RoundRecord(
        round=round_id,
        outcome="closed",
        reason="target",
        opened_at=1_700_000_000.0 + 60 * round_id,
        closed_at=1_700_000_010.0 + 60 * round_id,
        deadline=1_700_000_100.0 + 60 * round_id,
        extended=False,
        selected=tuple(DEVICES),
        contributions=contributions,
        rejected={},
        metrics={**metrics, "updates": 2.0, "examples": 200.0},
        strategy="fedavg",
        task=task,  # type: ignore[arg-type]
        evaluation=federated_evaluation(contributions, round_id),
    )


RECORDS = [_record(1, "train"), _record(2, "train"), _record(3, "evaluate")]


def _state_dir(root: Path) -> Path:
    store = StateStore(root)
    store.save_snapshot({"federation": "line-3", "round": 3, "phase": "finished"})
    for record in RECORDS:
        store.save_record(record)
    store.close()
    return root


def test_the_rounds_table_has_the_federated_evaluation_of_each_start_model(tmp_path: Path) -> None:
    history = read_history(_state_dir(tmp_path / "state"))
    assert history.evaluation_names == ["eval_loss", "eval_accuracy"]
    rows = list(csv.DictReader(io.StringIO(rounds_csv(history))))
    assert [r["task"] for r in rows] == ["train", "train", "evaluate"]
    expected = (0.5 * 40 + 0.55 * 60) / 100  # round 1: checkpoint 0, weighted by examples
    assert float(rows[0]["global_eval_accuracy"]) == pytest.approx(expected)
    assert [r["global_eval_devices"] for r in rows] == ["2", "2", "2"]
    assert "global_eval_accuracy" not in history.metric_names  # not a training metric


def test_the_page_shows_each_device_for_the_final_model(tmp_path: Path) -> None:
    report = write_report(_state_dir(tmp_path / "state"), tmp_path / "out")
    page = report.page.read_text(encoding="utf-8")
    section = page.split("Global model per device")[1]
    assert "Checkpoint 2, evaluated by each device in round 3 (an evaluate-only round)" in section
    assert "press-1" in section
    assert "press-2" in section
    assert "all (example-weighted)" in section
    assert "newest model is checkpoint" not in section  # it is the final model
    assert "federated eval_accuracy" in page  # the fact at the top


def test_without_an_evaluate_round_the_page_says_which_checkpoint_it_shows(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.save_snapshot({"federation": "line-3", "round": 3, "phase": "finished"})
    for record in RECORDS[:2]:
        store.save_record(record)
    store.close()
    page = write_report(tmp_path / "state", tmp_path / "out").page.read_text(encoding="utf-8")
    assert "Checkpoint 1, evaluated by each device in round 2 (before training)" in page
    assert "The newest model is checkpoint 2: [round] evaluate_final = true" in page


def test_the_simulation_summary_has_a_table_of_the_final_model_per_agent() -> None:
    table = final_devices(RECORDS)
    assert table is not None
    assert (table["round"], table["checkpoint"]) == (3, 2)
    assert table["devices"]["press-2"]["eval_accuracy"] == pytest.approx(0.95)
    assert final_devices(RECORDS[:2]) is None  # the last round trained
    text = summary_text(
        {
            "run": {
                "workload": "digits_mlp",
                "agents": 2,
                "processes": False,
                "rounds": 3,
                "partition": "iid",
                "codec": "raw",
                "strategy": "fedavg",
                "drop_rate": 0.0,
            },
            "broker": {"kind": "mosquitto", "reason": "found it"},
            "wall_time_s": 1.0,
            "rounds_closed": 3,
            "rounds_failed": 0,
            "bytes": {"up": 0, "down": 0},
            "final_devices": table,
        },
        [],
    )
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("final model"))
    assert lines[header + 1].split() == ["agent", "examples", "eval_accuracy", "eval_loss"]
    assert lines[header + 2].split() == ["press-1", "40", "0.9000", "0.6667"]
    assert lines[header + 4].split()[:4] == ["all", "(weighted)", "100", "0.9300"]


def test_an_evaluate_round_row_and_line_say_what_it_was() -> None:
    row = RoundRow(
        round=3,
        outcome="closed",
        reason="target",
        wall_time_s=0.2,
        selected=2,
        updates_accepted=2,
        updates_rejected=0,
        dropped_agents=0,
        train_loss=None,
        test_loss=None,
        test_accuracy=0.9,
        test_auroc=None,
        test_mse=None,
        bytes_up=100,
        bytes_down=100,
        close_lag_s=None,
        task="evaluate",
        global_eval_accuracy=0.93,
    )
    assert {"task", "global_eval_accuracy"} <= set(COLUMNS)
    text = round_line(row, 3, "test_accuracy", 5.0).plain
    assert "evaluate-only · 2/2 reports" in text
    assert "agents' accuracy 0.9300" in text
