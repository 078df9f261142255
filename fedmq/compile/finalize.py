"""Normalise exported ONNX models: old-runtime compatible, standard ops only, reproducible.

The exporter's output carries node metadata (source locations, module stacks), symbol
names such as ``s26`` for the batch dimension and the newest IR version.  A bundle
should run on onnxruntime >= 1.15 (IR version 8), name the batch ``batch``, contain
only default-domain operators and be byte-identical when compiled twice.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import onnx
import onnx.inliner
from onnx import numpy_helper

from fedmq.bundle.manifest import BATCH
from fedmq.errors import CompileError, UnsupportedOperatorError

OPSET = 18  # supported by onnxruntime >= 1.15 (2023) and every release since
IR_VERSION = 8  # the newest IR onnxruntime 1.15 reads; opset 18 needs at least 8
PRODUCER = "fedmq-compile"
_STANDARD_DOMAINS = ("", "ai.onnx")


def _strip(graph: onnx.GraphProto) -> None:
    graph.doc_string = ""
    del graph.value_info[:]
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _strip(attribute.g)
            for sub in attribute.graphs:
                _strip(sub)
    for value in (*graph.input, *graph.output):
        value.doc_string = ""
        del value.metadata_props[:]
    for initializer in graph.initializer:
        initializer.doc_string = ""
        del initializer.metadata_props[:]


def _check_ops(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        if node.domain not in _STANDARD_DOMAINS:
            raise UnsupportedOperatorError(
                f"{node.domain}::{node.op_type}",
                "the export produced a non-standard ONNX operator",
            )
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _check_ops(attribute.g)
            for sub in attribute.graphs:
                _check_ops(sub)


def _rename_batch(graph: onnx.GraphProto, symbol: str) -> None:
    for value in (*graph.input, *graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param == symbol:
                dim.dim_param = BATCH


def finalize(
    model: onnx.ModelProto,
    batched_inputs: int,
    defaults: Mapping[str, npt.NDArray[np.generic]] | None = None,
) -> bytes:
    """Normalise an exported model and serialise it.

    Args:
        model: the exporter's model (modified in place).
        batched_inputs: how many leading graph inputs carry the dynamic batch.
        defaults: initializers to attach to same-named graph inputs, so the model
            runs standalone while a caller may still feed current values.

    Returns:
        The serialised model.

    Raises:
        UnsupportedOperatorError: an operator outside the standard ONNX domain remains.
        CompileError: the result fails the ONNX checker or the batch is not dynamic.
    """
    model = onnx.inliner.inline_local_functions(model)
    del model.functions[:]
    graph = model.graph
    _check_ops(graph)
    first = graph.input[0].type.tensor_type.shape.dim
    if not first or not first[0].HasField("dim_param"):
        raise CompileError("the exported graph has a fixed batch size; it must be dynamic")
    symbol = first[0].dim_param
    for value in graph.input[:batched_inputs]:
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_param != symbol:
            raise CompileError(f"graph input {value.name!r} lost its dynamic batch dimension")
    _rename_batch(graph, symbol)
    _strip(graph)
    graph.name = "main"
    model.doc_string = ""
    del model.metadata_props[:]
    model.producer_name = PRODUCER
    model.producer_version = ""
    model.domain = ""
    model.model_version = 0
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", OPSET))
    model.ir_version = IR_VERSION
    if defaults:
        names = {value.name for value in graph.input}
        for name, array in defaults.items():
            if name not in names:
                raise CompileError(f"no graph input named {name!r} to attach a default to")
            graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CompileError(f"the exported graph is not valid ONNX: {exc}") from exc
    return bytes(model.SerializeToString(deterministic=True))
