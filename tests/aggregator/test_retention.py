"""Checkpoint retention: the policy, the store applying it, and a service that restarts
from what the policy left."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.scripted import (
    ScriptedAgent,
    checkpoint_params,
    make_settings,
    random_delta,
    records,
    running_service,
)
from fedmq.aggregator.config import load_settings
from fedmq.aggregator.retention import KEEP_ALL, CheckpointRetention
from fedmq.aggregator.store import StateStore, checkpoint_rounds
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.errors import ConfigError


@pytest.mark.parametrize(
    ("keep_last", "keep_every", "kept"),
    [
        pytest.param(5, 10, {0, 10, 20, 21, 22, 23, 24, 25}, id="defaults"),
        pytest.param(2, 0, {24, 25}, id="last-only"),
        pytest.param(0, 10, {0, 10, 20}, id="every-only"),
        pytest.param(0, 0, set(), id="both-off"),
        pytest.param(0, 1, set(range(26)), id="keep-all"),
        pytest.param(30, 0, set(range(26)), id="more-than-there-are"),
    ],
)
def test_the_policy_keeps_the_last_and_every_nth(
    keep_last: int, keep_every: int, kept: set[int]
) -> None:
    policy = CheckpointRetention(keep_last, keep_every)
    rounds = range(26)
    assert policy.kept(rounds) == kept
    assert policy.prunable(rounds) == sorted(set(rounds) - kept)


def test_protected_rounds_always_stay() -> None:
    policy = CheckpointRetention(keep_last=0, keep_every=0)
    assert policy.prunable(range(6), protect={3}) == [0, 1, 2, 4, 5]
    assert KEEP_ALL.keeps_everything
    with pytest.raises(ValueError, match=">= 0"):
        CheckpointRetention(keep_last=-1)


def _files(state: Path) -> list[str]:
    return sorted(p.name for p in (state / "checkpoints").iterdir())


def test_the_store_prunes_after_writes_but_never_what_recovery_needs(tmp_path: Path) -> None:
    with StateStore(tmp_path, CheckpointRetention(keep_last=1, keep_every=0)) as store:
        store.save_checkpoint(0, b"p0", b"o0")
        store.save_snapshot({"v": 1, "checkpoint": 0})
        store.save_checkpoint(1, b"p1", b"o1")
        # state.json still names checkpoint 0: a crash now restarts from it, so it stays.
        assert store.checkpoints() == [0, 1]
        store.save_snapshot({"v": 1, "checkpoint": 1})  # committed: 0 may go
        assert store.checkpoints() == [1]
        assert _files(tmp_path) == ["000001.optimizer", "000001.params"]
        store.save_checkpoint(2, b"p2", b"o2")
        assert store.checkpoints() == [1, 2]
        assert store.load_checkpoint(1) == (b"p1", b"o1")
    # A new service learns the committed checkpoint from state.json before it prunes.
    with StateStore(tmp_path, CheckpointRetention(keep_last=0, keep_every=0)) as store:
        store.load_snapshot()
        store.save_checkpoint(3, b"p3", b"o3")  # a crash after this write, before the state
        assert store.checkpoints() == [1, 3]


def test_an_optimizer_file_left_by_a_crash_is_removed(tmp_path: Path) -> None:
    with StateStore(tmp_path, CheckpointRetention(keep_last=1, keep_every=0)) as store:
        store.save_checkpoint(1, b"p1", b"o1")
        (tmp_path / "checkpoints" / "000000.optimizer").write_bytes(b"orphan")
        store.save_snapshot({"v": 1, "checkpoint": 1})
        store.save_checkpoint(2, b"p2", b"o2")
        store.save_snapshot({"v": 1, "checkpoint": 2})
        assert _files(tmp_path) == ["000002.optimizer", "000002.params"]


def test_keep_all_never_deletes(tmp_path: Path) -> None:
    with StateStore(tmp_path, KEEP_ALL) as store:
        for round_id in range(4):
            store.save_checkpoint(round_id, b"p", b"o")
            store.save_snapshot({"v": 1, "checkpoint": round_id})
        assert store.checkpoints() == [0, 1, 2, 3]


def test_retention_is_configured_in_federation_toml(tmp_path: Path) -> None:
    base = {"federation": "f", "bundle": str(tmp_path), "state_dir": str(tmp_path), "rounds": 1}
    assert load_settings(None, **base).retention.policy() == CheckpointRetention(5, 10)
    configured = load_settings(None, **base, retention={"keep_last": 0, "keep_every": 3})
    assert configured.retention.policy() == CheckpointRetention(0, 3)
    with pytest.raises(ConfigError, match=r"retention\.keep_last"):
        load_settings(None, **base, retention={"keep_last": -1})


@pytest.mark.broker
@pytest.mark.slow
async def test_after_seven_rounds_only_the_policy_remains_and_a_restart_resumes(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker,
        federation,
        state,
        rounds=7,
        round={"min_agents": 1, "target_updates": 1},
        retention={"keep_last": 2, "keep_every": 3},
    )
    agent = await ScriptedAgent(broker, federation, "a").start()

    async def train(round_id: int) -> None:
        await agent.wait_round(round_id)
        await agent.wait_ack(await agent.send_update(round_id, random_delta(round_id)))

    async with running_service(settings):
        for round_id in range(1, 6):
            await train(round_id)
        await agent.wait_round(6)  # round 5's checkpoint and snapshot are committed
    # Rounds 0..5 written: the last two, and the multiples of 3.
    assert checkpoint_rounds(state) == [0, 3, 4, 5]
    async with running_service(settings):  # restarts from checkpoint 5
        for round_id in (6, 7):
            await train(round_id)
        finished = await agent.wait_round(7, "finished")
    assert checkpoint_rounds(state) == [0, 3, 6, 7]
    assert [r.round for r in records(state)] == list(range(1, 8))  # records are never pruned
    final = checkpoint_params(state, finished)
    assert all(np.isfinite(value).all() for value in final.values())
    await agent.stop()
