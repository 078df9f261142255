"""Both broker paths fedmq can start: Mosquitto (persistent, restartable) and amqtt."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmq.broker.embedded import EmbeddedBroker
from fedmq.broker.mosquitto import MosquittoBroker, MosquittoConfig
from fedmq.errors import TransportError
from fedmq.transport.blob_receiver import BlobReceiver
from fedmq.transport.blobs import publish_blob
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.blobs import blob_ref
from fedmq.wire.topics import BlobChunkTopic, Topics

pytestmark = [pytest.mark.broker]


async def _round_trip(url: str, protocol: str, federation: str, size: int) -> bytes:
    topics = Topics(federation)
    data = os.urandom(size)
    ref = blob_ref(data, 64 * 1024)
    publisher = MqttSession(BrokerSettings(url, f"{federation}-p", protocol=protocol))  # type: ignore[arg-type]
    subscriber = MqttSession(BrokerSettings(url, f"{federation}-s", protocol=protocol))  # type: ignore[arg-type]
    receiver = BlobReceiver(subscriber, topics)

    async def ignore(message: Message) -> None:
        return None

    async def handle(message: Message) -> None:
        parsed = topics.parse(message.topic)
        assert isinstance(parsed, BlobChunkTopic)
        await receiver.feed(message, parsed)

    tasks = [
        asyncio.create_task(publisher.run(ignore)),
        asyncio.create_task(subscriber.run(handle)),
    ]
    try:
        await publisher.wait_connected(10)
        await publish_blob(publisher, topics, data, ref, sender="agg", round_id=0)
        blob = await receiver.fetch(ref, timeout=30)
        assert bytes(blob) == data
        return data
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_embedded_broker_moves_a_blob(tmp_path: Path, federation: str) -> None:
    with EmbeddedBroker(log_dir=tmp_path) as broker:
        await _round_trip(broker.url, broker.protocol, federation, 1024 * 1024)


async def test_retained_blobs_survive_a_persistent_mosquitto_restart(
    make_broker: Callable[..., MosquittoBroker], federation: str
) -> None:
    broker = make_broker(persistence=True)
    data = await _round_trip(broker.url, "5", federation, 300 * 1024)
    port = broker.port
    broker.restart()
    assert broker.port == port
    # A fresh subscriber after the restart still finds every retained chunk.
    topics = Topics(federation)
    ref = blob_ref(data, 64 * 1024)
    subscriber = MqttSession(BrokerSettings(broker.url, f"{federation}-late"))
    receiver = BlobReceiver(subscriber, topics)

    async def handle(message: Message) -> None:
        parsed = topics.parse(message.topic)
        assert isinstance(parsed, BlobChunkTopic)
        await receiver.feed(message, parsed)

    task = asyncio.create_task(subscriber.run(handle))
    try:
        assert bytes(await receiver.fetch(ref, timeout=30)) == data
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_bad_config_reports_the_log(tmp_path: Path) -> None:
    broker = MosquittoBroker(
        MosquittoConfig(extra_lines=["this_is_not_an_option 1"]), state_dir=tmp_path
    )
    with pytest.raises(TransportError, match="did not start"):
        broker.start()
    broker.close()


def test_rendered_config_has_the_queue_limits(tmp_path: Path) -> None:
    text = MosquittoConfig(port=1234, max_queued_messages=77).render(tmp_path)
    assert "listener 1234 127.0.0.1" in text
    assert "max_queued_messages 77" in text
    assert "${" not in text
