"""systemd ``Type=notify`` support for the agent: :class:`fedmq.systemd.Notifier`.

The notifier lives in :mod:`fedmq.systemd` (the aggregator uses it too); this module
keeps the agent's import path.
"""

from __future__ import annotations

from fedmq.systemd import Notifier

__all__ = ["Notifier"]
