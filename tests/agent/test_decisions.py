"""The agent's pure protocol decisions: announcements, acks, outbox re-sends."""

from __future__ import annotations

import logging
import time

import pytest

from edge_agent.decisions import (
    Finished,
    IgnoreAck,
    RemoveEntry,
    SendRecord,
    Skip,
    Train,
    decide_ack,
    decide_round,
    outbox_action,
)
from edge_agent.outbox import OutboxEntry
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import Ack, RoundAnnouncement

SHA = "ab" * 32
REF = BlobRef(SHA, 100, 1024)


def announcement(round_id: int = 5, **fields: object) -> RoundAnnouncement:
    base: dict[str, object] = {
        "federation": "fed",
        "aggregator": "agg",
        "round": round_id,
        "issued_at": 1.0,
        "deadline": 2.0,
        "bundle": REF,
        "params": REF,
    }
    base.update(fields)
    return RoundAnnouncement.model_validate(base)


def entry(round_id: int = 5, created_at: float = 1000.0) -> OutboxEntry:
    return OutboxEntry(
        update_id="u1",
        federation="fed",
        client="dev",
        round=round_id,
        created_at=created_at,
        sha256=SHA,
        size=10,
        chunk_size=1024,
        bundle=SHA,
    )


def decide(ann: RoundAnnouncement, last: int | None = None, working: int | None = None) -> object:
    return decide_round(ann, client="dev", federation="fed", last_answered=last, working_on=working)


@pytest.mark.parametrize(
    ("ann", "last", "working", "expected"),
    [
        pytest.param(announcement(), None, None, Train, id="fresh-agent-trains"),
        pytest.param(announcement(), 4, None, Train, id="next-round-trains"),
        pytest.param(announcement(), 5, None, Skip, id="answered-round-skipped"),
        pytest.param(announcement(), 7, None, Skip, id="stale-round-skipped"),
        pytest.param(announcement(), None, 5, Skip, id="in-progress-not-restarted"),
        pytest.param(announcement(), None, 6, Skip, id="older-than-current-work"),
        pytest.param(announcement(6), None, 5, Train, id="newer-round-supersedes"),
        pytest.param(announcement(federation="other"), None, None, Skip, id="wrong-federation"),
        pytest.param(announcement(selected=["a", "b"]), None, None, Skip, id="not-selected"),
        pytest.param(announcement(selected=["dev"]), None, None, Train, id="selected"),
        pytest.param(announcement(status="finished"), None, 5, Finished, id="finished"),
        pytest.param(announcement(status="waiting"), None, None, Skip, id="waiting"),
        pytest.param(
            announcement(status="finished", federation="x"), None, None, Skip, id="finished-other"
        ),
    ],
)
def test_round_decisions(
    ann: RoundAnnouncement, last: int | None, working: int | None, expected: type
) -> None:
    assert isinstance(decide(ann, last, working), expected)


def test_wrong_federation_is_logged_loudly() -> None:
    decision = decide(announcement(federation="other"))
    assert isinstance(decision, Skip)
    assert decision.level == logging.WARNING
    assert "other" in decision.reason


def ack(**fields: object) -> Ack:
    base: dict[str, object] = {
        "federation": "fed",
        "client": "dev",
        "round": 5,
        "update_id": "u1",
        "accepted": True,
        "reason": "accepted",
        "ts": time.time(),
    }
    base.update(fields)
    return Ack.model_validate(base)


@pytest.mark.parametrize(
    ("message", "held", "removes", "error"),
    [
        pytest.param(ack(), True, True, False, id="accepted"),
        pytest.param(ack(reason="duplicate"), True, True, False, id="duplicate"),
        pytest.param(
            ack(accepted=False, reason="round_closed"), True, True, False, id="round-closed"
        ),
        pytest.param(
            ack(accepted=False, reason="stale_round"), True, True, False, id="stale-round"
        ),
        pytest.param(ack(accepted=False, reason="non_finite"), True, True, True, id="rejected"),
        pytest.param(ack(), False, False, False, id="unknown-update"),
        pytest.param(ack(client="other"), True, False, False, id="other-client"),
        pytest.param(ack(federation="other"), True, False, False, id="other-federation"),
    ],
)
def test_ack_decisions(message: Ack, held: bool, removes: bool, error: bool) -> None:
    decision = decide_ack(message, client="dev", federation="fed", entry=entry() if held else None)
    if not removes:
        assert isinstance(decision, IgnoreAck)
        return
    assert isinstance(decision, RemoveEntry)
    assert decision.update_id == "u1"
    assert (decision.error is not None) is error


def test_round_closed_rejection_names_the_reason() -> None:
    decision = decide_ack(
        ack(accepted=False, reason="round_closed", detail="closed at 12:00"),
        client="dev",
        federation="fed",
        entry=entry(),
    )
    assert isinstance(decision, RemoveEntry)
    assert "round_closed" in decision.message
    assert "closed at 12:00" in decision.message


def act(record: SendRecord, now: float, connection: int = 1) -> tuple[str, float | None]:
    return outbox_action(
        entry(), record, now=now, connection=connection, ack_timeout=60, max_age=3600
    )


def test_unsent_entry_is_sent() -> None:
    assert act(SendRecord(), 1001) == ("send", None)


def test_sent_entry_waits_for_its_ack_then_resends_with_backoff() -> None:
    record = SendRecord(sent_at=1000, connection=1, sends=1)
    assert act(record, 1030) == ("wait", 1060)
    assert act(record, 1060) == ("send", None)
    record = SendRecord(sent_at=1000, connection=1, sends=3)
    assert act(record, 1100) == ("wait", 1000 + 60 * 4)
    record = SendRecord(sent_at=1000, connection=1, sends=50)
    assert act(record, 1100) == ("wait", 1000 + 60 * 16)


def test_entry_is_resent_after_a_reconnect() -> None:
    record = SendRecord(sent_at=1000, connection=1, sends=1)
    assert act(record, 1001, connection=2) == ("send", None)


def test_old_entry_expires() -> None:
    assert act(SendRecord(sent_at=1000, connection=1, sends=1), 1000 + 3601) == ("expire", None)


def test_resend_waits_are_bounded_by_the_rounds_deadline_and_jittered() -> None:
    near = entry().model_copy(update={"deadline": 1000 + 120.0})
    record = SendRecord(sent_at=1000, connection=1, sends=3)
    # 60 s doubling would wait 240 s, past the deadline: a quarter of the 120 s left.
    assert outbox_action(near, record, now=1001, connection=1, ack_timeout=60, max_age=3600) == (
        "wait",
        1030,
    )
    record.jitter = 0.5
    assert outbox_action(near, record, now=1001, connection=1, ack_timeout=60, max_age=3600) == (
        "wait",
        1015,
    )
    late = entry().model_copy(update={"deadline": 1001.0})
    record = SendRecord(sent_at=1000, connection=1, sends=1)
    assert outbox_action(late, record, now=1001, connection=1, ack_timeout=60, max_age=3600) == (
        "wait",
        1002,
    )  # never below MIN_RESEND_WAIT
