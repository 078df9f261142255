"""Crash safety in memory: restoring from the last snapshot + stored updates, at any point,
ends in exactly the model of an uninterrupted run, with every update counted once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.support import T0, Harness, config, delta, envelope, schema
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.policy import SyncPolicy
from fedmq.coordinator.validation import verify_update
from fedmq.errors import ConfigError, StateError
from fedmq.strategies.config import StrategyConfig, build_strategy

ROUNDS = 3
AGENTS = ("a", "b", "c")
STRATEGY = StrategyConfig(name="fedadam", eta=0.05)  # server state must survive the crash too


@dataclass(frozen=True)
class Send:
    client: str
    round: int
    uid: str
    data: bytes


def _script() -> list[Send]:
    sends = []
    for round_id in range(1, ROUNDS + 1):
        for i, client in enumerate(AGENTS):
            uid, data = envelope(client, round_id, delta(round_id * 10 + i), examples=5 + i)
            sends.append(Send(client, round_id, uid, data))
    return sends


def _config() -> Any:
    return config(rounds=ROUNDS, settle_s=1.0, sync=SyncPolicy(min_agents=3))


def _fresh() -> Harness:
    harness = Harness.create(_config(), build_strategy(STRATEGY))
    harness.online(*AGENTS)
    harness.advance(1.0)  # the settle period
    return harness


def _run(harness: Harness, sends: list[Send]) -> None:
    for send in sends:
        harness.send(send.data, send.client, send.round, send.uid)


def _restart(crashed: Harness) -> Harness:
    """What the service does on start: last snapshot, its checkpoint, the open round's updates."""
    snapshot = crashed.snapshots[-1]
    checkpoint = crashed.checkpoints[snapshot["checkpoint"]]
    coordinator = Coordinator.restore(
        _config(),
        build_strategy(STRATEGY),
        schema(),
        b"bundle-archive",
        snapshot,
        checkpoint.params,
        checkpoint.optimizer,
        now=crashed.now,
    )
    harness = Harness(coordinator, now=crashed.now)
    for ticket in sorted(crashed.stored, key=lambda t: t.seq):
        if ticket.fold_round != snapshot["round"] or snapshot["phase"] == "finished":
            continue  # pruned: folded into a checkpoint already
        result = verify_update(ticket.key, ticket.update.data, coordinator.schema)
        harness.run(coordinator.replay(result, ticket.seq, harness.now))  # type: ignore[arg-type]
    harness.run(coordinator.start(harness.now))
    harness.online(*AGENTS)  # retained statuses arrive during the settle period
    harness.advance(1.0)
    return harness


def _final(harness: Harness) -> dict[str, np.ndarray]:
    assert harness.coordinator.phase == "finished"
    return harness.coordinator.params


@settings(max_examples=25, deadline=None)
@given(crash_after=st.integers(0, ROUNDS * len(AGENTS)), stored_unacked=st.booleans())
def test_restart_at_any_point_gives_the_uninterrupted_model(
    crash_after: int, stored_unacked: bool
) -> None:
    sends = _script()
    reference = _fresh()
    _run(reference, sends)

    crashed = _fresh()
    _run(crashed, sends[:crash_after])
    resend_from = crash_after
    if stored_unacked and crash_after < len(sends):
        # The next update is stored durably, then the process dies before acking it.
        crashed.hold_persist = True
        _run(crashed, sends[crash_after : crash_after + 1])
        assert crashed.pending, "the update should be waiting for persisted()"
        resend_from = crash_after  # unacked: the agent sends it again

    restarted = _restart(crashed)
    # Agents re-send everything not acked, plus one already-acked update (a QoS 1 redelivery).
    if crash_after:
        _run(restarted, sends[crash_after - 1 : crash_after])
    _run(restarted, sends[resend_from:])

    for name, value in _final(reference).items():
        np.testing.assert_array_equal(_final(restarted)[name], value)
    records = {r.round: r for r in [*crashed.records, *restarted.records]}
    for record in records.values():
        keys = [(c.client, c.update_id) for c in record.contributions]
        assert len(keys) == len(set(keys)) == len(AGENTS)


def test_a_replayed_update_is_acked_again() -> None:
    crashed = _fresh()
    send = _script()[0]
    crashed.hold_persist = True
    _run(crashed, [send])
    assert crashed.acks() == []
    restarted = _restart(crashed)
    assert [(a.update_id, a.reason) for a in restarted.acks()] == [(send.uid, "accepted")]


def test_restore_refuses_another_federation_or_bundle() -> None:
    crashed = _fresh()
    snapshot = crashed.snapshots[-1]
    checkpoint = crashed.checkpoints[0]
    with pytest.raises(ConfigError, match="bundle"):
        Coordinator.restore(
            _config(),
            build_strategy(STRATEGY),
            schema(),
            b"another bundle",
            snapshot,
            checkpoint.params,
            checkpoint.optimizer,
            now=T0,
        )
    with pytest.raises(StateError, match="checkpoint"):
        Coordinator.restore(
            _config(),
            build_strategy(STRATEGY),
            schema(),
            b"bundle-archive",
            snapshot,
            b"garbage",
            checkpoint.optimizer,
            now=T0,
        )
    with pytest.raises(StateError, match="version"):
        Coordinator.restore(
            _config(),
            build_strategy(STRATEGY),
            schema(),
            b"bundle-archive",
            {"v": 99},
            checkpoint.params,
            checkpoint.optimizer,
            now=T0,
        )


def test_a_deadline_missed_while_down_waits_for_queued_resends() -> None:
    crashed = _fresh()
    first = _script()[0]
    _run(crashed, [first])
    restarted_at = crashed.now + 1000  # down far past the 300 s deadline
    snapshot = crashed.snapshots[-1]
    checkpoint = crashed.checkpoints[snapshot["checkpoint"]]
    coordinator = Coordinator.restore(
        _config(),
        build_strategy(STRATEGY),
        schema(),
        b"bundle-archive",
        snapshot,
        checkpoint.params,
        checkpoint.optimizer,
        now=restarted_at,
    )
    harness = Harness(coordinator, now=restarted_at)
    for ticket in crashed.stored:
        result = verify_update(ticket.key, ticket.update.data, coordinator.schema)
        harness.run(coordinator.replay(result, ticket.seq, harness.now))  # type: ignore[arg-type]
    harness.run(coordinator.start(harness.now))
    assert harness.closed == []  # not judged before the settle period
    harness.online(*AGENTS)
    for send in _script()[1:3]:  # the broker delivers the queued updates
        harness.send(send.data, send.client, send.round, send.uid)
    assert [c.reason for c in harness.closed] == ["target"]
