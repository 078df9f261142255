"""Dev-only helpers for tests and benchmarks: scripted MQTT clients that play agents.

Nothing in ``fedmq`` or ``edge_agent`` imports this package (``tests/test_layering.py``
checks it), and it may import anything: it is never on a device nor in a server's
import path.

- :mod:`~fedmq.testing.scripted_clients`: agent ids whose updates the caller chooses,
  on one MQTT connection per :class:`~fedmq.testing.scripted_clients.ScriptedConnection`.
"""
