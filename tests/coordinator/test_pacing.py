"""Paced uploads: at most ``upload_slots`` updates stream at once, the rest wait their turn."""

from __future__ import annotations

import pytest

from coordinator.support import T0, chunks, delta, envelope
from fedmq.coordinator.intake import Answered, Assembled, UpdateIntake, Verdict
from fedmq.coordinator.pacing import expected_update_bytes, upload_slots
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.topics import UpdateChunkTopic

CHUNK = 1024


def _admit_all(_header: object) -> Verdict | None:
    return None


def _upload(client: str) -> list[tuple[UpdateChunkTopic, bytes]]:
    uid, data = envelope(client, 1, delta(ord(client)), update_id=f"u-{client}")
    messages = chunks(data, client, 1, uid, chunk_size=CHUNK)
    assert len(messages) >= 3
    return messages


def test_the_rule_fits_a_round_into_the_queue() -> None:
    # 10 agents, 33 chunks each, a 200-message queue: (200 - 20) // 33 = 5 at once.
    assert upload_slots(200, 10, 33) == 5
    assert upload_slots(1000, 10, 33) is None  # 330 + 20 fit: no pacing needed
    assert upload_slots(None, 10, 33) is None
    assert upload_slots(30, 10, 33) == 1  # too small even for one: still progress
    for queue in range(1, 400, 7):
        for agents in range(1, 30, 3):
            slots = upload_slots(queue, agents, 12)
            if slots is None:
                assert agents * 12 + 2 * agents <= queue
            elif slots > 1:
                assert slots * 12 + 2 * agents <= queue


def test_expected_update_size_follows_the_codec() -> None:
    shapes = {"w": (1000, 100)}
    raw = expected_update_bytes(shapes, CodecSpec.parse("raw"))
    assert raw >= 400_000
    assert expected_update_bytes(shapes, CodecSpec.parse("fp16")) < raw / 1.9
    assert expected_update_bytes(shapes, CodecSpec.parse("int8")) < raw / 3.5
    assert expected_update_bytes(shapes, CodecSpec.parse("topk:0.05")) < raw / 8


def test_first_chunks_are_granted_in_arrival_order_up_to_the_slot_count() -> None:
    intake = UpdateIntake("plant7", max_update_bytes=1 << 20, upload_slots=2)
    uploads = {client: _upload(client) for client in ("a", "b", "c", "d")}
    for messages in uploads.values():
        topic, message = messages[0]
        assert intake.receive(topic, message, T0, _admit_all) is None
    grants = intake.resend_due(T0)
    assert [due.key.client for due in grants] == ["a", "b"]
    assert grants[0].missing == list(range(1, len(uploads["a"])))
    assert intake.resend_due(T0) == []  # a grant is asked for once
    assert intake.granted() == 2

    # "a" streams the rest: complete, so "c" (the oldest waiting) gets its slot.
    events = [intake.receive(t, m, T0 + 0.5, _admit_all) for t, m in uploads["a"][1:]]
    assert isinstance(events[-1], Assembled)
    assert intake.grants_ready
    assert [due.key.client for due in intake.resend_due(T0 + 0.5)] == ["c"]
    # Waiting updates are never asked for chunks, however long they wait.
    later = intake.resend_due(T0 + 60)
    assert {due.key.client for due in later} <= {"b", "c"}


def test_more_slots_in_a_new_announcement_grant_waiting_updates() -> None:
    intake = UpdateIntake("plant7", max_update_bytes=1 << 20, upload_slots=1)
    for client in ("a", "b", "c"):
        topic, message = _upload(client)[0]
        intake.receive(topic, message, T0, _admit_all)
    assert [due.key.client for due in intake.resend_due(T0)] == ["a"]
    intake.set_upload_slots(None)  # pacing off: everyone is told to send the rest
    assert {due.key.client for due in intake.resend_due(T0)} == {"b", "c"}


def test_an_expired_upload_frees_its_slot() -> None:
    intake = UpdateIntake("plant7", max_update_bytes=1 << 20, upload_slots=1, ttl_s=10)
    topic, message = _upload("a")[0]
    intake.receive(topic, message, T0, _admit_all)
    intake.resend_due(T0)
    topic, message = _upload("b")[0]
    intake.receive(topic, message, T0 + 8, _admit_all)
    # "a" holds the only slot (and, stalled, is asked again); "b" waits.
    assert [due.key.client for due in intake.resend_due(T0 + 8)] == ["a"]
    problems = intake.expire(T0 + 11)  # "a" went silent
    assert [p.client for p in problems] == ["a"]
    assert [due.key.client for due in intake.resend_due(T0 + 11)] == ["b"]


@pytest.mark.parametrize("paced", [True, False])
def test_a_refused_update_is_answered_on_its_first_chunk_when_paced(paced: bool) -> None:
    intake = UpdateIntake("plant7", max_update_bytes=1 << 20, upload_slots=3 if paced else None)
    messages = _upload("a")

    def refuse(_header: object) -> Verdict:
        return Verdict(False, "stale_round")

    first = intake.receive(*messages[0], T0, refuse)
    if paced:
        assert isinstance(first, Answered)  # the paced agent sends nothing else
        # If it sends everything anyway, it is not answered a second time.
        rest = [intake.receive(t, m, T0, refuse) for t, m in messages[1:]]
        assert rest == [None] * len(rest)
    else:
        assert first is None
        rest = [intake.receive(t, m, T0, refuse) for t, m in messages[1:]]
        assert isinstance(rest[-1], Answered)
