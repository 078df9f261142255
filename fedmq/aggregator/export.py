"""``fedmq export``: write a round's global model as a standalone ONNX inference model.

The bundle's ``model.onnx`` takes every parameter and buffer as an input whose default
(initializer) is the compiled initial value.  Exporting replaces those initializers
with the checkpointed values of the chosen round, so the result runs in any ONNX
runtime with only ``input`` fed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedmq.aggregator.store import checkpoint_file, checkpoint_rounds
from fedmq.bundle import Bundle
from fedmq.durable_files import write_file
from fedmq.errors import BundleError, DecodeError, StateError
from fedmq.wire.tensors import decode_tensors


def export_onnx(state_dir: Path, bundle_dir: Path, out: Path, round_id: int | None = None) -> int:
    """Write the inference model of ``round_id`` (default: the latest) to ``out``.

    Args:
        state_dir: the aggregator's state directory (read only; the service may run).
        bundle_dir: the bundle the federation was started with.
        out: the ONNX file to write (replaced atomically).
        round_id: checkpoint to export; None for the newest.

    Returns:
        The round exported.

    Raises:
        StateError: no such checkpoint, or it does not decode.
        BundleError: the bundle's model does not take the checkpoint's tensors.
    """
    # onnx is in the server extra only: importing it here keeps `fedmq serve` and the
    # rest of the CLI usable on an install without it.
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    rounds = checkpoint_rounds(state_dir)
    if not rounds:
        raise StateError(f"{state_dir} holds no checkpoint (has the aggregator run there?)")
    chosen = rounds[-1] if round_id is None else round_id
    if chosen not in rounds:
        raise StateError(f"no checkpoint for round {chosen}; available: {rounds[0]}..{rounds[-1]}")
    path = checkpoint_file(state_dir, chosen)
    try:
        params = decode_tensors(path.read_bytes())
    except (OSError, DecodeError) as exc:
        raise StateError(f"checkpoint {path} is unreadable: {exc}") from exc
    bundle = Bundle.load(bundle_dir)
    model = onnx.load_from_string(bundle.model_onnx)
    replaced: set[str] = set()
    for index, initializer in enumerate(model.graph.initializer):
        value = params.get(initializer.name)
        if value is None:
            continue
        old = numpy_helper.to_array(initializer)
        if tuple(old.shape) != tuple(value.shape):
            raise BundleError(
                f"checkpoint tensor {initializer.name!r} has shape {list(value.shape)}, "
                f"model.onnx {list(old.shape)}: the bundle is not the federation's"
            )
        new = numpy_helper.from_array(
            np.ascontiguousarray(value, dtype=old.dtype), initializer.name
        )
        model.graph.initializer[index].CopyFrom(new)
        replaced.add(initializer.name)
    missing = sorted(set(bundle.manifest.tensor_names) - replaced)
    if missing:
        raise BundleError(f"model.onnx has no initializer for {missing[:5]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, model.SerializeToString())
    return chosen


__all__ = ["export_onnx"]
