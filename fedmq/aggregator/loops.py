"""The aggregator service's background loops: storing updates, the timer, status, devices.

Each runs as one task of the service's task group for as long as the service runs and
tells the coordinator what happened through the service's
:class:`~fedmq.aggregator.feed.Feed`.  They live here, apart from the service, because
each owns one concern the service only starts:

- :func:`commit_loop`: accepted updates are stored in fsync'd batches, then reported
  ``persisted`` (or ``persist_failed``) one by one, in order;
- :class:`WakeupTimer`: the coordinator's one timer (``ArmTimer``);
- :func:`status_loop`: the retained status, published at most every
  ``status_interval_s`` however often it changes;
- :func:`registry_loop`: the device registry, re-read when its directory changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from fedmq.aggregator.devices import REFRESH_INTERVAL, DeviceRegistry
from fedmq.aggregator.feed import Feed, InFlight, Input
from fedmq.aggregator.memory import trim_heap
from fedmq.aggregator.reporting import Reporter
from fedmq.aggregator.store import StateStore
from fedmq.coordinator.actions import Ticket
from fedmq.timeouts import wait_event
from fedmq.wire.signing import VerifyKey

MAX_COMMIT_BATCH = 64  # updates stored per fsync batch
MIN_TIMER_DELAY = 0.01  # seconds: floor between timer callbacks, guards against a hot loop


async def commit_loop(
    commits: asyncio.Queue[Ticket],
    store: StateStore,
    reporter: Reporter,
    feed: Feed,
    work: InFlight,
) -> None:
    """Store the tickets of ``commits`` in batches; report each to the coordinator."""
    while True:
        batch = [await commits.get()]
        while len(batch) < MAX_COMMIT_BATCH and not commits.empty():
            batch.append(commits.get_nowait())
        error: str | None = None
        try:
            await reporter.persist("updates", store.persist_updates, batch)
        except OSError as exc:
            error = str(exc)
        async with feed.lock:
            for ticket in batch:
                now = feed.clock()
                if error is None:
                    tally = reporter.tally(ticket)
                    with reporter.folding():
                        actions = feed.coordinator().persisted(ticket, now)
                    reporter.accepted(ticket, tally)
                    await feed.apply(actions)
                else:
                    await feed.apply(feed.coordinator().persist_failed(ticket, error, now))
        for _ in batch:
            commits.task_done()
        work.end(len(batch))
        if work.count == 0:
            # A burst has drained: hand its model-sized buffers back to the OS so RSS
            # follows the live state, not the burst (not during it: re-faulting the
            # pages of every buffer would cost the intake CPU).
            await asyncio.to_thread(trim_heap)


class WakeupTimer:
    """The coordinator's one timer: :meth:`arm` sets it, :meth:`run` calls ``on_timer``."""

    def __init__(self) -> None:
        self._at: float | None = None
        self._armed = asyncio.Event()

    def arm(self, at: float | None) -> None:
        """Wake at unix time ``at`` (None: not at all), instead of when armed before."""
        self._at = at
        self._armed.set()

    async def run(self, started: asyncio.Event, feed: Feed) -> None:
        """Call ``on_timer`` whenever the armed time comes (once ``started`` is set)."""
        while True:
            self._armed.clear()
            at = self._at
            delay = None if at is None else max(MIN_TIMER_DELAY, at - feed.clock())
            if await wait_event(self._armed, delay):
                continue  # re-armed: recompute
            if not started.is_set():
                continue
            await feed(lambda coordinator, now: coordinator.on_timer(now))


async def status_loop(changed: asyncio.Event, interval: float, publish: Callable[[], None]) -> None:
    """``publish`` the status when ``changed`` is set, at most once per ``interval`` seconds."""
    while True:
        await changed.wait()
        changed.clear()
        publish()
        await asyncio.sleep(interval)


async def registry_loop(registry: DeviceRegistry, feed: Feed) -> None:
    """Hand the coordinator the device registry whenever its directory changed."""
    registry.load()
    while True:
        await asyncio.sleep(REFRESH_INTERVAL)
        devices = await asyncio.to_thread(registry.refresh)
        if devices is not None:
            await feed(_set_devices(devices))


def _set_devices(devices: Mapping[str, VerifyKey]) -> Input:
    # A function of its own: a lambda in the loop would not bind this round's devices.
    return lambda coordinator, now: coordinator.set_devices(devices, now)
