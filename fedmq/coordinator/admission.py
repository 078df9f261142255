"""Whether an update may count in the current round: the coordinator's admission rules.

Pure functions of the round, the recent history and the policy; the coordinator applies
them once on an update's first chunk (to refuse hopeless updates before buffering them)
and again on the verified update (the round may have moved on meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.coordinator.history import History
from fedmq.coordinator.intake import Verdict
from fedmq.coordinator.round_state import RoundState
from fedmq.coordinator.rules import Accept, RoundRules
from fedmq.coordinator.validation import UpdateKey


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
    rules: RoundRules,
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
        rules: the mode's rules for on-time and late updates.
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
    if history.contributed(key.client, key.round) or any(
        t.key.client == key.client and t.key.round == key.round for t in state.reserved.values()
    ):
        return Verdict(False, "duplicate", f"{key.client} already contributed to round {key.round}")
    return rules.admit(key, base, number=state.number, selected=state.selected, history=history)
