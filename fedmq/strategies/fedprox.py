"""FedProx (Li et al. 2020): FedAvg on the server, a proximal term on the devices.

The server side of FedProx is FedAvg; what changes is the local objective, which adds
``mu / 2 * ||w - w_global||**2``.  The aggregator sends ``mu`` to the agents in the round's
:class:`~fedmq.wire.training.TrainingConfig` (``prox_mu``); the device runtime adds the
term's gradient ``mu * (w - w_global)`` to every step.
"""

from __future__ import annotations

from fedmq.errors import LocalProtocolError
from fedmq.wire.training import TrainingConfig


def with_prox_mu(training: TrainingConfig, mu: float) -> TrainingConfig:
    """Return ``training`` with ``prox_mu = mu``.

    Raises:
        LocalProtocolError: ``mu`` is negative.
    """
    if mu < 0:
        raise LocalProtocolError(f"FedProx mu {mu} must be >= 0")
    return training.model_copy(update={"prox_mu": float(mu)})
