"""The coordinator's defenses, in memory: device signatures, reassembly slots, a bounded roster."""

from __future__ import annotations

import pytest
from coordinator.support import Harness, chunks, config, delta, envelope

from fedmq.coordinator.policy import SecurityPolicy, SyncPolicy
from fedmq.errors import ConfigError
from fedmq.wire.control import Ack, AggregatorStatus, RoundAnnouncement, decode_control
from fedmq.wire.ids import MAX_ID_LENGTH
from fedmq.wire.limits import DEFAULT_LIMITS
from fedmq.wire.signing import SigningKey, TrustedKeys, UnsignedMessageError
from fedmq.wire.topics import AckTopic, RoundTopic

AGGREGATOR = SigningKey.generate()
DEVICES = {name: SigningKey.generate() for name in ("a", "b")}


def secure_harness(**overrides: object) -> Harness:
    policy = SecurityPolicy(AGGREGATOR, {n: k.public for n, k in DEVICES.items()})
    harness = Harness.create(config(security=policy, sync=SyncPolicy(min_agents=2), **overrides))
    harness.online("a", "b")
    return harness


def send(harness: Harness, client: str, *, signer: SigningKey | None, examples: int = 10) -> str:
    uid, data = envelope(client, 1, delta(len(client)), examples=examples)
    harness.send(data, client, 1, uid, signer=signer)
    return uid


def test_every_control_message_is_signed_by_the_aggregator() -> None:
    harness = secure_harness()
    send(harness, "a", signer=DEVICES["a"])
    trusted = TrustedKeys([AGGREGATOR.public])
    topics = harness.coordinator.topics
    assert harness.published
    for message in harness.published:
        parsed = topics.parse(message.topic)
        kind: type[RoundAnnouncement | Ack | AggregatorStatus] = AggregatorStatus
        if isinstance(parsed, RoundTopic):
            kind = RoundAnnouncement
        elif isinstance(parsed, AckTopic):
            kind = Ack
        decode_control(message.payload, kind, trusted=trusted)  # raises if unsigned
        with pytest.raises(UnsignedMessageError):
            decode_control(
                message.payload.replace(b'"signature":"', b'"x":"'), kind, trusted=trusted
            )


def test_updates_count_only_with_the_registered_device_signature() -> None:
    harness = secure_harness()
    send(harness, "a", signer=None, examples=10**9)  # unsigned impersonation
    send(harness, "a", signer=DEVICES["b"], examples=10**9)  # signed by another device
    send(harness, "a", signer=SigningKey.generate(), examples=10**9)  # an unregistered key
    send(harness, "mallory", signer=SigningKey.generate())  # not registered at all
    reasons = [r.reason for r in harness.rejected]
    assert reasons.count("bad_signature") >= 3
    assert "unknown_client" in reasons
    assert harness.coordinator.intake.pending == 0  # nothing took a reassembly slot
    assert not harness.acks()  # unauthenticated senders get no ack at all
    # The real device's update still counts: nothing was recorded as a duplicate.
    send(harness, "a", signer=DEVICES["a"])
    send(harness, "b", signer=DEVICES["b"])
    assert [a.reason for a in harness.acks()] == ["accepted", "accepted"]
    assert harness.records[-1].contributions[0].examples == 10


def test_a_revoked_device_is_no_longer_waited_for_or_accepted() -> None:
    harness = secure_harness()
    send(harness, "a", signer=DEVICES["a"])
    harness.run(
        harness.coordinator.set_devices({"a": DEVICES["a"].public}, harness.now)
    )  # b revoked: the round no longer waits for it and closes with a's update
    assert harness.closed
    assert harness.closed[-1].round == 1
    send_b = envelope("b", 2, delta(2))
    harness.send(send_b[1], "b", 2, send_b[0], signer=DEVICES["b"])
    assert harness.rejected[-1].reason == "unknown_client"


def test_refused_updates_never_crowd_out_admitted_ones() -> None:
    harness = Harness.create(config(max_pending_updates=4, agents=frozenset({"a", "b"})))
    harness.online("a", "b")
    for i in range(500):  # first chunks of updates under ids that are not agents
        uid, data = envelope(f"ghost-{i}", 1, delta(i))
        topic, message = chunks(data, f"ghost-{i}", 1, uid)[0]
        harness.run(harness.coordinator.receive_chunk(topic, message, harness.now))
    assert harness.coordinator.intake.buffered_bytes() == 0
    for client in ("a", "b"):
        uid, data = envelope(client, 1, delta(3))
        harness.send(data, client, 1, uid)
    assert [a.reason for a in harness.acks("a")] == ["accepted"]
    assert harness.closed[-1].round == 1


def test_the_roster_is_bounded_and_the_announcement_fits_agents_limits() -> None:
    harness = Harness.create(config(max_agents=50))
    for i in range(5000):
        harness.status(f"{i:0{MAX_ID_LENGTH}d}")
    assert len(harness.coordinator.roster) == 50
    assert harness.coordinator.roster.ignored == 4950
    notes = [a for a in harness.log if type(a).__name__ == "Noted" and "ignoring status" in str(a)]
    assert len(notes) <= 13  # 1, 2, 4, ... 4096: a flood stays quiet
    sizes = [len(p.payload) for p in harness.published if p.topic.endswith("/round")]
    assert max(sizes) < DEFAULT_LIMITS.max_control_bytes


def test_max_agents_that_would_outgrow_an_announcement_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_agents"):
        config(max_agents=100_000)
