"""Dropout as a multiplication by a mask the device feeds in.

A traced graph cannot hold ``nn.Dropout``'s random draw (it would be replayed as a
constant, or exported as an op whose stream the device cannot reproduce), so while
tracing each dropout module multiplies its input by a graph input instead.  The device
draws the mask with numpy (``0`` or ``1 / (1 - p)``); see :mod:`fedmq.runtime.dropout`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fedmq.errors import CompileError, UnsupportedOperatorError

# Channel-wise variants drop whole feature maps: their mask is 1 on every spatial axis.
_CHANNEL_WISE = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


@dataclass(frozen=True)
class DropoutLayer:
    """A dropout module of the model and the shape of its mask (batch first)."""

    module: str
    p: float
    mask_shape: tuple[int, ...]


def find_dropout(model: nn.Module, example: torch.Tensor) -> list[DropoutLayer]:
    """Find active dropout modules and the mask shape each needs for ``example``.

    Raises:
        UnsupportedOperatorError: alpha dropout, or RNN inter-layer dropout.
        CompileError: a dropout module runs more than once per forward pass.
    """
    modules: dict[str, nn.modules.dropout._DropoutNd] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.AlphaDropout | nn.FeatureAlphaDropout):
            raise UnsupportedOperatorError(type(module).__name__, f"module {name!r}")
        if isinstance(module, nn.RNNBase) and module.dropout > 0 and module.num_layers > 1:
            raise UnsupportedOperatorError(
                f"{type(module).__name__}(dropout={module.dropout})",
                f"module {name!r}: inter-layer RNN dropout draws random numbers inside the "
                "op; stack single-layer RNNs with nn.Dropout between them instead",
            )
        is_dropout = type(module) in (nn.Dropout, *_CHANNEL_WISE)
        if is_dropout and isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            modules[name] = module
    shapes: dict[str, list[tuple[int, ...]]] = {name: [] for name in modules}

    def recorder(name: str) -> object:
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            shapes[name].append(tuple(inputs[0].shape))

        return hook

    handles = [m.register_forward_pre_hook(recorder(n)) for n, m in modules.items()]  # type: ignore[arg-type]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for name, module in modules.items():
        seen = shapes[name]
        if len(seen) != 1:
            raise CompileError(
                f"dropout module {name!r} ran {len(seen)} times in one forward pass; "
                "fedmq needs one mask per call, so give each call its own nn.Dropout"
            )
        shape = seen[0]
        if isinstance(module, _CHANNEL_WISE):
            shape = (*shape[:2], *([1] * (len(shape) - 2)))
        layers.append(DropoutLayer(module=name, p=float(module.p), mask_shape=shape))
    return layers


@contextlib.contextmanager
def masked_dropout(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Make each named dropout module multiply by its mask instead of drawing one."""
    modules = dict(model.named_modules())
    patched = []
    try:
        for name, mask in masks.items():
            module = modules[name]

            def forward(x: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                return x * mask

            # An instance attribute shadows the class's forward for this module only.
            object.__setattr__(module, "forward", forward)
            patched.append(module)
        yield
    finally:
        for module in patched:
            object.__delattr__(module, "forward")


# Random ATen ops cannot be replayed in a graph the device runs.
RANDOM_OPS = frozenset(
    {
        "bernoulli",
        "bernoulli_",
        "rand",
        "rand_like",
        "randn",
        "randn_like",
        "randint",
        "randint_like",
        "randperm",
        "normal",
        "normal_",
        "uniform",
        "uniform_",
        "native_dropout",
        "multinomial",
        "poisson",
        "exponential_",
        "geometric_",
        "cauchy_",
        "log_normal_",
    }
)


class _OpRecorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records the ATen ops a forward pass dispatches."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def reject_random_ops(model: nn.Module, example: torch.Tensor, layers: list[DropoutLayer]) -> None:
    """Run a train-mode forward (dropout modules masked) and refuse any random op.

    Raises:
        UnsupportedOperatorError: names the first random op, e.g. ``aten.native_dropout``
            from ``F.dropout`` called in ``forward``.
    """
    masks = {layer.module: torch.ones(layer.mask_shape) for layer in layers}
    recorder = _OpRecorder()
    with torch.no_grad(), masked_dropout(model, masks), recorder:
        model(example)
    found = sorted(recorder.ops & RANDOM_OPS)
    if found:
        raise UnsupportedOperatorError(
            f"aten.{found[0]}",
            "random operations cannot run in an exported train step; use nn.Dropout "
            "modules (fedmq feeds their masks as inputs) instead of F.dropout or other "
            "in-graph randomness",
        )
