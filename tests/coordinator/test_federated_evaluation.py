"""Federated evaluation in the pure coordinator: per-round figures of the global model each
round started from, evaluate-only rounds (schedule, reports, an unchanged model), snapshots."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.support import SHAPES, Harness, config, delta, schema
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.policy import SyncPolicy, TargetMetric
from fedmq.coordinator.records import RoundRecord, federated_evaluation
from fedmq.coordinator.selection import SelectFraction
from fedmq.coordinator.snapshot import Snapshot
from fedmq.coordinator.validation import verify_update
from fedmq.errors import ConfigError
from fedmq.strategies.config import StrategyConfig, build_strategy
from fedmq.wire.control import AggregatorStatus, decode_control, encode_control
from fedmq.wire.tensors import decode_tensors

AGENTS = ("a", "b", "c")
# Server momentum: its state must not move in an evaluate-only round either.
STRATEGY = StrategyConfig(name="fedavgm", server_lr=1.0, momentum=0.9)


def _figures(accuracy: float, loss: float, examples: int) -> dict[str, float]:
    """What an agent reports about the global model it received, before training."""
    return {
        "global_eval_accuracy": accuracy,
        "global_eval_loss": loss,
        "global_eval_examples": float(examples),
    }


def _harness(rounds: int = 3, **policy: Any) -> Harness:
    values: dict[str, Any] = {"min_agents": 3}
    values.update(policy)
    cfg = config(rounds=rounds, sync=SyncPolicy(**values))
    harness = Harness.create(cfg, build_strategy(STRATEGY))
    harness.online(*AGENTS)
    return harness


def _train(harness: Harness, round_id: int, figures: dict[str, dict[str, float]]) -> None:
    for i, client in enumerate(AGENTS):
        metrics = {"train_loss": 1.0 + i, "eval_accuracy": 0.5, **figures.get(client, {})}
        harness.update(client, round_id, delta(10 * round_id + i), examples=10, metrics=metrics)


def _report(harness: Harness, client: str, round_id: int, figures: dict[str, float]) -> str:
    examples = int(figures["global_eval_examples"])
    return harness.update(client, round_id, {}, examples=examples, metrics=figures)


def _status(harness: Harness) -> AggregatorStatus:
    return harness.coordinator.status(harness.now)


def test_a_training_round_records_the_example_weighted_evaluation_of_its_start_model() -> None:
    harness = _harness()
    figures = {
        "a": _figures(0.5, 1.0, 20),
        "b": _figures(0.8, 0.5, 60),
        "c": _figures(0.2, 2.0, 20),
    }
    _train(harness, 1, figures)
    [record] = harness.records
    assert record.task == "train"
    assert record.evaluated_checkpoint == 0
    assert record.evaluation == pytest.approx(
        {
            "eval_accuracy": (0.5 * 20 + 0.8 * 60 + 0.2 * 20) / 100,
            "eval_loss": (1.0 * 20 + 0.5 * 60 + 2.0 * 20) / 100,
            "examples": 100.0,
            "devices": 3.0,
        }
    )
    assert record.device_evaluations() == {
        client: {"eval_accuracy": f[0], "eval_loss": f[1], "eval_examples": f[2]}
        for client, f in (("a", (0.5, 1.0, 20)), ("b", (0.8, 0.5, 60)), ("c", (0.2, 2.0, 20)))
    }
    # The training metrics stay weighted by training examples, without the global_ ones.
    assert set(record.metrics) == {"train_loss", "eval_accuracy", "updates", "examples"}
    state = harness.coordinator.state
    assert state.evaluations == {0: pytest.approx({"eval_accuracy": 0.62, "eval_loss": 0.9})}
    evaluation = _status(harness).evaluation
    assert evaluation is not None
    assert (evaluation.round, evaluation.checkpoint, evaluation.task) == (1, 0, "train")
    assert (evaluation.devices, evaluation.examples) == (3, 100)
    assert evaluation.metrics == pytest.approx({"eval_accuracy": 0.62, "eval_loss": 0.9})
    # The published status carries it too (and decodes strictly).
    published = decode_control(encode_control(_status(harness)), AggregatorStatus)
    assert published.evaluation == evaluation


def test_only_updates_trained_on_the_round_model_count_and_claims_are_capped() -> None:
    record = RoundRecord.from_json(
        {
            "v": 1,
            "round": 4,
            "outcome": "closed",
            "reason": "target",
            "opened_at": 1.0,
            "closed_at": 2.0,
            "deadline": 3.0,
            "extended": False,
            "selected": None,
            "contributions": [
                {
                    "client": "on-time",
                    "update_id": "u1",
                    "round": 4,
                    "base_round": 4,
                    "examples": 10,
                    "weight": 10.0,
                    "staleness": 0,
                    "metrics": _figures(0.9, 0.1, 50),
                },
                {
                    "client": "late",  # trained on round 3's model: evaluated checkpoint 2
                    "update_id": "u2",
                    "round": 3,
                    "base_round": 3,
                    "examples": 10,
                    "weight": 7.0,
                    "staleness": 1,
                    "metrics": _figures(0.1, 3.0, 50),
                },
                {
                    "client": "boaster",
                    "update_id": "u3",
                    "round": 4,
                    "base_round": 4,
                    "examples": 10,
                    "weight": 10.0,
                    "staleness": 0,
                    "metrics": _figures(0.5, 1.0, 10**9),
                },
            ],
            "rejected": {},
            "metrics": {},
            "strategy": "fedavg",
        }
    )
    assert set(record.device_evaluations()) == {"on-time", "boaster"}
    capped = federated_evaluation(record.contributions, 4, max_examples=50)
    assert capped["eval_accuracy"] == pytest.approx((0.9 * 50 + 0.5 * 50) / 100)
    assert (capped["examples"], capped["devices"]) == (100.0, 2.0)
    assert record.evaluation == {}  # what the file said: records are not recomputed


def test_evaluate_every_k_makes_every_kth_round_evaluate_only_and_leaves_the_model_alone() -> None:
    harness = _harness(rounds=4, evaluate_every=2, target_updates=2)
    _train(harness, 1, {c: _figures(0.5, 1.0, 10) for c in AGENTS})
    evaluate = harness.announcements()[-1]
    assert (evaluate.round, evaluate.task, evaluate.status) == (2, "evaluate", "open")
    # Every eligible agent is asked and waited for: target_updates is about training.
    assert evaluate.selected == list(AGENTS)
    assert _status(harness).task == "evaluate"
    assert harness.coordinator.state.round.target == len(AGENTS)
    reports = {
        "a": _figures(0.6, 0.9, 30),
        "b": _figures(0.9, 0.2, 10),
        "c": _figures(0.7, 0.5, 60),
    }
    for client, figures in reports.items():
        uid = _report(harness, client, 2, figures)
        [ack] = [a for a in harness.acks(client) if a.update_id == uid]
        assert (ack.accepted, ack.reason) == (True, "accepted")
    second = harness.records[-1]
    assert (second.round, second.task, second.outcome, second.reason) == (
        2,
        "evaluate",
        "closed",
        "target",
    )
    assert all(c.weight == 0 and c.norm is None for c in second.contributions)
    assert second.rejected == {"stale_round": 1}  # c's round-1 update came after the target
    accuracy = (0.6 * 30 + 0.9 * 10 + 0.7 * 60) / 100
    assert second.evaluation["eval_accuracy"] == pytest.approx(accuracy)
    # The model, the checkpoint numbering and the server optimizer state are unchanged.
    checkpoints = harness.checkpoints
    assert checkpoints[2].params == checkpoints[1].params
    assert checkpoints[2].optimizer == checkpoints[1].optimizer
    assert harness.coordinator.checkpoint == 2
    third = harness.announcements()[-1]
    assert (third.round, third.task) == (3, "train")
    assert third.params == evaluate.params
    state = harness.coordinator.state
    assert (state.completed, state.failed) == (1, 0)  # training rounds only
    assert state.last_metrics == harness.records[0].metrics  # not the evaluate round's
    assert set(state.evaluations) == {0, 1}
    # Training goes on from the same model with the same momentum as without round 2.
    _train(harness, 3, {})
    reference = _harness(rounds=2, target_updates=2)
    _train(reference, 1, {})
    for i, client in enumerate(AGENTS):
        reference.update(client, 2, delta(30 + i), examples=10)
    got = decode_tensors(harness.checkpoints[3].params)
    want = decode_tensors(reference.checkpoints[2].params)
    for name in SHAPES:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7)
    assert harness.announcements()[-1].task == "evaluate"  # round 4 of 4


def test_evaluate_final_evaluates_the_final_model_then_finishes() -> None:
    harness = _harness(rounds=3, evaluate_final=True)
    _train(harness, 1, {})
    _train(harness, 2, {})
    final = harness.announcements()[-1]
    assert (final.round, final.task) == (3, "evaluate")
    assert final.params.sha256 == harness.coordinator.params_ref.sha256  # checkpoint 2
    for i, client in enumerate(AGENTS):
        _report(harness, client, 3, _figures(0.9 - 0.1 * i, 0.1 * (i + 1), 10 * (i + 1)))
    assert harness.coordinator.phase == "finished"
    assert [f.reason for f in harness.finished] == ["ran 3 rounds"]
    record = harness.records[-1]
    assert (record.task, record.evaluated_checkpoint) == ("evaluate", 2)
    assert sorted(record.device_evaluations()) == list(AGENTS)
    assert harness.coordinator.state.evaluations[2]["eval_accuracy"] == pytest.approx(
        (0.9 * 10 + 0.8 * 20 + 0.7 * 30) / 60
    )
    evaluation = _status(harness).evaluation
    assert evaluation is not None
    assert (evaluation.checkpoint, evaluation.task) == (2, "evaluate")
    assert harness.checkpoints[3].params == harness.checkpoints[2].params


def test_reaching_the_target_metric_still_evaluates_the_final_model_first() -> None:
    harness = Harness.create(
        config(
            rounds=10,
            sync=SyncPolicy(min_agents=3, evaluate_final=True),
            target_metric=TargetMetric("eval_accuracy", 0.5),
        )
    )
    harness.online(*AGENTS)
    _train(harness, 1, {})  # eval_accuracy 0.5 reaches the target
    announcement = harness.announcements()[-1]
    assert (announcement.round, announcement.task) == (2, "evaluate")
    assert harness.snapshots[-1]["final_round"] == 2
    assert harness.finished == []
    for client in AGENTS:
        _report(harness, client, 2, _figures(0.7, 0.3, 10))
    assert [f.reason for f in harness.finished] == ["eval_accuracy reached 0.5"]
    assert harness.coordinator.state.evaluations[1]["eval_accuracy"] == pytest.approx(0.7)


def test_an_evaluate_round_takes_reports_only_and_a_training_round_takes_no_report() -> None:
    harness = _harness(rounds=4, evaluate_every=2, late_updates="fold", max_staleness=1)
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    report = _report(harness, "c", 1, _figures(0.5, 1.0, 10))  # a report in a training round
    assert [a.reason for a in harness.acks("c") if a.update_id == report] == ["wrong_shape"]
    assert harness.records[-1].reason == "all_reported"  # c answered: refused
    assert harness.coordinator.state.round.task == "evaluate"
    # A late training update (folding is on) is not folded into the evaluate round...
    late = harness.update("c", 1, delta(3))
    [ack] = [a for a in harness.acks("c") if a.update_id == late]
    assert (ack.accepted, ack.reason) == (False, "stale_round")
    assert "only evaluates" in ack.detail
    # ...and a delta for the evaluate round itself is refused.
    trained = harness.update("a", 2, delta(4))
    assert [a.reason for a in harness.acks("a") if a.update_id == trained] == ["wrong_shape"]
    for client in ("b", "c"):
        _report(harness, client, 2, _figures(0.5, 1.0, 10))
    record = harness.records[-1]
    assert (record.round, record.reason) == (2, "all_reported")
    assert [c.client for c in record.contributions] == ["b", "c"]
    assert record.rejected == {"stale_round": 1, "wrong_shape": 1}
    assert harness.checkpoints[2].params == harness.checkpoints[1].params


def test_an_evaluate_round_asks_every_eligible_agent_despite_a_fraction_selection() -> None:
    harness = _harness(rounds=2, evaluate_final=True, selection=SelectFraction(0.34, 1))
    first = harness.announcements()[-1]
    assert first.selected is not None
    assert len(first.selected) < len(AGENTS)
    for client in first.selected:
        harness.update(client, 1, delta(1))
    final = harness.announcements()[-1]
    assert (final.task, final.selected) == ("evaluate", list(AGENTS))


def test_evaluate_every_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="evaluate_every"):
        SyncPolicy(evaluate_every=1)


def test_evaluations_and_the_round_task_survive_a_restart_mid_evaluate_round() -> None:
    # The settle period after a restart: the agents' statuses arrive before it judges.
    cfg = config(rounds=3, settle_s=1.0, sync=SyncPolicy(min_agents=3, evaluate_final=True))
    harness = Harness.create(cfg, build_strategy(STRATEGY))
    harness.online(*AGENTS)
    harness.advance(1.0)
    _train(harness, 1, {c: _figures(0.4, 1.2, 10) for c in AGENTS})
    _train(harness, 2, {c: _figures(0.6, 0.8, 10) for c in AGENTS})
    _report(harness, "a", 3, _figures(0.9, 0.1, 10))
    snapshot = harness.snapshots[-1]
    assert (snapshot["task"], snapshot["round"]) == ("evaluate", 3)
    assert set(snapshot["evaluations"]) == {"0", "1"}
    checkpoint = harness.checkpoints[snapshot["checkpoint"]]
    restored = Coordinator.restore(
        cfg,
        build_strategy(STRATEGY),
        schema(),
        b"bundle-archive",
        snapshot,
        checkpoint.params,
        checkpoint.optimizer,
        now=harness.now,
    )
    assert restored.state.round.task == "evaluate"
    assert restored.state.evaluations == harness.coordinator.state.evaluations
    after = Harness(restored, now=harness.now)
    [stored] = [t for t in harness.stored if t.fold_round == 3]
    result = verify_update(stored.key, stored.update.data, restored.schema)
    after.run(restored.replay(result, stored.seq, after.now))  # type: ignore[arg-type]
    after.run(restored.start(after.now))
    after.online(*AGENTS)
    for client in ("b", "c"):
        _report(after, client, 3, _figures(0.9, 0.1, 10))
    assert restored.phase == "finished"
    record = after.records[-1]
    assert sorted(record.device_evaluations()) == list(AGENTS)
    assert after.checkpoints[3].params == harness.checkpoints[2].params


def test_a_snapshot_without_evaluation_fields_loads_as_before() -> None:
    harness = _harness()
    _train(harness, 1, {c: _figures(0.5, 1.0, 10) for c in AGENTS})
    document = dict(harness.snapshots[-1])
    assert document["evaluations"] == {"0": {"eval_accuracy": 0.5, "eval_loss": 1.0}}
    round_trip = Snapshot.from_json(document)
    assert round_trip.evaluations == {0: {"eval_accuracy": 0.5, "eval_loss": 1.0}}
    for key in ("task", "final_round", "evaluations"):
        del document[key]  # written by an older fedmq
    old = Snapshot.from_json(document)
    assert (old.task, old.final_round, dict(old.evaluations)) == ("train", None, {})
