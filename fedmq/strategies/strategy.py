"""A strategy: aggregator + server optimizer + optional clipping, noise and FedProx mu.

The coordinator drives one :class:`Strategy` per federation::

    strategy.begin_round(round_id, layout)
    strategy.fold(delta, weight)          # once per accepted update, in acceptance order
    new_values = strategy.finalize(global_params)

``finalize`` returns new values for the update tensors only; frozen parameters and
integer buffers are never in an update and keep their global value.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedmq.errors import LocalProtocolError
from fedmq.strategies.aggregator import Aggregator
from fedmq.strategies.central_dp import GaussianNoise
from fedmq.strategies.clipping import clip_update
from fedmq.strategies.fedprox import with_prox_mu
from fedmq.strategies.layout import Array, ModelLayout, TensorMap
from fedmq.strategies.server_optimizer import ServerOptimizer
from fedmq.wire.training import TrainingConfig


class Strategy:
    """How a round's updates become the next global model.

    Args:
        aggregator: combines the round's deltas.
        optimizer: applies the combined delta to the trainable parameters.
        clip_norm: clip every update to this L2 norm before folding (None: no clipping).
        noise: central-DP Gaussian noise on the mean; requires ``clip_norm`` equal to
            ``noise.clip_norm`` and a streaming mean, and weighs updates uniformly.
        prox_mu: FedProx proximal weight sent to agents (0: plain local training).
        name: label for logs and round records.

    Raises:
        LocalProtocolError: an inconsistent combination (noise without clipping, …).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        optimizer: ServerOptimizer,
        *,
        clip_norm: float | None = None,
        noise: GaussianNoise | None = None,
        prox_mu: float = 0.0,
        name: str | None = None,
    ) -> None:
        if clip_norm is not None and not clip_norm > 0:
            raise LocalProtocolError(f"clip norm {clip_norm} must be positive")
        if noise is not None:
            if clip_norm is None or not np.isclose(clip_norm, noise.clip_norm):
                raise LocalProtocolError(
                    "central DP noise is calibrated to the clip norm: set clip_norm to "
                    f"{noise.clip_norm} (got {clip_norm})"
                )
            if not aggregator.streaming:
                raise LocalProtocolError(
                    f"central DP noise is calibrated for the mean, not for {aggregator.name}"
                )
        if prox_mu < 0:
            raise LocalProtocolError(f"FedProx mu {prox_mu} must be >= 0")
        self.aggregator = aggregator
        self.optimizer = optimizer
        self.clip_norm = clip_norm
        self.noise = noise
        self.prox_mu = prox_mu
        self.name = name or f"{aggregator.name}+{optimizer.name}"
        self._round: int | None = None
        self._clipped = 0

    @property
    def streaming(self) -> bool:
        """True when memory stays O(model) however many updates are folded."""
        return self.aggregator.streaming

    @property
    def count(self) -> int:
        """Updates folded this round."""
        return self.aggregator.count

    @property
    def clipped(self) -> int:
        """Updates this round whose norm exceeded the clip norm."""
        return self._clipped

    def training_config(self, base: TrainingConfig) -> TrainingConfig:
        """The training config to announce: ``base`` plus this strategy's ``prox_mu``."""
        if self.prox_mu:
            return with_prox_mu(base, self.prox_mu)
        return base

    def begin_round(self, round_id: int, layout: ModelLayout) -> None:
        """Start folding the updates of ``round_id``."""
        self._round = round_id
        self._clipped = 0
        self.aggregator.begin(layout)

    def fold(self, delta: TensorMap, weight: float) -> float:
        """Fold one validated update; return its L2 norm before clipping (0 if unclipped).

        Args:
            delta: update tensors (``trained - global``) as the layout names them.
            weight: examples times staleness discount; ignored (1) under central DP.
        """
        norm = 0.0
        if self.clip_norm is not None:
            delta, norm = clip_update(delta, self.clip_norm)
            if norm > self.clip_norm:
                self._clipped += 1
        self.aggregator.add(delta, 1.0 if self.noise is not None else weight)
        return norm

    def finalize(self, params: TensorMap) -> dict[str, Array]:
        """New values of the update tensors, from the global ``params`` and the round.

        Raises:
            LocalProtocolError: no update was folded, or ``begin_round`` was not called.
        """
        if self._round is None:
            raise LocalProtocolError("finalize() before begin_round()")
        delta = self.aggregator.result()
        if self.noise is not None:
            delta = self.noise.apply(delta, self.aggregator.count, self._round)
        layout = self.aggregator.layout
        optimized = {name: d for name, d in delta.items() if name in layout.optimized}
        current = {name: np.asarray(params[name], np.float32) for name in optimized}
        result = self.optimizer.step(current, optimized)
        for name, d in delta.items():
            if name not in layout.optimized:
                result[name] = np.asarray(params[name], np.float32) + d
        return {name: result[name] for name in layout.names}

    def state_dict(self) -> dict[str, npt.NDArray[np.float32]]:
        """Server optimizer state to checkpoint with the global model."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, npt.NDArray[np.float32]]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state)
