"""The round rules as pure decisions, and the lifecycle's transition table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fedmq.coordinator.lifecycle import ANNOUNCED, PHASES, TRANSITIONS, transition
from fedmq.coordinator.policy import AsyncPolicy, CoordinatorConfig, SyncPolicy
from fedmq.coordinator.rules import (
    AsyncRules,
    Close,
    Extend,
    Fail,
    Open,
    Progress,
    SyncRules,
    rules_for,
)
from fedmq.coordinator.selection import SelectFraction
from fedmq.coordinator.snapshot import SNAPSHOT_VERSION, Snapshot
from fedmq.errors import LocalProtocolError, StateError

NOW = 1000.0
OPEN = Progress(
    number=3,
    deadline=NOW + 10,
    extended=False,
    target=4,
    accepted=0,
    on_time=0,
    outstanding=("a", "b", "c", "d"),
    outstanding_gone=False,
    settled=True,
)


def test_rules_follow_the_mode() -> None:
    assert isinstance(rules_for(CoordinatorConfig("f", "agg", 1)), SyncRules)
    assert isinstance(rules_for(CoordinatorConfig("f", "agg", 1, mode="async")), AsyncRules)


def test_a_sync_round_opens_once_enough_eligible_agents_are_online() -> None:
    rules = SyncRules(SyncPolicy(min_updates=2, deadline_s=30, selection=SelectFraction(0.5)))
    assert rules.decide_open(["a"], 1, NOW) is None
    decision = rules.decide_open(["a", "b", "c", "d"], 1, NOW)
    assert isinstance(decision, Open)
    assert decision.deadline == NOW + 30
    assert decision.selected is not None
    assert len(decision.selected) == 2
    assert decision.target == 2


SYNC = SyncRules(SyncPolicy(min_updates=2, deadline_s=60, extension_s=30))


@pytest.mark.parametrize(
    ("progress", "now", "expected"),
    [
        pytest.param(OPEN, NOW, None, id="collecting"),
        pytest.param(replace(OPEN, on_time=4, accepted=4), NOW, Close("target"), id="target"),
        pytest.param(
            replace(OPEN, on_time=2, outstanding=("c", "d"), outstanding_gone=True),
            NOW,
            Close("dropouts"),
            id="rest-gone-with-quorum",
        ),
        pytest.param(
            replace(OPEN, on_time=2, outstanding=(), outstanding_gone=True, target=3),
            NOW,
            Close("all_reported"),
            id="all-reported",
        ),
        pytest.param(
            replace(OPEN, on_time=1, outstanding=(), outstanding_gone=True),
            NOW,
            Fail("no_quorum"),
            id="nobody-left-below-quorum",
        ),
        pytest.param(
            replace(OPEN, on_time=2, outstanding=("c",), outstanding_gone=True, settled=False),
            NOW,
            None,
            id="gone-but-settling",
        ),
        pytest.param(replace(OPEN, on_time=2), NOW + 10, Close("deadline"), id="deadline"),
        pytest.param(
            replace(OPEN, on_time=1, settled=False), NOW + 10, None, id="deadline-while-settling"
        ),
        pytest.param(replace(OPEN, on_time=1, extended=True), NOW + 10, Fail("no_quorum")),
    ],
)
def test_sync_close_rules(progress: Progress, now: float, expected: object) -> None:
    assert SYNC.decide_close(progress, now) == expected


def test_below_quorum_at_the_deadline_a_sync_round_is_extended_once() -> None:
    decision = SYNC.decide_close(replace(OPEN, on_time=1), NOW + 10)
    assert isinstance(decision, Extend)
    assert decision.deadline == NOW + 10 + 30
    assert decision.marks_extended
    assert decision.warning is not None
    assert "1/2 updates" in decision.warning


ASYNC = AsyncRules(AsyncPolicy(buffer_size=3, min_updates=2, deadline_s=20))


def test_fedbuff_opens_at_once_for_everyone() -> None:
    assert ASYNC.decide_open([], 7, NOW) == Open(None, 3, NOW + 20)


@pytest.mark.parametrize(
    ("accepted", "now", "expected"),
    [
        (0, NOW, None),
        (3, NOW, Close("buffer")),
        (2, NOW + 10, Close("deadline")),
        (1, NOW + 10, Extend(NOW + 10 + 20)),
    ],
)
def test_fedbuff_close_rules(accepted: int, now: float, expected: object) -> None:
    progress = replace(OPEN, target=3, accepted=accepted, outstanding=(), outstanding_gone=True)
    assert ASYNC.decide_close(progress, now) == expected


def test_every_phase_has_a_way_in_and_the_table_only_names_phases() -> None:
    assert set(TRANSITIONS.values()) == set(PHASES)
    assert {phase for phase, _ in TRANSITIONS} <= set(PHASES)
    assert set(ANNOUNCED) == set(PHASES)


@pytest.mark.parametrize(
    ("phase", "move"),
    [("waiting", "extend"), ("waiting", "advance"), ("finished", "open"), ("collecting", "open")],
)
def test_illegal_transitions_are_loud(phase: str, move: str) -> None:
    with pytest.raises(LocalProtocolError, match="illegal round transition"):
        transition(phase, move)  # type: ignore[arg-type]


def test_a_snapshot_of_another_version_or_with_bad_fields_is_refused() -> None:
    with pytest.raises(StateError, match="version 99"):
        Snapshot.from_json({"v": 99})
    with pytest.raises(StateError, match="inconsistent"):
        Snapshot.from_json({"v": SNAPSHOT_VERSION, "phase": "collecting"})
    with pytest.raises(StateError, match="unknown phase"):
        Snapshot.from_json({"v": SNAPSHOT_VERSION, "phase": "aggregating"})
