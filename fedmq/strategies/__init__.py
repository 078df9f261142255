"""Aggregation strategies: pure numpy, no IO (one file per method, named after its paper).

Build one from configuration with :func:`~fedmq.strategies.config.build_strategy`, or
compose :class:`~fedmq.strategies.strategy.Strategy` from an aggregator
(:class:`WeightedMean`, :class:`CoordinateMedian`, :class:`TrimmedMean`, :class:`Krum`)
and a server optimizer (:class:`ServerSgd`, :class:`ServerMomentum`, :class:`ServerAdam`,
:class:`ServerYogi`, :class:`ServerAdagrad`).
"""

from fedmq.strategies.base import Aggregator, ModelLayout, ServerOptimizer, update_norm
from fedmq.strategies.central_dp import GaussianNoise
from fedmq.strategies.clipping import clip_update
from fedmq.strategies.config import DifferentialPrivacy, StrategyConfig, build_strategy
from fedmq.strategies.fedadagrad import ServerAdagrad
from fedmq.strategies.fedadam import ServerAdam
from fedmq.strategies.fedavg import ServerSgd, WeightedMean
from fedmq.strategies.fedavgm import ServerMomentum
from fedmq.strategies.fedprox import with_prox_mu
from fedmq.strategies.fedyogi import ServerYogi
from fedmq.strategies.krum import Krum, krum_scores
from fedmq.strategies.median import CoordinateMedian
from fedmq.strategies.strategy import Strategy
from fedmq.strategies.trimmed_mean import TrimmedMean

__all__ = [
    "Aggregator",
    "CoordinateMedian",
    "DifferentialPrivacy",
    "GaussianNoise",
    "Krum",
    "ModelLayout",
    "ServerAdagrad",
    "ServerAdam",
    "ServerMomentum",
    "ServerOptimizer",
    "ServerSgd",
    "ServerYogi",
    "Strategy",
    "StrategyConfig",
    "TrimmedMean",
    "WeightedMean",
    "build_strategy",
    "clip_update",
    "krum_scores",
    "update_norm",
    "with_prox_mu",
]
