"""Strategy configuration (the ``[strategy]`` table of ``federation.toml``) and its factory."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmq.errors import LocalProtocolError
from fedmq.strategies.aggregator import Aggregator
from fedmq.strategies.central_dp import GaussianNoise
from fedmq.strategies.fedadagrad import ServerAdagrad
from fedmq.strategies.fedadam import ServerAdam
from fedmq.strategies.fedavg import ServerSgd, WeightedMean
from fedmq.strategies.fedavgm import ServerMomentum
from fedmq.strategies.fedyogi import ServerYogi
from fedmq.strategies.krum import Krum
from fedmq.strategies.median import CoordinateMedian
from fedmq.strategies.server_optimizer import (
    DEFAULT_BETA1,
    DEFAULT_BETA2,
    DEFAULT_ETA,
    DEFAULT_TAU,
    ServerOptimizer,
)
from fedmq.strategies.strategy import Strategy
from fedmq.strategies.trimmed_mean import TrimmedMean

StrategyName = Literal[
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedprox",
    "median",
    "trimmed_mean",
    "krum",
]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class DifferentialPrivacy(BaseModel):
    """Central DP: Gaussian noise on the clipped, uniformly weighted mean."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_multiplier: float = Field(ge=0, allow_inf_nan=False)
    seed: int = 0


class StrategyConfig(BaseModel):
    """Which strategy aggregates the rounds, and its hyper-parameters.

    Only the fields of the chosen ``name`` are used; defaults follow the papers.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrategyName = "fedavg"
    server_lr: PositiveFloat = Field(1.0, description="fedavg/fedavgm/fedprox server step")
    momentum: Beta = Field(0.9, description="fedavgm server momentum")
    eta: PositiveFloat = Field(DEFAULT_ETA, description="fedadam/fedyogi/fedadagrad step")
    beta1: Beta = DEFAULT_BETA1
    beta2: Beta = DEFAULT_BETA2
    tau: PositiveFloat = DEFAULT_TAU
    prox_mu: float = Field(0.01, ge=0, allow_inf_nan=False, description="fedprox mu")
    trim_beta: float = Field(0.1, ge=0, lt=0.5, description="trimmed_mean: cut per side")
    byzantine: int = Field(1, ge=0, description="krum: f, Byzantine updates tolerated")
    multi_krum: int = Field(1, ge=1, description="krum: m, updates averaged (1 = Krum)")
    clip_norm: PositiveFloat | None = Field(None, description="clip each update's L2 norm")
    dp: DifferentialPrivacy | None = None


def _aggregator(config: StrategyConfig) -> Aggregator:
    if config.name == "median":
        return CoordinateMedian()
    if config.name == "trimmed_mean":
        return TrimmedMean(config.trim_beta)
    if config.name == "krum":
        return Krum(config.byzantine, config.multi_krum)
    return WeightedMean()


def _optimizer(config: StrategyConfig) -> ServerOptimizer:
    adaptive: dict[str, type[ServerAdam | ServerYogi | ServerAdagrad]] = {
        "fedadam": ServerAdam,
        "fedyogi": ServerYogi,
        "fedadagrad": ServerAdagrad,
    }
    if config.name in adaptive:
        return adaptive[config.name](config.eta, config.beta1, config.beta2, config.tau)
    if config.name == "fedavgm":
        return ServerMomentum(config.server_lr, config.momentum)
    return ServerSgd(config.server_lr)


def build_strategy(config: StrategyConfig) -> Strategy:
    """Instantiate the configured strategy.

    Raises:
        LocalProtocolError: an inconsistent combination (e.g. ``dp`` without ``clip_norm``).
    """
    noise = None
    if config.dp is not None:
        if config.clip_norm is None:
            raise LocalProtocolError("[strategy.dp] needs clip_norm: the noise is scaled to it")
        noise = GaussianNoise(config.dp.noise_multiplier, config.clip_norm, config.dp.seed)
    return Strategy(
        _aggregator(config),
        _optimizer(config),
        clip_norm=config.clip_norm,
        noise=noise,
        prox_mu=config.prox_mu if config.name == "fedprox" else 0.0,
        name=config.name,
    )
