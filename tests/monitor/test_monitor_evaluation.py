"""``fedmq monitor`` shows an evaluate-only round and the newest federated evaluation."""

from __future__ import annotations

from rich.console import Console

from fedmq.monitor.state import MonitorState
from fedmq.monitor.view import render
from fedmq.wire.control import AggregatorStatus, FederatedEvaluation, encode_control
from fedmq.wire.topics import Topics

T0 = 1_000_000.0
TOPICS = Topics("line-3")


def test_the_header_names_the_evaluate_round_and_the_evaluation() -> None:
    status = AggregatorStatus(
        aggregator="agg",
        state="collecting",
        round=5,
        rounds=5,
        ts=T0,
        task="evaluate",
        evaluation=FederatedEvaluation(
            round=4,
            checkpoint=3,
            task="train",
            metrics={"eval_accuracy": 0.9512, "eval_loss": 0.2},
            devices=7,
            examples=700,
        ),
    )
    state = MonitorState("line-3")
    state.fold(TOPICS.aggregator_status(), encode_control(status), T0)
    snapshot = state.snapshot(T0)
    assert snapshot["aggregator"]["task"] == "evaluate"
    assert snapshot["aggregator"]["evaluation"]["checkpoint"] == 3
    console = Console(record=True, width=120, color_system=None)
    console.print(render(snapshot))
    text = console.export_text()
    assert "round 5/5 evaluate-only" in text
    assert "federated evaluation of checkpoint 3 on 7 devices: accuracy 0.9512, loss 0.2000" in text
