"""When a round opens and closes, and which late updates it takes: one object per mode.

Pure decision functions in the style of :func:`~fedmq.coordinator.admission.decide`:
they look at a snapshot of the round and return a decision; the coordinator executes
it.  The mode is chosen once, by :func:`rules_for`; nothing else branches on it.

Synchronous rounds (:class:`SyncRules`)::

    open     enough eligible agents online; select the cohort, set target and deadline
             (an evaluate-only round asks every eligible agent online, target all of them)
    close    target on-time updates      -> Close("target")
             every outstanding agent gone -> Close("dropouts" / "all_reported") at quorum,
                                            Fail("no_quorum") when nobody is left to wait for
             deadline, quorum            -> Close("deadline")
             deadline, below quorum      -> Extend once, then Fail("no_quorum")

Asynchronous FedBuff versions (:class:`AsyncRules`)::

    open     at once, addressed to everyone, target = buffer size
    close    buffer full                 -> Close("buffer")
             deadline, min_updates       -> Close("deadline"), else Extend (quietly)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedmq.coordinator.history import History
from fedmq.coordinator.intake import Verdict
from fedmq.coordinator.policy import AsyncPolicy, CoordinatorConfig, SyncPolicy
from fedmq.coordinator.selection import eligible, select
from fedmq.coordinator.validation import UpdateKey
from fedmq.wire.control import RoundTask


@dataclass(frozen=True)
class Open:
    """Open the waiting round for ``selected`` (None: anyone) until ``deadline``."""

    selected: tuple[str, ...] | None
    target: int
    deadline: float


@dataclass(frozen=True)
class Close:
    """Aggregate what arrived: the round closes with a new model."""

    reason: str


@dataclass(frozen=True)
class Extend:
    """Keep collecting until ``deadline``.

    ``warning`` is worth a log line (None: routine); ``marks_extended`` records the one
    extension a synchronous round gets below quorum (FedBuff's deadline just moves on).
    """

    deadline: float
    warning: str | None = None
    marks_extended: bool = False


@dataclass(frozen=True)
class Fail:
    """End the round without a new model."""

    reason: str


CloseDecision = Close | Extend | Fail | None


@dataclass(frozen=True)
class Progress:
    """What the close rules look at: the open round's counts and clocks.

    Args:
        number: the round.
        deadline: its current deadline.
        extended: whether the deadline was extended already.
        target: updates that close it early.
        accepted: updates accepted into it, late ones included.
        on_time: agents whose update for this very round was accepted.
        outstanding: selected agents that have not answered yet.
        outstanding_gone: every outstanding agent counts as gone (True when none is).
        settled: the settle period after a (re)start or reconnect is over, so absent
            agents and passed deadlines may be judged.
    """

    number: int
    deadline: float
    extended: bool
    target: int
    accepted: int
    on_time: int
    outstanding: tuple[str, ...]
    outstanding_gone: bool
    settled: bool


@dataclass(frozen=True)
class Accept:
    """The update joins the current round once persisted, with this staleness."""

    staleness: int


class RoundRules(Protocol):
    """The mode-specific part of the round policy."""

    @property
    def max_staleness(self) -> int:
        """Oldest base model (in rounds or versions) an update may be trained on."""

    def task(self, number: int, last: int) -> RoundTask:
        """Whether round ``number`` (of rounds up to ``last``) trains or only evaluates."""

    @property
    def evaluate_final(self) -> bool:
        """Whether the last round evaluates the final model (also after an early stop)."""

    def decide_open(
        self, online: Sequence[str], number: int, now: float, task: RoundTask = "train"
    ) -> Open | None:
        """Whether the waiting round ``number`` opens now, given the agents online."""

    def decide_close(self, progress: Progress, now: float) -> CloseDecision:
        """Whether the collecting round closes, extends, fails or goes on (None)."""

    def admit(
        self,
        key: UpdateKey,
        base: int,
        *,
        number: int,
        selected: tuple[str, ...] | None,
        history: History,
    ) -> Accept | Verdict:
        """Whether an update trained on round ``base``'s model may join round ``number``."""


@dataclass(frozen=True)
class SyncRules:
    """Synchronous rounds: a selected cohort, a deadline, a quorum."""

    policy: SyncPolicy

    @property
    def max_staleness(self) -> int:
        """Late updates may be this many rounds old (when folded at all)."""
        return self.policy.max_staleness

    def task(self, number: int, last: int) -> RoundTask:
        """``evaluate_every`` and ``evaluate_final`` decide (:meth:`SyncPolicy.task`)."""
        return self.policy.task(number, last)

    @property
    def evaluate_final(self) -> bool:
        """``evaluate_final`` of ``[round]``."""
        return self.policy.evaluate_final

    def decide_open(
        self, online: Sequence[str], number: int, now: float, task: RoundTask = "train"
    ) -> Open | None:
        """Open once ``agents_needed`` eligible agents are online.

        An evaluate-only round asks every eligible agent (the point is a figure for each
        device) and waits for all of them: ``target_updates`` is about training.
        """
        policy = self.policy
        candidates = eligible(policy.selection, online)
        if len(candidates) < policy.agents_needed:
            return None
        if task == "evaluate":
            return Open(tuple(candidates), len(candidates), now + policy.deadline_s)
        selected = tuple(select(policy.selection, online, number, policy.min_updates))
        target = min(policy.target_updates or len(selected), len(selected))
        return Open(selected, target, now + policy.deadline_s)

    def decide_close(self, progress: Progress, now: float) -> CloseDecision:
        """Close at the target, when nobody is left to wait for, or at the deadline."""
        policy = self.policy
        on_time = progress.on_time
        if on_time >= progress.target:
            return Close("target")
        if progress.settled and progress.outstanding_gone:
            if on_time >= policy.min_updates:
                return Close("dropouts" if progress.outstanding else "all_reported")
            if not progress.outstanding:
                return Fail("no_quorum")
        # After a restart, give queued re-sends the settle period before judging a
        # deadline that passed while we were down.
        if now < progress.deadline or not progress.settled:
            return None
        if on_time >= policy.min_updates:
            return Close("deadline")
        if not progress.extended:
            deadline = now + (policy.extension_s or policy.deadline_s)
            return Extend(
                deadline,
                f"round {progress.number}: {on_time}/{policy.min_updates} updates "
                f"at the deadline; extended to {deadline:.0f}",
                marks_extended=True,
            )
        return Fail("no_quorum")

    def admit(
        self,
        key: UpdateKey,
        base: int,
        *,
        number: int,
        selected: tuple[str, ...] | None,
        history: History,
    ) -> Accept | Verdict:
        """On time: only from the selected; late: only if folding late updates is on."""
        staleness = number - base
        if staleness == 0:
            if selected is not None and key.client not in selected:
                return Verdict(False, "not_selected", f"round {number} did not select it")
            return Accept(staleness)
        policy = self.policy
        if policy.late_updates == "drop" or staleness > policy.max_staleness:
            return Verdict(
                False, "stale_round", f"round {key.round} is over; round {number} is open"
            )
        remembered, then_selected = history.selection(key.round)
        if not remembered:
            return Verdict(False, "stale_round", f"round {key.round} is too old")
        if then_selected is not None and key.client not in then_selected:
            return Verdict(False, "not_selected", f"round {key.round} did not select it")
        return Accept(staleness)


@dataclass(frozen=True)
class AsyncRules:
    """FedBuff: a new model version every ``buffer_size`` accepted updates."""

    policy: AsyncPolicy

    @property
    def max_staleness(self) -> int:
        """Updates may be trained on a model this many versions old."""
        return self.policy.max_staleness

    def task(self, number: int, last: int) -> RoundTask:
        """Every version trains (evaluate-only rounds are for synchronous rounds)."""
        return "train"

    @property
    def evaluate_final(self) -> bool:
        """Never: a version is always open for training."""
        return False

    def decide_open(
        self, online: Sequence[str], number: int, now: float, task: RoundTask = "train"
    ) -> Open | None:
        """A version is always open to everyone."""
        return Open(None, self.policy.buffer_size, now + self.policy.deadline_s)

    def decide_close(self, progress: Progress, now: float) -> CloseDecision:
        """Aggregate a full buffer, or at the deadline what is there (or wait on)."""
        if progress.accepted >= progress.target:
            return Close("buffer")
        if now < progress.deadline:
            return None
        if progress.accepted >= self.policy.min_updates:
            return Close("deadline")
        return Extend(now + self.policy.deadline_s)

    def admit(
        self,
        key: UpdateKey,
        base: int,
        *,
        number: int,
        selected: tuple[str, ...] | None,
        history: History,
    ) -> Accept | Verdict:
        """Any update on a recent enough model version."""
        staleness = number - base
        if staleness > self.policy.max_staleness:
            return Verdict(
                False,
                "stale_round",
                f"model version {base} is {staleness} versions old "
                f"(max {self.policy.max_staleness})",
            )
        return Accept(staleness)


def rules_for(config: CoordinatorConfig) -> RoundRules:
    """The rules of ``config.mode``: the one place the mode is looked at."""
    if config.mode == "async":
        return AsyncRules(config.buffer)
    return SyncRules(config.sync)
