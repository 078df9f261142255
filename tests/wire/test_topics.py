import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.errors import InvalidIdentifierError, InvalidTopicError
from fedmq.wire.ids import MAX_ID_LENGTH, validate_id, validate_root
from fedmq.wire.topics import (
    AckTopic,
    AggregatorStatusTopic,
    BlobChunkTopic,
    RoundTopic,
    StatusTopic,
    Topics,
    UpdateChunkTopic,
)

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
SHA = "ab" * 32


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "a+b", "a#", "$SYS", "-lead", ".hidden", "..", "x" * (MAX_ID_LENGTH + 1), "é"],
    ids=["empty", "slash", "plus", "hash", "dollar", "dash", "dot", "dotdot", "long", "unicode"],
)
def test_invalid_ids_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        validate_id(bad, "client id")


def test_root_may_have_levels() -> None:
    assert validate_root("plant-7/fedmq") == "plant-7/fedmq"
    with pytest.raises(InvalidIdentifierError):
        validate_root("plant//fedmq")
    with pytest.raises(InvalidIdentifierError):
        Topics("fed", root="$SYS")


@given(ids, ids, st.integers(0, 2**40), st.integers(0, 10_000))
def test_every_topic_parses_back(federation: str, client: str, round_id: int, index: int) -> None:
    topics = Topics(federation, root="plant/fedmq")
    assert topics.parse(topics.round()) == RoundTopic()
    assert topics.parse(topics.blob(SHA, index)) == BlobChunkTopic(SHA, index)
    assert topics.parse(topics.update(client, round_id, index)) == UpdateChunkTopic(
        client, round_id, index
    )
    assert topics.parse(topics.ack(client)) == AckTopic(client)
    assert topics.parse(topics.status(client)) == StatusTopic(client)
    assert topics.parse(topics.aggregator_status()) == AggregatorStatusTopic()


def test_filters() -> None:
    topics = Topics("line-3")
    assert topics.update_filter() == "fedmq/line-3/update/+/+/+"
    assert topics.update_filter("dev-1") == "fedmq/line-3/update/dev-1/+/+"
    assert topics.status_filter() == "fedmq/line-3/status/+"
    assert topics.blob_filter(SHA) == f"fedmq/line-3/blob/{SHA}/+"


@pytest.mark.parametrize(
    "topic",
    [
        "other/fed/round",
        "fedmq/fed/round/extra",
        "fedmq/fed/update/dev/01/0",
        "fedmq/fed/update/dev/-1/0",
        "fedmq/fed/update/dev/1",
        "fedmq/fed/update/$dev/1/0",
        "fedmq/fed/blob/ABC/0",
        f"fedmq/fed/blob/{SHA}/x",
        "fedmq/fed/status/",
        "fedmq/fed/nonsense",
        "fedmq/fed/ack/a+b",
    ],
)
def test_unparseable_topics(topic: str) -> None:
    with pytest.raises(InvalidTopicError):
        Topics("fed").parse(topic)


def test_building_with_bad_parts_is_a_local_error() -> None:
    topics = Topics("fed")
    with pytest.raises(InvalidIdentifierError):
        topics.update("a/b", 1, 0)
    with pytest.raises(InvalidIdentifierError):
        topics.update("dev", -1, 0)
    with pytest.raises(InvalidIdentifierError):
        topics.blob("not-a-sha", 0)
