"""``fedmq export``: write a round's global model as a standalone ONNX inference model.

The checkpointed values of the chosen round become the weights of the bundle's
inference graph (:mod:`fedmq.aggregator.standalone`): initializers only, a single
input, and for a model compiled from ONNX the original file's names and layouts.
"""

from __future__ import annotations

from pathlib import Path

from fedmq.aggregator.store import checkpoint_file, checkpoint_rounds
from fedmq.bundle import Bundle
from fedmq.durable_files import write_file
from fedmq.errors import DecodeError, StateError
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
    from fedmq.aggregator.standalone import standalone_model  # noqa: PLC0415

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
    model = standalone_model(Bundle.load(bundle_dir), params)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, model)
    return chosen


__all__ = ["export_onnx"]
