"""Central differential privacy: Gaussian noise on the clipped mean (DP-FedAvg).

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language Models"): clip
every update to ``clip_norm``, average with uniform weights, add
``N(0, (noise_multiplier * clip_norm / n)**2)`` per coordinate.  Uniform weights keep the
sensitivity of the mean at ``clip_norm / n``; example-count weights would let one client
shift it arbitrarily.  Noise is drawn from a generator seeded with ``(seed, round)`` so a
restarted aggregator recomputes exactly the model it would have produced.

Privacy accounting (epsilon over rounds) is the operator's job: this module only adds
the calibrated noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmq.errors import LocalProtocolError
from fedmq.strategies.layout import Array, TensorMap


@dataclass(frozen=True)
class GaussianNoise:
    """Calibrated Gaussian noise for the mean of ``n`` updates clipped to ``clip_norm``.

    Args:
        noise_multiplier: ``z``: noise standard deviation in units of the clip norm.
        clip_norm: the L2 bound every update was clipped to.
        seed: base seed; each round draws from ``default_rng([seed, round])``.
    """

    noise_multiplier: float
    clip_norm: float
    seed: int = 0

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or not self.clip_norm > 0:
            raise LocalProtocolError(
                f"noise multiplier ({self.noise_multiplier}) must be >= 0 and clip norm "
                f"({self.clip_norm}) > 0"
            )

    def stddev(self, count: int) -> float:
        """Per-coordinate noise standard deviation for a mean of ``count`` updates."""
        return self.noise_multiplier * self.clip_norm / max(1, count)

    def apply(self, mean: TensorMap, count: int, round_id: int) -> dict[str, Array]:
        """Return ``mean`` plus noise (new arrays), deterministic per round."""
        rng = np.random.default_rng([self.seed, round_id])
        sigma = self.stddev(count)
        noisy: dict[str, Array] = {}
        for name, array in mean.items():
            noise = rng.standard_normal(array.shape, dtype=np.float32)
            noisy[name] = array + np.float32(sigma) * noise
        return noisy
