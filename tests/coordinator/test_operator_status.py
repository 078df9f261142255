"""The aggregator status carries what an operator needs without the state directory.

Who is missing (bounded), the round's traffic, how the last round ended, the newest
refusals; all optional fields, so statuses of older aggregators still decode, and the
signed status still verifies.
"""

from __future__ import annotations

import json

import pytest

from coordinator.support import T0, Harness, config, delta
from fedmq.coordinator.policy import SyncPolicy
from fedmq.wire.control import (
    MAX_MISSING_LISTED,
    AggregatorStatus,
    decode_control,
    encode_control,
)
from fedmq.wire.signing import SignatureError, SigningKey, TrustedKeys


def _harness(agents: list[str], **policy: object) -> Harness:
    values: dict[str, object] = {"min_agents": len(agents)}
    values.update(policy)
    harness = Harness.create(config(rounds=3, sync=SyncPolicy(**values)))  # type: ignore[arg-type]
    harness.online(*agents)
    return harness


def test_missing_agents_traffic_and_the_last_round() -> None:
    harness = _harness(["a", "b", "c"])
    opened = harness.coordinator.status(harness.now)
    assert (opened.state, opened.round, opened.rounds) == ("collecting", 1, 3)
    assert opened.opened_at == T0
    assert (opened.missing, opened.missing_count) == (["a", "b", "c"], 3)
    # Announcing round 1 published the bundle, the parameters and the announcement.
    published = sum(len(p.payload) for p in harness.published) + sum(
        b.ref.size for b in harness.blobs
    )
    assert opened.bytes_out == published
    assert opened.bytes_in == 0
    assert opened.last_round is None

    harness.update("b", 1, delta(1), metrics={"train_loss": 0.5})
    harness.send(b"not an update", "c", 1, "garbage")  # reassembles, then fails to decode
    status = harness.coordinator.status(harness.now)
    assert (status.missing, status.missing_count) == (["a"], 1)
    assert status.received == 1
    assert status.rejected == {"malformed": 1}
    [rejection] = status.recent_rejections
    assert (rejection.client, rejection.round, rejection.reason) == ("c", 1, "malformed")
    assert rejection.detail
    assert status.bytes_in > 0
    received_before = status.bytes_in

    harness.now += 12.5
    harness.update("a", 1, delta(2), metrics={"train_loss": 0.25})
    [closed] = harness.closed
    assert closed.round == 1
    after = harness.coordinator.status(harness.now)
    assert after.round == 2
    last = after.last_round
    assert last is not None
    assert (last.round, last.outcome, last.reason) == (1, "closed", "all_reported")
    assert last.duration_s == 12.5
    assert (last.updates, last.rejected) == (2, 1)
    assert last.bytes_in > received_before
    assert last.bytes_out >= opened.bytes_out  # and the acks
    assert after.metrics["train_loss"] == 0.375  # the example-weighted mean of round 1
    # Round 2's account starts with what announcing it published.
    assert after.bytes_in == 0
    assert after.bytes_out > 0
    assert (after.missing, after.missing_count) == (["a", "b", "c"], 3)
    assert after.recent_rejections == status.recent_rejections  # refusals name their round
    totals = harness.coordinator.report.total
    assert totals.bytes_in == last.bytes_in
    assert totals.bytes_out == last.bytes_out + after.bytes_out


def test_the_missing_list_is_bounded_and_counted() -> None:
    agents = [f"press-{i:03d}" for i in range(120)]
    harness = _harness(agents)
    status = harness.coordinator.status(harness.now)
    assert status.missing == agents[:MAX_MISSING_LISTED]
    assert status.missing_count == 120
    harness.update("press-000", 1, delta(1))
    status = harness.coordinator.status(harness.now)
    assert status.missing == agents[1 : MAX_MISSING_LISTED + 1]
    assert status.missing_count == 119
    payload = encode_control(status)
    assert len(payload) < 8 * 1024  # published often: stays small


def test_a_waiting_or_finished_federation_misses_nobody() -> None:
    harness = Harness.create(config(rounds=1, sync=SyncPolicy(min_agents=2)))
    harness.online("a")
    waiting = harness.coordinator.status(harness.now)
    assert (waiting.state, waiting.missing, waiting.missing_count) == ("waiting", [], 0)
    assert waiting.deadline is None
    assert waiting.opened_at is None
    harness.online("b")
    harness.update("a", 1, delta(1))
    harness.update("b", 1, delta(2))
    finished = harness.coordinator.status(harness.now)
    assert finished.state == "finished"
    assert (finished.missing, finished.missing_count) == ([], 0)
    assert finished.last_round is not None
    assert finished.last_round.round == 1


def test_an_old_status_without_the_new_fields_still_decodes() -> None:
    old = {
        "v": 1,
        "type": "aggregator_status",
        "aggregator": "agg",
        "state": "collecting",
        "round": 4,
        "deadline": T0 + 60,
        "received": 2,
        "expected": 5,
        "rejected": {"outlier": 1},
        "metrics": {"eval_accuracy": 0.9},
        "ts": T0,
    }
    status = decode_control(json.dumps(old).encode(), AggregatorStatus)
    assert status.missing == []
    assert status.missing_count == 0
    assert status.last_round is None
    assert status.recent_rejections == []
    assert (status.bytes_in, status.bytes_out, status.rounds) == (0, 0, None)


def test_the_signed_status_with_every_new_field_verifies() -> None:
    key = SigningKey.generate()
    harness = _harness(["a", "b"])
    harness.update("a", 1, delta(1))
    harness.send(b"junk", "b", 1, "junk")
    status = harness.coordinator.status(harness.now)
    # Both answered: round 1 closed, round 2 waits for both again.
    assert status.round == 2
    assert status.last_round is not None
    assert status.recent_rejections
    assert status.missing == ["a", "b"]
    trusted = TrustedKeys([key.public])
    payload = encode_control(status, key)
    decoded = decode_control(payload, AggregatorStatus, trusted=trusted)
    assert decoded.model_copy(update={"signature": None}) == status
    tampered = json.loads(payload)
    tampered["last_round"]["bytes_in"] += 1
    with pytest.raises(SignatureError):
        decode_control(json.dumps(tampered).encode(), AggregatorStatus, trusted=trusted)
