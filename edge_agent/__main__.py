"""``python -m edge_agent``: the same as ``fedmq-agent``."""

from edge_agent.cli import main

main()
