"""Starting a simulation's parts on one exit stack, which stops them however the run ends.

Each ``start_*`` enters the part's stop on the :class:`contextlib.AsyncExitStack`
*before* starting it, so a part that fails half-way (a broker that never listens, an
observer that never connects, a wave of agents that does not come online) is stopped
too.  The stack unwinds in reverse order of starting; every stop is bounded and
logs instead of raising, so stopping one part cannot hide why the run ended nor leave
the parts after it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from fedmq.aggregator.service import AggregatorService
from fedmq.broker.process import BrokerProcess
from fedmq.errors import SimulationError
from fedmq.simulate.fleet import Fleet
from fedmq.simulate.observer import Observer

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for the aggregator to connect and start
STOP_TIMEOUT = 20.0  # seconds for the aggregator to stop before it is cancelled
SHARED_MEMORY = Path("/dev/shm")  # tmpfs on Linux


def shared_memory() -> Path | None:
    """Where the agents' data and state directories go: tmpfs (``/dev/shm``) if writable.

    Every simulated device still writes its outbox and state durably (write, fsync,
    rename) exactly as on a device, but here a thousand devices share one disk, where
    their fsyncs would queue behind each other (profiled: a third of a 1000-agent
    round's CPU samples were in the agents' commits).  None: the system's temp dir.
    """
    if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK):
        return SHARED_MEMORY
    return None


@contextlib.contextmanager
def scratch_dir(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """A fresh directory under ``parent`` (None: the temp dir), removed with its files."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _quietly(part: str, stop: Callable[[], Awaitable[object]]) -> None:
    """Await ``stop()``, logging a failure: stopping one part must not hide another's."""
    try:
        await stop()
    except Exception:
        log.exception("stopping %s failed", part)


async def start_broker(stack: contextlib.AsyncExitStack, broker: BrokerProcess) -> None:
    """Start ``broker`` (its process dies with ours); closed when the stack unwinds.

    Raises:
        TransportError: it did not start.
    """
    stack.push_async_callback(
        _quietly, "the broker", functools.partial(asyncio.to_thread, broker.close)
    )
    await asyncio.to_thread(broker.start)


async def start_observer(stack: contextlib.AsyncExitStack, observer: Observer) -> None:
    """Connect ``observer``; disconnected when the stack unwinds.

    Raises:
        TransportError: it did not connect.
    """
    stack.push_async_callback(_quietly, "the observer", observer.stop)
    await observer.start()


async def start_fleet(stack: contextlib.AsyncExitStack, fleet: Fleet) -> None:
    """Start every device; all stopped (bounded) when the stack unwinds.

    Raises:
        SimulationError: a device failed to start.
    """
    stack.push_async_callback(_quietly, "the agents", fleet.stop)
    await fleet.start()


async def start_aggregator(
    stack: contextlib.AsyncExitStack, service: AggregatorService
) -> asyncio.Task[None]:
    """Run the prepared ``service`` as a task; it is stopped when the stack unwinds.

    Returns once it has started (connected, state loaded).

    Raises:
        SimulationError: it did not start within ``START_TIMEOUT``.
        FedmqError: what stopped it while it started.
    """
    task = asyncio.create_task(service.run(), name="fedmq-sim.aggregator")
    stop = functools.partial(_stop_aggregator, service, task)
    stack.push_async_callback(_quietly, "the aggregator", stop)
    started = asyncio.create_task(service.wait_started())
    done, _ = await asyncio.wait(
        {started, task}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    if started not in done:
        started.cancel()
        if task in done:
            task.result()  # raises what stopped it
        raise SimulationError(f"the aggregator did not start within {START_TIMEOUT:g} s")
    return task


async def _stop_aggregator(service: AggregatorService, task: asyncio.Task[None]) -> None:
    """Ask the aggregator to stop, cancel it after ``STOP_TIMEOUT``."""
    if not task.done():
        service.request_stop()
        await asyncio.wait({task}, timeout=STOP_TIMEOUT)
    if not task.done():
        task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task
