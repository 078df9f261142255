"""The tensors of an update, and the array types every strategy works on.

An update is a mapping of tensor names to float32 arrays (:data:`TensorMap`); a
:class:`ModelLayout` says which names and shapes a round's updates carry and which of
them a server optimizer may move.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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
