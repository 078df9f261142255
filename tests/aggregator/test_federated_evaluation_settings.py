"""The aggregator's federated-evaluation settings ([round] evaluate_every, evaluate_final)
and the Prometheus gauges of the newest federated evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from aggregator.scripted import bundle_dir
from fedmq.aggregator.config import AggregatorSettings, load_settings
from fedmq.aggregator.metrics import LiveCollector, LiveState
from fedmq.errors import ConfigError


def _settings(tmp_path: Path, **overrides: object) -> AggregatorSettings:
    values: dict[str, object] = {
        "federation": "plant7",
        "bundle": str(bundle_dir()),
        "state_dir": str(tmp_path / "state"),
        "rounds": 10,
    }
    values.update(overrides)
    return load_settings(None, **values)


def test_the_round_table_sets_the_evaluation_schedule(tmp_path: Path) -> None:
    settings = _settings(tmp_path, round={"evaluate_every": 4, "evaluate_final": True})
    policy = settings.coordinator_config().sync
    assert (policy.evaluate_every, policy.evaluate_final) == (4, True)
    assert [n for n in range(1, 11) if policy.task(n, 10) == "evaluate"] == [4, 8, 10]
    default = _settings(tmp_path).coordinator_config().sync
    assert [n for n in range(1, 11) if default.task(n, 10) == "evaluate"] == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"round": {"evaluate_every": 1}}, "evaluate_every 1 must be 0"),
        ({"round": {"evaluate_every": -2}}, "evaluate_every"),
        ({"mode": "async", "round": {"evaluate_final": True}}, "need mode = sync"),
    ],
)
def test_a_schedule_that_cannot_work_is_refused(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, **overrides)


def test_the_newest_federated_evaluation_is_a_prometheus_gauge() -> None:
    state = LiveState(
        round=4,
        phase="collecting",
        agents_online=3,
        agents_known=3,
        received=0,
        expected=3,
        deadline=None,
        bytes_received=0,
        bytes_sent=0,
        connections=1,
        evaluated_checkpoint=3,
        evaluation={"eval_accuracy": 0.95, "eval_loss": 0.2},
    )
    registry = CollectorRegistry()
    registry.register(LiveCollector(lambda: state))
    text = generate_latest(registry).decode()
    assert "fedmq_federated_evaluation_checkpoint 3.0" in text
    assert 'fedmq_federated_evaluation{metric="eval_accuracy"} 0.95' in text
    assert 'fedmq_federated_evaluation{metric="eval_loss"} 0.2' in text
