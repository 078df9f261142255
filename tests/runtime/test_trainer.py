"""Trainer on the shipped bundles: updates, determinism, control, errors (no torch)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from fedmq.bundle import Bundle
from fedmq.errors import TrainingCancelled, TrainingError
from fedmq.runtime import Trainer, TrainResult
from fedmq.wire.training import TrainingConfig


def apply(params: dict[str, np.ndarray], result: TrainResult) -> dict[str, np.ndarray]:
    return {n: v + result.delta[n] if n in result.delta else v for n, v in params.items()}


def test_mlp_learns_digits(mlp_bundle: Bundle, digits: tuple[np.ndarray, ...]) -> None:
    x_train, y_train, x_test, y_test = digits
    trainer = Trainer(mlp_bundle)
    params = mlp_bundle.initial_parameters()
    result = trainer.train(params, x_train, y_train, TrainingConfig(epochs=5, lr=0.1))
    assert set(result.delta) == set(mlp_bundle.manifest.update_names)
    assert result.num_examples == len(x_train)
    assert result.metrics["steps"] == 5 * -(-len(x_train) // 32)
    before = trainer.evaluate(params, x_test, y_test)
    after = trainer.evaluate(apply(params, result), x_test, y_test)
    assert before["accuracy"] < 0.3
    assert after["accuracy"] > 0.9
    assert after["loss"] < before["loss"]


def test_cnn_updates_batchnorm_statistics_not_counters(
    cnn_bundle: Bundle, digits: tuple[np.ndarray, ...]
) -> None:
    x_train, y_train, _, _ = digits
    manifest = cnn_bundle.manifest
    result = Trainer(cnn_bundle).train(
        cnn_bundle.initial_parameters(),
        x_train[:200].reshape(-1, 1, 8, 8),
        y_train[:200],
        TrainingConfig(epochs=1, optimizer="adam", lr=0.01, dropout_seed=1),
    )
    assert "1.running_mean" in result.delta
    assert "1.running_var" in result.delta
    assert "1.num_batches_tracked" not in result.delta
    assert np.abs(result.delta["1.running_mean"]).max() > 0
    assert list(result.delta) == list(manifest.update_names)


def test_same_seeds_same_update_other_seeds_differ(
    cnn_bundle: Bundle, digits: tuple[np.ndarray, ...]
) -> None:
    x, y = digits[0][:128].reshape(-1, 1, 8, 8), digits[1][:128]
    trainer = Trainer(cnn_bundle)
    params = cnn_bundle.initial_parameters()

    def run(**overrides: int) -> TrainResult:
        config = TrainingConfig(epochs=1, batch_size=16, seed=1, dropout_seed=2).model_copy(
            update=overrides
        )
        return trainer.train(params, x, y, config)

    first, second = run(), run()
    for name in first.delta:
        np.testing.assert_array_equal(first.delta[name], second.delta[name])
    for other in (run(seed=5), run(dropout_seed=9)):
        assert any(not np.array_equal(first.delta[n], other.delta[n]) for n in first.delta)


def test_autoencoder_reconstruction_improves(ae_bundle: Bundle, sensor_windows: np.ndarray) -> None:
    trainer = Trainer(ae_bundle, threads=2)
    params = ae_bundle.initial_parameters()
    result = trainer.train(
        params, sensor_windows, sensor_windows, TrainingConfig(epochs=10, optimizer="adam", lr=0.01)
    )
    before = trainer.evaluate(params, sensor_windows, sensor_windows)
    after = trainer.evaluate(apply(params, result), sensor_windows, sensor_windows)
    assert set(after) == {"loss", "mse", "mae"}
    assert after["mse"] < before["mse"] / 5
    # predict() gives the reconstructions the anomaly score is computed from.
    recon = trainer.predict(apply(params, result), sensor_windows[:7], batch_size=3)
    assert recon.shape == (7, 3, 64)
    np.testing.assert_allclose(((recon - sensor_windows[:7]) ** 2).mean(), after["mse"], rtol=0.5)


def test_progress_max_steps_and_cancel(mlp_bundle: Bundle, digits: tuple[np.ndarray, ...]) -> None:
    x, y = digits[0][:100], digits[1][:100]
    trainer = Trainer(mlp_bundle)
    params = mlp_bundle.initial_parameters()
    seen: list[tuple[int, int]] = []
    result = trainer.train(
        params,
        x,
        y,
        TrainingConfig(epochs=3, batch_size=30, max_steps=5),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(i, 5) for i in range(1, 6)]
    assert result.metrics["steps"] == 5
    polls = iter([False, False, True])
    with pytest.raises(TrainingCancelled, match="after 2 steps"):
        trainer.train(params, x, y, TrainingConfig(), should_stop=lambda: next(polls))


def test_last_partial_batch_is_trained(mlp_bundle: Bundle, digits: tuple[np.ndarray, ...]) -> None:
    result = Trainer(mlp_bundle).train(
        mlp_bundle.initial_parameters(),
        digits[0][:70],
        digits[1][:70],
        TrainingConfig(epochs=2, batch_size=32),
    )
    assert result.metrics["steps"] == 6
    assert result.metrics["examples_seen"] == 140


def test_clipping_bounds_a_plain_sgd_step(
    mlp_bundle: Bundle, digits: tuple[np.ndarray, ...]
) -> None:
    config = TrainingConfig(max_steps=1, lr=1.0, clip_grad_norm=0.01, batch_size=64)
    result = Trainer(mlp_bundle).train(
        mlp_bundle.initial_parameters(), digits[0], digits[1], config
    )
    norm = np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in result.delta.values()))
    assert 0.0099 < norm <= 0.01 + 1e-6  # the raw gradient norm is far above 0.01


def test_fedprox_pulls_towards_the_global_model(
    mlp_bundle: Bundle, digits: tuple[np.ndarray, ...]
) -> None:
    trainer = Trainer(mlp_bundle)
    params = mlp_bundle.initial_parameters()

    def drift(mu: float) -> float:
        config = TrainingConfig(epochs=3, lr=0.1, prox_mu=mu)
        result = trainer.train(params, digits[0][:300], digits[1][:300], config)
        return float(np.sqrt(sum((d**2).sum() for d in result.delta.values())))

    assert drift(5.0) < 0.5 * drift(0.0)


def test_concurrent_training_on_one_trainer(
    mlp_bundle: Bundle, digits: tuple[np.ndarray, ...]
) -> None:
    trainer = Trainer(mlp_bundle)
    params = mlp_bundle.initial_parameters()
    config = TrainingConfig(epochs=2, optimizer="adamw", lr=0.01, weight_decay=0.01)
    expected = trainer.train(params, digits[0][:400], digits[1][:400], config)
    results: list[TrainResult] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                trainer.train(params, digits[0][:400], digits[1][:400], config)
            )
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3
    for result in results:
        for name, delta in expected.delta.items():
            np.testing.assert_array_equal(result.delta[name], delta)


def test_params_are_not_modified(mlp_bundle: Bundle, digits: tuple[np.ndarray, ...]) -> None:
    params = mlp_bundle.initial_parameters()
    copies = {n: v.copy() for n, v in params.items()}
    Trainer(mlp_bundle).train(params, digits[0][:64], digits[1][:64], TrainingConfig(lr=0.5))
    for name, value in copies.items():
        np.testing.assert_array_equal(params[name], value)


def test_divergence_is_a_training_error(mlp_bundle: Bundle, digits: tuple[np.ndarray, ...]) -> None:
    params = mlp_bundle.initial_parameters()
    params["0.weight"] = np.full_like(params["0.weight"], np.nan)
    with pytest.raises(TrainingError, match="loss is nan at step 0"):
        Trainer(mlp_bundle).train(params, digits[0][:64], digits[1][:64], TrainingConfig())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p, x, y: (p, x[:, :10], y), r"inputs have shape \[64, 10\]"),
        (lambda p, x, y: (p, x, y[:10]), "labels have shape"),
        (lambda p, x, y: (p, x, y + 10), r"class labels span \[10, 19\]"),
        (
            lambda p, x, y: ({k: v for k, v in p.items() if k != "2.bias"}, x, y),
            r"missing \['2.bias'\]",
        ),
        (lambda p, x, y: ({**p, "2.bias": p["2.bias"][:3]}, x, y), "'2.bias' has shape"),
        (lambda p, x, y: ({**p, "extra": p["2.bias"]}, x, y), r"unexpected \['extra'\]"),
        (lambda p, x, y: (p, x[:0], y[:0]), "no training examples"),
    ],
)
def test_bad_inputs_are_training_errors(
    mlp_bundle: Bundle, digits: tuple[np.ndarray, ...], mutate: object, message: str
) -> None:
    params, x, y = mutate(mlp_bundle.initial_parameters(), digits[0][:64], digits[1][:64])  # type: ignore[operator]
    with pytest.raises(TrainingError, match=message):
        Trainer(mlp_bundle).train(params, x, y, TrainingConfig())
