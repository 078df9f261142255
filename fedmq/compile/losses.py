"""The losses a bundle can train with, as PyTorch functions (mean over the batch)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional alias

from fedmq.bundle.manifest import LossName

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES: dict[LossName, LossFunction] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
    "l1": F.l1_loss,
}
