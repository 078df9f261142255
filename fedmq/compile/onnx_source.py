"""Trace every state tensor of an onnx2torch module back to the ONNX file it came from.

onnx2torch builds one submodule per ONNX node.  Initializers reach PyTorch two ways:

* absorbed into a layer: ``Conv``/``ConvTranspose``, ``Gemm`` (as ``nn.Linear``: ``B``
  transposed when ``transB=0``, multiplied by ``alpha``; ``C`` by ``beta``),
  ``BatchNormalization``, ``InstanceNormalization`` and ``LayerNormalization`` copy node
  inputs into the layer's parameters and buffers (the rules below name which input);
* as a root buffer ``initializers.onnx_initializer_<i>`` passed to a generic node (e.g.
  ``MatMul``, ``Add``), one per use; ``Constant`` nodes keep theirs as ``<node>.value``.

Each traced tensor is checked to equal the file's data after the recorded transform, so
a change inside onnx2torch shows up as a compile error rather than as wrong weights in
an export.  Tensors with no origin in the file (``num_batches_tracked``, which PyTorch
adds to every BatchNorm) are left out; so are all but the first of several tensors made
from one shared initializer (the export keeps those under their fedmq names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from fedmq.bundle.source import OnnxSource, SourceInitializer, SourceValue
from fedmq.errors import CompileError

_DTYPES: dict[int, Literal["float32", "int64"]] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
}


@dataclass(frozen=True)
class _Origin:
    """Node input ``index`` of the ONNX node, and how onnx2torch transformed it."""

    index: int
    transpose: bool = False
    scale: float = 1.0


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _gemm(node: onnx.NodeProto, leaf: str) -> _Origin | None:
    if leaf == "weight":
        return _Origin(1, not _attribute(node, "transB", 0), float(_attribute(node, "alpha", 1.0)))
    if leaf == "bias":
        return _Origin(2, scale=float(_attribute(node, "beta", 1.0)))
    return None


def _by_leaf(indices: dict[str, int]) -> Callable[[onnx.NodeProto, str], _Origin | None]:
    def rule(_node: onnx.NodeProto, leaf: str) -> _Origin | None:
        index = indices.get(leaf)
        return None if index is None else _Origin(index)

    return rule


_AFFINE = {"weight": 1, "bias": 2}
# Which node input each parameter/buffer of an absorbing layer copies (onnx2torch 1.5).
_ABSORBED: dict[str, Callable[[onnx.NodeProto, str], _Origin | None]] = {
    "Conv": _by_leaf(_AFFINE),
    "ConvTranspose": _by_leaf(_AFFINE),
    "Gemm": _gemm,
    "BatchNormalization": _by_leaf({**_AFFINE, "running_mean": 3, "running_var": 4}),
    "InstanceNormalization": _by_leaf(_AFFINE),
    "LayerNormalization": _by_leaf(_AFFINE),
}


def _value(node: onnx.ValueInfoProto, what: str) -> SourceValue:
    tensor_type = node.type.tensor_type
    dtype = _DTYPES.get(int(tensor_type.elem_type))
    if dtype is None:
        name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise CompileError(
            f"graph {what} {node.name!r} is {name}; fedmq compiles float32 (or int64 input) "
            "models: cast it in the model before exporting the ONNX file"
        )
    shape: tuple[int | str | None, ...] | None = None
    if tensor_type.HasField("shape"):
        shape = tuple(
            int(d.dim_value)
            if d.HasField("dim_value")
            else (d.dim_param if d.HasField("dim_param") else None)
            for d in tensor_type.shape.dim
        )
    return SourceValue(name=node.name, dtype=dtype, shape=shape)


def _origins(
    module: torch.fx.GraphModule, model: onnx.ModelProto
) -> Iterator[tuple[str, str, _Origin]]:
    """(state name, original value name, transform) for every traceable state tensor."""
    producers = {output: node for node in model.graph.node for output in node.output}
    for fx_node in module.graph.nodes:
        if fx_node.op != "call_module":
            continue
        layer = module.get_submodule(fx_node.target)
        mapping = getattr(layer, "onnx_mapping", None)
        if mapping is None or not mapping.outputs or mapping.outputs[0] not in producers:
            continue  # a module fedmq substituted (static reshape): holds no state
        node = producers[mapping.outputs[0]]
        rule = _ABSORBED.get(node.op_type)
        if rule is not None:
            for name, _ in (*layer.named_parameters(), *layer.named_buffers()):
                origin = rule(node, name.rpartition(".")[2])
                if origin is not None and origin.index < len(node.input):
                    yield f"{fx_node.target}.{name}", node.input[origin.index], origin
        if node.op_type == "Constant":
            yield f"{fx_node.target}.value", node.output[0], _Origin(0)
        # Initializers passed as arguments: the non-empty node inputs, in order.
        arguments = [*fx_node.args, *fx_node.kwargs.values()]
        values = [name for name in mapping.inputs if name]
        if len(arguments) != len(values):
            continue
        for value, argument in zip(values, arguments, strict=True):
            if isinstance(argument, torch.fx.Node) and argument.op == "get_attr":
                yield str(argument.target), value, _Origin(0)


def _original_array(model: onnx.ModelProto, name: str) -> np.ndarray[Any, Any] | None:
    for initializer in model.graph.initializer:
        if initializer.name == name:
            return numpy_helper.to_array(initializer)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = _attribute(node, "value", None)
            return None if value is None else numpy_helper.to_array(value)
    return None


def _matches(state: torch.Tensor, original: np.ndarray[Any, Any], origin: _Origin) -> bool:
    # Recompute what onnx2torch did (transpose, then multiply in float32) and compare
    # bit for bit: the export applies the inverse, which is only right if this holds.
    expected = torch.from_numpy(np.array(original))
    if origin.transpose:
        expected = expected.T
    if origin.scale != 1.0:
        expected = expected * origin.scale
    value = state.detach()
    return tuple(value.shape) == tuple(expected.shape) and bool(
        torch.equal(value.to(expected.dtype), expected)
    )


def onnx_source(module: torch.fx.GraphModule, model: onnx.ModelProto) -> OnnxSource:
    """The original interface of ``module``, converted by onnx2torch from ``model``.

    Args:
        module: the converted module, with onnx2torch's ``onnx_mapping`` attached and
            fedmq's adjustments (names, settled buffers) applied.
        model: the ONNX model it was converted from.

    Raises:
        CompileError: the graph's input/output type is not supported, or a traced
            tensor does not hold the file's data (onnx2torch changed how it converts).
    """
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    state: dict[str, torch.Tensor] = {
        **dict(module.named_parameters()),
        **dict(module.named_buffers()),
    }
    traced: list[SourceInitializer] = []
    seen_tensors: set[str] = set()
    seen_names = {inputs[0].name, model.graph.output[0].name}
    for tensor, name, origin in _origins(module, model):
        if tensor not in state or tensor in seen_tensors or name in seen_names:
            continue  # a constant, not state; or a second use of one shared initializer
        original = _original_array(model, name)
        if original is None:
            continue
        if not _matches(state[tensor], original, origin):
            raise CompileError(
                f"{tensor!r} does not hold the data of ONNX initializer {name!r} as expected "
                "(has onnx2torch changed its conversion? fedmq is tested with 1.5.15)"
            )
        seen_tensors.add(tensor)
        seen_names.add(name)
        traced.append(
            SourceInitializer(
                tensor=tensor, name=name, transpose=origin.transpose, scale=origin.scale
            )
        )
    # The file's order (Constant outputs last), which the export's initializers follow.
    order = {i.name: index for index, i in enumerate(model.graph.initializer)}
    traced.sort(key=lambda item: order.get(item.name, len(order)))
    return OnnxSource(
        input=_value(inputs[0], "input"),
        output=_value(model.graph.output[0], "output"),
        initializers=tuple(traced),
    )


def drop_onnx_mappings(module: nn.Module) -> None:
    """Remove the ``onnx_mapping`` attributes onnx2torch attached (only needed above)."""
    for layer in module.modules():
        layer.__dict__.pop("onnx_mapping", None)
