"""On-device training with onnxruntime and numpy only (never imports torch).

``Trainer`` and ``TrainResult`` load lazily: the aggregator and the wire layer import
:mod:`fedmq.runtime.config` (pure pydantic) and must not pull in onnxruntime with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedmq.runtime.config import TrainingConfig

if TYPE_CHECKING:
    from fedmq.runtime.trainer import Trainer, TrainResult

__all__ = ["TrainResult", "Trainer", "TrainingConfig"]
_LAZY = {"Trainer", "TrainResult"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module("fedmq.runtime.trainer"), name)
    raise AttributeError(f"module 'fedmq.runtime' has no attribute {name!r}")
