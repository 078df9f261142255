"""Server optimizers: how the aggregated delta moves the global model.

:class:`ServerOptimizer` is the interface; plain steps live with their paper (FedAvg's
``ServerSgd`` in ``fedavg.py``, FedAvgM's momentum in ``fedavgm.py``).  FedAdam, FedYogi
and FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization") share Algorithm 2
of the paper and differ only in how the second moment ``v`` is updated, so they share
:class:`AdaptiveOptimizer`::

    m <- beta1 * m + (1 - beta1) * delta
    v <- (rule of the optimizer)
    x <- x + eta * m / (sqrt(v) + tau)

``m`` starts at 0 and ``v`` at ``tau**2`` as in the paper; like the paper (and unlike
local Adam) there is no bias correction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from fedmq.errors import LocalProtocolError
from fedmq.strategies.layout import Array, TensorMap

DEFAULT_ETA = 1e-2  # server step: the paper's grid centre for FedAdam/FedYogi on CV tasks
DEFAULT_TAU = 1e-3  # adaptivity floor: the paper's recommended value
DEFAULT_BETA1 = 0.9
DEFAULT_BETA2 = 0.99


class ServerOptimizer(ABC):
    """Moves the global model along the aggregated delta.

    ``delta`` is ``mean(trained - global)`` (a descent direction, i.e. minus the
    pseudo-gradient of Reddi et al. 2021).  Optimizer state (momentum, moments) lives
    here and is checkpointed through :meth:`state_dict`.
    """

    name: ClassVar[str]

    @abstractmethod
    def step(self, params: TensorMap, delta: TensorMap) -> dict[str, Array]:
        """Return new values for the tensors in ``delta`` (``params`` is not modified)."""

    def state_dict(self) -> dict[str, npt.NDArray[np.float32]]:
        """Arrays to checkpoint so a restarted server continues identically."""
        return {}

    def load_state_dict(self, state: Mapping[str, npt.NDArray[np.float32]]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise LocalProtocolError(f"{self.name} keeps no state, got {sorted(state)[:3]}")


class AdaptiveOptimizer(ServerOptimizer):
    """Shared first-moment logic; subclasses define the second-moment rule.

    Args:
        eta: server step size.
        beta1: first-moment decay in [0, 1).
        beta2: second-moment decay in [0, 1) (unused by Adagrad).
        tau: adaptivity floor (> 0); also the initial ``sqrt(v)``.
    """

    name: ClassVar[str]

    def __init__(
        self,
        eta: float = DEFAULT_ETA,
        beta1: float = DEFAULT_BETA1,
        beta2: float = DEFAULT_BETA2,
        tau: float = DEFAULT_TAU,
    ) -> None:
        if not eta > 0 or not tau > 0:
            raise LocalProtocolError(f"eta ({eta}) and tau ({tau}) must be positive")
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= beta < 1:
                raise LocalProtocolError(f"{label} {beta} must be in [0, 1)")
        self.eta = eta
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self._m: dict[str, Array] = {}
        self._v: dict[str, Array] = {}

    @abstractmethod
    def _second_moment(self, v: Array, squared: Array) -> Array:
        """New ``v`` from the previous ``v`` and ``delta**2``."""

    def step(self, params: TensorMap, delta: TensorMap) -> dict[str, Array]:
        """One adaptive step along ``delta``."""
        beta1 = np.float32(self.beta1)
        eta = np.float32(self.eta)
        tau = np.float32(self.tau)
        result: dict[str, Array] = {}
        for name, d in delta.items():
            m = self._m.get(name)
            if m is None:
                m = np.zeros_like(d)
            v = self._v.get(name)
            if v is None:
                v = np.full_like(d, tau * tau)
            m = beta1 * m + (np.float32(1) - beta1) * d
            v = self._second_moment(v, d * d)
            self._m[name] = m
            self._v[name] = v
            step = (eta * m / (np.sqrt(v) + tau)).astype(np.float32, copy=False)
            result[name] = params[name] + step
        return result

    def state_dict(self) -> dict[str, Array]:
        """First and second moments per tensor."""
        state = {f"m/{name}": m for name, m in self._m.items()}
        state.update({f"v/{name}": v for name, v in self._v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        """Restore the moments."""
        m: dict[str, Array] = {}
        v: dict[str, Array] = {}
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name:
                raise LocalProtocolError(f"unexpected {self.name} state entry {key!r}")
            (m if kind == "m" else v)[name] = np.array(value, np.float32)
        self._m, self._v = m, v
