"""Central evaluation: the global model after each round, on a held-out test set.

Agents report metrics on their own data; this is the number a data scientist trusts:
one fixed test set the federation never trained on.  Classifiers report
``test_accuracy`` and ``test_loss``; autoencoders report ``test_mse`` (mean squared
reconstruction error) and, when the test windows carry fault labels, ``test_auroc``
(how well the per-window reconstruction error separates faulty windows from normal ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.bundle import Bundle
from fedmq.datasets.sensors import roc_auc
from fedmq.errors import ConfigError, DecodeError, StateError
from fedmq.runtime.trainer import Trainer
from fedmq.wire.tensors import decode_tensors

Array = npt.NDArray[Any]
CHECKPOINT_DIGITS = 6  # the aggregator names checkpoints <round:06d>.params


@dataclass(frozen=True)
class TestSet:
    """Held-out examples: ``y`` labels (None for autoencoders), ``anomaly`` fault flags."""

    __test__ = False  # not a pytest test class, despite the name

    x: Array
    y: Array | None = None
    anomaly: npt.NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        count = len(self.x)
        if count == 0:
            raise ConfigError("the central test set is empty")
        for name, array in (("y", self.y), ("anomaly", self.anomaly)):
            if array is not None and len(array) != count:
                raise ConfigError(f"test set: {count} inputs but {len(array)} values of {name}")


class CentralEvaluator:
    """Evaluates parameter sets of one bundle on one test set (thread-safe).

    Args:
        bundle: the federation's bundle.
        test: the held-out examples.

    Raises:
        ConfigError: the test set does not fit the model.
    """

    def __init__(self, bundle: Bundle, test: TestSet) -> None:
        self.bundle = bundle
        manifest = bundle.manifest
        self.autoencoder = test.y is None
        if self.autoencoder and manifest.task != "regression":
            raise ConfigError(
                f"test set has no labels but bundle {manifest.name!r} is a {manifest.task} model"
            )
        shape = manifest.input.example_shape
        per_example = math.prod(test.x.shape[1:])
        if per_example != math.prod(shape):
            raise ConfigError(
                f"test inputs have {per_example} values each; bundle {manifest.name!r} "
                f"takes {list(shape)}"
            )
        dtype = np.float32 if manifest.input.dtype == "float32" else np.int64
        self._x = np.ascontiguousarray(test.x.reshape(len(test.x), *shape), dtype=dtype)
        self._y: Array = self._x if test.y is None else test.y
        self._anomaly = test.anomaly
        self._trainer = Trainer(bundle)

    @property
    def primary(self) -> str:
        """The metric a progress line shows first."""
        if self.autoencoder:
            return "test_auroc" if self._anomaly is not None else "test_mse"
        return "test_accuracy"

    @property
    def size(self) -> int:
        """Number of test examples."""
        return len(self._x)

    def evaluate(self, params: dict[str, Array]) -> dict[str, float]:
        """Metrics of ``params`` on the test set.

        Raises:
            TrainingError: the parameters do not fit the bundle, or onnxruntime failed.
        """
        if not self.autoencoder:
            metrics = self._trainer.evaluate(params, self._x, self._y)
            return {f"test_{name}": value for name, value in metrics.items()}
        outputs = self._trainer.predict(params, self._x)
        errors = np.square(outputs.astype(np.float64) - self._x.astype(np.float64))
        errors = errors.reshape(len(self._x), -1)
        per_window = errors.mean(axis=1)
        result = {"test_loss": float(per_window.mean()), "test_mse": float(per_window.mean())}
        if self._anomaly is not None:
            result["test_auroc"] = roc_auc(per_window, self._anomaly)
        return result

    def evaluate_checkpoint(self, state_dir: Path, round_id: int) -> dict[str, float]:
        """Metrics of the global model the aggregator checkpointed after ``round_id``.

        Raises:
            StateError: the checkpoint is missing or does not decode.
            TrainingError: it does not fit the bundle.
        """
        path = state_dir / "checkpoints" / f"{round_id:0{CHECKPOINT_DIGITS}d}.params"
        try:
            params = decode_tensors(path.read_bytes())
        except (OSError, DecodeError) as exc:
            raise StateError(f"checkpoint {path} is unreadable: {exc}") from exc
        return self.evaluate(params)


__all__ = ["CentralEvaluator", "TestSet"]
