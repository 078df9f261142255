"""Lost chunks are asked for by index, not waited out: the aggregator's resend requests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent.helpers import eventually, running_agent
from agent.scripted import ScriptedAggregator
from aggregator.scripted import ScriptedAgent, make_settings, random_delta, running_service

from edge_agent.config import AgentSettings
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.wire.control import AggregatorStatus, ResendRequest, encode_control

pytestmark = [pytest.mark.broker]


async def test_the_aggregator_asks_for_the_missing_chunks_and_accepts_at_once(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    settings = make_settings(broker, federation, tmp_path / "state", resend_after_s=0.3)
    agent = ScriptedAgent(broker, federation, "press-1", chunk_size=1024)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running_service(settings))
        await agent.start()
        stack.push_async_callback(agent.stop)
        await agent.wait_round(1)
        uid, data = agent.envelope(1, random_delta(1))
        messages = agent.upload_messages("press-1", 1, uid, data)
        assert len(messages) > 5
        lost = {1, 4}
        started = time.monotonic()
        for index, (topic, message) in enumerate(messages):
            if index not in lost:  # what a broker past its queue limit does, silently
                await agent.session.publish(topic, message, qos=1)
        # No ack yet: the aggregator asks for exactly the chunks it never got.
        # A pause of over resend_after_s between two of this loop's publishes would bring
        # an early request that names chunks not sent yet; the next names exactly these.
        await agent.wait_until(
            lambda: any(set(r.missing) == lost for r in agent.resend_requests), timeout=10
        )
        request = next(r for r in agent.resend_requests if set(r.missing) == lost)
        assert request.update_id == uid
        assert set(request.missing) == lost
        for index in request.missing:
            topic, message = messages[index]
            await agent.session.publish(topic, message, qos=1)
        ack = await agent.wait_ack(uid)
        elapsed = time.monotonic() - started
    assert ack.accepted
    assert elapsed < 30  # seconds, against an ack timeout of 60
    assert not [a for a in agent.acks if a.update_id == uid and not a.accepted]


async def test_the_agent_resends_only_what_was_asked_for(
    broker: MosquittoBroker, make_settings_agent: Callable[..., AgentSettings]
) -> None:
    settings = make_settings_agent(broker.url)
    aggregator = ScriptedAggregator(broker.url, settings.federation, hold_acks=True)
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        async with running_agent(settings) as agent:
            await aggregator.announce(1, bundle, params, chunk_size=1024)
            await aggregator.wait_updates(1)
            first = list(aggregator.chunk_headers)
            header = first[0]
            assert header.blob.count > 3
            request = ResendRequest(
                federation=settings.federation,
                client=settings.client_id,
                round=1,
                update_id=header.update_id or "",
                sha256=header.blob.sha256,
                chunk_size=header.blob.chunk_size,
                missing=[0, 2],
                ts=time.time(),
            )
            await aggregator.session.publish(
                aggregator.topics.ack(settings.client_id), encode_control(request)
            )
            await eventually(
                lambda: len(aggregator.chunk_headers) >= len(first) + 2, what="the re-sent chunks"
            )
            # Counted once the agent has its PUBACKs, on its own connection.
            await eventually(lambda: agent.statistics().uploads == 2, what="the counted re-send")
    again = aggregator.chunk_headers[len(first) :]
    assert sorted(h.index for h in again) == [0, 2]


async def test_a_paced_agent_sends_chunk_zero_and_the_rest_when_granted(
    broker: MosquittoBroker, make_settings_agent: Callable[..., AgentSettings]
) -> None:
    settings = make_settings_agent(broker.url)
    aggregator = ScriptedAggregator(broker.url, settings.federation, hold_acks=True)
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        async with running_agent(settings) as agent:
            await aggregator.announce(1, bundle, params, chunk_size=1024, upload_slots=2)
            await eventually(lambda: agent.statistics().uploads == 1, what="the first send")
            await eventually(lambda: bool(aggregator.chunk_headers), what="chunk 0")
            header = aggregator.chunk_headers[0]
            assert header.index == 0
            count = header.blob.count
            assert count > 3
            grant = ResendRequest(
                federation=settings.federation,
                client=settings.client_id,
                round=1,
                update_id=header.update_id or "",
                sha256=header.blob.sha256,
                chunk_size=header.blob.chunk_size,
                missing=list(range(1, count)),
                ts=time.time(),
            )
            await aggregator.session.publish(
                aggregator.topics.ack(settings.client_id), encode_control(grant)
            )
            await eventually(lambda: agent.statistics().uploads == 2, what="the granted send")
            await eventually(
                lambda: len(aggregator.chunk_headers) >= count, what="the granted chunks"
            )
    indices = [h.index for h in aggregator.chunk_headers]
    assert sorted(indices) == list(range(count))  # each chunk once: chunk 0, then the rest


async def test_uploads_wait_for_the_aggregator_and_resume_when_it_is_back(
    make_broker: Callable[..., MosquittoBroker],
    make_settings_agent: Callable[..., AgentSettings],
) -> None:
    broker = make_broker()
    settings = make_settings_agent(broker.url)
    assert settings.outbox.ack_timeout_s == 60  # the wait every resumption below beats
    aggregator = ScriptedAggregator(broker.url, settings.federation, hold_acks=True)
    topic = aggregator.topics.aggregator_status()

    async def say(state: str) -> float:
        status = AggregatorStatus(aggregator="aggregator", state=state, ts=time.time())  # type: ignore[arg-type]
        await aggregator.session.publish(topic, encode_control(status), retain=True)
        return time.monotonic()

    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        await say("collecting")
        async with running_agent(settings) as agent:
            await aggregator.announce(1, bundle, params, chunk_size=1024)
            await aggregator.wait_updates(1)
            count = len(aggregator.chunk_headers)
            # The aggregator restarts: its last will says offline, then it is back.
            await say("offline")
            back = await say("collecting")
            await eventually(
                lambda: len(aggregator.chunk_headers) >= 2 * count, what="the re-sent update"
            )
            resumed = time.monotonic() - back
            await eventually(lambda: agent.statistics().uploads == 2, what="the counted re-send")
    assert resumed < 30  # seconds, not the 60 s ack timeout
