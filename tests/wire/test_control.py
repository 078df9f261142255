from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.errors import LimitExceededError, MalformedMessageError, UnsupportedVersionError
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import (
    Ack,
    AgentStatus,
    AggregatorStatus,
    RoundAnnouncement,
    control_schemas,
    decode_control,
    encode_control,
)
from fedmq.wire.limits import DecodeLimits
from fedmq.wire.training import TrainingConfig

ids = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,15}", fullmatch=True)
times = st.floats(0, 4e9, allow_nan=False)
refs = st.builds(
    BlobRef,
    st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    st.integers(0, 2**40),
    st.integers(1024, 2**24),
)
announcements = st.builds(
    RoundAnnouncement,
    federation=ids,
    aggregator=ids,
    round=st.integers(0, 2**40),
    status=st.sampled_from(["open", "finished"]),
    mode=st.sampled_from(["sync", "async"]),
    issued_at=times,
    deadline=times,
    bundle=refs,
    params=refs,
    training=st.builds(
        TrainingConfig,
        epochs=st.integers(1, 5),
        lr=st.floats(1e-5, 1.0),
        optimizer=st.sampled_from(["sgd", "adam", "adamw"]),
    ),
    codec=st.sampled_from(["raw", "fp16", "int8:64", "topk:0.1"]),
    selected=st.none() | st.lists(ids, max_size=5),
    upload_slots=st.none() | st.integers(1, 100),
    task=st.sampled_from(["train", "evaluate"]),
)
acks = st.builds(
    Ack,
    federation=ids,
    client=ids,
    round=st.integers(0, 2**40),
    update_id=ids,
    accepted=st.booleans(),
    reason=st.sampled_from(["accepted", "duplicate", "non_finite"]),
    detail=st.text(max_size=50),
    ts=times,
)
statuses = st.builds(
    AgentStatus,
    client=ids,
    state=st.sampled_from(["idle", "training", "offline"]),
    round=st.none() | st.integers(0, 100),
    progress=st.none() | st.floats(0, 1),
    versions=st.dictionaries(ids, ids, max_size=3),
    ts=times,
)
aggregator_statuses = st.builds(
    AggregatorStatus,
    aggregator=ids,
    state=st.sampled_from(["collecting", "finished"]),
    received=st.integers(0, 100),
    rejected=st.dictionaries(ids, st.integers(0, 10), max_size=3),
    ts=times,
)


@given(st.one_of(announcements, acks, statuses, aggregator_statuses))
def test_every_control_message_round_trips(message: RoundAnnouncement) -> None:
    data = encode_control(message)
    assert decode_control(data, type(message)) == message
    assert json.loads(data)["v"] == 1


def _status_json(**changes: object) -> bytes:
    document: dict[str, object] = {
        "v": 1,
        "type": "agent_status",
        "client": "c",
        "state": "idle",
        "ts": 1.0,
    }
    document.update(changes)
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\xff\xfe", MalformedMessageError),
        (b"not json", MalformedMessageError),
        (b"[1, 2]", MalformedMessageError),
        (_status_json(v=2), UnsupportedVersionError),
        (_status_json(type="ack"), MalformedMessageError),
        (_status_json(client="a/b"), MalformedMessageError),
        (_status_json(state="sleeping"), MalformedMessageError),
        (_status_json(extra=1), MalformedMessageError),
        (_status_json(progress=2.0), MalformedMessageError),
        (
            b'{"v": 1, "type": "agent_status", "client": "c", "state": "idle", "ts": NaN}',
            MalformedMessageError,
        ),
        (b"[" * 100_000, MalformedMessageError),
    ],
    ids=[
        "utf8",
        "text",
        "array",
        "version",
        "type",
        "client",
        "state",
        "extra",
        "progress",
        "nan",
        "deep",
    ],
)
def test_malformed_control_messages(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_control(data, AgentStatus, DecodeLimits(max_control_bytes=1 << 20))


def test_oversized_control_message() -> None:
    with pytest.raises(LimitExceededError):
        decode_control(b" " * 300_000, AgentStatus)


def test_schemas_are_published_for_every_message() -> None:
    schemas = control_schemas()
    assert set(schemas) == {"round", "ack", "resend", "agent_status", "aggregator_status"}
    assert "deadline" in schemas["round"]["properties"]


def test_round_addressing() -> None:
    ref = BlobRef("0" * 64, 1, 1024)
    base = {
        "federation": "f",
        "aggregator": "a",
        "round": 1,
        "issued_at": 0,
        "deadline": 1,
        "bundle": ref,
        "params": ref,
    }
    assert RoundAnnouncement(**base).addresses("anyone")  # type: ignore[arg-type]
    selective = RoundAnnouncement(**base, selected=["d1"])  # type: ignore[arg-type]
    assert selective.addresses("d1")
    assert not selective.addresses("d2")
    assert not RoundAnnouncement(**base, status="finished").addresses("d1")  # type: ignore[arg-type]


# The announcement fields of fedmq 0.x agents before upload pacing, evaluate-only rounds
# and model releases: they refuse any other field.
FIRST_ANNOUNCEMENT_FIELDS = {
    "v", "signature", "type", "federation", "aggregator", "round", "status", "mode",
    "issued_at", "deadline", "bundle", "params", "training", "codec", "chunk_size",
    "selected",
}  # fmt: skip


@given(announcements)
def test_an_announcement_using_no_later_field_carries_none_of_them(
    message: RoundAnnouncement,
) -> None:
    plain = message.model_copy(update={"upload_slots": None, "task": "train", "models": None})
    document = json.loads(encode_control(plain))
    assert set(document) <= FIRST_ANNOUNCEMENT_FIELDS  # older agents still read it
    assert decode_control(json.dumps(document).encode(), RoundAnnouncement) == plain
    paced = json.loads(encode_control(message.model_copy(update={"upload_slots": 3})))
    assert paced["upload_slots"] == 3
