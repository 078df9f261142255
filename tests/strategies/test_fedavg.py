"""FedAvg: the streaming fold equals numpy's weighted average, in O(model) memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.errors import LocalProtocolError
from fedmq.strategies import ServerSgd, Strategy, WeightedMean
from fedmq.strategies.layout import ModelLayout
from strategies.support import LAYOUT, SHAPES, cohort, params, stacked


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 1e4), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_weighted_mean_equals_numpy_average(weights: list[float], seed: int) -> None:
    updates = cohort(len(weights), seed)
    mean = WeightedMean()
    mean.begin(LAYOUT)
    for update, weight in zip(updates, weights, strict=True):
        mean.add(update, weight)
    result = mean.result()
    for name in SHAPES:
        expected = np.average(stacked(updates, name), axis=0, weights=weights)
        np.testing.assert_allclose(result[name], expected, rtol=1e-5, atol=1e-6)
    assert mean.count == len(weights)


def test_identical_updates_average_to_that_update() -> None:
    update = cohort(1)[0]
    mean = WeightedMean()
    mean.begin(LAYOUT)
    for weight in (1, 7, 1000):
        mean.add(update, weight)
    for name, value in mean.result().items():
        np.testing.assert_allclose(value, update[name], rtol=1e-6)


def test_fedavg_moves_the_model_by_the_mean_delta() -> None:
    updates = cohort(3)
    base = params()
    strategy = Strategy(WeightedMean(), ServerSgd(1.0))
    strategy.begin_round(1, LAYOUT)
    for update, weight in zip(updates, (10, 20, 30), strict=True):
        strategy.fold(update, weight)
    new = strategy.finalize(base)
    for name in SHAPES:
        expected = base[name] + np.average(stacked(updates, name), axis=0, weights=[10, 20, 30])
        np.testing.assert_allclose(new[name], expected, rtol=1e-5, atol=1e-6)


def test_server_learning_rate_scales_the_step() -> None:
    updates = cohort(2)
    base = params()
    strategy = Strategy(WeightedMean(), ServerSgd(0.5))
    strategy.begin_round(1, LAYOUT)
    for update in updates:
        strategy.fold(update, 1.0)
    new = strategy.finalize(base)
    for name in SHAPES:
        # Buffers (running statistics) are not optimized: they take the plain mean delta.
        lr = 0.5 if name in LAYOUT.optimized else 1.0
        expected = base[name] + lr * stacked(updates, name).mean(axis=0)
        np.testing.assert_allclose(new[name], expected, rtol=1e-5, atol=1e-6)


def test_begin_round_forgets_the_previous_round() -> None:
    mean = WeightedMean()
    mean.begin(LAYOUT)
    mean.add(cohort(1, 1)[0], 5)
    mean.begin(LAYOUT)
    fresh = cohort(1, 2)[0]
    mean.add(fresh, 1)
    for name, value in mean.result().items():
        np.testing.assert_allclose(value, fresh[name], rtol=1e-6)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_weights_are_refused(weight: float) -> None:
    mean = WeightedMean()
    mean.begin(LAYOUT)
    with pytest.raises(LocalProtocolError, match="weight"):
        mean.add(cohort(1)[0], weight)


def test_an_empty_round_has_no_result() -> None:
    mean = WeightedMean()
    mean.begin(LAYOUT)
    with pytest.raises(LocalProtocolError, match="no update"):
        mean.result()


def _peak_fold_memory(updates: int, size: int) -> int:
    layout = ModelLayout.from_shapes({"w": (size,)})
    mean = WeightedMean()
    mean.begin(layout)
    rng = np.random.default_rng(0)
    template = rng.standard_normal(size).astype(np.float32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for i in range(updates):
            # Each update is created, folded and dropped, as the service does.
            mean.add({"w": template * np.float32(i % 7)}, 1.0 + i)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_fold_memory_does_not_grow_with_the_number_of_updates() -> None:
    size = 250_000  # 1 MB per update
    few = _peak_fold_memory(5, size)
    many = _peak_fold_memory(200, size)
    # Two transient arrays per fold at most, whatever the count: O(model), not O(updates).
    assert many < few + 4 * size
    assert many < 3 * 4 * size
