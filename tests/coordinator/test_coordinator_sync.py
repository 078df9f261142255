"""Synchronous rounds: open, collect, close at target/deadline/dropouts, extend, fail, finish."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.support import SHAPES, T0, Harness, config, delta, envelope, initial_params
from fedmq.coordinator.actions import (
    ClearBlob,
    PersistUpdate,
    Publish,
    PublishBlob,
    SaveCheckpoint,
    SaveState,
)
from fedmq.coordinator.policy import SyncPolicy, TargetMetric
from fedmq.coordinator.selection import SelectFraction
from fedmq.strategies.config import StrategyConfig, build_strategy
from fedmq.wire.control import AggregatorStatus, decode_control
from fedmq.wire.tensors import decode_tensors


def _harness(rounds: int = 3, **policy: object) -> Harness:
    values: dict[str, object] = {"min_agents": 3}
    values.update(policy)
    harness = Harness.create(config(rounds=rounds, sync=SyncPolicy(**values)))  # type: ignore[arg-type]
    harness.online("a", "b", "c")
    return harness


def _mean(
    base: dict[str, np.ndarray], pairs: list[tuple[float, dict[str, np.ndarray]]]
) -> dict[str, np.ndarray]:
    total = sum(w for w, _ in pairs)
    return {
        name: base[name] + sum(np.float64(w) * d[name] for w, d in pairs) / total for name in SHAPES
    }


def test_a_round_waits_for_enough_agents_then_announces() -> None:
    harness = Harness.create(config(sync=SyncPolicy(min_agents=2)))
    assert harness.coordinator.phase == "waiting"
    harness.online("a")
    # Retained from the start: round 1 waits, which addresses nobody (it replaces any
    # announcement an earlier run left on the broker).
    [waiting] = harness.announcements()
    assert (waiting.round, waiting.status) == (1, "waiting")
    assert not waiting.addresses("a")
    harness.online("b")
    waiting_again, announcement = harness.announcements()
    assert waiting_again == waiting
    assert announcement.status == "open"
    assert announcement.round == 1
    assert announcement.selected == ["a", "b"]
    assert announcement.deadline == T0 + 300
    assert announcement.params.sha256 == harness.blobs[-1].ref.sha256 or any(
        b.ref == announcement.params for b in harness.blobs
    )


def test_a_closed_round_is_not_left_announced_while_the_next_one_waits() -> None:
    harness = Harness.create(config(sync=SyncPolicy(min_agents=3, min_updates=2)))
    harness.online("a", "b", "c")
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    harness.status("c", "offline")  # its last will: round 1 stops waiting for it
    harness.advance(5.0)
    assert [c.reason for c in harness.closed] == ["dropouts"]
    latest = harness.announcements()[-1]
    # Two agents online, three needed: round 2 waits.  An agent connecting now must
    # not find round 1 still announced: it no longer takes updates.
    assert (latest.round, latest.status) == (2, "waiting")
    assert not latest.addresses("a")
    assert latest.params.sha256 != harness.announcements()[0].params.sha256  # new model
    harness.online("c")
    assert harness.announcements()[-1].status == "open"


def test_the_first_round_waits_for_the_settle_period() -> None:
    harness = Harness.create(config(settle_s=2.0))
    harness.online("a")
    assert harness.coordinator.phase == "waiting"
    assert harness.timer == T0 + 2.0
    harness.advance(2.0)
    assert harness.coordinator.phase == "collecting"


def test_a_round_closes_when_the_target_arrives() -> None:
    harness = _harness(target_updates=2)
    harness.update("a", 1, delta(1), examples=10)
    assert harness.closed == []
    harness.update("b", 1, delta(2), examples=30)
    [closed] = harness.closed
    assert (closed.round, closed.outcome, closed.reason) == (1, "closed", "target")
    expected = _mean(initial_params(), [(10, delta(1)), (30, delta(2))])
    for name in SHAPES:
        np.testing.assert_allclose(harness.coordinator.params[name], expected[name], rtol=1e-5)
    assert harness.coordinator.round == 2
    late = harness.update("c", 1, delta(3))
    assert [a.reason for a in harness.acks("c") if a.update_id == late] == ["stale_round"]


def test_the_deadline_closes_a_round_with_quorum() -> None:
    harness = _harness(min_updates=2, deadline_s=60)
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    harness.advance(59)
    assert harness.closed == []
    harness.advance(1)
    assert [(c.outcome, c.reason) for c in harness.closed] == [("closed", "deadline")]


def test_below_quorum_the_deadline_is_extended_once_then_the_round_fails() -> None:
    harness = _harness(min_updates=2, deadline_s=60, extension_s=30)
    harness.update("a", 1, delta(1))
    harness.advance(60)
    assert harness.closed == []
    extended = harness.announcements()[-1]
    assert (extended.round, extended.deadline) == (1, T0 + 90)
    harness.advance(30)
    [failed] = harness.closed
    assert (failed.outcome, failed.reason) == ("failed", "no_quorum")
    # The model did not move, the next round started from the same parameters.
    assert harness.checkpoints[1].params == harness.checkpoints[0].params
    assert harness.announcements()[-1].round == 2
    assert harness.records[-1].extended


def test_an_agent_gone_offline_is_not_waited_for() -> None:
    harness = _harness(min_updates=2)
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    assert harness.closed == []
    harness.status("c", "offline")  # its last will
    assert harness.timer == harness.now + 5.0  # the dropout grace
    harness.advance(5.0)
    assert [(c.outcome, c.reason) for c in harness.closed] == [("closed", "dropouts")]


def test_after_our_reconnect_a_wave_of_last_wills_does_not_close_the_round() -> None:
    # A broker restart fires every agent's last will; agents reconnect with a backoff
    # that can exceed a short dropout grace.
    harness = Harness.create(
        config(dropout_grace_s=0.5, reconnect_settle_s=5.0, sync=SyncPolicy(min_agents=3))
    )
    harness.online("a", "b", "c")
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    harness.run(harness.coordinator.republish(harness.now))  # we reconnected
    harness.status("c", "offline")
    harness.advance(4.0)  # far past the grace, still within the reconnect settle
    assert harness.closed == []
    harness.online("c")
    harness.update("c", 1, delta(3))
    assert [c.reason for c in harness.closed] == ["target"]


def test_without_a_reconnect_the_dropout_grace_alone_applies() -> None:
    harness = Harness.create(
        config(dropout_grace_s=0.5, reconnect_settle_s=5.0, sync=SyncPolicy(min_agents=3))
    )
    harness.online("a", "b", "c")
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    harness.status("c", "offline")
    harness.advance(1.0)
    assert [c.reason for c in harness.closed] == ["dropouts"]


def test_an_agent_back_within_the_grace_is_still_waited_for() -> None:
    # A broker restart fires every agent's last will; they reconnect within seconds.
    harness = _harness(min_updates=2)
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    harness.status("c", "offline")
    harness.advance(2.0)
    harness.status("c")
    harness.advance(60.0)
    assert harness.closed == []
    harness.update("c", 1, delta(3))
    assert [c.reason for c in harness.closed] == ["target"]


def test_an_agent_with_missed_heartbeats_is_not_waited_for() -> None:
    harness = Harness.create(config(sync=SyncPolicy(min_agents=3, min_updates=2)))
    harness.online("a", "b")
    harness.status("c", heartbeat_s=1.0)
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    harness.silence("c")
    assert harness.timer == T0 + 3.0  # c's third missed heartbeat
    harness.advance(3.0)
    assert [c.reason for c in harness.closed] == ["dropouts"]


def test_a_dropped_agent_below_quorum_may_still_come_back() -> None:
    harness = _harness(min_updates=3)
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    harness.status("c", "offline")
    assert harness.closed == []  # below quorum: wait for the deadline, c may return
    harness.advance(100)
    assert harness.closed == []
    harness.status("c")
    harness.update("c", 1, delta(3))
    assert [c.reason for c in harness.closed] == ["target"]


def test_when_every_selected_agent_answered_below_quorum_the_round_fails_at_once() -> None:
    harness = _harness(min_updates=2)
    bad = {name: np.full(shape, np.nan, np.float32) for name, shape in SHAPES.items()}
    harness.update("a", 1, delta(1))
    harness.update("b", 1, bad)
    assert harness.closed == []
    harness.update("c", 1, bad)
    assert [(c.outcome, c.reason) for c in harness.closed] == [("failed", "no_quorum")]
    assert harness.records[-1].rejected == {"non_finite": 2}


def test_rejections_are_acked_counted_and_the_round_goes_on() -> None:
    harness = _harness(target_updates=3, selection=SelectFraction(1.0))
    good = harness.update("a", 1, delta(1))
    harness.update("a", 1, delta(1), update_id=good)  # re-send: duplicate, counted once
    harness.update("a", 1, delta(5))  # a second update of a in round 1
    harness.update("stranger", 1, delta(2))
    harness.update("b", 2, delta(2))
    harness.update("b", 1, {k: v for k, v in delta(2).items() if k != "bn.mean"})
    verdicts = [(a.client, a.accepted, a.reason) for a in harness.acks()]
    assert verdicts == [
        ("a", True, "accepted"),
        ("a", True, "duplicate"),
        ("a", False, "duplicate"),
        ("stranger", False, "unknown_client"),
        ("b", False, "future_round"),
        ("b", False, "wrong_shape"),
    ]
    status = harness.coordinator.status(harness.now)
    assert status.rejected == {
        "duplicate": 1,
        "unknown_client": 1,
        "future_round": 1,
        "wrong_shape": 1,
    }
    assert (status.received, status.expected) == (1, 3)
    harness.update("b", 1, delta(2))
    harness.update("c", 1, delta(3))
    assert [c.reason for c in harness.closed] == ["target"]
    assert len(harness.records[0].contributions) == 3


def test_not_selected_agents_are_refused() -> None:
    harness = Harness.create(
        config(sync=SyncPolicy(min_agents=4, selection=SelectFraction(0.5, seed=1)))
    )
    harness.online("a", "b", "c", "d")
    selected = harness.coordinator.selected
    assert selected is not None
    assert len(selected) == 2
    outsider = next(c for c in "abcd" if c not in selected)
    harness.update(outsider, 1, delta(1))
    assert harness.acks(outsider)[-1].reason == "not_selected"


def test_late_updates_are_dropped_by_default() -> None:
    harness = _harness(target_updates=2)
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    harness.update("c", 1, delta(3))
    assert harness.acks("c")[-1].reason == "stale_round"


def test_late_updates_can_fold_into_the_next_round_with_a_staleness_weight() -> None:
    harness = _harness(target_updates=2, late_updates="fold")
    harness.update("a", 1, delta(1), examples=10)
    harness.update("b", 1, delta(2), examples=10)
    after_round_1 = {k: v.copy() for k, v in harness.coordinator.params.items()}
    harness.update("c", 1, delta(3), examples=20)  # late: trained on round 1's model
    assert harness.acks("c")[-1].reason == "accepted"
    assert harness.closed[-1].round == 1  # late updates never close a round
    harness.update("a", 2, delta(4), examples=10)
    harness.update("b", 2, delta(5), examples=10)
    late_weight = 20 / np.sqrt(2)
    expected = _mean(after_round_1, [(late_weight, delta(3)), (10, delta(4)), (10, delta(5))])
    for name in SHAPES:
        np.testing.assert_allclose(harness.coordinator.params[name], expected[name], rtol=1e-5)
    record = harness.records[-1]
    assert [(c.client, c.staleness) for c in record.contributions] == [("c", 1), ("a", 0), ("b", 0)]
    assert record.contributions[0].weight == pytest.approx(late_weight)


def test_an_unseen_sender_is_not_rejected_while_statuses_settle() -> None:
    harness = Harness.create(config(settle_s=5.0, sync=SyncPolicy(min_agents=1)))
    harness.update("a", 1, delta(1))
    assert harness.acks() == []  # silently dropped: the agent re-sends after its ack timeout
    harness.advance(5)
    harness.update("x", 1, delta(1))
    assert harness.acks("x")[-1].reason == "unknown_client"


def test_the_federation_finishes_after_its_rounds_or_at_a_target_metric() -> None:
    harness = Harness.create(
        config(
            rounds=5,
            sync=SyncPolicy(min_agents=2),
            target_metric=TargetMetric("eval_accuracy", 0.9),
        )
    )
    harness.online("a", "b")
    harness.update("a", 1, delta(1), examples=1, metrics={"eval_accuracy": 0.5})
    harness.update("b", 1, delta(2), examples=1, metrics={"eval_accuracy": 0.9})
    assert harness.finished == []
    assert harness.records[-1].metrics["eval_accuracy"] == pytest.approx(0.7)
    harness.update("a", 2, delta(1), examples=3, metrics={"eval_accuracy": 0.95})
    harness.update("b", 2, delta(2), examples=1, metrics={"eval_accuracy": 0.85})
    assert [f.reason for f in harness.finished] == ["eval_accuracy reached 0.9"]
    final = harness.announcements()[-1]
    assert final.status == "finished"
    assert decode_tensors(harness.coordinator.params_blob).keys() == initial_params().keys()
    assert final.params == harness.coordinator.params_ref
    late = harness.update("a", 2, delta(3))
    assert [a.reason for a in harness.acks("a") if a.update_id == late] == ["round_closed"]


def test_state_is_saved_before_blobs_and_the_announcement_and_old_blobs_are_cleared() -> None:
    harness = _harness(target_updates=3, rounds=2)
    for client, seed in zip("abc", (1, 2, 3), strict=True):
        harness.update(client, 1, delta(seed))
    log = harness.log
    checkpoint = next(
        i for i, a in enumerate(log) if isinstance(a, SaveCheckpoint) and a.round == 1
    )
    announce = next(
        i
        for i, a in enumerate(log)
        if isinstance(a, Publish) and a.topic.endswith("/round") and i > checkpoint
    )
    new_blob = next(i for i, a in enumerate(log) if isinstance(a, PublishBlob) and i > checkpoint)
    saved = [i for i, a in enumerate(log) if isinstance(a, SaveState) and checkpoint < i < new_blob]
    assert saved
    assert new_blob < announce
    cleared = [a for a in log[announce:] if isinstance(a, ClearBlob)]
    first_params = harness.announcements()[0].params
    assert [c.ref for c in cleared] == [first_params]
    assert harness.coordinator.bundle_ref not in [c.ref for c in harness.cleared]
    # Blob bookkeeping survives a restart: the snapshot lists exactly what is retained.
    shas = {ref["sha256"] for ref in harness.snapshots[-1]["blobs"]}
    assert shas == {harness.coordinator.bundle_ref.sha256, harness.coordinator.params_ref.sha256}


def test_a_round_does_not_close_while_an_accepted_update_is_being_stored() -> None:
    harness = _harness(min_updates=1, deadline_s=10)
    harness.hold_persist = True
    harness.update("a", 1, delta(1))
    assert harness.acks() == []  # not durable yet: no ack
    harness.advance(20)
    assert harness.closed == []  # past the deadline, but the update is still being stored
    harness.release()
    assert harness.acks("a")[-1].reason == "accepted"
    assert [c.reason for c in harness.closed] == ["deadline"]


def test_a_failed_store_is_not_acked() -> None:
    harness = _harness()
    harness.hold_persist = True
    harness.update("a", 1, delta(1))
    [ticket] = harness.pending
    harness.pending = []
    harness.run(harness.coordinator.persist_failed(ticket, "disk full", harness.now))
    assert harness.acks() == []
    assert harness.coordinator.accepted == 0
    harness.hold_persist = False
    uid = ticket.key.update_id
    _, data = envelope("a", 1, delta(1), update_id=uid)
    harness.send(data, "a", 1, uid)  # the agent re-sends after its ack timeout
    assert harness.acks("a")[-1].reason == "accepted"


def test_status_reports_progress() -> None:
    harness = _harness(target_updates=3)
    harness.update("a", 1, delta(1))
    status = harness.coordinator.status(harness.now)
    assert isinstance(status, AggregatorStatus)
    assert (status.state, status.round, status.received, status.expected) == (
        "collecting",
        1,
        1,
        3,
    )
    assert status.deadline == T0 + 300
    assert any(isinstance(a, PersistUpdate) for a in harness.log)
    shutdown = harness.coordinator.shutdown(harness.now)
    assert decode_control(shutdown[0].payload, AggregatorStatus).state == "offline"  # type: ignore[union-attr]


def test_two_updates_of_one_agent_in_flight_count_once() -> None:
    harness = _harness()
    harness.hold_persist = True
    harness.update("a", 1, delta(1))
    harness.update("a", 1, delta(2))  # another training run, while the first is stored
    assert [a.reason for a in harness.acks("a")] == ["duplicate"]
    harness.release()
    assert harness.coordinator.accepted == 1


def test_a_strategy_that_cannot_aggregate_fails_the_round_not_the_service() -> None:
    strategy = build_strategy(StrategyConfig(name="krum", byzantine=1))
    harness = Harness.create(config(sync=SyncPolicy(min_agents=2)), strategy)
    harness.online("a", "b")
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))  # Krum with f=1 needs 4 updates
    assert [(c.outcome, c.reason) for c in harness.closed] == [("failed", "strategy")]
    assert harness.coordinator.round == 2
