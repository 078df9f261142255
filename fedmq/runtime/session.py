"""onnxruntime sessions for a bundle's graphs, checked against its manifest."""

from __future__ import annotations

from collections.abc import Sequence

import onnxruntime as ort

from fedmq.errors import BundleError

# onnxruntime logs a warning for every model.onnx weight that is also a graph input
# (that is deliberate: it lets us feed current weights); show errors only.
_LOG_ERRORS_ONLY = 3


def onnxruntime_version() -> str:
    """The version of the onnxruntime that trains, for status reports.

    Only :mod:`fedmq.runtime` imports onnxruntime; the agent asks here.
    """
    return str(ort.__version__)


def open_session(model: bytes, *, threads: int, what: str) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model`` that uses ``threads`` intra-op threads.

    Raises:
        BundleError: onnxruntime cannot load the graph.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = _LOG_ERRORS_ONLY
    # onnxruntime's default, stated because train steps depend on its fusions: the
    # convolution weight gradient's Transpose -> MatMul must fold into one GEMM
    # (FusedMatMul), or a large transpose is materialised every step.  EXTENDED was
    # measured equal to ALL on the bench models; BASIC 5-10% slower on the CNN.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Worker threads would busy-wait between steps; on a shared edge CPU that is waste.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exception classes
        raise BundleError(f"onnxruntime cannot load {what}: {exc}") from exc


def check_io(
    session: ort.InferenceSession,
    inputs: Sequence[str],
    outputs: Sequence[str],
    what: str,
) -> None:
    """Check the session's inputs (incl. overridable initializers) and outputs.

    Raises:
        BundleError: the graph's inputs or outputs are not those the manifest implies.
    """
    got_inputs = {i.name for i in session.get_inputs()}
    got_inputs |= {i.name for i in session.get_overridable_initializers()}
    got_outputs = [o.name for o in session.get_outputs()]
    missing = [name for name in inputs if name not in got_inputs]
    extra = sorted(got_inputs - set(inputs))
    if missing or extra or got_outputs != list(outputs):
        raise BundleError(
            f"{what} does not match the manifest: inputs missing {missing[:5]}, "
            f"unexpected {extra[:5]}; outputs {got_outputs[:5]} (expected {list(outputs)[:5]})"
        )
