"""Data wiring of the shipped models: per-agent splits, files agents read, central tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import DataConfig
from edge_agent.data import fit_to_model, load_raw
from fedmq.bundle import Bundle
from fedmq.datasets.digits import load_digits_split
from fedmq.datasets.partition import PartitionSpec
from fedmq.errors import ConfigError
from fedmq.runtime.trainer import Trainer
from fedmq.simulate import datasets
from fedmq.simulate.evaluation import CentralEvaluator, TestSet
from fedmq.simulate.project import accepted_keywords, to_test_set
from fedmq.simulate.settings import client_ids, heartbeat_for
from fedmq.simulate.workloads import builtin_bundle_dir, builtin_workload


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_digits_agents_share_the_train_split_exactly_once(spec: str) -> None:
    data = datasets.digits(10, PartitionSpec.parse(spec), seed=3)
    train, test = load_digits_split()
    joined = np.concatenate([a.x for a in data.agents])
    assert len(joined) == len(train.x)
    rows = {r.tobytes() for r in joined}
    assert rows == {r.tobytes() for r in train.x}
    np.testing.assert_array_equal(data.test.x, test.x)
    assert data.test.y is not None
    np.testing.assert_array_equal(data.test.y, test.y)


def test_a_thousand_digit_agents_get_an_example_each_but_not_under_skew() -> None:
    data = datasets.digits(1000, PartitionSpec.parse("iid"), seed=0)
    assert min(len(a.x) for a in data.agents) >= 1
    with pytest.raises(ConfigError, match="dirichlet"):
        datasets.digits(1000, PartitionSpec.parse("dirichlet:0.1"), seed=0)


def test_sensor_machines_differ_and_the_test_set_has_labelled_faults() -> None:
    data = datasets.sensors(40, PartitionSpec.parse("iid"), seed=0)
    assert all(a.x.shape == (datasets.SENSOR_TRAIN_WINDOWS, 3, 64) for a in data.agents)
    assert all(a.y is None for a in data.agents)
    assert not np.allclose(data.agents[0].x, data.agents[1].x)
    anomaly = data.test.anomaly
    assert anomaly is not None
    assert len(data.test.x) == datasets.SENSOR_TEST_MACHINES * datasets.SENSOR_TEST_WINDOWS
    assert 0 < anomaly.sum() < len(anomaly) / 4
    skewed = datasets.sensor_counts(40, PartitionSpec.parse("dirichlet:0.3"), seed=0)
    assert min(skewed) >= datasets.SENSOR_MIN_WINDOWS
    assert max(skewed) > 3 * datasets.SENSOR_TRAIN_WINDOWS


@pytest.mark.parametrize("model", ["digits_mlp", "digits_cnn", "sensor_autoencoder"])
def test_written_agent_data_loads_with_the_agents_own_reader(model: str, tmp_path: Path) -> None:
    clients = client_ids(4)
    workload = builtin_workload(model, clients, PartitionSpec.parse("iid"), 0, tmp_path)  # type: ignore[arg-type]
    bundle = Bundle.load(workload.bundle_dir)
    assert len(workload.agent_data) == 4
    for table in workload.agent_data:
        config = DataConfig(**table)
        train, evaluation = load_raw(config)
        dataset = fit_to_model(train, evaluation, bundle.manifest, config.target)
        assert dataset.num_train > 0
        assert dataset.x_train.shape[1:] == bundle.manifest.input.example_shape
    assert workload.evaluator is not None
    metrics = workload.evaluator.evaluate(bundle.initial_parameters())
    if model == "sensor_autoencoder":
        assert set(metrics) == {"test_loss", "test_mse", "test_auroc"}
        assert 0.0 <= metrics["test_auroc"] <= 1.0
    else:
        assert set(metrics) == {"test_loss", "test_accuracy"}
        assert metrics["test_accuracy"] < 0.3  # an untrained model is near chance


def test_central_classifier_metrics_match_the_trainer() -> None:
    bundle = Bundle.load(builtin_bundle_dir("digits_mlp"))
    _, test = load_digits_split()
    params = bundle.initial_parameters()
    rng = np.random.default_rng(0)
    params = {k: v + rng.normal(0, 0.1, v.shape).astype(v.dtype) for k, v in params.items()}
    ours = CentralEvaluator(bundle, TestSet(test.x, test.y)).evaluate(params)
    theirs = Trainer(bundle).evaluate(params, test.x, test.y)
    assert ours == {"test_loss": theirs["loss"], "test_accuracy": theirs["accuracy"]}


def test_autoencoder_mse_is_the_mean_squared_reconstruction_error() -> None:
    bundle = Bundle.load(builtin_bundle_dir("sensor_autoencoder"))
    data = datasets.sensors(2, PartitionSpec.parse("iid"), seed=1)
    params = bundle.initial_parameters()
    evaluator = CentralEvaluator(bundle, data.test)
    out = Trainer(bundle).predict(params, data.test.x)
    expected = float(np.mean((out.astype(np.float64) - data.test.x) ** 2))
    assert evaluator.evaluate(params)["test_mse"] == pytest.approx(expected, rel=1e-9)


def test_test_sets_that_do_not_fit_are_refused() -> None:
    bundle = Bundle.load(builtin_bundle_dir("digits_mlp"))
    with pytest.raises(ConfigError, match="64"):
        CentralEvaluator(bundle, TestSet(np.zeros((3, 10)), np.zeros(3)))
    with pytest.raises(ConfigError, match="classification"):
        CentralEvaluator(bundle, TestSet(np.zeros((3, 64))))
    with pytest.raises(ConfigError, match="empty"):
        TestSet(np.zeros((0, 64)), np.zeros(0))


def test_load_test_results_become_test_sets() -> None:
    x = np.zeros((5, 64))
    assert to_test_set((x, np.ones(5)), "label", "m:load_test").y is not None
    auto = to_test_set({"x": x, "anomaly": [0, 1, 0, 0, 1]}, "input", "m:load_test")
    assert auto.anomaly is not None
    assert auto.anomaly.dtype == bool
    with pytest.raises(ConfigError, match="no 'y'"):
        to_test_set({"x": x}, "label", "m:load_test")
    with pytest.raises(ConfigError, match="must return"):
        to_test_set([x], "label", "m:load_test")


def test_accepted_keywords() -> None:
    def fixed(device: int, *, seed: int = 0) -> None: ...

    def anything(**options: object) -> None: ...

    assert accepted_keywords(fixed) == {"device", "seed"}
    assert accepted_keywords(anything) is None


def test_client_ids_sort_in_order_and_heartbeats_scale() -> None:
    ids = client_ids(1000)
    assert ids == sorted(ids)
    assert len(set(ids)) == 1000
    assert heartbeat_for(10) < heartbeat_for(1000) <= 20
