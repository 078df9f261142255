"""On-device training with onnxruntime and numpy only (never imports torch).

The hyper-parameters an aggregator announces live in :mod:`fedmq.wire.training` (a wire
schema); this package runs them.
"""

from __future__ import annotations

from fedmq.runtime.trainer import Trainer, TrainResult

__all__ = ["TrainResult", "Trainer"]
