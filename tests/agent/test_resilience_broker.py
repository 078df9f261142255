"""An in-process agent against real Mosquitto: outages, corruption, bad and stale input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.helpers import eventually, running_agent
from agent.scripted import AGGREGATOR_ID, ScriptedAggregator
from edge_agent.config import AgentSettings
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.transport.blobs import publish_blob
from fedmq.wire.blobs import BlobRef, blob_ref, split_blob
from fedmq.wire.chunks import ChunkHeader, encode_chunk
from fedmq.wire.control import Ack
from fedmq.wire.framing import encode_frame
from fedmq.wire.tensors import decode_tensors, encode_tensors
from fedmq.wire.topics import UpdateChunkTopic

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_broker_restart_mid_upload_delivers_the_update_exactly_once(
    make_broker: Callable[..., MosquittoBroker],
    federation: str,
    make_settings: Callable[..., AgentSettings],
) -> None:
    broker = make_broker(persistence=True)
    aggregator = ScriptedAggregator(broker.url, federation)
    restarted: list[int] = []

    def restart_on_first_chunk(topic: UpdateChunkTopic) -> None:
        if not restarted:
            restarted.append(topic.index)
            # Synchronous on purpose: the agent shares this event loop, so it is frozen
            # with the rest of its chunks unsent while the broker goes down and comes back.
            broker.restart()

    aggregator.on_chunk = restart_on_first_chunk
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        async with running_agent(make_settings(broker.url)) as agent:
            await aggregator.announce(1, bundle, params, chunk_size=1024)
            await aggregator.wait_updates(1, timeout=60)
            await eventually(lambda: agent.statistics().updates_acked == 1, what="the ack")
            stats = agent.statistics()
        assert restarted
        assert stats.connections >= 2
        assert stats.rounds_trained == 1
        assert len(aggregator.chunk_uids) == 1
        assert len(aggregator.updates) == 1
        assert not any(Path(agent.settings.state_dir, "outbox").iterdir())


def bad_crc(message: bytes) -> bytes:
    # Flip the last payload byte: the header's crc32 no longer matches.
    return message[:-1] + bytes([message[-1] ^ 0xFF])


def wrong_content(ref: BlobRef, index: int, length: int) -> bytes:
    # A well-formed chunk (valid crc32) whose bytes are not the blob's: only the
    # sha256 of the reassembled blob can catch it.
    header = ChunkHeader("blob", "x", AGGREGATOR_ID, 0, ref, index)
    return encode_chunk(header, bytes(length))


async def publish_chunk(
    aggregator: ScriptedAggregator, ref: BlobRef, index: int, data: bytes
) -> None:
    await aggregator.session.publish(aggregator.topics.blob(ref.sha256, index), data, retain=True)


def good_chunk(aggregator: ScriptedAggregator, ref: BlobRef, blob: bytes, index: int) -> bytes:
    part = list(split_blob(blob, ref))[index]
    header = ChunkHeader("blob", aggregator.federation, AGGREGATOR_ID, 0, ref, index)
    return encode_chunk(header, part)


async def test_corrupted_chunks_and_cache_are_rejected_and_refetched(
    broker: MosquittoBroker, federation: str, make_settings: Callable[..., AgentSettings]
) -> None:
    aggregator = ScriptedAggregator(broker.url, federation)
    async with aggregator.running():
        bundle, params, model = await aggregator.publish_model(chunk_size=2048)
        params_blob = encode_tensors(model.initial_parameters()).data
        async with running_agent(make_settings(broker.url)) as agent:
            # 1. A chunk failing its crc32 is dropped on arrival; the good copy completes it.
            good = good_chunk(aggregator, params, params_blob, 1)
            await publish_chunk(aggregator, params, 1, bad_crc(good))
            await aggregator.announce(1, bundle, params)
            await eventually(lambda: agent.statistics().rejected_chunks >= 1, what="crc reject")
            await publish_chunk(aggregator, params, 1, good)
            await aggregator.wait_updates(1)

            # 2. A chunk with a valid crc but wrong bytes fails the blob's sha256: the
            # agent refetches until the aggregator republishes it correctly.
            tensors = {k: v + 1 for k, v in decode_tensors(params_blob).items()}
            second_blob = encode_tensors(tensors).data
            second = blob_ref(second_blob, 2048)
            await publish_blob(
                aggregator.session,
                aggregator.topics,
                second_blob,
                second,
                sender=AGGREGATOR_ID,
                round_id=2,
            )
            await publish_chunk(
                aggregator, second, 2, wrong_content(second, 2, second.chunk_length(2))
            )
            await aggregator.announce(2, bundle, second)
            await eventually(lambda: agent.statistics().refetches >= 1, what="a refetch")
            await publish_chunk(
                aggregator, second, 2, good_chunk(aggregator, second, second_blob, 2)
            )
            await aggregator.wait_updates(2)

            # 3. A cached blob damaged on disk is detected, deleted and downloaded again.
            cached = Path(agent.settings.state_dir, "cache", "blobs", second.sha256)
            cached.write_bytes(bytes(cached.stat().st_size))
            await aggregator.announce(3, bundle, second)
            await aggregator.wait_updates(3)
            stats = agent.statistics()
        assert stats.corrupt_cache_reads == 1
        assert sorted(u.meta.round for u in aggregator.updates.values()) == [1, 2, 3]


async def test_bad_wrong_and_stale_input_is_ignored(
    broker: MosquittoBroker, federation: str, make_settings: Callable[..., AgentSettings]
) -> None:
    aggregator = ScriptedAggregator(broker.url, federation)
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        async with running_agent(make_settings(broker.url)) as agent:
            await aggregator.announce(2, bundle, params)
            await aggregator.wait_updates(1)
            await eventually(lambda: agent.statistics().updates_acked == 1, what="ack")

            await aggregator.publish_raw_round(b"{not json")
            await aggregator.publish_raw_round(encode_frame("round", {}))  # binary garbage
            await aggregator.announce(5, bundle, params, federation="someone-else")
            await aggregator.announce(1, bundle, params)  # stale
            await aggregator.announce(6, bundle, params, selected=["another-device"])
            topic = aggregator.topics.ack(agent.client)
            await aggregator.session.publish(topic, b"\x00garbage")
            await aggregator.send_ack(
                Ack(
                    federation=federation,
                    client=agent.client,
                    round=2,
                    update_id="not-ours",
                    accepted=True,
                    reason="accepted",
                    ts=1.0,
                )
            )
            bogus_chunk = aggregator.topics.blob("ee" * 32, 0)
            await aggregator.session.publish(bogus_chunk, b"junk", retain=False)

            # The agent is still fine; it reads round messages in order, so by the time
            # it trains round 7 it has seen (and ignored) everything above.
            await aggregator.announce(7, bundle, params)
            await aggregator.wait_updates(2)
            await aggregator.announce(8, bundle, params, status="finished")
            await eventually(lambda: agent.statistics().state == "idle", what="idle")
            stats = agent.statistics()
        assert stats.rounds_trained == 2
        assert stats.last_answered_round == 7
        assert sorted(u.meta.round for u in aggregator.updates.values()) == [2, 7]
        assert "malformed round announcement" in (stats.last_error or "")


async def test_round_closed_rejection_drops_the_update(
    broker: MosquittoBroker, federation: str, make_settings: Callable[..., AgentSettings]
) -> None:
    aggregator = ScriptedAggregator(broker.url, federation, closed_rounds={4})
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        settings = make_settings(broker.url, outbox={"ack_timeout_s": 1.0})
        async with running_agent(settings) as agent:
            await aggregator.announce(4, bundle, params)
            await eventually(lambda: agent.statistics().updates_dropped == 1, what="the drop")
            # Re-sends come from the outbox: with the update gone from it, none can follow.
            assert not any(Path(settings.state_dir, "outbox").iterdir())
            assert agent.statistics().last_answered_round == 4  # and not retrained
        # A re-send that crossed the ack (a stalled machine) is refused the same way.
        assert {a.reason for a in aggregator.acks} == {"round_closed"}


async def test_unacknowledged_update_is_resent_with_the_same_id(
    broker: MosquittoBroker, federation: str, make_settings: Callable[..., AgentSettings]
) -> None:
    # An aggregator that lost the update (e.g. crashed before persisting it) never acks:
    # the agent sends it again after the ack timeout, under the same update id.
    aggregator = ScriptedAggregator(broker.url, federation, hold_acks=True)
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model()
        settings = make_settings(broker.url, outbox={"ack_timeout_s": 0.3})
        async with running_agent(settings) as agent:
            await aggregator.announce(1, bundle, params)
            await aggregator.wait_updates(1)
            await eventually(lambda: agent.statistics().uploads >= 2, what="a re-send")
            aggregator.hold_acks = False
            await eventually(lambda: agent.statistics().updates_acked == 1, what="the ack")
        (received,) = aggregator.updates.values()
        assert received.deliveries >= 2
        assert len(aggregator.chunk_uids) == 1
