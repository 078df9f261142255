"""Aggregation strategies: pure numpy, no IO.

A :class:`Strategy` (``strategy.py``) composes an :class:`Aggregator` (``aggregator.py``:
the interface, and the cohort base of the robust rules) with a :class:`ServerOptimizer`
(``server_optimizer.py``: the interface, and the shared base of the adaptive ones), over
update tensors described by a :class:`ModelLayout` (``layout.py``).  Every method has one
file named after its paper or rule:

* aggregators: ``fedavg.py`` (:class:`WeightedMean`), ``median.py``
  (:class:`CoordinateMedian`), ``trimmed_mean.py`` (:class:`TrimmedMean`), ``krum.py``
  (:class:`Krum`, Multi-Krum);
* server optimizers: ``fedavg.py`` (:class:`ServerSgd`), ``fedavgm.py``
  (:class:`ServerMomentum`), ``fedadam.py`` (:class:`ServerAdam`), ``fedyogi.py``
  (:class:`ServerYogi`), ``fedadagrad.py`` (:class:`ServerAdagrad`);
* around them: ``fedprox.py`` (the proximal weight sent to agents), ``clipping.py``
  (update-norm clipping), ``central_dp.py`` (Gaussian noise on the mean).

``config.py`` holds the ``[strategy]`` table and :func:`build_strategy`, which picks and
composes them by name.
"""

from fedmq.strategies.aggregator import Aggregator, CohortAggregator
from fedmq.strategies.central_dp import GaussianNoise
from fedmq.strategies.clipping import clip_update, update_norm
from fedmq.strategies.config import DifferentialPrivacy, StrategyConfig, build_strategy
from fedmq.strategies.fedadagrad import ServerAdagrad
from fedmq.strategies.fedadam import ServerAdam
from fedmq.strategies.fedavg import ServerSgd, WeightedMean
from fedmq.strategies.fedavgm import ServerMomentum
from fedmq.strategies.fedprox import with_prox_mu
from fedmq.strategies.fedyogi import ServerYogi
from fedmq.strategies.krum import Krum, krum_scores
from fedmq.strategies.layout import ModelLayout
from fedmq.strategies.median import CoordinateMedian
from fedmq.strategies.server_optimizer import AdaptiveOptimizer, ServerOptimizer
from fedmq.strategies.strategy import Strategy
from fedmq.strategies.trimmed_mean import TrimmedMean

__all__ = [
    "AdaptiveOptimizer",
    "Aggregator",
    "CohortAggregator",
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
