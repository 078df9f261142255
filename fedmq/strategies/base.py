"""What every strategy is built from: model layout, aggregators and server optimizers.

A round's strategy work splits into two pure steps (DESIGN §5):

1. an :class:`Aggregator` combines the round's deltas (``trained - global``) into one
   delta: the streaming weighted mean of FedAvg, or a robust rule that holds the cohort
   (coordinate median, trimmed mean, Krum);
2. a :class:`ServerOptimizer` applies that aggregated delta to the global model: plain
   (FedAvg), with momentum (FedAvgM) or adaptively (FedAdam, FedYogi, FedAdagrad).

:class:`~fedmq.strategies.strategy.Strategy` composes the two with optional clipping and
Gaussian noise.  Nothing here performs IO: arrays in, arrays out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from fedmq.errors import LocalProtocolError

Array = npt.NDArray[np.float32]
TensorMap = Mapping[str, Array]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelLayout:
    """The tensors an update carries and which of them a server optimizer may move.

    Args:
        shapes: update tensor name to shape, in manifest order.
        optimized: names of trainable parameters.  Server optimizers act on these only;
            the other update tensors (running BatchNorm statistics) take the plain
            aggregated delta, since momentum or Adam on a running variance is meaningless.
    """

    shapes: Mapping[str, Shape]
    optimized: frozenset[str]

    def __post_init__(self) -> None:
        unknown = sorted(self.optimized - set(self.shapes))
        if unknown:
            raise LocalProtocolError(f"optimized tensors {unknown[:5]} are not update tensors")

    @property
    def names(self) -> tuple[str, ...]:
        """Update tensor names in order."""
        return tuple(self.shapes)

    @property
    def numel(self) -> int:
        """Total number of elements of one update."""
        return sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes.values())

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, Iterable[int]], optimized: Iterable[str] | None = None
    ) -> ModelLayout:
        """Build a layout; every tensor is optimized when ``optimized`` is None."""
        fixed = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        return cls(fixed, frozenset(fixed if optimized is None else optimized))

    def zeros(self) -> dict[str, Array]:
        """A float32 zero tensor per update tensor."""
        return {name: np.zeros(shape, np.float32) for name, shape in self.shapes.items()}

    def flatten(self, tensors: TensorMap) -> Array:
        """Concatenate ``tensors`` (in layout order) into one new float32 vector."""
        return np.concatenate(
            [np.asarray(tensors[name], np.float32).reshape(-1) for name in self.shapes]
        )

    def unflatten(self, flat: Array) -> dict[str, Array]:
        """Split a vector made by :meth:`flatten` back into named tensors (copies)."""
        result: dict[str, Array] = {}
        offset = 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape, dtype=np.int64))
            result[name] = np.array(flat[offset : offset + size], np.float32).reshape(shape)
            offset += size
        return result


def update_norm(delta: TensorMap) -> float:
    """L2 norm of an update over all its tensors."""
    total = 0.0
    for array in delta.values():
        flat = np.asarray(array, np.float32).reshape(-1)
        total += float(np.dot(flat, flat))
    return float(np.sqrt(total))


class Aggregator(ABC):
    """Combines the deltas of one round into one delta.

    Call :meth:`begin` once per round, :meth:`add` per accepted update, then
    :meth:`result`.  ``streaming`` aggregators keep O(model) memory whatever the number
    of updates; the others hold the cohort until :meth:`result`.
    """

    name: ClassVar[str]
    streaming: ClassVar[bool]

    def __init__(self) -> None:
        self._layout: ModelLayout | None = None

    @property
    def layout(self) -> ModelLayout:
        """The layout given to :meth:`begin`."""
        if self._layout is None:
            raise LocalProtocolError(f"{self.name}: begin() was not called")
        return self._layout

    def begin(self, layout: ModelLayout) -> None:
        """Start a round: forget every update added so far."""
        self._layout = layout
        self._reset()

    @abstractmethod
    def _reset(self) -> None: ...

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates added since :meth:`begin`."""

    @abstractmethod
    def add(self, delta: TensorMap, weight: float) -> None:
        """Fold one update's delta with a positive weight (robust rules may ignore it)."""

    @abstractmethod
    def result(self) -> dict[str, Array]:
        """The aggregated delta.

        Raises:
            LocalProtocolError: no update was added.
        """

    def _check_nonempty(self) -> None:
        if self.count == 0:
            raise LocalProtocolError(f"{self.name}: no update to aggregate")


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


def check_weight(weight: float) -> float:
    """Return ``weight`` if it is a finite positive number.

    Raises:
        LocalProtocolError: zero, negative, NaN or infinite weight.
    """
    if not np.isfinite(weight) or weight <= 0:
        raise LocalProtocolError(f"update weight {weight!r} must be finite and positive")
    return float(weight)
