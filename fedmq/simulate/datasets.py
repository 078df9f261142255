"""The shipped models' data, split across simulated agents, plus a central test set.

- **digits** (scikit-learn's bundled 8x8 digits, offline): the stratified train split is
  partitioned across agents (IID, or label skew by Dirichlet(alpha)); the test split
  is the central test set.
- **sensors** (:mod:`fedmq.datasets.sensors`, generated): agent *i* is machine *i*, with
  its own frequencies, gains and wear drift, and a few injected faults in its
  (unlabelled) training windows.  ``iid`` gives every machine the same number of
  windows; ``dirichlet:ALPHA`` skews the quantity per machine.  Each machine's latest
  windows are held out, with their fault labels, as the central test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.datasets.digits import load_digits_split
from fedmq.datasets.partition import PartitionSpec, partition_indices
from fedmq.datasets.sensors import sensor_windows
from fedmq.simulate.evaluation import TestSet

Array = npt.NDArray[Any]

DIGITS_SPLIT_SEED = 0  # the test split never changes with --seed: runs stay comparable
SENSOR_TRAIN_WINDOWS = 160  # mean training windows per machine (~2.5 s of 64 Hz data each)
SENSOR_TEST_WINDOWS = 40  # latest windows of a machine held out for the central test set
SENSOR_TEST_MACHINES = 32  # machines contributing test windows: bounds evaluation time
SENSOR_MIN_WINDOWS = 16  # fewest training windows a machine gets under quantity skew


@dataclass(frozen=True)
class AgentArrays:
    """One agent's training examples (``y`` None: the model reconstructs ``x``)."""

    x: Array
    y: Array | None


@dataclass(frozen=True)
class FederatedData:
    """Every agent's training data and the central test set."""

    agents: list[AgentArrays]
    test: TestSet


def digits(agents: int, spec: PartitionSpec, seed: int) -> FederatedData:
    """Digits split across ``agents`` (flat 64-pixel rows; agents reshape for the CNN).

    Raises:
        ConfigError: the partition cannot give every agent data (too many agents for a
            skewed split: use ``iid`` or fewer agents).
    """
    train, test = load_digits_split(seed=DIGITS_SPLIT_SEED)
    # Over ~700 agents there are fewer than two examples each: allow single examples.
    min_size = 2 if agents * 2 <= len(train.y) else 1
    parts = partition_indices(train.y, agents, spec, seed=seed, min_size=min_size)
    return FederatedData(
        [AgentArrays(train.x[index], train.y[index]) for index in parts],
        TestSet(test.x, test.y),
    )


def sensor_counts(agents: int, spec: PartitionSpec, seed: int) -> list[int]:
    """Training windows per machine: equal for ``iid``, Dirichlet quantity skew otherwise."""
    if spec.kind == "iid":
        return [SENSOR_TRAIN_WINDOWS] * agents
    rng = np.random.default_rng([seed, agents])
    shares = rng.dirichlet(np.full(agents, spec.alpha))
    counts = np.rint(shares * SENSOR_TRAIN_WINDOWS * agents).astype(int)
    return [max(SENSOR_MIN_WINDOWS, int(count)) for count in counts]


def sensors(agents: int, spec: PartitionSpec, seed: int) -> FederatedData:
    """One machine per agent; the latest windows of the first machines form the test set."""
    arrays: list[AgentArrays] = []
    test_x: list[Array] = []
    test_anomaly: list[npt.NDArray[np.bool_]] = []
    for device, count in enumerate(sensor_counts(agents, spec, seed)):
        held = SENSOR_TEST_WINDOWS if device < SENSOR_TEST_MACHINES else 0
        windows = sensor_windows(device, count + held, seed=seed)
        arrays.append(AgentArrays(windows.x[:count], None))
        if held:
            test_x.append(windows.x[count:])
            test_anomaly.append(windows.anomaly[count:])
    test = TestSet(np.concatenate(test_x), anomaly=np.concatenate(test_anomaly))
    return FederatedData(arrays, test)
