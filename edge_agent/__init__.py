"""fedmq edge agent: the device daemon that trains locally and uploads compressed deltas.

Installed with a bare ``pip install fedmq`` (the core dependencies are the device
stack: aiomqtt, msgpack, numpy, onnxruntime, pydantic, pydantic-settings, zstandard);
never imports torch or the server packages (``tests/test_layering.py`` enforces it).

Public API:

- :class:`AgentSettings`, :func:`load_settings`: configuration (TOML + ``FEDMQ_AGENT_``).
- :class:`Agent`: the daemon (``await Agent(settings).run()``; ``await wait_ready()``;
  ``request_stop()``).
- :func:`main`: the ``fedmq-agent`` command; exit codes in :mod:`fedmq.exit_codes`.
"""

from edge_agent.cli import main, run_agent
from edge_agent.config import AgentSettings, load_settings
from edge_agent.daemon import Agent, AgentStatistics

__all__ = [
    "Agent",
    "AgentSettings",
    "AgentStatistics",
    "load_settings",
    "main",
    "run_agent",
]
