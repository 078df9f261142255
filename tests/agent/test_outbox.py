"""The outbox and state directory: atomic commits, crash recovery, residual promotion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.outbox import ENTRY_FILE, RESIDUAL_FILE, UPDATE_FILE, Outbox, OutboxEntry
from edge_agent.state import StateDir, encode_residual
from fedmq.errors import ConfigError

BUNDLE = "cd" * 32


def make_entry(update_id: str, round_id: int, created_at: float = 1.0) -> OutboxEntry:
    return OutboxEntry(
        update_id=update_id,
        federation="fed",
        client="dev",
        round=round_id,
        created_at=created_at,
        sha256="ab" * 32,
        size=5,
        chunk_size=1024,
        bundle=BUNDLE,
    )


EXPECTED = {"w": ((3,), np.dtype(np.float32))}


def test_commit_then_read_then_remove(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.commit(make_entry("u1", 1), b"hello", None)
    outbox.commit(make_entry("u2", 2, created_at=2.0), b"world", None)
    assert [e.update_id for e in outbox.entries()] == ["u1", "u2"]
    assert outbox.read_update(make_entry("u1", 1)) == b"hello"
    with pytest.raises(FileExistsError):
        outbox.commit(make_entry("u1", 1), b"hello", None)
    assert outbox.remove("u1")
    assert not outbox.remove("u1")
    assert [e.update_id for e in Outbox(tmp_path).entries()] == ["u2"]


def test_interrupted_commit_leaves_nothing_after_recovery(tmp_path: Path) -> None:
    state = StateDir(tmp_path, "fed")
    # What a power cut between writing the files and the rename leaves behind:
    staging = tmp_path / "outbox" / ".staging-u1"
    staging.mkdir()
    (staging / UPDATE_FILE).write_bytes(b"half")
    state.recover()
    assert not staging.exists()
    assert state.outbox.entries() == []
    assert state.state.last_answered_round is None
    state.close()


def test_corrupt_entry_is_deleted_not_sent(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path)
    outbox.commit(make_entry("u1", 1), b"hello", None)
    (tmp_path / "u1" / ENTRY_FILE).write_text("{not json")
    outbox.commit(make_entry("u2", 1), b"hello", None)
    (tmp_path / "u2" / UPDATE_FILE).write_bytes(b"torn")  # size no longer matches
    assert outbox.entries() == []
    assert list(tmp_path.iterdir()) == []


def test_commit_promotes_residual_and_marks_the_round(tmp_path: Path) -> None:
    state = StateDir(tmp_path, "fed")
    residual = {"w": np.array([0.5, -0.25, 0.0], np.float32)}
    state.commit_update(make_entry("u1", 3), b"hello", residual)
    assert state.state.last_answered_round == 3
    loaded = state.residuals.load(BUNDLE, EXPECTED)
    np.testing.assert_array_equal(loaded["w"], residual["w"])
    assert not (tmp_path / "outbox" / "u1" / RESIDUAL_FILE).exists()
    # A lossless round leaves an empty residual: the old one was carried by the update.
    state.commit_update(make_entry("u2", 4), b"again", {})
    assert state.residuals.load(BUNDLE, EXPECTED) == {}
    state.close()
    reopened = StateDir(tmp_path, "fed")
    assert reopened.state.last_answered_round == 4
    reopened.close()


def test_crash_between_commit_and_promotion_is_recovered(tmp_path: Path) -> None:
    state = StateDir(tmp_path, "fed")
    residual = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
    # Commit without the follow-up steps, as if the process died right after the rename.
    state.outbox.commit(make_entry("u1", 9), b"hello", encode_residual(residual))
    state.close()
    recovered = StateDir(tmp_path, "fed")
    recovered.recover()
    assert recovered.state.last_answered_round == 9
    np.testing.assert_array_equal(recovered.residuals.load(BUNDLE, EXPECTED)["w"], residual["w"])
    assert [e.update_id for e in recovered.outbox.entries()] == ["u1"]
    recovered.close()


def test_residual_of_another_shape_is_dropped(tmp_path: Path) -> None:
    state = StateDir(tmp_path, "fed")
    state.commit_update(make_entry("u1", 1), b"x", {"w": np.ones(4, np.float32)})
    assert state.residuals.load(BUNDLE, EXPECTED) == {}
    state.close()


def test_second_agent_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    first = StateDir(tmp_path, "fed")
    with pytest.raises(ConfigError, match="another fedmq-agent"):
        StateDir(tmp_path, "fed")
    first.close()
    StateDir(tmp_path, "fed").close()


def test_unusable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    # A path below a regular file cannot be created, even by root.
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="not usable"):
        StateDir(tmp_path / "file" / "state", "fed")


def test_state_of_another_federation_is_not_reused(tmp_path: Path) -> None:
    state = StateDir(tmp_path, "fed")
    state.mark_answered(7, BUNDLE)
    state.close()
    other = StateDir(tmp_path, "other")
    assert other.state.last_answered_round is None
    other.close()
