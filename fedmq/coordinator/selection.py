"""Which online agents a synchronous round asks to train."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from fedmq.errors import ConfigError


@dataclass(frozen=True)
class SelectAll:
    """Every agent online when the round opens."""


@dataclass(frozen=True)
class SelectFraction:
    """A seeded random fraction of the online agents (at least ``minimum`` of them).

    The draw depends only on ``seed``, the round and the sorted online set, so a
    replayed round selects the same agents.
    """

    fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"selection fraction {self.fraction} must be in (0, 1]")


@dataclass(frozen=True)
class SelectList:
    """The listed agents that are online when the round opens."""

    agents: frozenset[str]

    def __post_init__(self) -> None:
        if not self.agents:
            raise ConfigError("selection list is empty: name at least one agent")


Selection = SelectAll | SelectFraction | SelectList


def eligible(policy: Selection, online: Iterable[str]) -> list[str]:
    """Online agents the policy may choose from, sorted."""
    agents = sorted(set(online))
    if isinstance(policy, SelectList):
        return [agent for agent in agents if agent in policy.agents]
    return agents


def select(policy: Selection, online: Iterable[str], round_id: int, minimum: int = 1) -> list[str]:
    """Choose the agents of round ``round_id`` among ``online``.

    Args:
        policy: how to choose.
        online: agents currently online.
        round_id: the round (seeds the fraction draw).
        minimum: a fraction never selects fewer than this (the quorum), if available.

    Returns:
        The selected agents, sorted.
    """
    candidates = eligible(policy, online)
    if not isinstance(policy, SelectFraction):
        return candidates
    count = min(len(candidates), max(minimum, math.ceil(policy.fraction * len(candidates))))
    # random.Random seeded with a str hashes it with SHA-512: stable across processes.
    rng = random.Random(f"fedmq-selection:{policy.seed}:{round_id}")
    return sorted(rng.sample(candidates, count))
