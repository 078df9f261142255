"""Restoring a finished federation under another ``rounds``: continue, stay, or refuse."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from coordinator.support import Harness, config, delta, schema
from fedmq.coordinator.actions import FederationFinished, PublishBlob
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.policy import SyncPolicy, TargetMetric
from fedmq.errors import ConfigError
from fedmq.strategies.config import StrategyConfig, build_strategy
from fedmq.wire.tensors import decode_tensors


def _ran(rounds: int) -> Harness:
    harness = Harness.create(config(rounds=rounds, sync=SyncPolicy(min_agents=1)))
    harness.online("a")
    for round_id in range(1, rounds + 1):
        harness.update("a", round_id, delta(round_id), metrics={"eval_accuracy": 0.5})
    assert [f.reason for f in harness.finished] == [f"ran {rounds} rounds"]
    return harness


def _restore(harness: Harness, **overrides: Any) -> Coordinator:
    snapshot = harness.snapshots[-1]
    checkpoint = harness.checkpoints[snapshot["checkpoint"]]
    return Coordinator.restore(
        config(sync=SyncPolicy(min_agents=1), **overrides),
        build_strategy(StrategyConfig()),
        schema(),
        b"bundle-archive",
        snapshot,
        checkpoint.params,
        checkpoint.optimizer,
        now=harness.now,
    )


def test_more_rounds_continue_with_the_final_model() -> None:
    harness = _ran(2)
    restored = _restore(harness, rounds=4)
    assert (restored.phase, restored.round, restored.checkpoint) == ("waiting", 3, 2)
    final = decode_tensors(harness.checkpoints[2].params)
    for name, value in final.items():
        np.testing.assert_array_equal(restored.params[name], value)
    actions = restored.start(harness.now)
    assert not [a for a in actions if isinstance(a, FederationFinished)]
    # The bundle and the final model are published again for round 3.
    published = {a.ref.sha256 for a in actions if isinstance(a, PublishBlob)}
    assert published == {restored.bundle_ref.sha256, restored.params_ref.sha256}
    assert {ref.sha256 for ref in restored.state.blobs.retained()} == published
    continued = Harness(restored, now=harness.now)
    continued.run(actions)
    continued.online("a")
    continued.update("a", 3, delta(3))
    continued.update("a", 4, delta(4))
    assert [c.round for c in continued.closed] == [3, 4]
    assert sorted(continued.checkpoints) == [3, 4]
    assert [f.reason for f in continued.finished] == ["ran 4 rounds"]


def test_as_many_rounds_stay_finished_and_fewer_are_refused() -> None:
    harness = _ran(2)
    assert _restore(harness, rounds=2).phase == "finished"
    with pytest.raises(ConfigError, match="rounds = 1 is below the 2 rounds"):
        _restore(harness, rounds=1)


def test_a_reached_target_keeps_it_finished_until_the_target_changes() -> None:
    harness = _ran(2)
    reached = TargetMetric("eval_accuracy", 0.5)
    stays = _restore(harness, rounds=5, target_metric=reached)
    assert (stays.phase, stays.round) == ("finished", 2)
    higher = TargetMetric("eval_accuracy", 0.9)
    assert _restore(harness, rounds=5, target_metric=higher).phase == "waiting"


def test_an_unfinished_federation_cannot_drop_below_its_open_round() -> None:
    harness = Harness.create(config(rounds=5, sync=SyncPolicy(min_agents=1)))
    harness.online("a")
    harness.update("a", 1, delta(1))
    harness.update("a", 2, delta(2))
    assert harness.coordinator.round == 3
    assert _restore(harness, rounds=3).round == 3  # ends after the round under way
    with pytest.raises(ConfigError, match=r"rounds = 2 is below round 3.*set rounds >= 3"):
        _restore(harness, rounds=2)
