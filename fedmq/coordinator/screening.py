"""Screening hostile updates: the example-count cap and the update-norm screen.

An authenticated device can still lie.  Two things it controls move the global model
more than an honest update would:

- the example count it claims (its FedAvg weight): counted at most ``max_examples``;
- the size of its delta: an update whose L2 norm is far above what the federation has
  been accepting (``norm_factor`` times the median of the last ``norm_window`` accepted
  norms), or above ``max_norm``, is rejected (ack ``outlier``) or clipped to the bound.

Streaming-friendly: the screen keeps norms (floats), never deltas.  Until
``min_history`` norms have been accepted the median is replaced by the global model's
scale, ``max(‖global‖, √n)`` over the ``n`` update elements: a delta ``norm_factor``
times larger than the whole model (or than a model of unit-sized values) is no
training step.  The median is robust: moving it takes more than half of the window.

The norms of rounds that closed are part of the coordinator snapshot; the open round's
come from its contributions (rebuilt by replay), so a restarted aggregator screens the
same way.  A snapshot taken under another ``[training]`` table starts a new history
(update norms scale with the learning rate and epochs).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedmq.errors import ConfigError
from fedmq.strategies.clipping import update_norm
from fedmq.wire.training import TrainingConfig

NormMode = Literal["reject", "clip", "off"]

# A device claiming more outweighs 100 devices of 1000 examples; honest fleets with
# larger local sets raise it.  The wire allows 2**53.
DEFAULT_MAX_EXAMPLES = 100_000
DEFAULT_NORM_FACTOR = 10.0  # honest norms vary with local data and epochs, not 10x
DEFAULT_NORM_WINDOW = 64  # accepted norms remembered, across rounds
DEFAULT_MIN_HISTORY = 5  # norms needed before their median is trusted over the model scale


@dataclass(frozen=True)
class ScreeningPolicy:
    """How the coordinator screens updates before they count.

    Args:
        max_examples: example count an update is weighted by at most (claims above it
            are counted as ``max_examples`` and noted).
        norm_mode: ``reject`` an outlier (ack ``outlier``), ``clip`` it to the bound,
            or ``off``.
        norm_factor: the relative bound: ``norm_factor`` x the median of recent
            accepted norms (x the model scale before there are ``min_history``).
        max_norm: an absolute bound on every update's L2 norm (None: none).
        norm_window: accepted norms the median is taken over.
        min_history: accepted norms needed before the median replaces the model scale.
    """

    max_examples: int = DEFAULT_MAX_EXAMPLES
    norm_mode: NormMode = "reject"
    norm_factor: float = DEFAULT_NORM_FACTOR
    max_norm: float | None = None
    norm_window: int = DEFAULT_NORM_WINDOW
    min_history: int = DEFAULT_MIN_HISTORY

    def __post_init__(self) -> None:
        if self.max_examples < 1:
            raise ConfigError(f"max_examples {self.max_examples} must be at least 1")
        if self.norm_mode not in ("reject", "clip", "off"):
            raise ConfigError(f"norm_mode {self.norm_mode!r} must be reject, clip or off")
        if not (math.isfinite(self.norm_factor) and self.norm_factor > 1):
            raise ConfigError(f"norm_factor {self.norm_factor} must be a finite number > 1")
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ConfigError(f"max_norm {self.max_norm} must be a positive finite number")
        if self.norm_window < 1:
            raise ConfigError(f"norm_window {self.norm_window} must be at least 1")
        if not 1 <= self.min_history <= self.norm_window:
            raise ConfigError(
                f"min_history {self.min_history} must be between 1 and norm_window "
                f"{self.norm_window}"
            )

    def counted_examples(self, claimed: int) -> int:
        """The example count an update claiming ``claimed`` is weighted by."""
        return min(claimed, self.max_examples)


@dataclass(frozen=True)
class NormBound:
    """The largest update norm the screen lets through now, and why."""

    value: float
    why: str


def training_fingerprint(training: TrainingConfig) -> str:
    """Names a ``[training]`` table: norms screened under another one are not comparable."""
    return hashlib.sha256(training.model_dump_json().encode()).hexdigest()[:16]


def remember(history: Sequence[float], norms: Iterable[float], window: int) -> list[float]:
    """``history`` followed by ``norms``, the last ``window`` of them."""
    combined = [*history, *norms]
    return combined[-window:]


class NormScreen:
    """The norm screen's bound, from the accepted norms and the global model.

    Pure: the history lives in the federation state; this object caches the model
    scale of the current global parameters.
    """

    def __init__(self, policy: ScreeningPolicy, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.policy = policy
        self._names = tuple(shapes)
        self._elements = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes.values())
        self._scaled: object | None = None  # the params the cached scale belongs to
        self._scale = 0.0

    @property
    def active(self) -> bool:
        """False when ``norm_mode`` is ``off``."""
        return self.policy.norm_mode != "off"

    def model_scale(self, params: Mapping[str, Any]) -> float:
        """``max(‖global‖, √n)`` over the update tensors (cached per parameter set)."""
        if self._scaled is not params:
            norm = update_norm({name: params[name] for name in self._names})
            self._scale = max(norm, math.sqrt(self._elements), 1.0)
            self._scaled = params
        return self._scale

    def bound(
        self, closed: Sequence[float], current: Sequence[float], params: Mapping[str, Any]
    ) -> NormBound | None:
        """The bound now (None: the screen is off).

        Args:
            closed: accepted norms of closed rounds (oldest first).
            current: accepted norms of the open round, in acceptance order.
            params: the current global parameters.
        """
        policy = self.policy
        if not self.active:
            return None
        history = [*closed, *current][-policy.norm_window :]
        median = float(np.median(history)) if len(history) >= policy.min_history else 0.0
        if median > 0:
            value = policy.norm_factor * median
            why = (
                f"{policy.norm_factor:g} x {median:.4g}, the median of the last "
                f"{len(history)} accepted norms"
            )
        else:
            scale = self.model_scale(params)
            value = policy.norm_factor * scale
            why = f"{policy.norm_factor:g} x {scale:.4g}, the global model's scale"
        if policy.max_norm is not None and policy.max_norm < value:
            return NormBound(policy.max_norm, "max_norm")
        return NormBound(value, why)
