"""``fedmq simulate --evaluate-final``: the last round evaluates the final model on every
agent's own held-out data, and the report has the per-agent table."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmq.aggregator.store import read_records
from fedmq.simulate import Simulation, SimulationOptions, TrainingOverrides

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_the_report_has_each_agents_figures_for_the_final_model(tmp_path: Path) -> None:
    out = tmp_path / "report"
    options = SimulationOptions(
        agents=3,
        rounds=3,
        broker="mosquitto",
        out=out,
        evaluate_final=True,
        training=TrainingOverrides(epochs=1),
    )
    result = await Simulation(options).run()
    assert [row.task for row in result.rows] == ["train", "train", "evaluate"]
    assert [row.outcome for row in result.rows] == ["closed"] * 3
    final = result.rows[-1]
    assert final.updates_accepted == 3  # one report per agent
    assert final.test_accuracy == result.rows[-2].test_accuracy  # the model did not move
    table = result.summary["final_devices"]
    assert table["checkpoint"] == 2
    assert len(table["devices"]) == 3
    records = list(read_records(out / "aggregator"))
    assert table["overall"] == records[-1].evaluation
    assert final.global_eval_accuracy == pytest.approx(table["overall"]["eval_accuracy"])
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert "final model (checkpoint 2) on each agent's evaluation data" in text
    for client in table["devices"]:
        assert client in text
