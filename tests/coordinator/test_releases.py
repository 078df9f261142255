"""Inference models released to the devices: built on request, announced, kept retained."""

from __future__ import annotations

import hashlib
import json

import pytest

from coordinator.support import Harness, config, delta, schema
from fedmq.coordinator.actions import BuildInferenceModel, ClearBlob, Noted, Publish, PublishBlob
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.policy import SyncPolicy
from fedmq.coordinator.releases import DeliveryPolicy, ModelShelf, ShelfState
from fedmq.strategies.config import StrategyConfig, build_strategy
from fedmq.wire.control import RoundAnnouncement, decode_control


def model_of(action: BuildInferenceModel) -> bytes:
    """A stand-in for the standalone model: deterministic in the parameters, as the real one."""
    return b"onnx:" + hashlib.sha256(action.params).digest() * 50


class Builder:
    """Plays the service's model builder: answers every BuildInferenceModel of the log."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.done = 0
        self.built: list[int] = []

    def build(self) -> None:
        while True:
            log = self.harness.log
            requests = [a for a in log if isinstance(a, BuildInferenceModel)]
            if self.done >= len(requests):
                return
            action = requests[self.done]
            self.done += 1
            self.built.append(action.checkpoint)
            coordinator = self.harness.coordinator
            self.harness.run(
                coordinator.set_inference_model(
                    action.checkpoint, model_of(action), self.harness.now
                )
            )


def federation(rounds: int = 3, policy: DeliveryPolicy | None = None) -> tuple[Harness, Builder]:
    cfg = config(rounds=rounds, sync=SyncPolicy(min_agents=1), delivery=policy or DeliveryPolicy())
    harness = Harness.create(cfg)
    builder = Builder(harness)
    builder.build()
    harness.online("a")
    return harness, builder


def run_round(harness: Harness, builder: Builder, round_id: int) -> None:
    harness.update("a", round_id, delta(round_id))
    builder.build()


def test_each_checkpoint_gets_a_model_announced_as_latest() -> None:
    harness, builder = federation()
    first = harness.announcements()[-1]
    assert first.models is not None
    assert first.models.latest is not None
    assert first.models.latest.checkpoint == 0
    assert first.models.best is None  # nothing evaluated yet
    published = {a.ref.sha256 for a in harness.blobs}
    assert first.models.latest.model.sha256 in published
    run_round(harness, builder, 1)
    assert builder.built == [0, 1]
    latest = harness.announcements()[-1].models
    assert latest is not None
    assert latest.latest is not None
    assert latest.latest.checkpoint == 1
    assert latest.latest.model.sha256 != first.models.latest.model.sha256
    # The announcement naming a model comes after its blob.
    index = {id(a): i for i, a in enumerate(harness.log)}
    blob = next(
        a for a in harness.log if isinstance(a, PublishBlob) and a.ref == latest.latest.model
    )
    announcement = next(
        a
        for a in harness.log
        if isinstance(a, Publish) and a.topic.endswith("/round") and b'"checkpoint":1' in a.payload
    )
    assert index[id(blob)] < index[id(announcement)]


def test_the_best_follows_the_federated_evaluation() -> None:
    harness, builder = federation(rounds=4)
    state = harness.coordinator.state
    state.evaluations[0] = {"eval_accuracy": 0.4, "eval_loss": 1.0}
    run_round(harness, builder, 1)
    models = harness.announcements()[-1].models
    assert models is not None
    assert models.best is not None
    assert (models.best.checkpoint, models.best.metrics["eval_accuracy"]) == (0, 0.4)
    state.evaluations[1] = {"eval_accuracy": 0.9, "eval_loss": 0.2}
    run_round(harness, builder, 2)
    state.evaluations[2] = {"eval_accuracy": 0.6, "eval_loss": 0.1}
    run_round(harness, builder, 3)
    models = harness.announcements()[-1].models
    assert models is not None
    assert models.best is not None
    assert models.latest is not None
    assert models.best.checkpoint == 1  # highest accuracy, although checkpoint 2 is newer
    assert models.latest.checkpoint == 3
    retained = {ref.sha256 for ref in harness.coordinator.state.blobs.retained()}
    assert {models.best.model.sha256, models.latest.model.sha256} <= retained
    # A model neither latest, best nor the candidate being evaluated is dropped.
    assert [m.checkpoint for m in harness.coordinator.models.held()] == [1, 2, 3]


def test_an_explicit_metric_and_direction_choose_the_best() -> None:
    harness, builder = federation(rounds=3, policy=DeliveryPolicy("eval_loss", "min"))
    state = harness.coordinator.state
    state.evaluations[0] = {"eval_accuracy": 0.9, "eval_loss": 0.5}
    run_round(harness, builder, 1)
    state.evaluations[1] = {"eval_accuracy": 0.1, "eval_loss": 0.3}
    run_round(harness, builder, 2)
    models = harness.announcements()[-1].models
    assert models is not None
    assert models.best is not None
    assert models.best.checkpoint == 1


def test_without_accuracy_the_lowest_loss_is_best() -> None:
    shelf = ModelShelf(1024)
    for checkpoint in (0, 1):
        assert shelf.request(checkpoint, f"{checkpoint:064x}")
        shelf.add(checkpoint, bytes([checkpoint]) * 10)
    shelf.choose_best({0: {"eval_loss": 0.2}, 1: {"eval_loss": 0.7}}, DeliveryPolicy())
    assert shelf.best == 0
    shelf.choose_best({0: {"eval_loss": 0.2}, 1: {"eval_accuracy": 0.5}}, DeliveryPolicy())
    assert shelf.best == 1  # accuracy, where any held model has it, wins over loss


def test_a_failed_round_keeps_the_model_under_its_number() -> None:
    cfg = config(
        rounds=3,
        sync=SyncPolicy(min_agents=1, deadline_s=10, extension_s=1),
        delivery=DeliveryPolicy(),
    )
    harness = Harness.create(cfg)
    builder = Builder(harness)
    builder.build()
    harness.online("a")
    harness.advance(30)  # rounds fail at their deadlines: nobody sends anything
    failed = [c.round for c in harness.closed]
    assert failed
    assert all(c.outcome == "failed" for c in harness.closed)
    builder.build()
    assert builder.built == [0]  # the same parameters: no second build
    models = harness.announcements()[-1].models
    assert models is not None
    assert models.latest is not None
    assert models.latest.checkpoint == failed[-1]


def test_a_finished_federation_keeps_its_releases_retained() -> None:
    harness, builder = federation(rounds=2)
    harness.coordinator.state.evaluations[0] = {"eval_accuracy": 0.8}
    run_round(harness, builder, 1)
    run_round(harness, builder, 2)
    assert harness.finished
    coordinator = harness.coordinator
    final = harness.announcements()[-1]
    assert final.status == "finished"
    assert final.models is not None
    assert final.models.latest is not None
    assert final.models.latest.checkpoint == 2
    assert final.models.best is not None
    assert final.models.best.checkpoint == 0
    kept = {final.models.latest.model.sha256, final.models.best.model.sha256}
    cleared = {a.ref.sha256 for a in harness.cleared}
    assert coordinator.bundle_ref.sha256 in cleared  # the training blobs go ...
    assert not kept & cleared  # ... the releases stay
    snapshot = harness.snapshots[-1]
    assert {ref["sha256"] for ref in snapshot["blobs"]} == kept

    # Restarted (the service hands back the stored model bytes): the releases again.
    checkpoint = harness.checkpoints[snapshot["checkpoint"]]
    restored = Coordinator.restore(
        coordinator.config,
        build_strategy(StrategyConfig()),
        schema(),
        b"bundle-archive",
        snapshot,
        checkpoint.params,
        checkpoint.optimizer,
        now=harness.now,
    )
    stored = {
        m.ref.sha256: coordinator.models.data(m.ref.sha256) for m in coordinator.models.held()
    }
    restored.provide_models({sha: data for sha, data in stored.items() if data is not None})
    actions = restored.start(harness.now)
    assert {a.ref.sha256 for a in actions if isinstance(a, PublishBlob)} == kept
    assert not [a for a in actions if isinstance(a, BuildInferenceModel)]
    [announcement] = [a for a in actions if isinstance(a, Publish) and a.topic.endswith("/round")]
    again = decode_control(announcement.payload, RoundAnnouncement)
    assert again.status == "finished"
    assert again.models == final.models


def test_a_model_lost_from_the_state_directory_is_rebuilt() -> None:
    harness, builder = federation(rounds=3)
    run_round(harness, builder, 1)
    coordinator = harness.coordinator
    snapshot = harness.snapshots[-1]
    checkpoint = harness.checkpoints[snapshot["checkpoint"]]
    restored = Coordinator.restore(
        coordinator.config,
        build_strategy(StrategyConfig()),
        schema(),
        b"bundle-archive",
        snapshot,
        checkpoint.params,
        checkpoint.optimizer,
        now=harness.now,
    )
    assert restored.models.missing()  # nothing provided: the files are gone
    actions = restored.start(harness.now)
    warnings = [a.message for a in actions if isinstance(a, Noted) and a.level == "warning"]
    assert any("missing from the state directory" in w for w in warnings), warnings
    [build] = [a for a in actions if isinstance(a, BuildInferenceModel)]
    assert build.checkpoint == 1
    assert build.params == checkpoint.params
    # The lost model's retained chunks are cleared; nothing unheld is published.
    assert [a for a in actions if isinstance(a, ClearBlob)]
    assert not [
        a
        for a in actions
        if isinstance(a, PublishBlob)
        and a.ref.size != 0
        and a.ref.sha256 not in {restored.bundle_ref.sha256, restored.params_ref.sha256}
    ]


def test_without_delivery_announcements_carry_no_models_field() -> None:
    harness = Harness.create(config(rounds=1))
    assert not [a for a in harness.log if isinstance(a, BuildInferenceModel)]
    payload = next(m.payload for m in harness.published if m.topic.endswith("/round"))
    assert "models" not in json.loads(payload)  # absent, not null: old agents still read it


def test_a_shelf_snapshot_that_names_an_unheld_release_is_refused() -> None:
    with pytest.raises(ValueError, match="not on the shelf"):
        ShelfState.from_json({"held": [], "latest": 3, "best": None})
    assert ShelfState.from_json(None) == ShelfState()
