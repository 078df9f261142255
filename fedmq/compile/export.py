"""From a Python function over tensors to a standard-ONNX model proto, batch kept dynamic.

Two routes, both ending in ``torch.onnx.export(..., dynamo=True)``:

* :func:`export_train_step` traces with ``make_fx(tracing_mode="symbolic")`` first, so
  ``torch.func`` transforms (``grad_and_value``) become plain ATen graphs and the
  backward ops are decomposed by :mod:`fedmq.compile.decompositions`;
* :func:`export_inference` hands an ``nn.Module`` straight to ``torch.export``.

Pitfalls this module handles: duck shaping (a symbol shared by every dimension that
happens to equal the batch size would specialise the batch) is turned off while
tracing; oneDNN (mkldnn) is disabled so RNNs trace their differentiable ATen path.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import onnx
import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

from fedmq.compile.decompositions import train_step_decompositions
from fedmq.compile.translations import translation_table
from fedmq.errors import CompileError, UnsupportedOperatorError

MAX_BATCH = 2**20  # examples per call; the upper bound torch.export needs for the batch symbol

_UNSUPPORTED_RE = re.compile(r"(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)")


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence third-party chatter known to be harmless during export.

    The ONNX exporter logs that torchvision ops are skipped when torchvision is absent
    (by design here), torch's pytree emits a FutureWarning about its own internals and
    toggling oneDNN warns about an Intel GPU feature.
    """
    registration_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    previous = registration_logger.level
    registration_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            # Toggling oneDNN off and on re-applies its TF32 flag, which warns on CPU builds.
            warnings.filterwarnings("ignore", message=r"TF32 acceleration on top of oneDNN")
            yield
    finally:
        registration_logger.setLevel(previous)


@contextlib.contextmanager
def tracing_context() -> Iterator[None]:
    """Settings every trace needs: no duck shaping, no oneDNN kernels."""
    with (
        _quiet_export(),
        fx_config.patch(use_duck_shape=False),  # type: ignore[attr-defined]
        torch.backends.mkldnn.flags(enabled=False),
    ):
        yield


def _to_onnx(
    program: torch.export.ExportedProgram,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
) -> onnx.ModelProto:
    try:
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            verbose=False,
            optimize=True,
            custom_translation_table=translation_table(),
        )
    except Exception as exc:  # the exporter raises a zoo of private error types
        message = str(exc)
        match = _UNSUPPORTED_RE.search(message) if "registered" in message else None
        if match:
            raise UnsupportedOperatorError(
                match.group(1), "it has no ONNX translation and no fedmq decomposition"
            ) from exc
        raise CompileError(f"ONNX export failed: {message.splitlines()[0][:500]}") from exc
    assert onnx_program is not None  # dynamo export always returns a program
    return onnx_program.model_proto


def _guard_trace(what: str, run: Callable[[], Any]) -> Any:
    """Run a tracing step, turning torch's errors into a CompileError that says which."""
    try:
        return run()
    except CompileError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else type(exc).__name__
        raise CompileError(f"{what} failed ({type(exc).__name__}): {first}") from exc


def export_train_step(
    step: Callable[..., tuple[torch.Tensor, ...]],
    args: Sequence[torch.Tensor],
    batched: Sequence[bool],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
) -> onnx.ModelProto:
    """Trace ``step`` (which may use ``torch.func`` transforms) and export it to ONNX.

    Args:
        step: a function of ``args`` returning a tuple of tensors.
        args: example arguments; batched ones share their first dimension.
        batched: for each argument, whether dimension 0 is the dynamic batch.
        input_names: ONNX input names, one per argument.
        output_names: ONNX output names, one per returned tensor.
        opset: ONNX default-domain opset to export to.

    Raises:
        UnsupportedOperatorError: an op has no ONNX translation (named in the message).
        CompileError: tracing or export failed for another reason.
    """
    table = train_step_decompositions()
    with tracing_context():
        graph_module = _guard_trace(
            "tracing the train step",
            lambda: make_fx(
                step,
                decomposition_table=table,
                tracing_mode="symbolic",
                # Constant tensors held by the model (e.g. from ONNX initializers).
                _allow_non_fake_inputs=True,
            )(*args),
        )
        batch = Dim("batch", min=1, max=MAX_BATCH)
        shapes = tuple({0: batch} if b else None for b in batched)
        program = _guard_trace(
            "torch.export of the train step",
            lambda: torch.export.export(
                graph_module, tuple(args), dynamic_shapes=shapes, strict=False
            ),
        )
        return _to_onnx(program, input_names, output_names, opset)


def export_inference(
    module: torch.nn.Module,
    x: torch.Tensor,
    state: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
) -> onnx.ModelProto:
    """Export ``module(x, *state)`` with ``torch.export``; ``x`` has the dynamic batch.

    Raises:
        UnsupportedOperatorError: an op has no ONNX translation (named in the message).
        CompileError: export failed for another reason.
    """
    with tracing_context():
        batch = Dim("batch", min=1, max=MAX_BATCH)
        # One entry per forward() parameter: ``x`` then the ``*state`` tuple.
        shapes = ({0: batch}, tuple(None for _ in state))
        program = _guard_trace(
            "torch.export of the inference model",
            lambda: torch.export.export(module, (x, *state), dynamic_shapes=shapes, strict=False),
        )
        return _to_onnx(program, input_names, output_names, opset)
