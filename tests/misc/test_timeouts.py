"""Cancelling a loop that waits with a timeout must stop it (Python 3.11's wait_for may not)."""

from __future__ import annotations

import asyncio

import pytest

from fedmq.timeouts import wait_event, within


async def _service_loop(event: asyncio.Event, rounds: list[int]) -> None:
    while True:
        await wait_event(event, 10)
        event.clear()
        rounds.append(1)


async def test_cancel_while_the_event_fires_stops_the_loop() -> None:
    event = asyncio.Event()
    rounds: list[int] = []
    task = asyncio.create_task(_service_loop(event, rounds))
    await asyncio.sleep(0.01)
    # The race that asyncio.wait_for loses on 3.11: the wait completes in the same
    # iteration as the cancellation.
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(asyncio.shield(task), 5)
    assert task.cancelled()


async def test_wait_event_reports_timeouts_and_sets() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    event.set()
    assert await wait_event(event, 0.01)
    assert await wait_event(event, None)


async def test_within_times_out_and_returns() -> None:
    assert await within(asyncio.sleep(0, result=7), 1) == 7
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(10), 0.01)
    task = asyncio.create_task(asyncio.sleep(0.05, result=3))
    with pytest.raises(TimeoutError):
        await within(asyncio.shield(task), 0.001)
    assert await task == 3  # shielded: it kept running
