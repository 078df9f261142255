"""Runs the inference-model builds the coordinator asks for, and hands the models back.

``BuildInferenceModel`` is a command like ``VerifyUpdate``: the service starts it in the
background and a shutdown waits for it (the final model too).  :class:`ModelBuilder`
lets :class:`~fedmq.aggregator.delivery.ModelDelivery` build and store the model off the
event loop, gives the result to the coordinator (``set_inference_model``, or
``inference_model_failed``) through the service's :class:`~fedmq.aggregator.feed.Feed`,
then deletes the stored models the coordinator no longer holds.  At start it reads the
released models back for ``provide_models``.  Kept apart from the service, which only
dispatches the command, so the whole life of a build reads in one place.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fedmq.aggregator.delivery import ModelBuildError, ModelDelivery
from fedmq.aggregator.feed import Feed, InFlight
from fedmq.coordinator.actions import BuildInferenceModel
from fedmq.coordinator.coordinator import Coordinator


class ModelBuilder:
    """The service's inference-model builds.

    Args:
        state_dir: the state directory (the models are kept in its ``models/``).
        feed: the way into the coordinator.
        work: the work a shutdown waits for (a build counts from :meth:`asked` on).
    """

    def __init__(self, state_dir: Path, feed: Feed, work: InFlight) -> None:
        self.delivery = ModelDelivery(state_dir)
        self._feed = feed
        self._work = work

    def asked(self, action: BuildInferenceModel) -> None:
        """The coordinator asked for a build; :meth:`build` runs it."""
        self._work.begin()  # a shutdown waits for it (the final model, too)
        self.delivery.asked(action)

    async def restore(self, coordinator: Coordinator) -> None:
        """Give the coordinator the released models' stored bytes (before its ``start``)."""
        missing = coordinator.models.missing()
        stored = await asyncio.to_thread(self.delivery.stored, missing)
        coordinator.provide_models(stored)

    async def build(self, action: BuildInferenceModel) -> None:
        """Build the model, hand it to the coordinator, prune the models no longer held."""
        feed = self._feed
        try:
            try:
                model = await self.delivery.build(action)
            except (ModelBuildError, OSError) as exc:
                if isinstance(exc, OSError) or self.delivery.failed(exc):
                    error = str(exc)
                    await feed(
                        lambda coordinator, now: coordinator.inference_model_failed(
                            action.checkpoint, error, now
                        )
                    )
                return
            if model is None:
                return  # overtaken by a newer checkpoint's model
            async with feed.lock:
                coordinator, now = feed.coordinator(), feed.clock()
                await feed.apply(coordinator.set_inference_model(action.checkpoint, model, now))
                held = [m.ref.sha256 for m in coordinator.models.held()]
            await asyncio.to_thread(self.delivery.prune, held)
        finally:
            self._work.end()
