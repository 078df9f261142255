"""``fedmq serve`` under systemd: READY=1, WATCHDOG=1 and STATUS= (``Type=notify``).

The unit (``deploy/fedmq-aggregator.service``) is ``Type=notify`` with ``WatchdogSec=``:

- **READY=1** once the service is connected and has (re)started its round, so units
  ordered ``After=fedmq-aggregator.service`` start against a live aggregator.
- **WATCHDOG=1** from the event loop at half of ``WatchdogSec=`` (``$WATCHDOG_USEC``):
  a blocked loop stops the pings and systemd restarts the service, which resumes from
  its state directory.  Each ping carries a ``STATUS=`` line for ``systemctl status``.
- **STOPPING=1** when shutdown begins (:func:`~fedmq.aggregator.service.serve` sends it).

Without ``$NOTIFY_SOCKET`` (a terminal, a test) nothing is sent.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fedmq.systemd import Notifier

if TYPE_CHECKING:
    from fedmq.aggregator.service import AggregatorService


def status_line(service: AggregatorService) -> str:
    """One line for ``systemctl status``: federation, round, phase, accepted updates."""
    stats = service.statistics()
    federation = service.settings.federation
    if stats.round is None:
        return f"{federation}: starting"
    return (
        f"{federation}: round {stats.round} {stats.phase}, "
        f"{stats.updates_accepted} updates accepted"
    )


async def notify_systemd(service: AggregatorService, notifier: Notifier) -> None:
    """Tell systemd when ``service`` is ready, then ping its watchdog until cancelled."""
    if not notifier.enabled:
        return
    await service.wait_started()
    notifier.ready(status_line(service))
    interval = notifier.watchdog_interval
    if interval is None:
        return  # WatchdogSec= unset: readiness was all systemd asked for
    while True:
        notifier.notify("WATCHDOG=1", f"STATUS={status_line(service)}")
        await asyncio.sleep(interval)
