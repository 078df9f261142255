"""A bundle's inference graph as a standalone ONNX model: what ``fedmq export`` writes.

The bundle's ``model.onnx`` takes every parameter and buffer as a graph input with an
initializer default, so the device runtime can feed the weights it is training.  A
model for an inference application must not work that way: onnxruntime warns once per
such input ("will not be treated as constant") and cannot fold constants through
them.  So the standalone model

* holds the given values as initializers only (0-d buffers such as
  ``num_batches_tracked`` stay 0-d), and has a single graph input;
* has no initializer that nothing reads (onnxruntime warns and removes those:
  ``num_batches_tracked`` of an inference BatchNorm, for instance), and carries the
  exporter's own constants (reshape targets) as ``Constant`` nodes, so its
  initializers are exactly the model's weights;
* for a model compiled from an ONNX file (``manifest.source``), has that file's input
  and output names, element types and declared shapes, and its weights under their
  original names and layouts: a weight onnx2torch transposed (Gemm ``transB=0``) or
  scaled (``alpha``/``beta``) is stored as in the file and re-laid out by a
  ``Transpose``/``Mul`` node, which onnxruntime folds when it loads the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from fedmq.bundle import Bundle, OnnxSource, SourceValue
from fedmq.bundle.manifest import BATCH, INPUT_NAME, OUTPUT_NAME, Manifest
from fedmq.errors import BundleError

_Message = TypeVar("_Message", onnx.NodeProto, onnx.TensorProto)
_ELEMENT_TYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}


def standalone_model(bundle: Bundle, params: Mapping[str, npt.NDArray[np.generic]]) -> bytes:
    """The bundle's inference graph with ``params`` as its weights, ready to deploy.

    Args:
        bundle: the bundle (its ``model.onnx`` and manifest).
        params: a value for every parameter and buffer of the manifest.

    Returns:
        The serialised model (deterministic bytes).

    Raises:
        BundleError: a value is missing or has the wrong shape, or the result is not
            valid ONNX (the bundle's graph does not agree with its manifest).
    """
    model = onnx.load_from_string(bundle.model_onnx)
    graph = model.graph
    _set_weights(graph, bundle.manifest, params)
    for value in [value for value in graph.input if value.name != INPUT_NAME]:
        graph.input.remove(value)
    _drop_unused_initializers(graph)
    _constants_as_nodes(graph, set(bundle.manifest.tensor_names))
    if bundle.manifest.source is not None:
        _restore_interface(graph, bundle.manifest.source)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BundleError(f"the standalone model is not valid ONNX: {exc}") from exc
    return bytes(model.SerializeToString(deterministic=True))


def exported_tensors(bundle: Bundle) -> frozenset[str]:
    """The state tensors a standalone export of ``bundle`` holds: those its graph reads.

    The others (``num_batches_tracked`` of an inference BatchNorm) are left out of
    every export, so a model read back from one takes them from the bundle.
    """
    graph = onnx.load_from_string(bundle.model_onnx).graph
    used = set(_consumed(graph)) | {value.name for value in graph.output}
    return frozenset(name for name in bundle.manifest.tensor_names if name in used)


def _set_weights(
    graph: onnx.GraphProto, manifest: Manifest, params: Mapping[str, npt.NDArray[np.generic]]
) -> None:
    wanted = set(manifest.tensor_names)
    replaced: set[str] = set()
    for index, initializer in enumerate(graph.initializer):
        if initializer.name not in wanted:
            continue
        value = params.get(initializer.name)
        if value is None:
            continue
        old = numpy_helper.to_array(initializer)
        if tuple(old.shape) != tuple(value.shape):
            raise BundleError(
                f"tensor {initializer.name!r} has shape {list(value.shape)}, "
                f"model.onnx {list(old.shape)}: the bundle is not the federation's"
            )
        # np.array, not np.ascontiguousarray: the latter turns 0-d arrays (BatchNorm's
        # num_batches_tracked) into shape [1], which onnxruntime refuses to load.
        new = numpy_helper.from_array(np.array(value, dtype=old.dtype, order="C"), initializer.name)
        graph.initializer[index].CopyFrom(new)
        replaced.add(initializer.name)
    missing = sorted(wanted - replaced)
    if missing:
        raise BundleError(f"no value (or no model.onnx initializer) for {missing[:5]}")


def _constants_as_nodes(graph: onnx.GraphProto, state: set[str]) -> None:
    """Turn initializers that are not model state into ``Constant`` nodes."""
    constants = [i for i in graph.initializer if i.name not in state]
    taken = {node.name for node in graph.node}
    nodes = []
    for initializer in constants:
        name = _fresh(f"constant_{initializer.name}", taken)
        nodes.append(
            helper.make_node("Constant", [], [initializer.name], name=name, value=initializer)
        )
        graph.initializer.remove(initializer)
    _prepend(graph, nodes)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = set(_consumed(graph)) | {value.name for value in graph.output}
    for initializer in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(initializer)


def _restore_interface(graph: onnx.GraphProto, source: OnnxSource) -> None:
    present = {i.name for i in graph.initializer}
    initializers = [i for i in source.initializers if i.tensor in present]
    targets = {source.input.name, source.output.name, *(i.name for i in initializers)}
    # Names the fedmq graph already uses for something else move out of the way first.
    taken = set(_names(graph)) | targets
    moved = {name: _fresh(name, taken) for name in sorted(set(_names(graph)) & targets)}
    _rename(graph, moved)
    renames: dict[str, str] = {
        moved.get(INPUT_NAME, INPUT_NAME): source.input.name,
        moved.get(OUTPUT_NAME, OUTPUT_NAME): source.output.name,
    }
    node_names = {node.name for node in graph.node}
    layout_nodes: list[onnx.NodeProto] = []
    by_name = {i.name: i for i in graph.initializer}
    for item in initializers:
        tensor = moved.get(item.tensor, item.tensor)
        if not item.transpose and item.scale == 1.0:
            renames[tensor] = item.name
            continue
        # Store the file's layout under the file's name; a node recreates fedmq's.
        initializer = by_name[tensor]
        value = numpy_helper.to_array(initializer)
        initializer.CopyFrom(numpy_helper.from_array(item.to_file(value), item.name))
        produced = item.name
        if item.scale != 1.0:
            scale_name = _fresh(f"{item.name}_scale", taken)
            scale = numpy_helper.from_array(np.array(item.scale, dtype=value.dtype), scale_name)
            scaled = _fresh(f"{item.name}_scaled", taken) if item.transpose else tensor
            layout_nodes.append(
                helper.make_node(
                    "Constant", [], [scale_name], name=_fresh(scale_name, node_names), value=scale
                )
            )
            layout_nodes.append(
                helper.make_node(
                    "Mul",
                    [produced, scale_name],
                    [scaled],
                    name=_fresh(f"{item.name}_mul", node_names),
                )
            )
            produced = scaled
        if item.transpose:
            layout_nodes.append(
                helper.make_node(
                    "Transpose",
                    [produced],
                    [tensor],
                    name=_fresh(f"{item.name}_layout", node_names),
                    perm=[1, 0],
                )
            )
    _rename(graph, renames)
    _prepend(graph, layout_nodes)
    batch = source.input.shape[0] if source.input.shape else None
    _set_type(graph.input[0], source.input, batch)
    _set_type(graph.output[0], source.output, batch)
    # The file's initializer order, so a listing of the two models reads the same.
    order = {item.name: index for index, item in enumerate(initializers)}
    ordered = [
        _copy(i) for i in sorted(graph.initializer, key=lambda i: order.get(i.name, len(order)))
    ]
    del graph.initializer[:]
    graph.initializer.extend(ordered)


def _set_type(value: onnx.ValueInfoProto, spec: SourceValue, batch: str | int | None) -> None:
    """Declare ``spec``'s type; without a declared shape, the compiled one (batch renamed)."""
    value.ClearField("doc_string")
    tensor_type = value.type.tensor_type
    tensor_type.elem_type = _ELEMENT_TYPES[spec.dtype]
    if spec.shape is None:
        # ONNX requires a shape on graph outputs (files without one fail onnx.checker);
        # the compiled one is right, with the batch named as on the input.
        dims = [batch if d.dim_param == BATCH else d.dim_value for d in tensor_type.shape.dim]
    else:
        dims = list(spec.shape)
    tensor_type.ClearField("shape")
    tensor_type.shape.SetInParent()  # a known rank, even when it is 0
    for dim in dims:
        entry = tensor_type.shape.dim.add()
        if isinstance(dim, int):
            entry.dim_value = dim
        elif isinstance(dim, str):
            entry.dim_param = dim


def _prepend(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    if not nodes:
        return
    existing = [_copy(node) for node in graph.node]
    del graph.node[:]
    graph.node.extend([*nodes, *existing])


def _copy(message: _Message) -> _Message:
    # Detached copies: messages taken out of a repeated field before it is cleared.
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _fresh(name: str, taken: set[str]) -> str:
    candidate, index = name, 0
    while candidate in taken:
        index += 1
        candidate = f"{name}_{index}"
    taken.add(candidate)
    return candidate


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        yield from attribute.graphs


def _consumed(graph: onnx.GraphProto) -> Iterator[str]:
    """Every value a node of ``graph`` (or of a subgraph: outer-scope reads) reads."""
    for node in graph.node:
        yield from (name for name in node.input if name)
        for sub in _subgraphs(node):
            yield from _consumed(sub)
            yield from (value.name for value in sub.output)


def _names(graph: onnx.GraphProto) -> Iterator[str]:
    """Every value name in ``graph`` and its subgraphs."""
    yield from (value.name for value in (*graph.input, *graph.output, *graph.value_info))
    yield from (initializer.name for initializer in graph.initializer)
    for node in graph.node:
        yield from (name for name in (*node.input, *node.output) if name)
        for sub in _subgraphs(node):
            yield from _names(sub)


def _rename(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Rename values everywhere in ``graph``, subgraphs included."""
    if not renames:
        return
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renames.get(value.name, value.name)
    for initializer in graph.initializer:
        initializer.name = renames.get(initializer.name, initializer.name)
    for node in graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = renames.get(name, name)
        for index, name in enumerate(node.output):
            node.output[index] = renames.get(name, name)
        for sub in _subgraphs(node):
            _rename(sub, renames)


__all__ = ["exported_tensors", "standalone_model"]
