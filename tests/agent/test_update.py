"""Building updates: codecs, error feedback carried across rounds, seeds."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.scripted import BUNDLES
from edge_agent.update import build_update, local_training_config
from fedmq.bundle.bundle import Bundle
from fedmq.errors import TrainingError
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.training import TrainingConfig
from fedmq.wire.update import decode_update

MANIFEST = Bundle.load(BUNDLES / "digits_cnn").manifest


def random_delta(rng: np.random.Generator) -> dict[str, npt.NDArray[Any]]:
    return {
        name: rng.normal(0, 0.01, MANIFEST.tensor(name).shape).astype(np.float32)
        for name in MANIFEST.update_names
    }


def build(delta: dict[str, Any], residual: dict[str, Any], codec: str):  # type: ignore[no-untyped-def]
    return build_update(
        delta=delta,
        residual=residual,
        manifest=MANIFEST,
        codec=CodecSpec.parse(codec),
        federation="fed",
        client="dev",
        round_id=3,
        num_examples=10,
        metrics={"train_loss": 1.5},
        chunk_size=1024,
    )


@pytest.mark.parametrize("codec", ["raw", "fp16", "int8", "topk:0.05"])
def test_error_feedback_loses_nothing_across_rounds(codec: str) -> None:
    # What the aggregator received over all rounds plus the residual still on the device
    # equals the sum of every delta trained: the codec only delays information.
    rng = np.random.default_rng(0)
    residual: dict[str, Any] = {}
    trained = {name: np.zeros(MANIFEST.tensor(name).shape) for name in MANIFEST.update_names}
    sent = {name: np.zeros_like(value) for name, value in trained.items()}
    for _ in range(4):
        delta = random_delta(rng)
        built = build(delta, residual, codec)
        meta, decoded = decode_update(built.data)
        assert meta.update_id == built.meta.update_id
        assert list(decoded) == list(MANIFEST.update_names)
        for name in trained:
            trained[name] += delta[name]
            sent[name] += decoded[name]
        residual = built.residual
        assert bool(residual) == (codec != "raw")
    for name, total in trained.items():
        leftover = residual.get(name, 0.0)
        np.testing.assert_allclose(sent[name] + leftover, total, atol=1e-6)


def test_update_carries_metrics_examples_and_a_fresh_id() -> None:
    delta = random_delta(np.random.default_rng(1))
    first, second = build(delta, {}, "raw"), build(delta, {}, "raw")
    assert first.meta.update_id != second.meta.update_id
    meta, _ = decode_update(first.data)
    assert meta.metrics == {"train_loss": 1.5}
    assert meta.num_examples == 10
    assert meta.round == meta.base_round == 3
    assert first.ref.size == len(first.data)


def test_non_finite_or_incomplete_delta_is_a_training_error() -> None:
    delta = random_delta(np.random.default_rng(2))
    name = MANIFEST.update_names[0]
    broken = {**delta, name: np.full_like(delta[name], np.nan)}
    with pytest.raises(TrainingError, match="not finite"):
        build(broken, {}, "raw")
    incomplete = dict(delta)
    del incomplete[name]
    with pytest.raises(TrainingError, match="no delta"):
        build(incomplete, {}, "raw")


def test_fp16_overflow_is_a_training_error() -> None:
    delta = random_delta(np.random.default_rng(3))
    name = MANIFEST.update_names[0]
    delta[name] = np.full_like(delta[name], 1e6)
    with pytest.raises(TrainingError, match="fp16"):
        build(delta, {}, "fp16")


def test_seeds_differ_per_client_and_round_and_repeat_for_a_rerun() -> None:
    config = TrainingConfig(seed=7, dropout_seed=3)
    a = local_training_config(config, "dev-a", 1)
    assert a == local_training_config(config, "dev-a", 1)
    assert a.seed != local_training_config(config, "dev-b", 1).seed
    assert a.seed != local_training_config(config, "dev-a", 2).seed
    assert a.dropout_seed not in (None, 3)
    assert 0 <= a.seed < 2**63
    assert local_training_config(TrainingConfig(), "dev-a", 1).dropout_seed is None
