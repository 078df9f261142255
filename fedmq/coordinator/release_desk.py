"""The coordinator's inputs about inference models: stored bytes, finished and failed builds.

The shelf of :mod:`~fedmq.coordinator.releases` is pure bookkeeping inside the blob
ledger; what the coordinator does when the service reports on a model (hold it, note
it, announce it once the federation runs) lives here, beside the round flow it
announces with, as :class:`~fedmq.coordinator.update_desk.UpdateDesk` does for updates.
It is its own module because ``releases`` sits below the state and the round flow (the
ledger and the snapshot import it) and this desk needs both.

Like the update desk it only returns actions: ``Coordinator`` keeps the public methods
and decides which of them end in its end-of-input step.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedmq.coordinator.actions import Action, Noted
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.releases import ModelShelf
from fedmq.coordinator.round_flow import RoundFlow
from fedmq.coordinator.state import FederationState


class ReleaseDesk:
    """What happens to the inference models the service builds and stores.

    Args:
        config: federation policy (``delivery``: whether models are released at all).
        state: the federation state (its ledger holds the shelf and publishes the blobs).
        flow: the round flow (announces a new release once started).
    """

    def __init__(self, config: CoordinatorConfig, state: FederationState, flow: RoundFlow) -> None:
        self.config = config
        self.state = state
        self.flow = flow

    @property
    def shelf(self) -> ModelShelf:
        """The inference models held for the devices."""
        return self.state.blobs.models

    def provide(self, models: Mapping[str, bytes]) -> None:
        """Hand the shelf the stored bytes (sha256 -> bytes) of the models the snapshot names."""
        for sha256, data in models.items():
            self.shelf.provide(sha256, data)

    def built(self, checkpoint: int, model: bytes, now: float) -> tuple[list[Action], bool]:
        """Hold the model built for ``checkpoint``; the actions, and whether it was announced.

        Only an announced model changed what the coordinator publishes, so only then does
        the input end in the end-of-input step.
        """
        held = self.shelf.add(checkpoint, model)
        if held is None:
            return [Noted("info", f"inference model of checkpoint {checkpoint} not needed")], False
        note = Noted(
            "info",
            f"inference model of checkpoint {checkpoint}: {held.ref.size} bytes, "
            f"sha256 {held.ref.sha256[:12]}…",
        )
        if not self.flow.started:
            return [note], False  # start() publishes and announces it
        return [note, *self.flow.announce(now)], True

    def failed(self, checkpoint: int, error: str) -> list[Action]:
        """A build failed: say so, if it was still wanted (the previous releases stay)."""
        if not self.shelf.failed(checkpoint):
            return []
        return [
            Noted(
                "warning",
                f"no inference model for checkpoint {checkpoint}: {error}; the devices keep "
                "the previous release",
            )
        ]

    def start(self) -> list[Action]:
        """At start: stop releasing models that were lost, build the current one if needed."""
        shelf = self.shelf
        if self.config.delivery is None:
            shelf.clear()  # switched off: start() clears their retained blobs after this
            return []
        actions: list[Action] = [
            Noted(
                "warning",
                f"the inference model of checkpoint {checkpoint} is missing from the state "
                "directory: it is no longer released",
            )
            for checkpoint in shelf.drop_missing()
        ]
        actions.extend(self.state.blobs.request_model(self.state.checkpoint))
        return actions
