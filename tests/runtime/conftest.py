"""Shipped example bundles and small data sets for device-runtime tests (no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmq.bundle import Bundle

BUNDLES = Path(__file__).resolve().parents[2] / "examples" / "bundles"


@pytest.fixture(scope="session")
def bundles_dir() -> Path:
    return BUNDLES


@pytest.fixture(scope="session")
def mlp_bundle() -> Bundle:
    return Bundle.load(BUNDLES / "digits_mlp")


@pytest.fixture(scope="session")
def cnn_bundle() -> Bundle:
    return Bundle.load(BUNDLES / "digits_cnn")


@pytest.fixture(scope="session")
def ae_bundle() -> Bundle:
    return Bundle.load(BUNDLES / "sensor_autoencoder")


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits scaled to [0, 1]: (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


@pytest.fixture(scope="session")
def sensor_windows() -> np.ndarray:
    """Smooth 3-channel sine windows (the 'normal' vibration of a machine)."""
    rng = np.random.default_rng(0)
    t = np.linspace(0, 2 * np.pi, 64)
    freq = rng.uniform(1, 3, (256, 3, 1))
    phase = rng.uniform(0, 6, (256, 3, 1))
    return np.sin(t[None, None] * freq + phase).astype(np.float32)
