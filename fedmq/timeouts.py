"""Waiting with a timeout without losing a cancellation.

On Python 3.11, ``asyncio.wait_for`` returns normally when what it awaits completes in
the same event-loop iteration as the cancellation of the waiting task: the
``CancelledError`` is swallowed (CPython gh-86296, fixed in 3.12).  A service loop of
the form ``while True: await wait_for(event.wait(), t)`` then survives its own shutdown
and the ``TaskGroup`` waiting for it hangs.  ``asyncio.timeout()`` has no such race, so
fedmq waits through these helpers (ruff bans ``asyncio.wait_for`` in the package).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; return whether it is set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await ``awaitable`` for at most ``timeout`` seconds.

    Raises:
        TimeoutError: it did not complete in time (a coroutine is then cancelled; wrap a
            task in ``asyncio.shield`` to let it continue).
    """
    async with asyncio.timeout(timeout):
        return await awaitable
