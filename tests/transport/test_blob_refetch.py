"""BlobReceiver gives up on a blob whose retained chunks stay corrupt, and takes any store."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.errors import IntegrityError
from fedmq.transport.blob_receiver import BlobReceiver
from fedmq.transport.blobs import publish_blob
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.blobs import BlobAssembler, BlobRef, blob_ref
from fedmq.wire.chunks import ChunkHeader, encode_chunk
from fedmq.wire.limits import DecodeLimits, KiB
from fedmq.wire.topics import BlobChunkTopic, Topics

pytestmark = [pytest.mark.broker]


async def test_persistently_corrupt_blob_fails_after_the_refetch_limit(
    broker: MosquittoBroker, federation: str
) -> None:
    topics = Topics(federation)
    data = os.urandom(8 * KiB)
    ref = blob_ref(data, 2 * KiB)
    session = MqttSession(BrokerSettings(broker.url, f"{federation}-rx"))
    stores: list[BlobRef] = []

    def factory(blob: BlobRef, limits: DecodeLimits) -> BlobAssembler:
        stores.append(blob)
        return BlobAssembler(blob, limits)

    receiver = BlobReceiver(session, topics, store_factory=factory, max_refetches=2)

    async def handle(message: Message) -> None:
        parsed = topics.parse(message.topic)
        assert isinstance(parsed, BlobChunkTopic)
        await receiver.feed(message, parsed)

    task = asyncio.create_task(session.run(handle))
    try:
        await session.wait_connected(10)
        await publish_blob(session, topics, data, ref, sender="agg", round_id=0)
        # Replace chunk 1 with well-formed (valid crc) but wrong bytes, retained.
        bad = encode_chunk(ChunkHeader("blob", federation, "agg", 0, ref, 1), bytes(2 * KiB))
        await session.publish(topics.blob(ref.sha256, 1), bad, retain=True)
        with pytest.raises(IntegrityError, match="after 2 refetches"):
            await receiver.fetch(ref, timeout=30)
        assert receiver.refetches == 2
        assert stores == [ref]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
