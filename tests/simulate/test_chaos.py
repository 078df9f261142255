"""Which devices vanish in a round: repeatable per seed and round, never everyone alive."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from fedmq.simulate.chaos import choose_victims, victim_count

SIX = [f"agent-{index:03d}" for index in range(6)]


def test_a_seed_and_round_always_pick_the_same_victims() -> None:
    # Pinned: a run with --seed 0 drops these, today and in every later version.
    assert choose_victims(SIX, set(SIX), drop_rate=1 / 3, seed=0, round_id=1) == [
        "agent-003",
        "agent-004",
    ]
    assert choose_victims(SIX, set(SIX), drop_rate=1 / 3, seed=0, round_id=2) == [
        "agent-002",
        "agent-004",
    ]
    assert choose_victims(SIX, set(SIX), drop_rate=1 / 3, seed=7, round_id=1) == [
        "agent-000",
        "agent-004",
    ]


def test_victims_are_drawn_from_the_live_agents_in_selection_order() -> None:
    alive = ["agent-000", "agent-002", "agent-005"]
    victims = choose_victims(SIX, set(alive), drop_rate=1 / 3, seed=0, round_id=1)
    assert victims == sorted(random.Random("0/1").sample(alive, 2))


def test_nobody_vanishes_without_a_rate_or_with_one_agent_alive() -> None:
    assert choose_victims(SIX, set(SIX), drop_rate=0, seed=0, round_id=1) == []
    assert choose_victims(SIX, {"agent-001"}, drop_rate=0.5, seed=0, round_id=1) == []
    assert choose_victims(SIX, set(), drop_rate=0.5, seed=0, round_id=1) == []
    assert choose_victims(["agent-000"], {"agent-000"}, drop_rate=0.9, seed=0, round_id=1) == []


@given(
    st.integers(1, 50),
    st.sets(st.integers(0, 49)),
    st.floats(0, 0.999),
    st.integers(0, 2**32),
    st.integers(1, 1000),
)
def test_victims_are_live_selected_agents_and_one_live_agent_is_spared(
    selected_count: int, alive_indices: set[int], rate: float, seed: int, round_id: int
) -> None:
    selected = [f"agent-{index:03d}" for index in range(selected_count)]
    alive = {f"agent-{index:03d}" for index in alive_indices}
    victims = choose_victims(selected, alive, drop_rate=rate, seed=seed, round_id=round_id)
    assert victims == sorted(set(victims))
    assert set(victims) <= alive & set(selected)
    live = len(alive & set(selected))
    assert len(victims) == max(0, min(victim_count(rate, selected_count), live - 1))
    assert victims == choose_victims(selected, alive, drop_rate=rate, seed=seed, round_id=round_id)
