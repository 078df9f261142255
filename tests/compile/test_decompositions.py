"""fedmq's backward decompositions equal ATen's own kernels (eager, many configurations)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedmq.compile.decompositions import (
    adaptive_avg_pool2d_backward,
    avg_pool2d_backward,
    convolution_backward,
)

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
