"""ATen decompositions that make a traced train step exportable to standard ONNX.

Autograd records the *backward* ATen ops of a forward pass; ONNX has no counterpart
for several of them.  PyTorch ships decompositions for most (core ATen set plus
``max_pool2d_with_indices_backward``, ``native_dropout`` and the batch-norm variants,
which are not in the core set), but none for convolution and average-pool backward:
those are written here in terms of forward convolutions, which ONNX has.

The functions receive ``SymInt`` sizes while ``make_fx`` traces symbolically.  Sizes
of non-batch dimensions may be turned into Python ints (that specialises them, which is
what the export does anyway); the batch dimension is only ever used symbolically.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._decomp import core_aten_decompositions, get_decompositions

aten = torch.ops.aten

DecompositionTable = dict[Any, Callable[..., Any]]


def _expand(values: Sequence[int] | int, rank: int) -> list[int]:
    """Expand a conv/pool argument given once (``[2]``) to one value per spatial dim."""
    if isinstance(values, int):
        return [values] * rank
    values = list(values)
    return values * rank if len(values) == 1 else values


def _conv_weight_grad(
    signal: torch.Tensor,
    grad: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    """Gradient of a (non-transposed) convolution's weight, as one batched matmul.

    ``weight_grad[o, i, k] = sum_{n, t} grad[n, o, t] * signal[n, i, t*stride + k*dilation
    - padding]``.  The signal windows are gathered with one strided slice per kernel
    offset (an explicit im2col), then contracted with ``grad`` by a matmul, which
    onnxruntime runs through its GEMM kernel -- several times faster than expressing
    the same sum as a convolution whose kernel is the whole output map.

    Args:
        signal: the convolution input ``[N, C_in, *S]``.
        grad: gradient of the convolution output ``[N, C_out, *T]``.
        kernel: spatial kernel size.
        stride: forward stride.
        padding: forward padding.
        dilation: forward dilation.
        groups: forward groups.

    Returns:
        ``[C_out, C_in / groups, *kernel]``.
    """
    rank = len(kernel)
    batch, channels = signal.shape[0], int(signal.shape[1])
    out_channels = int(grad.shape[1])
    positions = [int(t) for t in grad.shape[2:]]
    if any(padding):
        pad_spec: list[int] = []
        for axis in reversed(range(rank)):
            pad_spec += [padding[axis], padding[axis]]
        signal = torch.nn.functional.pad(signal, pad_spec)
    columns = []
    for offset in itertools.product(*(range(k) for k in kernel)):
        window = signal
        for axis in range(rank):
            start = offset[axis] * dilation[axis]
            stop = start + (positions[axis] - 1) * stride[axis] + 1
            window = window.narrow(2 + axis, start, stop - start)
            if stride[axis] > 1:
                window = window[(slice(None),) * (2 + axis) + (slice(None, None, stride[axis]),)]
        columns.append(window)
    taps = len(columns)
    cols = torch.stack(columns, dim=-1)  # [N, C_in, *T, K]
    group_in = channels // groups
    group_out = out_channels // groups
    count = 1
    for t in positions:
        count *= t
    # [N, G, Cg_in, P, K] -> [G, N, P, Cg_in, K] -> [G, N*P, Cg_in*K]
    cols = cols.reshape(batch, groups, group_in, count, taps).permute(1, 0, 3, 2, 4)
    cols = cols.reshape(groups, -1, group_in * taps)
    # [N, G, Cg_out, P] -> [G, Cg_out, N, P] -> [G, Cg_out, N*P]
    grads = grad.reshape(batch, groups, group_out, count).permute(1, 2, 0, 3)
    grads = grads.reshape(groups, group_out, -1)
    weight = torch.matmul(grads, cols)  # [G, Cg_out, Cg_in*K]
    return weight.reshape(out_channels, group_in, *kernel)


def convolution_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    bias_sizes: Sequence[int] | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool,
    output_padding: Sequence[int],
    groups: int,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``aten.convolution_backward`` as forward convolutions (1d/2d/3d, transposed too)."""
    rank = weight.dim() - 2
    stride = _expand(stride, rank)
    padding = _expand(padding, rank)
    dilation = _expand(dilation, rank)
    kernel = [int(k) for k in weight.shape[2:]]
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        if transposed:
            # The adjoint of a transposed convolution is the plain convolution.
            grad_input = aten.convolution.default(
                grad_output, weight, None, stride, padding, dilation, False, [0] * rank, groups
            )
        else:
            # The adjoint of a convolution is the transposed one; output padding restores
            # the input rows the forward stride skipped.
            extra = []
            for axis in range(rank):
                size_in = int(input.shape[2 + axis])
                size_out = int(grad_output.shape[2 + axis])
                covered = (size_out - 1) * stride[axis] - 2 * padding[axis]
                covered += dilation[axis] * (kernel[axis] - 1) + 1
                extra.append(size_in - covered)
            grad_input = aten.convolution.default(
                grad_output, weight, None, stride, padding, dilation, True, extra, groups
            )
    if output_mask[1]:
        if transposed:
            # y[o] += x[i] w[k] at o = i*stride + k*dilation - padding: the same sum as a
            # plain convolution's weight gradient with the roles of x and dy swapped.
            grad_weight = _conv_weight_grad(
                grad_output, input, kernel, stride, padding, dilation, groups
            )
        else:
            grad_weight = _conv_weight_grad(
                input, grad_output, kernel, stride, padding, dilation, groups
            )
    if output_mask[2]:
        grad_bias = grad_output.sum(dim=[0, *range(2, grad_output.dim())])
    return grad_input, grad_weight, grad_bias


def _pool_divisors(
    size_in: int,
    size_out: int,
    kernel: int,
    stride: int,
    padding: int,
    count_include_pad: bool,
) -> torch.Tensor:
    """Per-output-position divisor along one axis, exactly as ATen's avg_pool computes it."""
    start = torch.arange(size_out, dtype=torch.int64) * stride - padding
    end = torch.clamp(start + kernel, max=size_in + padding)
    padded_len = end - start
    valid_len = torch.clamp(end, max=size_in) - torch.clamp(start, min=0)
    return (padded_len if count_include_pad else valid_len).to(torch.float32)


def avg_pool2d_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> torch.Tensor:
    """``aten.avg_pool2d_backward``: divide, then spread with a transposed box filter."""
    kernel = _expand(kernel_size, 2)
    strides = _expand(stride, 2) if len(stride) else kernel
    pads = _expand(padding, 2)
    size_in = [int(s) for s in input.shape[-2:]]
    size_out = [int(s) for s in grad_output.shape[-2:]]
    if divisor_override:
        scaled = grad_output / float(divisor_override)
    else:
        rows = _pool_divisors(
            size_in[0], size_out[0], kernel[0], strides[0], pads[0], count_include_pad
        )
        cols = _pool_divisors(
            size_in[1], size_out[1], kernel[1], strides[1], pads[1], count_include_pad
        )
        scaled = grad_output / (rows[:, None] * cols[None, :])
    lead = grad_output.shape[:-2]
    flat = scaled.reshape(-1, 1, size_out[0], size_out[1])
    box = torch.ones(1, 1, kernel[0], kernel[1], dtype=grad_output.dtype)
    # Full transposed box filter over the padded frame, then crop the padding away.
    spread: torch.Tensor = aten.convolution.default(
        flat, box, None, strides, [0, 0], [1, 1], True, [0, 0], 1
    )
    for axis in range(2):
        have = int(spread.shape[2 + axis])
        need = size_in[axis] + pads[axis]
        if have < need:  # trailing rows no window reached get zero gradient
            pad_spec = [0, 0, 0, 0]
            pad_spec[3 - 2 * axis] = need - have
            spread = torch.nn.functional.pad(spread, pad_spec)
        spread = spread.narrow(2 + axis, pads[axis], size_in[axis])
    return spread.reshape(*lead, size_in[0], size_in[1])


def _adaptive_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``[size_out, size_in]`` averaging matrix of adaptive pooling along one axis."""
    index = torch.arange(size_out, dtype=torch.int64)
    start = (index * size_in) // size_out
    end = ((index + 1) * size_in + size_out - 1) // size_out
    position = torch.arange(size_in, dtype=torch.int64)
    inside = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return inside.to(torch.float32) / (end - start).to(torch.float32)[:, None]


def adaptive_avg_pool2d_backward(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``aten._adaptive_avg_pool2d_backward`` as two matrix products (windows are separable)."""
    rows = _adaptive_matrix(int(input.shape[-2]), int(grad_output.shape[-2]))
    cols = _adaptive_matrix(int(input.shape[-1]), int(grad_output.shape[-1]))
    return torch.matmul(torch.matmul(rows.t(), grad_output), cols)


def threshold_backward(
    grad_output: torch.Tensor, self: torch.Tensor, threshold: float
) -> torch.Tensor:
    """ReLU's backward (``aten.threshold_backward``) as a multiply by the mask.

    onnxruntime's ``Where`` with a scalar branch is several times slower than ``Cast``
    + ``Mul`` on large activations.
    """
    return grad_output * (self > threshold).to(grad_output.dtype)


def empty_permuted(
    size: Sequence[int],
    physical_layout: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    layout: torch.layout | None = None,
    device: torch.device | None = None,
    pin_memory: bool | None = None,
) -> torch.Tensor:
    """``aten.empty_permuted``: memory layout means nothing in ONNX, so a plain ``empty``.

    Core ATen decomposes ``empty_like`` into it (e.g. in the ``bce_with_logits`` backward).
    """
    return torch.empty(list(size), dtype=dtype, device=device)


def train_step_decompositions() -> DecompositionTable:
    """The table ``make_fx`` uses: core ATen plus everything ONNX export needs."""
    table: DecompositionTable = dict(core_aten_decompositions())
    table.update(
        get_decompositions(
            [
                aten.max_pool2d_with_indices_backward,
                aten.native_dropout,
                aten._native_batch_norm_legit,
                aten._native_batch_norm_legit_functional,
                aten._native_batch_norm_legit_no_training,
            ]
        )
    )
    table[aten.convolution_backward.default] = convolution_backward
    table[aten.avg_pool2d_backward.default] = avg_pool2d_backward
    table[aten._adaptive_avg_pool2d_backward.default] = adaptive_avg_pool2d_backward
    table[aten.empty_permuted.default] = empty_permuted
    table[aten.threshold_backward.default] = threshold_backward
    return table
