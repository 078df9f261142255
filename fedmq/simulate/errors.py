"""The simulator's own error (its other failures are fedmq's usual errors)."""

from __future__ import annotations

from fedmq.errors import FedmqError


class SimulationError(FedmqError):
    """The simulation could not complete: a part failed or the rounds stalled."""
