"""A real agent with pinned aggregator keys, against forged, unsigned and replayed control.

The hostile client is another connection on the same (development, ACL-less) broker:
what it publishes reaches the agent exactly as a forged message would on a plant broker
whose ACLs were misconfigured.  Each refusal is awaited as an event (the agent's
``refused_messages`` counter and its log line), then a signed message shows the agent
still works and its state was untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from agent.helpers import eventually, running_agent
from agent.scripted import ScriptedAggregator

from edge_agent.config import AgentSettings
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.wire.control import Ack, RoundAnnouncement, encode_control
from fedmq.wire.signing import SigningKey, update_statement
from fedmq.wire.training import TrainingConfig
from security.keys import Keys

pytestmark = [pytest.mark.broker]

CLIENT = "dev-1"


def forged(announcement: RoundAnnouncement, **changes: object) -> RoundAnnouncement:
    return announcement.model_copy(update={"signature": None, **changes})


def refused_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing")]


async def test_signed_rounds_train_and_updates_are_signed_by_the_device(
    broker: MosquittoBroker, keys: Keys, make_settings: Callable[..., AgentSettings]
) -> None:
    settings = make_settings(broker.url, CLIENT, security=keys.agent_security(CLIENT))
    device = keys.devices[CLIENT]
    aggregator = ScriptedAggregator(broker.url, settings.federation, signer=keys.aggregator)
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        async with running_agent(settings) as agent:
            await aggregator.announce(1, bundle, params)
            await aggregator.wait_updates(1)
            await eventually(lambda: agent.statistics().updates_acked == 1, what="the ack")
    signatures = [
        (
            update_statement(
                h.federation,
                h.sender,
                h.round,
                h.update_id or "",
                bytes.fromhex(h.blob.sha256),
                h.blob.size,
            ),
            h.signature,
        )
        for h in aggregator.chunk_headers
    ]
    assert signatures
    assert all(sig is not None and device.public.verify(st, sig) for st, sig in signatures)


async def test_unsigned_forged_and_replayed_control_change_nothing(
    broker: MosquittoBroker,
    keys: Keys,
    make_settings: Callable[..., AgentSettings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent")
    settings = make_settings(broker.url, CLIENT, security=keys.agent_security(CLIENT))
    aggregator = ScriptedAggregator(
        broker.url, settings.federation, signer=keys.aggregator, hold_acks=True
    )
    hostile = SigningKey.generate()
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        async with running_agent(settings) as agent:
            round1 = await aggregator.announce(1, bundle, params)
            signed_round1 = encode_control(round1, keys.aggregator)
            await aggregator.wait_updates(1)  # committed and sent; no ack: stays in the outbox
            update_id = next(iter(aggregator.updates))

            def refused(n: int) -> Callable[[], bool]:
                return lambda: agent.statistics().refused_messages >= n

            # 1. unsigned "finished": an agent would drop its outbox
            await aggregator.publish_raw_round(encode_control(forged(round1, status="finished")))
            await eventually(refused(1), what="the unsigned finished announcement refused")
            # 2. unsigned far-future round: would disable the agent until its state is wiped
            await aggregator.publish_raw_round(
                encode_control(forged(round1, round=10**6, issued_at=time.time() + 10**6))
            )
            await eventually(refused(2), what="the unsigned far-future round refused")
            # 3. signed by a key the agent does not pin
            await aggregator.publish_raw_round(
                encode_control(forged(round1, status="finished"), hostile)
            )
            await eventually(refused(3), what="the announcement by another key refused")
            # 4. a forged ack for the update the agent holds: it must not delete it
            ack = Ack(
                federation=settings.federation,
                client=CLIENT,
                round=1,
                update_id=update_id,
                accepted=True,
                reason="accepted",
                ts=time.time(),
            )
            await aggregator.send_ack(ack)
            await eventually(refused(4), what="the unsigned ack refused")
            await aggregator.send_ack(ack, hostile)
            await eventually(refused(5), what="the ack by another key refused")
            stats = agent.statistics()
            assert stats.updates_dropped == 0
            assert stats.updates_acked == 0
            assert agent.status.state != "idle" or stats.updates_committed == 1
            # 5. the real aggregator moves on; then round 1's signed announcement is replayed
            round2 = await aggregator.announce(2, bundle, params)
            await aggregator.wait_updates(2)
            assert round2.issued_at > round1.issued_at
            await aggregator.publish_raw_round(signed_round1)
            await eventually(refused(6), what="the replayed round 1 announcement refused")
            # The signed ack still removes the entry: the outbox survived every forgery.
            await aggregator.send_ack(ack, keys.aggregator)
            await eventually(lambda: agent.statistics().updates_acked == 1, what="the real ack")
            assert agent.statistics().last_answered_round == 2
    reasons = refused_log(caplog)
    assert any("is not signed" in r for r in reasons), reasons
    assert any("not a trusted aggregator key" in r for r in reasons), reasons
    assert any("older than the newest seen" in r for r in reasons), reasons


async def test_a_replay_is_refused_after_a_restart_too(
    broker: MosquittoBroker, keys: Keys, make_settings: Callable[..., AgentSettings]
) -> None:
    settings = make_settings(broker.url, CLIENT, security=keys.agent_security(CLIENT))
    aggregator = ScriptedAggregator(broker.url, settings.federation, signer=keys.aggregator)
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        training = TrainingConfig(epochs=1, batch_size=32, lr=0.05)
        old = await aggregator.announce(1, bundle, params, training=training)
        async with running_agent(settings) as agent:
            await aggregator.announce(2, bundle, params)
            await aggregator.wait_updates(1)
            await eventually(lambda: agent.statistics().updates_acked == 1, what="round 2 acked")
        # While the agent is down, the broker is made to hold round 1 again (retained).
        await aggregator.publish_raw_round(encode_control(old, keys.aggregator))
        async with running_agent(settings) as agent:
            await eventually(
                lambda: agent.statistics().refused_messages >= 1,
                what="the retained replay refused on start",
            )
            assert agent.statistics().rounds_trained == 0
