"""The interface of the ONNX file a bundle was compiled from, so the export can restore it.

fedmq's own graphs use fixed names (``input``, ``output``, PyTorch state-dict names such
as ``fc1_Gemm.weight``), and onnx2torch stores some weights in PyTorch's layout (a Gemm
with ``transB=0`` keeps ``B`` as ``[in, out]``; ``nn.Linear`` wants ``[out, in]``).  An
inference application written against the original file feeds its input name, reads
its output name and may look weights up by name, so ``fedmq export`` renames and
re-lays out everything back; this record says how.

The mapping is exact and reversible: ``state = scale * (original.T if transpose else
original)``, and the export stores ``original = (state / scale)`` transposed back
(:meth:`SourceInitializer.to_file`; a warm start from an export reads it back with
:meth:`SourceInitializer.to_state`).  Both
operations are exact for ``scale == 1`` (what exporters write); a Gemm's ``alpha``/
``beta`` other than 1 round-trip within one float32 rounding.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_T = TypeVar("_T", bound=np.generic)

MAX_ONNX_NAME = 4096  # characters; ONNX names are free text, bounded only to bound parsing
MAX_SOURCE_TENSORS = 100_000  # as many as a manifest may list

OnnxName = Annotated[str, Field(min_length=1, max_length=MAX_ONNX_NAME)]
# A dimension as the file declared it: a size, a symbolic name (dim_param), or unknown.
SourceDim = Annotated[int, Field(ge=0, le=2**31 - 1)] | OnnxName | None


class SourceValue(BaseModel):
    """A graph input or output of the original file: name, element type, declared shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: OnnxName
    dtype: Literal["float32", "int64"]
    shape: tuple[SourceDim, ...] | None = Field(
        None, max_length=8, description="declared dimensions; null when the file gives none"
    )


class SourceInitializer(BaseModel):
    """Where one state tensor came from in the original file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor: str = Field(min_length=1, max_length=512, description="state tensor name")
    name: OnnxName = Field(description="the initializer (or Constant output) in the file")
    transpose: bool = Field(False, description="the file stores the 2-d tensor transposed")
    scale: float = Field(1.0, description="state = scale * original (Gemm alpha/beta)")

    @field_validator("scale")
    @classmethod
    def _usable_scale(cls, scale: float) -> float:
        if not math.isfinite(scale) or scale == 0.0:
            raise ValueError(f"scale {scale} must be finite and non-zero")
        return scale

    def to_file(self, state: npt.NDArray[_T]) -> npt.NDArray[_T]:
        """The file's layout of a state tensor: ``(state / scale)``, transposed back.

        Exact for ``scale == 1``; otherwise within one rounding of ``state``'s dtype.
        """
        value = state
        if self.scale != 1.0:
            value = (value.astype(np.float64) / self.scale).astype(state.dtype)
        # np.array, not np.ascontiguousarray, which makes 0-d arrays 1-d.
        return np.array(value.T if self.transpose else value, order="C")

    def to_state(self, original: npt.NDArray[_T]) -> npt.NDArray[_T]:
        """The state tensor of the file's initializer, the inverse of :meth:`to_file`."""
        value = original.T if self.transpose else original
        if self.scale != 1.0:
            value = (value.astype(np.float64) * self.scale).astype(original.dtype)
        return np.array(value, order="C")


class OnnxSource(BaseModel):
    """The original file's interface (``manifest.source``), for a model compiled from ONNX."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: SourceValue
    output: SourceValue
    initializers: tuple[SourceInitializer, ...] = Field(max_length=MAX_SOURCE_TENSORS)

    @model_validator(mode="after")
    def _distinct_names(self) -> OnnxSource:
        names = [self.input.name, self.output.name, *(i.name for i in self.initializers)]
        if len(set(names)) != len(names):
            raise ValueError("the input, the output and each initializer need distinct names")
        tensors = [i.tensor for i in self.initializers]
        if len(set(tensors)) != len(tensors):
            raise ValueError("a state tensor comes from one initializer at most")
        return self

    def original_names(self) -> dict[str, str]:
        """State tensor name to its name in the original file."""
        return {i.tensor: i.name for i in self.initializers}
