"""Model factories for the shipped example bundles (``fedmq compile examples/models.py:NAME``).

Each factory seeds PyTorch itself, so the initial weights — and therefore the bundle
bytes — are the same on every run.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0  # initial weights of every example model

DIGITS_FEATURES = 64  # sklearn load_digits: 8x8 images flattened, values 0..16
DIGITS_CLASSES = 10
SENSOR_CHANNELS = 3  # e.g. a 3-axis vibration sensor
SENSOR_WINDOW = 64  # samples per window


def digits_mlp() -> nn.Module:
    """Two-layer perceptron for flattened 8x8 digits (input ``(64,)``, 10 logits)."""
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Linear(DIGITS_FEATURES, 64),
        nn.ReLU(),
        nn.Linear(64, DIGITS_CLASSES),
    )


def digits_cnn() -> nn.Module:
    """Small CNN for 8x8 digit images (input ``(1, 8, 8)``, 10 logits)."""
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(16, DIGITS_CLASSES),
    )


def sensor_autoencoder() -> nn.Module:
    """Conv1d autoencoder for anomaly detection on sensor windows (input ``(3, 64)``).

    Trained with MSE against its own input; a large reconstruction error flags a window
    unlike the training data.
    """
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv1d(SENSOR_CHANNELS, 16, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv1d(16, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.ConvTranspose1d(8, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose1d(16, SENSOR_CHANNELS, 4, stride=2, padding=1),
    )
