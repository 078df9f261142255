"""Training hyper-parameters an aggregator sends to agents with each round.

Pure pydantic (no onnxruntime): round announcements embed this model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OptimizerName = Literal["sgd", "momentum", "nesterov", "adam", "adamw"]


class TrainingConfig(BaseModel):
    """How an agent trains locally in one round."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(1, ge=1, le=1000, description="local passes over the training split")
    batch_size: int = Field(32, ge=1, le=65536)
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps (None: all epochs)"
    )
    optimizer: OptimizerName = "sgd"
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="for momentum/nesterov")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="L2 (sgd/adam) or decoupled (adamw)")
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal term weight; 0 disables it")
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the global gradient norm")
    dropout_seed: int | None = Field(None, description="seed for dropout masks (None: random)")
    seed: int = Field(0, description="shuffling seed; agents mix in their id and the round")
