"""The aggregator service (``fedmq serve``): the IO shell around :mod:`fedmq.coordinator`.

- :mod:`~fedmq.aggregator.config`: ``federation.toml`` + ``FEDMQ_*`` environment.
- :mod:`~fedmq.aggregator.store`: the crash-safe state directory, whose checkpoints
  :mod:`~fedmq.aggregator.retention` prunes.
- :mod:`~fedmq.aggregator.service`: MQTT session, action execution, shutdown;
  :mod:`~fedmq.aggregator.supervision`: its systemd notifications;
  :mod:`~fedmq.aggregator.feed`, :mod:`~fedmq.aggregator.loops`,
  :mod:`~fedmq.aggregator.model_builder`, :mod:`~fedmq.aggregator.broker_session`: the
  parts it runs.
- :mod:`~fedmq.aggregator.export`: a round's model as an ONNX file.
"""

from fedmq.aggregator.config import AggregatorSettings, load_settings
from fedmq.aggregator.export import export_onnx
from fedmq.aggregator.service import AggregatorService, serve
from fedmq.aggregator.store import StateStore, read_records

__all__ = [
    "AggregatorService",
    "AggregatorSettings",
    "StateStore",
    "export_onnx",
    "load_settings",
    "read_records",
    "serve",
]
