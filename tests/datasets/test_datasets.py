from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.datasets.digits import load_digits_split
from fedmq.datasets.partition import PartitionSpec, partition_indices
from fedmq.datasets.sensors import CHANNELS, WINDOW, roc_auc, sensor_windows
from fedmq.errors import ConfigError


@settings(max_examples=40, deadline=None)
@given(
    st.integers(20, 400),
    st.integers(1, 10),
    st.sampled_from(["iid", "dirichlet:0.1", "dirichlet:0.5", "dirichlet:100"]),
    st.integers(0, 1000),
)
def test_partitions_cover_every_example_once(count: int, parts: int, text: str, seed: int) -> None:
    labels = np.random.default_rng(seed).integers(0, 5, size=count)
    spec = PartitionSpec.parse(text)
    try:
        result = partition_indices(labels, parts, spec, seed=seed)
    except ConfigError:
        assert spec.kind == "dirichlet"  # tiny alpha may starve an agent; never for iid
        return
    assert len(result) == parts
    joined = np.sort(np.concatenate(result))
    np.testing.assert_array_equal(joined, np.arange(count))
    assert min(len(part) for part in result) >= 2


def test_dirichlet_skews_labels_and_iid_does_not() -> None:
    labels = np.repeat(np.arange(10), 100)

    def skew(spec: str) -> float:
        parts = partition_indices(labels, 10, PartitionSpec.parse(spec), seed=1)
        # Mean over agents of the share of the agent's most common label.
        return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))

    assert skew("iid") < 0.2
    assert skew("dirichlet:0.1") > 0.5


@pytest.mark.parametrize(
    "text", ["", "dirichlet", "dirichlet:0", "dirichlet:-1", "zipf:2", "dirichlet:nan"]
)
def test_bad_partition_specs(text: str) -> None:
    with pytest.raises(ConfigError):
        PartitionSpec.parse(text)


def test_digits_split_is_stratified_and_scaled() -> None:
    train, test = load_digits_split()
    assert train.x.shape[1] == 64
    assert train.x.dtype == np.float32
    assert train.x.min() >= 0.0
    assert train.x.max() <= 1.0
    assert len(train.y) + len(test.y) == 1797
    assert set(np.unique(test.y)) == set(range(10))
    images, _ = load_digits_split(image=True)
    assert images.x.shape[1:] == (1, 8, 8)


def test_sensor_windows_are_deterministic_and_device_specific() -> None:
    a = sensor_windows(3, 200, seed=7)
    b = sensor_windows(3, 200, seed=7)
    c = sensor_windows(4, 200, seed=7)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.shape == (200, CHANNELS, WINDOW)
    assert a.x.dtype == np.float32
    assert not np.allclose(a.x, c.x)
    assert 0 < a.anomaly.sum() < 40
    assert set(a.fault[a.anomaly]) <= {"spike", "bearing", "imbalance", "flatline"}
    assert (a.fault[~a.anomaly] == "").all()


def test_faults_stand_out_from_normal_windows() -> None:
    data = sensor_windows(0, 2000, anomaly_rate=0.2, seed=1)
    # Even a crude score (distance to the mean normal window) separates faults a bit;
    # an autoencoder does much better.  This guards against faults that change nothing.
    mean = data.x[~data.anomaly].mean(axis=0)
    score = ((data.x - mean) ** 2).max(axis=(1, 2))
    assert roc_auc(score, data.anomaly) > 0.6


def test_roc_auc_known_values() -> None:
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([False, False, True, True])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([False, False, True, True])) == 0.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([False, True])) == 0.5
    assert np.isnan(roc_auc(np.array([1.0]), np.array([True])))
