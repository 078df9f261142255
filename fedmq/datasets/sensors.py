"""A deterministic synthetic factory-sensor dataset: vibration windows with anomalies.

Each device is a rotating machine seen by a three-axis accelerometer.  A window is
``WINDOW`` samples of the three channels: the shaft's rotation frequency and a few
harmonics, with device-specific frequency, phase and channel gains, plus noise.  Devices
drift (bearing wear: the rotation frequency and vibration energy creep up over the
device's windows), which is what makes a federated model useful: every device sees a
slightly different machine.

A fraction of windows carries one of four injected faults, labelled for evaluation:

- ``spike``: an impact, a short high-amplitude impulse;
- ``bearing``: a burst of high-frequency vibration with a decaying envelope;
- ``imbalance``: the 1x rotation component doubles on one axis;
- ``flatline``: a sensor dropout, one channel stuck at a constant value.

An autoencoder trained on normal windows reconstructs faulty ones badly; the
reconstruction error is the anomaly score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

CHANNELS = 3  # accelerometer axes
WINDOW = 64  # samples per window
FAULTS = ("spike", "bearing", "imbalance", "flatline")
NOISE = 0.05  # standard deviation of sensor noise, in normalised units


@dataclass(frozen=True)
class SensorData:
    """Windows ``x`` of shape (N, CHANNELS, WINDOW) and their fault labels."""

    x: npt.NDArray[np.float32]
    anomaly: npt.NDArray[np.bool_]
    fault: npt.NDArray[np.str_]


def sensor_windows(
    device: int, count: int, *, anomaly_rate: float = 0.05, seed: int = 0
) -> SensorData:
    """Generate ``count`` windows of device ``device`` (same arguments, same data).

    Args:
        device: device index; each has its own machine characteristics and drift.
        count: number of windows, in time order.
        anomaly_rate: fraction of windows with an injected fault.
        seed: dataset seed, shared by all devices of one plant.
    """
    rng = np.random.default_rng([seed, device])
    base_frequency = rng.uniform(3.0, 8.0)  # rotations per window
    gains = rng.uniform(0.6, 1.4, size=CHANNELS)
    phases = rng.uniform(0, 2 * np.pi, size=(CHANNELS, 3))
    harmonic_weights = np.array([1.0, rng.uniform(0.2, 0.5), rng.uniform(0.05, 0.2)])
    wear = rng.uniform(0.02, 0.08)  # relative frequency/energy creep over the windows

    progress = np.linspace(0.0, 1.0, count)[:, None, None]  # (N, 1, 1): age of the machine
    t = np.arange(WINDOW)[None, None, :] / WINDOW  # (1, 1, T)
    frequency = base_frequency * (1 + wear * progress)
    signal = np.zeros((count, CHANNELS, WINDOW))
    for harmonic in range(3):
        angle = 2 * np.pi * (harmonic + 1) * frequency * t + phases[None, :, harmonic, None]
        signal += harmonic_weights[harmonic] * np.sin(angle)
    signal *= gains[None, :, None] * (1 + 2 * wear * progress)
    signal += rng.normal(0, NOISE, size=signal.shape)

    fault = np.full(count, "", dtype="<U9")
    anomalous = rng.random(count) < anomaly_rate
    for index in np.flatnonzero(anomalous):
        kind = FAULTS[rng.integers(len(FAULTS))]
        fault[index] = kind
        channel = rng.integers(CHANNELS)
        if kind == "spike":
            at = rng.integers(WINDOW - 2)
            signal[index, :, at : at + 2] += rng.choice([-1, 1]) * rng.uniform(3, 5)
        elif kind == "bearing":
            start = rng.integers(WINDOW // 2)
            span = np.arange(WINDOW - start)
            burst = np.exp(-span / 8.0) * np.sin(2 * np.pi * rng.uniform(20, 28) * span / WINDOW)
            signal[index, :, start:] += rng.uniform(1.5, 2.5) * burst
        elif kind == "imbalance":
            angle = 2 * np.pi * frequency[index, 0, 0] * t[0, 0] + phases[channel, 0]
            signal[index, channel] += 1.5 * gains[channel] * np.sin(angle)
        else:
            start = rng.integers(WINDOW // 2)
            signal[index, channel, start:] = signal[index, channel, start]
    return SensorData(signal.astype(np.float32), anomalous, fault)


def roc_auc(scores: npt.NDArray[np.floating], positive: npt.NDArray[np.bool_]) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` (Mann-Whitney U).

    Returns NaN when one class is absent.
    """
    positives = int(positive.sum())
    negatives = len(positive) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # Average the ranks of tied scores so ties count one half.
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, size in zip(first, counts, strict=True):
        if size > 1:
            ranks[order[start : start + size]] = start + (size + 1) / 2
    rank_sum = ranks[positive].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))
