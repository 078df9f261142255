"""What the service's tasks share: one way into the coordinator, and the work in flight.

The coordinator is synchronous and holds the whole federation state, so the service
gives it one input at a time: :class:`Feed` takes the one lock, reads the clock, calls
one coordinator input and executes the actions it returns before releasing the lock,
so durable actions are on disk before the next decision is made.  The service, its
background loops (:mod:`~fedmq.aggregator.loops`) and the model builder
(:mod:`~fedmq.aggregator.model_builder`) all go through the same :class:`Feed`.

:class:`InFlight` counts the work a shutdown waits for: updates being verified or
stored, and inference models being built.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from fedmq.coordinator.actions import Action
from fedmq.coordinator.coordinator import Coordinator

Input = Callable[[Coordinator, float], Sequence[Action]]
"""One coordinator input: given the coordinator and the time, the actions it returns."""


class Feed:
    """The coordinator behind the service's one lock.

    Args:
        coordinator: the coordinator (a getter: the service loads it after it is built).
        clock: unix-time source.
        apply: executes actions in order; call it with :attr:`lock` held.
    """

    def __init__(
        self,
        coordinator: Callable[[], Coordinator],
        clock: Callable[[], float],
        apply: Callable[[Sequence[Action]], Awaitable[None]],
    ) -> None:
        self.lock = asyncio.Lock()
        self.coordinator = coordinator
        self.clock = clock
        self.apply = apply

    async def __call__(self, step: Input) -> None:
        """Run one coordinator input under the lock and execute its actions."""
        async with self.lock:
            await self.apply(step(self.coordinator(), self.clock()))


class InFlight:
    """Work started and not yet finished; :attr:`idle` is set while there is none."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def begin(self) -> None:
        """One more piece of work started."""
        self.count += 1
        self.idle.clear()

    def end(self, count: int = 1) -> None:
        """``count`` pieces of work finished."""
        self.count -= count
        if self.count == 0:
            self.idle.set()
