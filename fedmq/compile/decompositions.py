"""ATen decompositions that make a traced train step exportable to standard ONNX.

Autograd records the *backward* ATen ops of a forward pass; ONNX has no counterpart
for several of them.  PyTorch ships decompositions for most (core ATen set plus
``native_dropout`` and the batch-norm variants, which are not in the core set), but
none for convolution and average-pool backward: those are written here in terms of
forward convolutions, which ONNX has.  Max pooling is decomposed here too, forward and
backward, because the exporter's translation is slow in onnxruntime (see
:func:`max_pool2d_with_indices`).

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

from fedmq.compile.translations import space_to_depth

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
    """Gradient of a (non-transposed) convolution's weight, as one matmul per group.

    ``weight_grad[o, i, k] = sum_{n, t} grad[n, o, t] * signal[n, i, t*stride + k*dilation
    - padding]``.  The signal windows are gathered with one strided slice per kernel
    offset (an explicit im2col), then contracted with ``grad`` by a matmul, which
    onnxruntime runs through its GEMM kernel -- several times faster than expressing
    the same sum as a convolution whose kernel is the whole output map.

    Layout matters more than arithmetic here: the signal is made channels-first
    (``[C_in, N, *S]``, a cheap block copy of the small input) so that the windows
    stacked on axis 1 already form the ``[C_in*K, N*P]`` operand; the contraction over
    ``N*P`` then needs only ``grad`` channels-first and a transposed right operand,
    which onnxruntime folds into the GEMM (``FusedMatMul``).  Stacking the windows
    last and permuting the K-times larger column tensor instead cost a slow
    small-stride Transpose.

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
    channels = int(signal.shape[1])
    out_channels = int(grad.shape[1])
    positions = [int(t) for t in grad.shape[2:]]
    signal = signal.transpose(0, 1)  # [C_in, N, *S]
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
            window = window[(slice(None),) * (2 + axis) + (slice(start, stop, stride[axis]),)]
        columns.append(window)
    taps = len(columns)
    group_in = channels // groups
    group_out = out_channels // groups
    cols = torch.stack(columns, dim=1)  # [C_in, K, N, *T]
    grads = grad.transpose(0, 1)  # [C_out, N, *T]
    if groups == 1:  # a plain 2-D product: bmm would add Expand copies in the export
        weight = torch.mm(grads.reshape(out_channels, -1), cols.reshape(channels * taps, -1).t())
    else:  # [G, Cg_out, N*P] x [G, N*P, Cg_in*K]
        cols = cols.reshape(groups, group_in * taps, -1)
        weight = torch.bmm(grads.reshape(groups, group_out, -1), cols.transpose(1, 2))
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


_EXACT_INTEGERS = {torch.float32: 2**24, torch.float64: 2**53}  # all smaller ints are exact


def _pool_output_size(
    size: int, kernel: int, padding: int, stride: int, dilation: int, ceil_mode: bool
) -> int:
    """Output length of a max/avg pool along one axis, by ATen's rule.

    In ceil mode the last window must start inside the input or its left padding.
    """
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_windows(
    self: torch.Tensor,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    size_out: Sequence[int],
) -> torch.Tensor:
    """The ``K`` taps of every pooling window, stacked: ``[N, K, C, Ho, Wo]``.

    Square non-overlapping windows (``MaxPool2d(b)``, the usual case) take one
    ``SpaceToDepth``; any other geometry takes one strided slice per tap of the input
    padded with ``-inf`` (padding never wins a max; its taps also score 0 in
    :func:`max_pool2d_with_indices`).  Tap ``k`` is ``(k // kw, k % kw)`` either way.
    """
    # How far the last window reads past the input's end (ceil mode, right padding);
    # <= 0 when every window ends inside the input.
    after = [
        (size_out[a] - 1) * strides[a]
        + (kernel[a] - 1) * dilations[a]
        + 1
        - pads[a]
        - int(self.shape[-2 + a])
        for a in range(2)
    ]
    block = kernel[0]
    if (
        self.dim() == 4
        and block == kernel[1] == strides[0] == strides[1]
        and list(dilations) == [1, 1]
        and not any(pads)
        and max(after) <= 0
    ):
        # One SpaceToDepth is ~3x faster in onnxruntime than K strided slices.
        inside = self[..., : size_out[0] * block, : size_out[1] * block]
        channels = int(self.shape[1])
        taps: torch.Tensor = space_to_depth(inside, block)  # custom ops are typed Any
        return taps.reshape(-1, block * block, channels, *size_out)
    frame = self
    if any(pads) or max(after) > 0:
        pad_spec = [pads[1], max(0, after[1]), pads[0], max(0, after[0])]
        frame = torch.nn.functional.pad(self, pad_spec, value=float("-inf"))
    columns = []
    for i, j in itertools.product(range(kernel[0]), range(kernel[1])):
        top, left = i * dilations[0], j * dilations[1]
        rows = frame[..., top : top + (size_out[0] - 1) * strides[0] + 1 : strides[0], :]
        columns.append(rows[..., left : left + (size_out[1] - 1) * strides[1] + 1 : strides[1]])
    return torch.stack(columns, dim=-4)  # [N, K, C, Ho, Wo] (or [K, C, Ho, Wo] unbatched)


def max_pool2d_with_indices(
    self: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] | int = 0,
    dilation: Sequence[int] | int = 1,
    ceil_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | Any:  # Any: typeshed's NotImplemented
    """``aten.max_pool2d_with_indices`` from window taps, a max and float arithmetic.

    The exporter's translation runs onnxruntime's ``MaxPool`` with an ``Indices``
    output (a slow generic kernel, ~15x the plain pool) plus a second full-size
    ``MaxPool`` only to convert ONNX's index format to PyTorch's.  Here the ``K``
    window taps are stacked on a new axis (:func:`_pool_windows`) and reduced with
    ``ReduceMax``.  The index is that of the *first* maximum in the window, as ATen's
    kernel picks it (ties are common: ReLU zeros): every tap that equals the maximum
    scores ``H*W - (its plane index)``, taps in the padding score 0, so the largest
    score is the first maximum in row-major order (plane index grows with the tap's
    row, then its column) and ``H*W - score`` is its index.  All scores are integers
    below ``H*W``, exact in float; int64 arithmetic (``ArgMax``, ``Mod``, ``Gather``,
    ``Clip``) is several times slower in onnxruntime.

    A window without any tap equal to its max (only NaN inputs: NaN never compares
    equal) gets the clamped score 1, index ``H*W - 1``, so the backward scatter stays in
    bounds; the loss is NaN then anyway.

    Returns ``NotImplemented`` (``make_fx`` then keeps the ATen op, which the exporter
    translates) when plane indices would not be exact in the input's dtype.
    """
    kernel = _expand(kernel_size, 2)
    strides = _expand(stride, 2) if len(stride) else kernel
    pads = _expand(padding, 2)
    dilations = _expand(dilation, 2)
    size_in = [int(s) for s in self.shape[-2:]]
    plane = size_in[0] * size_in[1]
    if plane >= _EXACT_INTEGERS.get(self.dtype, 0):
        return NotImplemented
    size_out = [
        _pool_output_size(size_in[a], kernel[a], pads[a], strides[a], dilations[a], ceil_mode)
        for a in range(2)
    ]
    windows = _pool_windows(self, kernel, strides, pads, dilations, size_out)
    scores = []
    for i, j in itertools.product(range(kernel[0]), range(kernel[1])):
        row = torch.arange(size_out[0]) * strides[0] + i * dilations[0] - pads[0]
        col = torch.arange(size_out[1]) * strides[1] + j * dilations[1] - pads[1]
        inside = ((row >= 0) & (row < size_in[0]))[:, None] & ((col >= 0) & (col < size_in[1]))
        score = plane - (row[:, None] * size_in[1] + col[None, :])
        scores.append(torch.where(inside, score, 0))
    score_table = torch.stack(scores)[:, None].to(self.dtype)  # [K, 1, Ho, Wo]
    peak = windows.amax(dim=-4, keepdim=True)
    best = ((windows == peak).to(self.dtype) * score_table).amax(dim=-4)
    # Clamped in float: onnxruntime's int64 Clip is ~5x slower than the float one.
    indices = (plane - best.clamp_min(1)).to(torch.int64)
    return peak.squeeze(-4), indices


def _stock_max_pool_backward() -> Callable[..., torch.Tensor]:
    stock: Callable[..., torch.Tensor] = get_decompositions(
        [aten.max_pool2d_with_indices_backward]
    )[aten.max_pool2d_with_indices_backward.default]
    return stock


def max_pool2d_with_indices_backward(
    grad_output: torch.Tensor,
    self: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    indices: torch.Tensor,
) -> torch.Tensor:
    """``aten.max_pool2d_with_indices_backward``: scatter the gradient to the indices.

    When windows cannot overlap (stride at least the dilated kernel, e.g. the usual
    ``MaxPool2d(2)``), every input position is the maximum of at most one window, so a
    plain scatter is exact: ``aten.max_unpool2d``, exported as ONNX ``MaxUnpool``
    (:mod:`fedmq.compile.translations`), ~4x faster in onnxruntime than the
    ``ScatterElements`` of PyTorch's ``scatter_add`` decomposition, which is kept for
    overlapping windows (they accumulate).
    """
    kernel = _expand(kernel_size, 2)
    strides = _expand(stride, 2) if len(stride) else kernel
    dilations = _expand(dilation, 2)
    if any(strides[a] < (kernel[a] - 1) * dilations[a] + 1 for a in range(2)):
        return _stock_max_pool_backward()(
            grad_output, self, kernel_size, stride, padding, dilation, ceil_mode, indices
        )
    size_in = [int(s) for s in self.shape[-2:]]
    size_out = [int(s) for s in grad_output.shape[-2:]]
    channels = int(self.shape[-3])
    # max_unpool2d takes [N, C, h, w]; unbatched inputs get a batch of one.
    grad = grad_output.reshape(-1, channels, *size_out)
    index = indices.reshape(-1, channels, *size_out)
    grad_input: torch.Tensor = aten.max_unpool2d.default(grad, index, size_in)
    return grad_input.reshape(self.shape)


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
    table[aten.max_pool2d_with_indices.default] = max_pool2d_with_indices
    table[aten.max_pool2d_with_indices_backward.default] = max_pool2d_with_indices_backward
    # Kept whole: fedmq.compile.translations maps it to ONNX MaxUnpool.
    del table[aten.max_unpool2d.default]
    return table
