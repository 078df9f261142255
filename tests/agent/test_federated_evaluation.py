"""The agent's side of federated evaluation, without a broker: the global model it receives
is evaluated before training, and an evaluate-only round commits a report, not a delta."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from agent.helpers import write_digits
from edge_agent.config import DataConfig
from edge_agent.data import fit_to_model, load_raw
from edge_agent.state import StateDir
from edge_agent.training import ModelCache, RoundInputs, RoundOutput, train_and_commit
from fedmq.bundle import Bundle
from fedmq.errors import DataError
from fedmq.runtime.trainer import Trainer
from fedmq.wire.archive import pack_files
from fedmq.wire.blobs import blob_ref
from fedmq.wire.control import RoundAnnouncement, RoundTask
from fedmq.wire.limits import DEFAULT_LIMITS
from fedmq.wire.tensors import decode_tensors, encode_tensors
from fedmq.wire.training import TrainingConfig
from fedmq.wire.update import UpdateMeta, decode_update

BUNDLE = Path(__file__).resolve().parents[2] / "examples" / "bundles" / "digits_mlp"
FEDERATION = "plant7"
CLIENT = "press-1"


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load(BUNDLE)


def _inputs(
    bundle: Bundle,
    data: DataConfig,
    *,
    task: RoundTask = "train",
    codec: str = "raw",
    round_id: int = 1,
) -> RoundInputs:
    archive = bytearray(pack_files(bundle.files()))
    params = bytearray(encode_tensors(bundle.initial_parameters()).data)
    announcement = RoundAnnouncement(
        federation=FEDERATION,
        aggregator="agg",
        round=round_id,
        issued_at=time.time(),
        deadline=time.time() + 60,
        bundle=blob_ref(bytes(archive), 4096),
        params=blob_ref(bytes(params), 4096),
        training=TrainingConfig(epochs=1, batch_size=32, lr=0.1),
        codec=codec,
        task=task,
    )
    return RoundInputs(announcement, CLIENT, archive, params, data, DEFAULT_LIMITS)


def _run(
    inputs: RoundInputs, state: StateDir
) -> tuple[RoundOutput, dict[str, np.ndarray], UpdateMeta]:
    output = train_and_commit(
        inputs, ModelCache(1), state, progress=lambda *_: None, should_stop=lambda: False
    )
    meta, tensors = decode_update(output.update.data)
    return output, tensors, meta


def _direct(bundle: Bundle, data: DataConfig) -> dict[str, float]:
    """The received model evaluated directly on the same evaluation split."""
    train, evaluation = load_raw(data)
    dataset = fit_to_model(train, evaluation, bundle.manifest)
    trainer = Trainer(bundle)
    return trainer.evaluate(bundle.initial_parameters(), dataset.x_eval, dataset.y_eval) | {
        "examples": float(dataset.num_eval)
    }


def test_a_training_update_reports_the_received_model_beside_the_trained_one(
    tmp_path: Path, bundle: Bundle
) -> None:
    data = DataConfig(path=write_digits(tmp_path / "data"))
    state = StateDir(tmp_path / "state", FEDERATION)
    try:
        _, tensors, meta = _run(_inputs(bundle, data), state)
    finally:
        state.close()
    metrics = meta.metrics
    direct = _direct(bundle, data)
    assert metrics["global_eval_loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert metrics["global_eval_accuracy"] == pytest.approx(direct["accuracy"], rel=1e-6)
    assert metrics["global_eval_examples"] == direct["examples"] == 72  # 20% of 360
    # The trained model's figures are still there, and are of another model.
    assert {"train_loss", "num_batches", "eval_loss", "eval_accuracy"} <= set(metrics)
    assert metrics["eval_loss"] < metrics["global_eval_loss"]
    assert list(tensors) == list(bundle.manifest.update_names)


def test_an_evaluate_round_commits_a_report_and_keeps_the_residual(
    tmp_path: Path, bundle: Bundle
) -> None:
    data = DataConfig(path=write_digits(tmp_path / "data"))
    state = StateDir(tmp_path / "state", FEDERATION)
    try:
        # A lossy round first: it leaves an error-feedback residual for the bundle.
        _run(_inputs(bundle, data, codec="int8"), state)
        sha = blob_ref(pack_files(bundle.files()), 4096).sha256
        residual = state.residuals.path(sha).read_bytes()
        assert len(residual) > 100
        output, tensors, meta = _run(
            _inputs(bundle, data, task="evaluate", codec="int8", round_id=2), state
        )
        assert tensors == {}  # nothing to fold
        assert state.residuals.path(sha).read_bytes() == residual  # for the next training
        assert state.state.last_answered_round == 2
        [entry] = [e for e in state.outbox.entries() if e.round == 2]
        assert entry.update_id == meta.update_id
    finally:
        state.close()
    direct = _direct(bundle, data)
    assert meta.num_examples == direct["examples"]
    assert meta.metrics == pytest.approx(
        {
            "global_eval_loss": direct["loss"],
            "global_eval_accuracy": direct["accuracy"],
            "global_eval_examples": direct["examples"],
        },
        rel=1e-6,
    )
    assert output.update.ref.size < 2048


def test_an_evaluate_round_without_evaluation_data_fails_as_a_data_error(
    tmp_path: Path, bundle: Bundle
) -> None:
    data = DataConfig(path=write_digits(tmp_path / "data"), eval_fraction=0.0)
    state = StateDir(tmp_path / "state", FEDERATION)
    try:
        with pytest.raises(DataError, match="evaluation data"):
            _run(_inputs(bundle, data, task="evaluate"), state)
        # A training round without evaluation data still trains (and reports no figures).
        _, _, meta = _run(_inputs(bundle, data, round_id=2), state)
        assert not any(name.startswith("global_") for name in meta.metrics)
    finally:
        state.close()
    assert decode_tensors(encode_tensors({}).data) == {}
