"""A finished federation clears its retained blobs and keeps the finished announcement."""

from __future__ import annotations

from coordinator.support import Harness, config, delta, schema
from fedmq.coordinator.actions import ClearBlob, Publish, PublishBlob, SaveState
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.policy import SyncPolicy
from fedmq.strategies.config import StrategyConfig, build_strategy
from fedmq.wire.control import RoundAnnouncement, decode_control


def _finished() -> tuple[Harness, int]:
    harness = Harness.create(config(rounds=2, sync=SyncPolicy(min_agents=2)))
    harness.online("a", "b")
    for round_id in (1, 2):
        harness.update("a", round_id, delta(round_id))
        harness.update("b", round_id, delta(round_id + 10))
    assert [f.reason for f in harness.finished] == ["ran 2 rounds"]
    finish = next(i for i, a in enumerate(harness.log) if type(a).__name__ == "FederationFinished")
    return harness, finish


def test_finishing_clears_the_bundle_and_params_after_the_final_announcement() -> None:
    harness, finish = _finished()
    coordinator = harness.coordinator
    last_open = [a for a in harness.announcements() if a.status == "open"][-1]
    final = harness.announcements()[-1]
    assert final.status == "finished"
    # The announcement still names the last blobs; the broker holds none of them.
    assert final.bundle == coordinator.bundle_ref
    ending = harness.log[: finish + 1]
    announced = max(
        i for i, a in enumerate(ending) if isinstance(a, Publish) and a.topic.endswith("/round")
    )
    cleared = [a.ref for a in harness.log[announced:] if isinstance(a, ClearBlob)]
    assert sorted(ref.sha256 for ref in cleared) == sorted(
        {coordinator.bundle_ref.sha256, last_open.params.sha256}
    )
    # The final model itself is never published: nobody would download it.
    published = {a.ref.sha256 for a in harness.log if isinstance(a, PublishBlob)}
    assert final.params.sha256 not in published
    # The snapshot after the clearing lists nothing retained (a restart clears nothing).
    last_state = [a for a in harness.log if isinstance(a, SaveState)][-1]
    assert last_state.snapshot["blobs"] == []
    assert coordinator.state.blobs.referenced() == []


def test_a_restarted_finished_federation_publishes_no_blob_and_clears_leftovers() -> None:
    harness, finish = _finished()
    # A crash after the finished state was saved but before its blobs were cleared.
    snapshot = next(
        a.snapshot
        for a in harness.log[:finish]
        if isinstance(a, SaveState) and a.snapshot["phase"] == "finished"
    )
    assert len(snapshot["blobs"]) == 2
    checkpoint = harness.checkpoints[snapshot["checkpoint"]]
    restored = Coordinator.restore(
        config(rounds=2, sync=SyncPolicy(min_agents=2)),
        build_strategy(StrategyConfig()),
        schema(),
        b"bundle-archive",
        snapshot,
        checkpoint.params,
        checkpoint.optimizer,
        now=harness.now,
    )
    actions = restored.start(harness.now)
    assert not [a for a in actions if isinstance(a, PublishBlob)]
    assert len([a for a in actions if isinstance(a, ClearBlob)]) == 2
    [announcement] = [a for a in actions if isinstance(a, Publish) and a.topic.endswith("/round")]
    assert decode_control(announcement.payload, RoundAnnouncement).status == "finished"
    # After a reconnect: the announcement again, still no blob.
    again = restored.republish(harness.now)
    assert not [a for a in again if isinstance(a, PublishBlob)]
    assert [a for a in again if isinstance(a, Publish) and a.topic.endswith("/round")]
