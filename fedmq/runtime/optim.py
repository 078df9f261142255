"""Optimizers on one flat float32 buffer, matching ``torch.optim`` step for step.

Every trainable parameter is a view into one contiguous vector, so an update is a
handful of vectorised numpy expressions regardless of how many tensors the model has.
The formulas are those of ``torch.optim.SGD``/``Adam``/``AdamW`` (dampening 0,
``amsgrad`` off), so a run here and in PyTorch agree to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedmq.wire.training import TrainingConfig

FloatArray = npt.NDArray[np.float32]


class Optimizer(Protocol):
    """Updates ``weights`` in place from ``grad`` (both flat float32 vectors)."""

    def step(self, weights: FloatArray, grad: FloatArray) -> None:
        """Apply one update; ``grad`` may be overwritten."""


class SGD:
    """SGD with optional (Nesterov) momentum and L2 weight decay (``torch.optim.SGD``)."""

    def __init__(
        self, size: int, lr: float, momentum: float, nesterov: bool, weight_decay: float
    ) -> None:
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self._velocity: FloatArray | None = (
            np.zeros(size, dtype=np.float32) if momentum > 0 else None
        )
        self._started = False

    def step(self, weights: FloatArray, grad: FloatArray) -> None:
        """Apply one update (``grad`` is used as scratch space)."""
        if self.weight_decay:
            grad += np.float32(self.weight_decay) * weights
        if self._velocity is not None:
            velocity = self._velocity
            if self._started:
                velocity *= np.float32(self.momentum)
                velocity += grad
            else:  # torch seeds the buffer with the first gradient
                velocity[:] = grad
                self._started = True
            if self.nesterov:
                grad += np.float32(self.momentum) * velocity
            else:
                grad = velocity
        weights -= np.float32(self.lr) * grad


class Adam:
    """Adam with L2 weight decay, or AdamW with decoupled decay (``torch.optim``)."""

    def __init__(
        self,
        size: int,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        decoupled: bool,
    ) -> None:
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.decoupled = decoupled
        self._m = np.zeros(size, dtype=np.float32)
        self._v = np.zeros(size, dtype=np.float32)
        self._scratch = np.zeros(size, dtype=np.float32)
        self._t = 0

    def step(self, weights: FloatArray, grad: FloatArray) -> None:
        """Apply one update (``grad`` is used as scratch space)."""
        self._t += 1
        if self.weight_decay:
            if self.decoupled:
                weights *= np.float32(1.0 - self.lr * self.weight_decay)
            else:
                grad += np.float32(self.weight_decay) * weights
        m, v, denom = self._m, self._v, self._scratch
        m *= np.float32(self.beta1)
        m += np.float32(1.0 - self.beta1) * grad
        v *= np.float32(self.beta2)
        np.multiply(grad, grad, out=grad)
        v += np.float32(1.0 - self.beta2) * grad
        correction1 = 1.0 - self.beta1**self._t
        correction2 = 1.0 - self.beta2**self._t
        np.sqrt(v, out=denom)
        denom /= np.float32(math.sqrt(correction2))
        denom += np.float32(self.eps)
        np.divide(m, denom, out=denom)
        weights -= np.float32(self.lr / correction1) * denom


def make_optimizer(config: TrainingConfig, size: int) -> Optimizer:
    """The optimizer ``config`` names, for a flat vector of ``size`` weights."""
    if config.optimizer in ("sgd", "momentum", "nesterov"):
        momentum = 0.0 if config.optimizer == "sgd" else config.momentum
        return SGD(size, config.lr, momentum, config.optimizer == "nesterov", config.weight_decay)
    return Adam(
        size, config.lr, config.betas, config.eps, config.weight_decay, config.optimizer == "adamw"
    )


def clip_by_global_norm(grad: FloatArray, max_norm: float) -> float:
    """Scale ``grad`` in place so its L2 norm is at most ``max_norm``; return the norm before.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: scale by
    ``max_norm / (norm + 1e-6)`` when that is below one.
    """
    norm = float(np.sqrt(np.dot(grad, grad, out=None)))
    scale = max_norm / (norm + 1e-6)
    if scale < 1.0:
        grad *= np.float32(scale)
    return norm
