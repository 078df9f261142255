"""Forward-only ONNX models to PyTorch modules, ready for :func:`compile_module`.

Users often arrive with an ``.onnx`` file made elsewhere.  It is converted with
``onnx2torch`` (a GraphModule whose submodules mirror the ONNX nodes), then adjusted:

* ``Reshape`` with ``allowzero=1`` (the dynamo exporter's default) is rewritten to
  ``allowzero=0`` when its target shape is a constant without zeros, where both mean
  the same; onnx2torch rejects ``allowzero=1`` outright.
* ``Reshape`` with a constant target becomes a static reshape, so tracing never reads a
  shape out of a tensor (which symbolic tracing cannot do).
* Submodule names become valid state names (``0/Conv`` -> ``0_Conv``).
* Float initializers onnx2torch keeps as buffers become trainable parameters (ONNX does
  not say what is a weight; anything with more than one element is treated as one);
  scalar and integer initializers become constants.
* Initializers the TorchScript exporter merged because they were equal (``Identity``
  nodes reading an initializer) get their own copy back, under the ``Identity`` output.
* Every state tensor is traced back to its initializer in the file
  (:mod:`fedmq.compile.onnx_source`), so the manifest can record the file's interface
  and ``fedmq export`` restores it.

onnx2torch imports torchvision for its ``NonMaxSuppression`` and ``RoiAlign``
converters only.  When torchvision cannot be imported (not installed, or a wheel that
does not match the installed torch), a stand-in lets onnx2torch load and those two
operators are reported as unsupported; neither is trainable anyway.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from fedmq.bundle.source import OnnxSource
from fedmq.compile.onnx_source import drop_onnx_mappings, onnx_source
from fedmq.errors import CompileError, UnsupportedOperatorError

_TORCHVISION_OPS = {"NonMaxSuppression": "nms", "RoiAlign": "roi_align"}
_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]")
_onnx2torch: Any = None


def _torchvision_works() -> bool:
    try:
        importlib.import_module("torchvision.ops")
    except Exception:  # ImportError, or RuntimeError from a wheel built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


def _unavailable(op: str) -> Any:
    def missing(*_args: object, **_kwargs: object) -> None:
        raise UnsupportedOperatorError(op, "it needs torchvision, which is not importable here")

    return missing


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """Make ``import torchvision`` succeed for the duration of onnx2torch's import only."""
    package = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = _unavailable("NonMaxSuppression")  # type: ignore[attr-defined]
    ops.roi_align = _unavailable("RoiAlign")  # type: ignore[attr-defined]
    ops.box_convert = _unavailable("NonMaxSuppression")  # type: ignore[attr-defined]
    package.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"] = package
    sys.modules["torchvision.ops"] = ops
    try:
        yield
    finally:
        # Later imports of torchvision elsewhere must not see the stand-in.
        sys.modules.pop("torchvision", None)
        sys.modules.pop("torchvision.ops", None)


def _load_onnx2torch() -> tuple[Any, bool]:
    """Import onnx2torch; return it and whether torchvision is really available."""
    global _onnx2torch  # noqa: PLW0603 - one import per process
    has_torchvision = _torchvision_works()
    if _onnx2torch is None:
        try:
            if has_torchvision:
                _onnx2torch = importlib.import_module("onnx2torch")
            else:
                with _torchvision_stand_in():
                    _onnx2torch = importlib.import_module("onnx2torch")
        except ImportError as exc:
            raise CompileError(
                "compiling .onnx models needs onnx2torch: pip install --no-deps "
                "'onnx2torch==1.5.*' (--no-deps: it would pull torchvision, which it only "
                f"uses for NonMaxSuppression/RoiAlign) ({exc})"
            ) from exc
    return _onnx2torch, has_torchvision


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray[Any, Any] | None:
    for initializer in graph.initializer:
        if initializer.name == name:
            return numpy_helper.to_array(initializer)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
    return None


def _rewrite_allowzero(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        if node.op_type != "Reshape":
            continue
        for attribute in node.attribute:
            if attribute.name != "allowzero" or attribute.i == 0:
                continue
            shape = _constant(model.graph, node.input[1])
            if shape is None or (shape == 0).any():
                raise UnsupportedOperatorError(
                    "Reshape(allowzero=1)",
                    f"node {node.name!r}: its target shape is computed or contains 0, where "
                    "allowzero=1 differs from allowzero=0; re-export with a constant shape",
                )
            attribute.i = 0  # without zeros in the shape the two modes are identical


def _undo_deduplication(model: onnx.ModelProto) -> None:
    """Give every weight an exporter merged into another its own initializer again.

    The TorchScript exporter stores equal initializers once and recreates the others
    with ``Identity`` nodes (a fresh BatchNorm's ``running_var`` is its ``weight``: all
    ones).  Left so, the BatchNorm would no longer see initializers (onnx2torch then
    makes its statistics trainable weights) and the two tensors would be one.  The copy
    is named after the ``Identity`` output, the name the consumers read.
    """
    graph = model.graph
    outputs = {value.name for value in graph.output}
    while True:
        values = {i.name: i for i in graph.initializer}
        copies = [
            node
            for node in graph.node
            if node.op_type == "Identity"
            and node.input[0] in values
            and node.output[0] not in outputs
        ]
        if not copies:
            return
        for node in copies:
            copy = onnx.TensorProto()
            copy.CopyFrom(values[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            graph.node.remove(node)


class _StaticReshape(nn.Module):
    """Reshape to a shape known at conversion time (0 copies the input dimension)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = [x.shape[i] if size == 0 else size for i, size in enumerate(self.shape)]
        return torch.reshape(x, target)


def _owner(module: nn.Module, target: str) -> tuple[nn.Module, str]:
    path, _, leaf = target.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _static_reshapes(module: torch.fx.GraphModule) -> None:
    for node in list(module.graph.nodes):
        if (
            node.op != "call_module"
            or type(module.get_submodule(node.target)).__name__ != "OnnxReshape"
        ):
            continue
        shape_node = node.args[1] if len(node.args) > 1 else None
        if not isinstance(shape_node, torch.fx.Node) or shape_node.op != "get_attr":
            continue  # a computed shape: left to onnx2torch (may not trace)
        owner, leaf = _owner(module, shape_node.target)  # type: ignore[arg-type]
        shape = tuple(int(v) for v in getattr(owner, leaf).tolist())
        module.add_submodule(node.target, _StaticReshape(shape))
        node.args = (node.args[0],)
    module.graph.eliminate_dead_code()


def _sanitize_names(module: torch.fx.GraphModule) -> None:
    taken = {name for name, _ in module.named_children()}
    for node in module.graph.nodes:
        if node.op != "call_module" or "." in node.target:
            continue
        clean = _INVALID_NAME_CHARS.sub("_", node.target).strip("_") or "node"
        if clean == node.target:
            continue
        while clean in taken:
            clean += "_"
        taken.add(clean)
        child = module.get_submodule(node.target)
        delattr(module, node.target)
        module.add_submodule(clean, child)
        node.target = clean


def _settle_buffers(module: torch.fx.GraphModule) -> None:
    used = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    # A called module reads its own buffers in forward (a Constant node's value).
    called = [str(n.target) for n in module.graph.nodes if n.op == "call_module"]
    for owner_name, owner in list(module.named_modules()):
        if isinstance(owner, nn.modules.batchnorm._BatchNorm):
            continue
        in_forward = any(owner_name == c or owner_name.startswith(f"{c}.") for c in called)
        for name, buffer in list(owner._buffers.items()):
            full = f"{owner_name}.{name}" if owner_name else name
            del owner._buffers[name]
            if buffer is None or (full not in used and not in_forward):
                continue
            if buffer.is_floating_point() and buffer.numel() > 1:
                owner.register_parameter(name, nn.Parameter(buffer.to(torch.float32)))
            else:
                object.__setattr__(owner, name, buffer)  # a constant, not model state


@dataclass(frozen=True)
class ImportedOnnx:
    """A forward-only ONNX model converted to PyTorch.

    Attributes:
        module: the converted module (state names such as ``fc1_Gemm.weight``).
        example_shape: shape of one example, read from the graph input.
        source: the file's interface and where each state tensor came from; give it
            to :func:`~fedmq.compile.compile_module` so the bundle records it.
    """

    module: nn.Module
    example_shape: tuple[int, ...]
    source: OnnxSource


def module_from_onnx(path: str | Path) -> tuple[nn.Module, tuple[int, ...]]:
    """Load a forward-only ONNX model as a PyTorch module (see :func:`import_onnx`).

    Returns:
        The module and the shape of one example, read from the graph input.
    """
    imported = import_onnx(path)
    return imported.module, imported.example_shape


def import_onnx(path: str | Path) -> ImportedOnnx:
    """Load a forward-only ONNX model as a PyTorch module, with its original interface.

    Args:
        path: the ``.onnx`` file (one input with a batch dimension first, one output).

    Raises:
        UnsupportedOperatorError: an operator onnx2torch cannot convert (named).
        CompileError: the file cannot be read or has not exactly one input/output.
    """
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError, OSError, onnx's own errors
        raise CompileError(f"cannot read ONNX model {path}: {exc}") from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise CompileError(
            f"{path}: fedmq compiles models with one input and one output; this one has "
            f"{len(inputs)} inputs and {len(model.graph.output)} outputs"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    example = []
    for dim in dims[1:]:
        if not dim.HasField("dim_value"):
            raise CompileError(
                f"{path}: input dimension {dim.dim_param!r} is not fixed; only the first "
                "(batch) dimension may be dynamic"
            )
        example.append(int(dim.dim_value))
    onnx2torch, has_torchvision = _load_onnx2torch()
    if not has_torchvision:
        for node in model.graph.node:
            if node.op_type in _TORCHVISION_OPS:
                raise UnsupportedOperatorError(
                    node.op_type, "onnx2torch converts it with torchvision, which is not importable"
                )
    _rewrite_allowzero(model)
    _undo_deduplication(model)
    try:
        # The mapping (ONNX value names per converted node) lets onnx_source trace weights.
        module = onnx2torch.convert(model, attach_onnx_mapping=True)
    except NotImplementedError as exc:
        match = re.search(r"type=(\w+)", str(exc))
        raise UnsupportedOperatorError(
            match.group(1) if match else str(exc)[:200], "onnx2torch has no converter for it"
        ) from exc
    except Exception as exc:
        raise CompileError(f"onnx2torch could not convert {path}: {str(exc)[:500]}") from exc
    _static_reshapes(module)
    _sanitize_names(module)
    _settle_buffers(module)
    module.recompile()
    source = onnx_source(module, model)
    drop_onnx_mappings(module)
    return ImportedOnnx(module, tuple(example), source)
