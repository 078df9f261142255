"""Jittered exponential backoff, shared by every retry loop in fedmq.

A plant restarts hundreds of devices at once (a broker restart, a power dip): retries
that wait the same delay would arrive in lockstep and knock the broker over again, so
every delay is drawn at random from the upper half of its exponential ceiling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

BACKOFF_INITIAL = 0.2  # seconds: a restarted broker is usually back within a second
BACKOFF_MAX = 30.0  # seconds: caps reconnect storms from a plant full of devices


@dataclass
class Backoff:
    """Capped exponential backoff with "equal jitter".

    The n-th delay is uniform in ``[c/2, c]`` with ``c = min(maximum, initial *
    factor**n)``: random enough that no two devices retry in lockstep, and never shorter
    than half the ceiling (a delay drawn from ``[0, c]`` may be zero), so a fleet backs
    off for real.
    """

    initial: float = BACKOFF_INITIAL
    maximum: float = BACKOFF_MAX
    factor: float = 2.0
    _attempt: int = field(default=0, init=False)
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt."""
        ceiling = min(self.maximum, self.initial * self.factor**self._attempt)
        self._attempt += 1
        return self._random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """Start over after a success."""
        self._attempt = 0
