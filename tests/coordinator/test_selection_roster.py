"""Who is online (statuses, last wills, missed heartbeats) and who gets selected."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.support import T0, status
from fedmq.coordinator.roster import Roster
from fedmq.coordinator.selection import SelectAll, SelectFraction, SelectList, select
from fedmq.errors import ConfigError


def test_an_agent_is_online_until_it_says_offline() -> None:
    roster = Roster()
    roster.update(status("a"), T0)
    assert roster.online(T0 + 1) == ["a"]
    roster.update(status("a", "offline"), T0 + 2)
    assert roster.online(T0 + 2) == []
    assert roster.is_known("a")


def test_an_agent_expires_after_three_missed_heartbeats() -> None:
    roster = Roster(missed_heartbeats=3)
    roster.update(status("a", heartbeat_s=2.0), T0)
    assert roster.is_online("a", T0 + 5.9)
    assert not roster.is_online("a", T0 + 6.0)
    assert roster.next_expiry(T0) == T0 + 6.0
    roster.update(status("a", heartbeat_s=2.0), T0 + 5)  # a heartbeat: alive again
    assert roster.is_online("a", T0 + 10)


def test_status_without_heartbeat_uses_the_default() -> None:
    roster = Roster(default_heartbeat_s=10.0)
    roster.update(status("a").model_copy(update={"heartbeat_s": None}), T0)
    assert roster.expires_at("a") == T0 + 30.0


def test_an_allow_list_ignores_strangers() -> None:
    roster = Roster(allowed=["a"])
    assert not roster.update(status("b"), T0)
    assert roster.update(status("a"), T0)
    assert roster.online(T0) == ["a"]
    assert not roster.is_known("b")


def test_a_deleted_status_forgets_the_agent() -> None:
    roster = Roster()
    roster.update(status("a"), T0)
    roster.forget("a")
    assert not roster.is_known("a")


def test_select_all_and_list() -> None:
    online = ["c", "a", "b"]
    assert select(SelectAll(), online, 1) == ["a", "b", "c"]
    assert select(SelectList(frozenset({"b", "z"})), online, 1) == ["b"]


@given(
    agents=st.lists(
        st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=1, max_size=40, unique=True
    ),
    fraction=st.floats(0.01, 1.0),
    round_id=st.integers(1, 1000),
    minimum=st.integers(1, 5),
)
def test_fraction_is_seeded_sized_and_a_subset(
    agents: list[str], fraction: float, round_id: int, minimum: int
) -> None:
    policy = SelectFraction(fraction, seed=42)
    chosen = select(policy, agents, round_id, minimum)
    assert chosen == select(policy, list(reversed(agents)), round_id, minimum)  # order-free
    assert set(chosen) <= set(agents)
    expected = min(len(agents), max(minimum, -(-int(fraction * 1e9) * len(agents) // int(1e9))))
    assert abs(len(chosen) - expected) <= 1  # ceil of a float product
    assert len(chosen) >= min(minimum, len(agents))


def test_fraction_varies_with_round_and_seed() -> None:
    agents = [f"dev-{i}" for i in range(50)]
    draws = {tuple(select(SelectFraction(0.2, seed), agents, r)) for seed in (1, 2) for r in (1, 2)}
    assert len(draws) == 4


@pytest.mark.parametrize("make", [lambda: SelectFraction(0.0), lambda: SelectList(frozenset())])
def test_bad_selections_are_config_errors(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError):
        make()
