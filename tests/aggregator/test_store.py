"""The state directory: exclusive, atomic, ordered, pruned."""

from __future__ import annotations

from pathlib import Path

import pytest
from coordinator.support import delta, envelope, schema

from fedmq.aggregator.store import StateStore, atomic_write, read_records
from fedmq.coordinator.actions import Ticket
from fedmq.coordinator.records import Contribution, RoundRecord
from fedmq.coordinator.validation import UpdateKey, VerifiedUpdate, verify_update
from fedmq.errors import StateError


def _ticket(seq: int, client: str, fold_round: int = 1) -> Ticket:
    uid, data = envelope(client, fold_round, delta(seq))
    verified = verify_update(UpdateKey(client, fold_round, uid), data, schema())
    assert isinstance(verified, VerifiedUpdate)
    return Ticket(seq, fold_round, verified, 10.0, 0)


def test_one_service_per_state_directory(tmp_path: Path) -> None:
    with StateStore(tmp_path), pytest.raises(StateError, match="in use"):
        StateStore(tmp_path)
    with StateStore(tmp_path):  # released on close
        pass


def test_atomic_write_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "a" / "file.json"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_leftover_temporaries_are_removed_on_open(tmp_path: Path) -> None:
    leftover = tmp_path / "rounds" / "000001" / "updates" / ".x.update.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half")
    with StateStore(tmp_path) as store:
        assert not leftover.exists()
        assert store.stored_updates(1) == []


def test_updates_come_back_in_acceptance_order_and_are_pruned(tmp_path: Path) -> None:
    with StateStore(tmp_path) as store:
        tickets = [_ticket(seq, client) for seq, client in [(3, "c"), (1, "a"), (2, "b")]]
        store.persist_updates(tickets[:2])
        store.persist_updates(tickets[2:])
        stored = store.stored_updates(1)
        assert [(s.seq, s.client) for s in stored] == [(1, "a"), (2, "b"), (3, "c")]
        assert stored[0].path.read_bytes() == tickets[1].update.data
        store.persist_updates([_ticket(4, "a", fold_round=2)])
        store.prune_updates(2)
        assert store.stored_updates(1) == []
        assert [s.seq for s in store.stored_updates(2)] == [4]


def test_snapshot_checkpoints_and_records_round_trip(tmp_path: Path) -> None:
    record = RoundRecord(
        round=1,
        outcome="closed",
        reason="target",
        opened_at=1.0,
        closed_at=2.0,
        deadline=3.0,
        extended=False,
        selected=("a",),
        contributions=(Contribution("a", "u1", 1, 1, 10, 10.0, 0, {"train_loss": 0.5}),),
        rejected={"malformed": 1},
        metrics={"train_loss": 0.5},
        strategy="fedavg",
    )
    with StateStore(tmp_path) as store:
        assert store.load_snapshot() is None
        store.save_snapshot({"v": 1, "round": 4})
        store.save_checkpoint(3, b"params", b"optimizer")
        store.save_record(record)
        assert store.load_snapshot() == {"v": 1, "round": 4}
        assert store.load_checkpoint(3) == (b"params", b"optimizer")
        assert store.checkpoints() == [3]
        with pytest.raises(StateError, match="round 9"):
            store.load_checkpoint(9)
    assert list(read_records(tmp_path)) == [record]


def test_a_corrupt_snapshot_is_a_state_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"{not json")
    with StateStore(tmp_path) as store, pytest.raises(StateError, match="JSON"):
        store.load_snapshot()


def test_an_unusable_directory_fails_loudly(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_bytes(b"a file where the state directory should be")
    with pytest.raises(StateError, match="cannot use"):
        StateStore(blocker)
