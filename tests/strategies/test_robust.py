"""Coordinate median, trimmed mean and Krum: numpy references and robustness invariants."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.errors import LocalProtocolError
from fedmq.strategies import CoordinateMedian, Krum, TrimmedMean, krum_scores
from fedmq.strategies.aggregator import BLOCK, CohortAggregator
from fedmq.strategies.layout import ModelLayout
from strategies.support import LAYOUT, SHAPES, cohort, stacked


def _aggregate(aggregator: CohortAggregator, updates, layout=LAYOUT):  # type: ignore[no-untyped-def]
    aggregator.begin(layout)
    for i, update in enumerate(updates):
        aggregator.add(update, 1.0 + i)  # weights must not matter to robust rules
    return aggregator.result()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_median_equals_numpy_median(n: int, seed: int) -> None:
    updates = cohort(n, seed)
    result = _aggregate(CoordinateMedian(), updates)
    for name in SHAPES:
        np.testing.assert_allclose(
            result[name], np.median(stacked(updates, name), axis=0), rtol=1e-6
        )


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    beta=st.sampled_from([0.0, 0.1, 0.2, 0.34, 0.49]),
    seed=st.integers(0, 2**16),
)
def test_trimmed_mean_equals_sort_and_average(n: int, beta: float, seed: int) -> None:
    updates = cohort(n, seed)
    k = int(np.floor(beta * n))
    result = _aggregate(TrimmedMean(beta), updates)
    for name in SHAPES:
        ordered = np.sort(stacked(updates, name), axis=0)
        np.testing.assert_allclose(
            result[name], ordered[k : n - k].mean(axis=0), rtol=1e-5, atol=1e-6
        )


def test_robust_rules_work_across_column_blocks() -> None:
    shapes = {"big": (BLOCK + 17,)}
    layout = ModelLayout.from_shapes(shapes)
    updates = cohort(5, 4, shapes)
    data = stacked(updates, "big")
    np.testing.assert_allclose(
        _aggregate(CoordinateMedian(), updates, layout)["big"], np.median(data, axis=0), rtol=1e-6
    )
    ordered = np.sort(data, axis=0)
    np.testing.assert_allclose(
        _aggregate(TrimmedMean(0.2), updates, layout)["big"], ordered[1:4].mean(axis=0), rtol=1e-5
    )
    krum = Krum(byzantine=1)
    _aggregate(krum, updates, layout)
    brute = ((data[:, None, :] - data[None, :, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(krum.distances(), brute, rtol=1e-6)


@pytest.mark.parametrize("make", [CoordinateMedian, lambda: TrimmedMean(0.2), lambda: Krum(1, 2)])
def test_identical_updates_give_that_update(make) -> None:  # type: ignore[no-untyped-def]
    update = cohort(1)[0]
    result = _aggregate(make(), [update] * 6)
    for name in SHAPES:
        np.testing.assert_allclose(result[name], update[name], rtol=1e-6)


def _with_outlier(n_honest: int, seed: int = 1) -> tuple[list, list]:  # type: ignore[type-arg]
    honest = cohort(n_honest, seed)
    outlier = {name: np.full(shape, 1e6, np.float32) for name, shape in SHAPES.items()}
    return honest, [*honest, outlier]


def test_median_resists_an_outlier() -> None:
    honest, attacked = _with_outlier(6)
    result = _aggregate(CoordinateMedian(), attacked)
    for name in SHAPES:
        data = stacked(honest, name)
        # The median stays within the honest updates' range, whatever the outlier's size.
        assert np.all(result[name] <= data.max(axis=0) + 1e-6)
        assert np.all(result[name] >= data.min(axis=0) - 1e-6)


def test_trimmed_mean_drops_an_outlier() -> None:
    _, attacked = _with_outlier(9)
    result = _aggregate(TrimmedMean(0.1), attacked)  # n=10: one trimmed per side
    for name in SHAPES:
        assert np.all(np.abs(result[name]) < 10)


def test_krum_scores_match_brute_force() -> None:
    updates = cohort(7, 2)
    flat = np.stack([np.concatenate([u[n].ravel() for n in SHAPES]) for u in updates]).astype(
        np.float64
    )
    distances = ((flat[:, None] - flat[None, :]) ** 2).sum(axis=2)
    f = 2
    expected = []
    for i in range(7):
        others = sorted(distances[i, j] for j in range(7) if j != i)
        expected.append(sum(others[: 7 - f - 2]))
    np.testing.assert_allclose(krum_scores(distances, f), expected, rtol=1e-9)


def test_krum_selects_an_honest_update_and_multi_krum_averages() -> None:
    honest, attacked = _with_outlier(6)
    krum = Krum(byzantine=1, multi=1)
    result = _aggregate(krum, attacked)
    assert krum.selected[0] < 6
    chosen = honest[krum.selected[0]]
    for name in SHAPES:
        np.testing.assert_allclose(result[name], chosen[name], rtol=1e-6)
    multi = Krum(byzantine=1, multi=3)
    result = _aggregate(multi, attacked)
    assert len(multi.selected) == 3
    assert all(i < 6 for i in multi.selected)
    for name in SHAPES:
        expected = np.mean([honest[i][name] for i in multi.selected], axis=0)
        np.testing.assert_allclose(result[name], expected, rtol=1e-5, atol=1e-7)


def test_krum_needs_f_plus_three_updates() -> None:
    with pytest.raises(LocalProtocolError, match="at least 4"):
        _aggregate(Krum(byzantine=1), cohort(3))


def test_krum_breaks_score_ties_deterministically() -> None:
    updates = cohort(1)[0]
    for permutation in itertools.islice(itertools.permutations(range(5)), 3):
        krum = Krum(byzantine=1)
        _aggregate(krum, [updates] * 5)
        assert krum.selected == [0], permutation


@pytest.mark.parametrize("make", [lambda: TrimmedMean(0.5), lambda: Krum(-1), lambda: Krum(1, 0)])
def test_invalid_robust_parameters_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LocalProtocolError):
        make()
