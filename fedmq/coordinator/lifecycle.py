"""The round lifecycle: its phases, the legal moves between them, and what each shows.

One table holds every transition the coordinator may make (in the manner of h11's
connection state table); :func:`transition` is the only way the coordinator changes a
round's phase, so an illegal move is a loud bug rather than a silent stuck federation::

    waiting ──open──▶ collecting ──finish──▶ finished
     ▲ ▲                 │  ▲ extend             │
     │ └────advance──────┘  └─┘                  │
     └─────────────────continue──────────────────┘

``advance`` closes (or fails) the round and makes the next one wait for its agents;
``finish`` closes (or fails) the last one.  A round that opens the moment it is
created goes ``waiting → collecting`` within one input.  ``continue`` happens only in
:meth:`~fedmq.coordinator.coordinator.Coordinator.restore`: a finished federation
restarted with more ``rounds`` than it ran waits for the agents of its next round.

The vocabulary is :data:`~fedmq.wire.control.RoundPhase`, shared with the aggregator
status; the retained announcement says ``open`` for ``collecting`` (:data:`ANNOUNCED`).
"""

from __future__ import annotations

from typing import Literal

from fedmq.errors import LocalProtocolError
from fedmq.wire.control import AnnouncedStatus, RoundPhase

Phase = RoundPhase
PHASES: tuple[Phase, ...] = ("waiting", "collecting", "finished")

Move = Literal["open", "extend", "advance", "finish", "continue"]

TRANSITIONS: dict[tuple[Phase, Move], Phase] = {
    ("waiting", "open"): "collecting",  # enough agents online (sync), or at once (async)
    ("collecting", "extend"): "collecting",  # below quorum at the deadline: once (sync)
    ("collecting", "advance"): "waiting",  # closed or failed; the next round waits
    ("collecting", "finish"): "finished",  # the last round closed or failed, or target met
    ("finished", "continue"): "waiting",  # restarted with more rounds (restore only)
}

ANNOUNCED: dict[Phase, AnnouncedStatus] = {
    "waiting": "waiting",  # addresses nobody: agents connecting now do not train
    "collecting": "open",
    "finished": "finished",  # agents go idle
}
"""What the retained announcement says in each phase: the one vocabulary mapping."""


def transition(phase: Phase, move: Move) -> Phase:
    """The phase after ``move`` from ``phase``.

    Raises:
        LocalProtocolError: the move is not legal from ``phase`` (a coordinator bug).
    """
    try:
        return TRANSITIONS[(phase, move)]
    except KeyError:
        raise LocalProtocolError(f"illegal round transition: {move!r} from {phase!r}") from None
