"""Update reassembly: any order, duplicates, early verdicts, bounded memory, hostile chunks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.support import FEDERATION, T0, chunks, delta, envelope
from fedmq.coordinator.intake import (
    DEFAULT_RESEND_AFTER,
    Answered,
    Assembled,
    ChunkProblem,
    UpdateIntake,
    Verdict,
)
from fedmq.wire.topics import UpdateChunkTopic


def _intake(**kw: object) -> UpdateIntake:
    values: dict[str, object] = {"max_update_bytes": 1 << 20}
    values.update(kw)
    return UpdateIntake(FEDERATION, **values)  # type: ignore[arg-type]


def _admit_all(_header: object) -> Verdict | None:
    return None


def test_chunks_in_any_order_with_duplicates_reassemble_once() -> None:
    uid, data = envelope("a", 1, delta(1), update_id="u1")
    messages = chunks(data, "a", 1, uid, chunk_size=1024)
    assert len(messages) > 2
    shuffled = messages + messages[:2]
    random.Random(4).shuffle(shuffled)
    intake = _intake()
    events = [intake.receive(t, m, T0, _admit_all) for t, m in shuffled]
    assembled = [e for e in events if isinstance(e, Assembled)]
    assert len(assembled) == 1
    assert assembled[0].assembler.finish() == data
    assert intake.pending == 0 or all(e is None for e in events[events.index(assembled[0]) + 1 :])


def test_an_early_verdict_is_answered_once_per_complete_send() -> None:
    uid, data = envelope("a", 1, delta(1), update_id="u1")
    messages = chunks(data, "a", 1, uid)
    intake = _intake()
    verdict = Verdict(True, "duplicate")
    calls: list[object] = []

    def admit(header: object) -> Verdict:
        calls.append(header)
        return verdict

    for _send in range(2):
        events = [intake.receive(t, m, T0, admit) for t, m in messages]
        answers = [e for e in events if e is not None]
        assert answers == [Answered(answers[0].key, verdict)]  # type: ignore[union-attr]
        assert intake.buffered_bytes() == 0
    assert len(calls) == 2  # judged again on each re-send: the round may have moved on


def test_too_large_updates_are_refused_before_allocation() -> None:
    uid, data = envelope("a", 1, delta(1), update_id="u1")
    intake = _intake(max_update_bytes=100)
    events = [intake.receive(t, m, T0, _admit_all) for t, m in chunks(data, "a", 1, uid)]
    assert intake.buffered_bytes() == 0
    answers = [e for e in events if e is not None]
    assert len(answers) == 1
    assert isinstance(answers[0], Answered)
    assert answers[0].verdict.reason == "too_large"


def test_another_federation_is_answered_as_such() -> None:
    uid, data = envelope("a", 1, delta(1), update_id="u1", federation="other")
    intake = _intake()
    messages = chunks(data, "a", 1, uid, federation="other")
    events = [intake.receive(t, m, T0, _admit_all) for t, m in messages]
    assert [e.verdict.reason for e in events if isinstance(e, Answered)] == ["wrong_federation"]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t, m: (t, m[:-1]), "malformed"),
        (lambda t, m: (t, m[:-1] + bytes([m[-1] ^ 0xFF])), "integrity"),
        (lambda t, m: (UpdateChunkTopic("b", t.round, t.index), m), "malformed"),
        (lambda t, m: (UpdateChunkTopic(t.client, t.round + 1, t.index), m), "malformed"),
        (lambda t, m: (t, b"not a fedmq frame"), "malformed"),
    ],
    ids=["truncated", "bad-crc", "other-senders-topic", "round-mismatch", "garbage"],
)
def test_bad_chunks_are_problems_not_exceptions(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    uid, data = envelope("a", 1, delta(1), update_id="u1")
    topic, message = chunks(data, "a", 1, uid)[0]
    event = _intake().receive(*mutate(topic, message), T0, _admit_all)
    assert isinstance(event, ChunkProblem)
    assert event.reason == reason


def test_reassembly_is_bounded_per_client_and_in_total() -> None:
    intake = _intake(max_pending=3, max_pending_per_client=2)
    first_chunks = []
    for client, uid in [("a", "u1"), ("a", "u2"), ("a", "u3"), ("b", "u4"), ("c", "u5")]:
        _, data = envelope(client, 1, delta(1), update_id=uid)
        first_chunks.append(chunks(data, client, 1, uid)[0])
    events = [intake.receive(t, m, T0, _admit_all) for t, m in first_chunks]
    busy = [e for e in events if isinstance(e, ChunkProblem) and e.reason == "busy"]
    assert len(busy) == 2  # a's third update, then c: the total limit
    assert intake.pending == 3


def test_idle_partial_updates_expire() -> None:
    uid, data = envelope("a", 1, delta(1), update_id="u1")
    intake = _intake(ttl_s=10.0)
    intake.receive(*chunks(data, "a", 1, uid)[0], T0, _admit_all)
    # First the missing chunks are asked for, then (still idle) the update expires.
    assert intake.next_expiry() == T0 + DEFAULT_RESEND_AFTER
    due = intake.resend_due(T0 + DEFAULT_RESEND_AFTER)
    assert [d.key.update_id for d in due] == [uid]
    assert 0 not in due[0].missing
    assert due[0].missing == list(range(1, due[0].ref.count))
    assert intake.resend_due(T0 + DEFAULT_RESEND_AFTER) == []  # the next one waits longer
    assert intake.expire(T0 + 5) == []
    problems = intake.expire(T0 + 11)
    assert [p.reason for p in problems] == ["incomplete"]
    assert intake.pending == 0


def test_a_resend_with_other_bytes_under_the_same_id_starts_over() -> None:
    uid, first = envelope("a", 1, delta(1), update_id="u1")
    _, second = envelope("a", 1, delta(2), update_id="u1")
    intake = _intake()
    intake.receive(*chunks(first, "a", 1, uid)[0], T0, _admit_all)
    events = [intake.receive(t, m, T0, _admit_all) for t, m in chunks(second, "a", 1, uid)]
    assembled = [e for e in events if isinstance(e, Assembled)]
    assert [a.assembler.finish() for a in assembled] == [second]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 5), st.integers(0, 5))
def test_arbitrary_payloads_never_raise(payload: bytes, round_id: int, index: int) -> None:
    event = _intake().receive(UpdateChunkTopic("a", round_id, index), payload, T0, _admit_all)
    assert event is None or isinstance(event, ChunkProblem)
