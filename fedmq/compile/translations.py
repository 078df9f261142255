"""fedmq's own ONNX translations, for ops the exporter lacks or that have no ATen form.

They are handed to ``torch.onnx.export(custom_translation_table=...)`` and written in
ONNX Script's tracing style (plain Python calling ``op.*``), like torch's own library.
Each emits standard default-domain ONNX operators only.

``fedmq::space_to_depth`` is a custom operator defined here so that decompositions can
reach ONNX's ``SpaceToDepth``: ``aten.pixel_unshuffle`` orders channels differently and
is exported as a Reshape/Transpose chain, several times slower in onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from onnxscript import opset18 as op
from onnxscript.onnx_types import FLOAT, INT64

aten = torch.ops.aten


@torch.library.custom_op("fedmq::space_to_depth", mutates_args=())
def space_to_depth(x: torch.Tensor, block: int) -> torch.Tensor:
    """ONNX ``SpaceToDepth`` (DCR order) in PyTorch: ``[N, C, H, W] -> [N, b*b*C, H/b, W/b]``.

    Output channel ``(i * b + j) * C + c`` holds ``x[:, c, i::b, j::b]``: the ``b*b``
    taps of every non-overlapping ``b x b`` window, tap-major.  ``H`` and ``W`` must be
    multiples of ``block``.
    """
    batch, channels, height, width = x.shape
    rows, cols = height // block, width // block
    tiles = x.reshape(batch, channels, rows, block, cols, block).permute(0, 3, 5, 1, 2, 4)
    return tiles.reshape(batch, block * block * channels, rows, cols)


@space_to_depth.register_fake
def _space_to_depth_shape(x: torch.Tensor, block: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    return x.new_empty((batch, block * block * channels, height // block, width // block))


def _space_to_depth_onnx(x: FLOAT, block: int) -> FLOAT:
    return op.SpaceToDepth(x, blocksize=block)


def max_unpool2d(self: FLOAT, indices: INT64, output_size: Sequence[int]) -> FLOAT:
    """``aten.max_unpool2d`` as ONNX ``MaxUnpool`` (the exporter has no translation).

    PyTorch's indices count positions within each ``[H, W]`` plane; ONNX's count over
    the whole tensor, so each plane's offset ``(n * C + c) * H * W`` is added first (a
    cheap broadcast int64 ``Add``).  onnxruntime's ``MaxUnpool`` is a plain scatter into
    a zeroed output, ~4x faster than ``ScatterElements``, which copies a zero tensor
    first.  Input ``[N, C, h, w]`` or unbatched ``[C, h, w]``, indices the same shape;
    output ``[..., *output_size]``.
    """
    height, width = int(output_size[0]), int(output_size[1])
    unbatched = _rank(self) == 3
    if unbatched:  # ONNX MaxUnpool wants [N, C, h, w]
        self = op.Unsqueeze(self, _ints([0]))
        indices = op.Unsqueeze(indices, _ints([0]))
    lead = op.Shape(self, start=0, end=2)  # [N, C]
    plane = _scalar(height * width)
    # The first flat index of every plane, shaped [N, C, 1, 1] to broadcast.
    offsets = op.Range(_scalar(0), op.Mul(op.ReduceProd(lead, keepdims=0), plane), plane)
    offsets = op.Reshape(offsets, op.Concat(lead, _ints([1, 1]), axis=0))
    shape = op.Concat(lead, _ints([height, width]), axis=0)
    # kernel_shape is required but unused when output_shape is given.
    result = op.MaxUnpool(self, op.Add(indices, offsets), shape, kernel_shape=[1, 1])
    return op.Squeeze(result, _ints([0])) if unbatched else result


def _rank(value: Any) -> int:
    """Rank of a value being traced (ONNX Script's type stubs give tensors no shape)."""
    return len(value.shape)


def _scalar(value: int) -> INT64:
    return cast(INT64, op.Constant(value_int=value))


def _ints(values: Sequence[int]) -> INT64:
    return cast(INT64, op.Constant(value_ints=list(values)))


def translation_table() -> dict[Any, Callable[..., Any]]:
    """The ``custom_translation_table`` every fedmq export uses."""
    return {
        aten.max_unpool2d.default: max_unpool2d,
        torch.ops.fedmq.space_to_depth.default: _space_to_depth_onnx,
    }
