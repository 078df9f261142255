"""Update-norm clipping, central-DP Gaussian noise, FedProx, and building strategies from config."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.errors import LocalProtocolError
from fedmq.strategies import (
    CoordinateMedian,
    GaussianNoise,
    ServerSgd,
    Strategy,
    StrategyConfig,
    WeightedMean,
    build_strategy,
    clip_update,
    update_norm,
)
from fedmq.strategies.layout import ModelLayout
from fedmq.wire.training import TrainingConfig
from strategies.support import LAYOUT, SHAPES, cohort, params, stacked


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e3), bound=st.floats(0.01, 100), seed=st.integers(0, 2**16))
def test_clipping_bounds_the_norm_and_keeps_the_direction(
    scale: float, bound: float, seed: int
) -> None:
    update = {k: v * np.float32(scale) for k, v in cohort(1, seed)[0].items()}
    clipped, norm = clip_update(update, bound)
    flat = np.concatenate([update[k].ravel() for k in SHAPES]).astype(np.float64)
    assert norm == pytest.approx(np.linalg.norm(flat), rel=1e-5)
    assert update_norm(clipped) <= bound * (1 + 1e-5) or norm <= bound
    factor = min(1.0, bound / norm)
    for name in SHAPES:
        np.testing.assert_allclose(clipped[name], update[name] * factor, rtol=1e-5, atol=1e-12)


def test_clipping_leaves_small_updates_alone() -> None:
    update = cohort(1)[0]
    clipped, norm = clip_update(update, 1e9)
    assert all(clipped[k] is update[k] for k in SHAPES)
    assert norm > 0


def test_clipping_in_a_strategy_bounds_each_updates_influence() -> None:
    honest = cohort(3)
    attacker = {k: np.full(s, 1e4, np.float32) for k, s in SHAPES.items()}
    strategy = Strategy(WeightedMean(), ServerSgd(), clip_norm=1.0)
    strategy.begin_round(1, LAYOUT)
    for update in [*honest, attacker]:
        strategy.fold(update, 1.0)
    base = params()
    new = strategy.finalize(base)
    step = np.sqrt(sum(np.sum((new[k] - base[k]).astype(np.float64) ** 2) for k in SHAPES))
    assert step <= 1.0 + 1e-5  # a mean of vectors of norm <= 1
    assert strategy.clipped == 4


def test_noise_is_calibrated_and_deterministic_per_round() -> None:
    layout = ModelLayout.from_shapes({"w": (200_000,)})
    noise = GaussianNoise(noise_multiplier=2.0, clip_norm=0.5, seed=3)
    zero = {"w": np.zeros(200_000, np.float32)}
    a = noise.apply(zero, count=4, round_id=7)["w"]
    b = noise.apply(zero, count=4, round_id=7)["w"]
    c = noise.apply(zero, count=4, round_id=8)["w"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    sigma = 2.0 * 0.5 / 4
    assert a.std() == pytest.approx(sigma, rel=0.02)
    assert abs(a.mean()) < 5 * sigma / np.sqrt(a.size)
    assert layout.numel == a.size


def test_dp_strategy_weighs_updates_uniformly_and_adds_noise() -> None:
    updates = cohort(4, 8)
    clip = 1e6  # no clipping bites: isolates weighting and noise
    dp = Strategy(WeightedMean(), ServerSgd(), clip_norm=clip, noise=GaussianNoise(0.0, clip))
    dp.begin_round(1, LAYOUT)
    for update, examples in zip(updates, (1, 10, 100, 1000), strict=True):
        dp.fold(update, examples)
    base = params()
    new = dp.finalize(base)
    for name in SHAPES:  # zero noise multiplier: exactly the uniform mean
        np.testing.assert_allclose(
            new[name], base[name] + stacked(updates, name).mean(axis=0), rtol=1e-5
        )


def test_dp_requires_matching_clipping_and_a_mean() -> None:
    with pytest.raises(LocalProtocolError, match="clip"):
        Strategy(WeightedMean(), ServerSgd(), noise=GaussianNoise(1.0, 1.0))
    with pytest.raises(LocalProtocolError, match="mean"):
        Strategy(CoordinateMedian(), ServerSgd(), clip_norm=1.0, noise=GaussianNoise(1.0, 1.0))
    with pytest.raises(LocalProtocolError, match="clip_norm"):
        build_strategy(StrategyConfig(dp={"noise_multiplier": 1.0}))  # type: ignore[arg-type]


def test_fedprox_sends_mu_and_aggregates_like_fedavg() -> None:
    prox = build_strategy(StrategyConfig(name="fedprox", prox_mu=0.25))
    plain = build_strategy(StrategyConfig(name="fedavg"))
    base_training = TrainingConfig(lr=0.1)
    assert prox.training_config(base_training).prox_mu == 0.25
    assert prox.training_config(base_training).lr == 0.1
    assert plain.training_config(base_training).prox_mu == 0.0
    updates = cohort(3)
    results = []
    for strategy in (prox, plain):
        strategy.begin_round(1, LAYOUT)
        for update, w in zip(updates, (1, 2, 3), strict=True):
            strategy.fold(update, w)
        results.append(strategy.finalize(params()))
    for name in SHAPES:
        np.testing.assert_array_equal(results[0][name], results[1][name])


@pytest.mark.parametrize(
    "name",
    [
        "fedavg",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedprox",
        "median",
        "trimmed_mean",
        "krum",
    ],
)
def test_every_configured_strategy_builds_and_aggregates(name: str) -> None:
    strategy = build_strategy(StrategyConfig(name=name))  # type: ignore[arg-type]
    strategy.begin_round(1, LAYOUT)
    for update in cohort(5):
        strategy.fold(update, 2.0)
    new = strategy.finalize(params())
    assert set(new) == set(SHAPES)
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in new.values())
