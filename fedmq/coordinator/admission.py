"""Whether an update may count in the current round: the coordinator's admission rules.

Pure functions of the round, the recent history and the policy; the coordinator applies
them once on an update's first chunk (to refuse hopeless updates before buffering them)
and again on the verified update (the round may have moved on meanwhile).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from fedmq.coordinator.actions import Ticket
from fedmq.coordinator.history import History
from fedmq.coordinator.intake import Verdict
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.records import Contribution
from fedmq.coordinator.validation import UpdateKey

Phase = Literal["waiting", "collecting", "finished"]


@dataclass
class RoundState:
    """The round being collected (or waited for, or the last one once finished)."""

    number: int
    phase: Phase
    opened_at: float = 0.0
    deadline: float = 0.0
    extended: bool = False
    selected: tuple[str, ...] | None = None
    target: int = 0
    contributions: list[Contribution] = field(default_factory=list)
    on_time: set[str] = field(default_factory=set)
    answered: set[str] = field(default_factory=set)
    reserved: dict[tuple[str, str], Ticket] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Accept:
    """The update joins the current round once persisted, with this staleness."""

    staleness: int


@dataclass(frozen=True)
class Ignore:
    """Say nothing (the update is being stored, or its sender's status has not arrived)."""

    why: str


Decision = Accept | Verdict | Ignore


def decide(
    key: UpdateKey,
    base_round: int | None,
    *,
    state: RoundState,
    history: History,
    config: CoordinatorConfig,
    known: bool,
    settling: bool,
) -> Decision:
    """Whether the update ``key`` may count.

    Args:
        key: the update (client, round it answers, update id).
        base_round: the round whose model it trained from; None when only its first chunk
            has arrived (the round is then assumed).
        state: the current round.
        history: recent accepted ids, contributors and selections.
        config: the federation's policy.
        known: whether the sender is a known agent.
        settling: whether statuses may still be arriving after a (re)start.
    """
    accepted_in = history.accepted_in(key.client, key.update_id)
    if accepted_in is not None:
        return Verdict(True, "duplicate", f"update counted in round {accepted_in}")
    if (key.client, key.update_id) in state.reserved:
        return Ignore("already being stored")
    if not known:
        if settling:
            return Ignore("sender not seen yet; waiting for retained statuses")
        return Verdict(False, "unknown_client", f"no status seen from {key.client!r}")
    if state.phase == "finished":
        return Verdict(False, "round_closed", "the federation has finished")
    if key.round > state.number or (key.round == state.number and state.phase == "waiting"):
        return Verdict(False, "future_round", f"round {key.round} is not open")
    base = key.round if base_round is None else base_round
    staleness = state.number - base
    if history.contributed(key.client, key.round) or any(
        t.key.client == key.client and t.key.round == key.round for t in state.reserved.values()
    ):
        return Verdict(False, "duplicate", f"{key.client} already contributed to round {key.round}")
    if config.mode == "async":
        if staleness > config.buffer.max_staleness:
            return Verdict(
                False,
                "stale_round",
                f"model version {base} is {staleness} versions old "
                f"(max {config.buffer.max_staleness})",
            )
        return Accept(staleness)
    if staleness == 0:
        if state.selected is not None and key.client not in state.selected:
            return Verdict(False, "not_selected", f"round {state.number} did not select it")
        return Accept(staleness)
    policy = config.sync
    if policy.late_updates == "drop" or staleness > policy.max_staleness:
        return Verdict(
            False, "stale_round", f"round {key.round} is over; round {state.number} is open"
        )
    remembered, selected = history.selection(key.round)
    if not remembered:
        return Verdict(False, "stale_round", f"round {key.round} is too old")
    if selected is not None and key.client not in selected:
        return Verdict(False, "not_selected", f"round {key.round} did not select it")
    return Accept(staleness)
