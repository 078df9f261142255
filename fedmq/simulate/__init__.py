"""``fedmq simulate``: a whole federation on one machine, with a report.

- :mod:`~fedmq.simulate.options`: the validated command line.
- :mod:`~fedmq.simulate.workloads`, :mod:`~fedmq.simulate.project`,
  :mod:`~fedmq.simulate.datasets`: what is trained, on which data per agent.
- :mod:`~fedmq.simulate.settings`: aggregator and agent settings for one machine, the
  fleet built from them, its ``agent.toml`` files.
- :mod:`~fedmq.simulate.brokers`, :mod:`~fedmq.simulate.fleet`: the broker and the
  devices (the fleet: the simulated agents of the federation).
- :mod:`~fedmq.simulate.chaos`: which devices vanish in each round (pure).
- :mod:`~fedmq.simulate.observer`: bytes and acks seen on the wire.
- :mod:`~fedmq.simulate.evaluation`: the global model on a held-out test set.
- :mod:`~fedmq.simulate.runner`: the run itself, its parts started and stopped by
  :mod:`~fedmq.simulate.parts`, its rounds followed by :mod:`~fedmq.simulate.watch`;
  :mod:`~fedmq.simulate.external`: a run on a broker it did not start (``--broker``).
- :mod:`~fedmq.simulate.report`, :mod:`~fedmq.simulate.plot`,
  :mod:`~fedmq.simulate.progress`: what people see.

Server-side only: it imports rich, matplotlib (when writing the plot) and scikit-learn
(for the digits); ``edge_agent`` never imports this package.
"""

from fedmq.errors import SimulationError
from fedmq.simulate.options import SimulationOptions, TrainingOverrides
from fedmq.simulate.runner import Simulation, SimulationResult

__all__ = [
    "Simulation",
    "SimulationError",
    "SimulationOptions",
    "SimulationResult",
    "TrainingOverrides",
]
