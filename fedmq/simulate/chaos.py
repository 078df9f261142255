"""Which simulated devices vanish in a round (``--drop-rate``): pure decisions.

When a round is announced, ``drop_rate`` of its selected agents vanish at once, before
they can answer (the fleet makes them: :meth:`~fedmq.simulate.fleet.Fleet.crash`).
How many: the rate times the selection, rounded half up, at least one whenever the rate
is positive and never all (:func:`victim_count`).  Which: a sample of the selected
agents still alive, drawn from ``random.Random(f"{seed}/{round}")`` so that a run is
repeatable and rounds are independent of each other (:func:`choose_victims`); at least
one live agent is always spared, so a round can close.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence


def victim_count(drop_rate: float, selected: int) -> int:
    """How many of ``selected`` agents vanish in a round (at least one stays).

    Rounded half up, and at least one whenever ``drop_rate`` is positive, so a small
    fleet still shows a dropout.
    """
    if drop_rate <= 0 or selected < 2:
        return 0
    count = max(1, math.floor(drop_rate * selected + 0.5))
    return min(count, selected - 1)


def choose_victims(
    selected: Sequence[str],
    alive: Collection[str],
    *,
    drop_rate: float,
    seed: int,
    round_id: int,
) -> list[str]:
    """The agents of ``selected`` that vanish when round ``round_id`` opens, sorted.

    Args:
        selected: the round's selection, in the announcement's order.
        alive: the agents running now (a vanished one may still be rebooting).
        drop_rate: the fraction of the selection that vanishes.
        seed: the run's seed.
        round_id: the round.
    """
    candidates = [client for client in selected if client in alive]
    count = min(victim_count(drop_rate, len(selected)), len(candidates) - 1)
    if count <= 0:
        return []
    rng = random.Random(f"{seed}/{round_id}")
    return sorted(rng.sample(candidates, count))
