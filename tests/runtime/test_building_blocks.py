"""Batching, dropout masks, flat buffers and numpy metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmq.bundle import DropoutSpec, TensorSpec
from fedmq.runtime.batching import batch_indices, steps_per_epoch
from fedmq.runtime.dropout import dropout_mask
from fedmq.runtime.flat import FlatTensors
from fedmq.runtime.metrics import correct_fraction, per_example_loss


def test_every_example_once_per_epoch_in_seeded_order() -> None:
    batches = list(batch_indices(10, 4, 2, np.random.default_rng(3)))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(np.concatenate(batches[:3])) == list(range(10))
    assert sorted(np.concatenate(batches[3:])) == list(range(10))
    again = list(batch_indices(10, 4, 2, np.random.default_rng(3)))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    assert not np.array_equal(np.concatenate(batches[:3]), np.concatenate(batches[3:]))
    assert steps_per_epoch(10, 4) == 3
    assert steps_per_epoch(8, 4) == 2


def test_dropout_mask_values_shape_and_rate() -> None:
    spec = DropoutSpec(
        module="drop", p=0.25, shape=TensorSpec(shape=("batch", 50, 1), dtype="float32")
    )
    mask = dropout_mask(spec, 200, np.random.default_rng(0))
    assert mask.shape == (200, 50, 1)
    assert mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, np.float32(1 / 0.75)}
    assert abs((mask == 0).mean() - 0.25) < 0.02
    assert abs(mask.mean() - 1.0) < 0.03  # rescaling keeps the expectation


def test_flat_views_share_memory() -> None:
    flat = FlatTensors(["a", "b"], [(2, 3), ()])
    flat.load({"a": np.arange(6).reshape(2, 3), "b": np.array(7.0)})
    np.testing.assert_array_equal(flat.data, [0, 1, 2, 3, 4, 5, 7])
    flat.data += 1
    assert flat.views["b"] == 8
    assert flat.views["a"].flags.c_contiguous
    out = np.zeros(7, np.float32)
    flat.gather([np.ones((2, 3)), np.array(2.0)], out)
    np.testing.assert_array_equal(out, [1, 1, 1, 1, 1, 1, 2])


def test_losses_and_accuracy() -> None:
    logits = np.zeros((2, 4), np.float32)
    np.testing.assert_allclose(
        per_example_loss("cross_entropy", logits, np.array([0, 3])), math.log(4)
    )
    big = np.array([[1000.0, -1000.0]], np.float32)  # stable at extreme logits
    assert per_example_loss("cross_entropy", big, np.array([0]))[0] == pytest.approx(0.0)
    z = np.array([[0.0, 50.0, -50.0]], np.float32)
    t = np.array([[1.0, 1.0, 0.0]], np.float32)
    assert per_example_loss("bce_with_logits", z, t)[0] == pytest.approx(math.log(2) / 3, rel=1e-6)
    out, target = np.array([[1.0, 3.0]], np.float32), np.array([[0.0, 1.0]], np.float32)
    assert per_example_loss("mse", out, target)[0] == pytest.approx(2.5)
    assert per_example_loss("l1", out, target)[0] == pytest.approx(1.5)
    scores = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    np.testing.assert_array_equal(
        correct_fraction("cross_entropy", scores, np.array([1, 1])), [1, 0]
    )
    np.testing.assert_array_equal(correct_fraction("bce_with_logits", z, t), [2 / 3])
