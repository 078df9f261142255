"""Named tensors laid out as views into one contiguous float32 vector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


class FlatTensors:
    """Tensors ``names`` with ``shapes`` stored back to back in :attr:`data`.

    :attr:`views` are C-contiguous reshaped slices of :attr:`data`: writing one writes
    the flat vector and vice versa, so optimizers work on the vector while onnxruntime
    reads the views without copies.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> None:
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
        self.names = tuple(names)
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.data: FloatArray = np.zeros(int(self.offsets[-1]), dtype=np.float32)
        self.views: dict[str, FloatArray] = {
            name: self.data[self.offsets[i] : self.offsets[i + 1]].reshape(shape)
            for i, (name, shape) in enumerate(zip(names, shapes, strict=True))
        }

    @property
    def size(self) -> int:
        """Total number of elements."""
        return int(self.data.size)

    def load(self, values: Mapping[str, npt.NDArray[np.generic]]) -> None:
        """Copy ``values[name]`` into every view (casting to float32)."""
        for name, view in self.views.items():
            view[...] = values[name]

    def gather(self, arrays: Sequence[npt.NDArray[np.generic]], out: FloatArray) -> FloatArray:
        """Copy ``arrays`` (in name order) into the flat vector ``out`` and return it."""
        for i, array in enumerate(arrays):
            out[self.offsets[i] : self.offsets[i + 1]] = array.reshape(-1)
        return out
