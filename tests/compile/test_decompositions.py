"""fedmq's decompositions equal ATen's own kernels (eager, many configurations)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from fedmq.compile.decompositions import (
    adaptive_avg_pool2d_backward,
    avg_pool2d_backward,
    convolution_backward,
    max_pool2d_with_indices,
    max_pool2d_with_indices_backward,
)
from fedmq.compile.translations import space_to_depth

pytestmark = pytest.mark.compile

aten = torch.ops.aten

# (rank, in_ch, out_ch, kernel, stride, padding, dilation, groups, transposed, output_padding)
CONV_CASES = [
    (1, 3, 4, 5, 1, 2, 1, 1, False, 0),
    (1, 4, 6, 3, 2, 0, 2, 2, False, 0),
    (2, 3, 4, 3, 1, 1, 1, 1, False, 0),
    (2, 4, 8, 3, 2, 1, 1, 4, False, 0),  # grouped, strided: skipped input rows
    (2, 6, 6, 3, 1, 2, 2, 6, False, 0),  # depthwise, dilated
    (2, 2, 4, (3, 2), (2, 1), (1, 0), (1, 2), 1, False, 0),  # anisotropic
    (3, 2, 4, 3, 2, 1, 1, 2, False, 0),
    (1, 4, 3, 4, 2, 1, 1, 1, True, 0),
    (1, 4, 6, 3, 2, 1, 1, 2, True, 1),  # transposed, grouped, output padding
    (2, 4, 2, 3, 2, 1, 2, 1, True, 1),  # transposed, dilated
    (3, 2, 2, 2, 2, 0, 1, 1, True, 0),
]


def _pair(value: Any, rank: int) -> list[int]:
    return list(value) if isinstance(value, tuple) else [value] * rank


@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: f"{c[0]}d-g{c[7]}-{'T' if c[8] else 'C'}"
)
def test_convolution_backward(case: tuple[Any, ...]) -> None:
    rank, cin, cout, kernel, stride, padding, dilation, groups, transposed, out_pad = case
    gen = torch.Generator().manual_seed(0)
    kernel, stride = _pair(kernel, rank), _pair(stride, rank)
    padding, dilation = _pair(padding, rank), _pair(dilation, rank)
    x = torch.randn(3, cin, *([9] * rank), generator=gen, dtype=torch.float64)
    if transposed:
        w = torch.randn(cin, cout // groups, *kernel, generator=gen, dtype=torch.float64)
    else:
        w = torch.randn(cout, cin // groups, *kernel, generator=gen, dtype=torch.float64)
    out_padding = [out_pad] * rank
    y = aten.convolution(x, w, None, stride, padding, dilation, transposed, out_padding, groups)
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    args = (
        grad,
        x,
        w,
        [w.shape[1 if transposed else 0] * (groups if transposed else 1)],
        stride,
        padding,
        dilation,
        transposed,
        out_padding,
        groups,
        [True, True, True],
    )
    expected = aten.convolution_backward(*args)
    got = convolution_backward(*args)
    for name, e, g in zip(("input", "weight", "bias"), expected, got, strict=True):
        assert g is not None
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "ceil_mode", "count_include_pad", "divisor"),
    [
        (2, 2, 0, False, True, None),
        (3, 2, 1, False, True, None),
        (3, 2, 1, False, False, None),
        (3, 2, 1, True, True, None),
        (3, 2, 1, True, False, None),
        ((3, 2), (1, 2), (1, 0), False, True, None),
        (3, 3, 0, False, True, None),  # trailing rows no window reaches
        (2, 1, 1, False, True, 3),
    ],
)
def test_avg_pool2d_backward(
    kernel: Any, stride: Any, padding: Any, ceil_mode: bool, count_include_pad: bool, divisor: Any
) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, 11, generator=gen, dtype=torch.float64)
    k, s, p = _pair(kernel, 2), _pair(stride, 2), _pair(padding, 2)
    y = aten.avg_pool2d(x, k, s, p, ceil_mode, count_include_pad, divisor)
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    args = (grad, x, k, s, p, ceil_mode, count_include_pad, divisor)
    expected = aten.avg_pool2d_backward(*args)
    got = avg_pool2d_backward(*args)
    torch.testing.assert_close(got.to(torch.float64), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("size_in", "size_out"), [((7, 7), (3, 2)), ((8, 6), (1, 1)), ((5, 4), (7, 4))]
)
def test_adaptive_avg_pool2d_backward(size_in: tuple[int, int], size_out: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, *size_in, generator=gen)
    grad = torch.randn(2, 3, *size_out, generator=gen)
    expected = aten._adaptive_avg_pool2d_backward(grad, x)
    torch.testing.assert_close(
        adaptive_avg_pool2d_backward(grad, x), expected, rtol=1e-6, atol=1e-6
    )


# (kernel, stride, padding, dilation, ceil_mode): square non-overlapping (SpaceToDepth),
# overlapping, padded, ceil mode reading past the end, dilated, 1-d style (1, k).
POOL_CASES = [
    ((2, 2), (2, 2), 0, 1, False),
    ((2, 2), (2, 2), 0, 1, True),
    ((3, 3), (3, 3), 0, 1, False),
    ((3, 3), (2, 2), 1, 1, False),
    ((3, 3), (2, 2), 1, 1, True),
    ((3, 2), (2, 1), (1, 0), (1, 2), False),
    ((2, 2), (3, 3), 1, 2, True),
    ((2, 2), (1, 1), 0, 1, False),
    ((1, 2), (1, 2), 0, 1, False),
    ((1, 3), (1, 2), (0, 1), 1, True),
]


def _tied(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ReLU-like input on a coarse grid: most windows hold several equal maxima."""
    gen = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(shape, generator=gen)).mul(2).round().div(2)


POOL_SHAPES = [(3, 4, 9, 11), (2, 3, 8, 8), (4, 9, 11), (3, 2, 1, 16)]  # odd, even, unbatched, 1-d


@pytest.mark.parametrize(
    ("shape", "case"),
    [(s, c) for s in POOL_SHAPES for c in POOL_CASES if s[-2] > 1 or c[0][0] == 1],
    ids=str,
)
def test_max_pool2d_with_indices_picks_the_first_maximum(
    shape: tuple[int, ...], case: tuple[Any, ...]
) -> None:
    kernel, stride, padding, dilation, ceil_mode = case
    x = _tied(shape, 3)
    expected = aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
    got = max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])  # same index among ties, not just same value
    grad = torch.randn(expected[0].shape, generator=torch.Generator().manual_seed(4))
    args = (grad, x, kernel, stride, padding, dilation, ceil_mode, expected[1])
    torch.testing.assert_close(
        max_pool2d_with_indices_backward(*args),
        aten.max_pool2d_with_indices_backward(*args),
        rtol=0,
        atol=1e-6,  # overlapping windows accumulate in a different order
    )


def test_max_pool2d_with_indices_all_minus_infinity_windows() -> None:
    # Padding taps are -inf too; ATen then picks the first tap inside the input.
    x = torch.full((1, 1, 5, 5), float("-inf"))
    for ceil_mode in (False, True):
        expected = aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1], [1, 1], ceil_mode)
        got = max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1], [1, 1], ceil_mode)
        assert torch.equal(got[0], expected[0])
        assert torch.equal(got[1], expected[1])


def test_max_pool2d_with_indices_nan_window_stays_in_bounds() -> None:
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, :2, :2] = float("nan")
    _, indices = max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert int(indices.min()) >= 0
    assert int(indices.max()) < 16


def test_max_pool2d_with_indices_declines_inexact_sizes() -> None:
    # float16 cannot hold every plane index exactly: make_fx keeps the ATen op.
    x = torch.zeros(1, 1, 64, 64, dtype=torch.float16)
    assert max_pool2d_with_indices(x, [2, 2]) is NotImplemented


def test_space_to_depth_matches_onnx_definition() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    got = space_to_depth(x, 2)
    # ONNX SpaceToDepth: out[n, (i*b + j)*C + c, h, w] = x[n, c, h*b + i, w*b + j]
    for i, j, c in itertools.product(range(2), range(2), range(3)):
        assert torch.equal(got[:, (i * 2 + j) * 3 + c], x[:, c, i::2, j::2])
