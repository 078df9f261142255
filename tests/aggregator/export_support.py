"""What every exported model must satisfy: standalone, silent in onnxruntime, same outputs.

"No warnings" is checked in a fresh interpreter: onnxruntime logs from C++ straight to
the process's stderr (Python's ``warnings`` and ``logging`` never see it), its default
logger is process-wide, and a test process has already opened sessions that warn (a
bundle's ``model.onnx`` feeds its weights as inputs, deliberately).  The child sets the
severity threshold to WARNING for the default logger and the session, loads the model
and runs it once, so load-time (graph) and run-time (shape) warnings both reach its
stderr, which must then be empty.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from fedmq.aggregator.standalone import standalone_model
from fedmq.bundle import Bundle

_LOAD_AND_RUN = """
import sys
import numpy as np
import onnxruntime as ort
WARNING = 2  # onnxruntime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal
ort.set_default_logger_severity(WARNING)
options = ort.SessionOptions()
options.log_severity_level = WARNING
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
with np.load(sys.argv[2]) as feeds:
    session.run(None, dict(feeds))
"""

QUIET = 3  # severity for sessions opened in the test process itself: errors only


def onnxruntime_messages(model: bytes, feeds: Mapping[str, np.ndarray]) -> str:
    """Everything onnxruntime prints at WARNING or above while loading and running ``model``.

    Raises:
        AssertionError: the model does not load or run (the child's stderr says why).
    """
    with tempfile.TemporaryDirectory() as directory:
        model_path = Path(directory) / "model.onnx"
        feeds_path = Path(directory) / "feeds.npz"
        model_path.write_bytes(model)
        np.savez(feeds_path, **feeds)
        result = subprocess.run(
            [sys.executable, "-c", _LOAD_AND_RUN, str(model_path), str(feeds_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    return result.stderr


def session(model: bytes) -> ort.InferenceSession:
    """An in-process CPU session that prints errors only."""
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def perturbed(bundle: Bundle, seed: int) -> dict[str, np.ndarray]:
    """Initial state plus noise (running variances kept positive), counters advanced."""
    rng = np.random.default_rng(seed)
    state = bundle.initial_parameters()
    for name, value in state.items():
        if value.dtype != np.float32:
            state[name] = np.asarray(value + 7)  # num_batches_tracked: any value, still 0-d
        elif name.endswith("running_var"):
            state[name] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
        else:
            state[name] = (value + 0.05 * rng.standard_normal(value.shape)).astype(np.float32)
    return state


def example_input(bundle: Bundle, batch: int = 5, seed: int = 0) -> np.ndarray:
    spec = bundle.manifest.input
    rng = np.random.default_rng(seed)
    if spec.dtype == "int64":
        return rng.integers(0, 3, (batch, *spec.example_shape)).astype(np.int64)
    return rng.standard_normal((batch, *spec.example_shape)).astype(np.float32)


def check_standalone(
    bundle: Bundle, state: Mapping[str, np.ndarray], x: np.ndarray
) -> onnx.ModelProto:
    """Export ``state`` and check it against the bundle's inference graph; return the export.

    The export has one graph input; its initializers are exactly the state tensors the
    graph reads (every one but ``num_batches_tracked``, which inference BatchNorm does
    not use), under their original names for a model imported from ONNX, holding the
    given values; it computes what ``model.onnx`` fed the same state computes, and
    onnxruntime loads and runs it without a single warning.
    """
    data = standalone_model(bundle, state)
    model = onnx.load_from_string(data)
    manifest = bundle.manifest
    source = manifest.source
    names = source.original_names() if source is not None else {}
    input_name = source.input.name if source is not None else "input"
    output_name = source.output.name if source is not None else "output"
    assert [v.name for v in model.graph.input] == [input_name]
    assert [v.name for v in model.graph.output] == [output_name]
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    used = [n for n in manifest.tensor_names if not n.endswith("num_batches_tracked")]
    assert set(initializers) == {names.get(n, n) for n in used}
    layouts = {i.tensor: i for i in source.initializers} if source is not None else {}
    for name in used:
        stored = initializers[names.get(name, name)]
        layout = layouts.get(name)
        if layout is not None and layout.transpose:
            stored = stored.T
        if layout is not None and layout.scale != 1.0:
            stored = stored * np.float32(layout.scale)
        np.testing.assert_array_equal(stored, state[name], err_msg=name)
    (expected,) = session(bundle.model_onnx).run(["output"], {"input": x, **state})
    (got,) = session(data).run(None, {input_name: x})
    # Same weights bit for bit (checked above); with them as constants onnxruntime
    # folds and fuses differently, so float32 sums may differ in the last bits.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert onnxruntime_messages(data, {input_name: x}) == ""
    return model
