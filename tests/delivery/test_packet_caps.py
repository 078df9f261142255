"""Packet caps learned, not guessed: the MQTT 5 CONNACK, the [broker] table, chunk_size auto."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aggregator.scripted import (
    bundle_dir,
    make_settings,
    running_service,
    serve_process,
    wait_exit,
    write_toml,
)

from fedmq.aggregator.config import load_settings
from fedmq.aggregator.service import AggregatorService
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.errors import ConfigError
from fedmq.exit_codes import CONFIG_ERROR
from fedmq.testing.scripted_clients import ScriptedConnection
from fedmq.timeouts import within
from fedmq.transport.blobs import max_chunk_size
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import (
    BrokerRefusedError,
    MqttSession,
    PacketTooLargeError,
    publish_packet_size,
)
from fedmq.wire.blobs import BlobRef
from fedmq.wire.chunks import ChunkHeader, encode_chunk
from fedmq.wire.ids import MAX_ID_LENGTH
from fedmq.wire.topics import MAX_ROUND, Topics

pytestmark = [pytest.mark.broker]

CAP = 131072  # AWS IoT Core's 128 KB


@contextlib.asynccontextmanager
async def session(url: str, **settings: object) -> AsyncIterator[MqttSession]:
    mqtt = MqttSession(BrokerSettings(url, f"caps-{uuid.uuid4().hex[:8]}", **settings))  # type: ignore[arg-type]

    async def ignore(_message: Message) -> None:
        return None

    task = asyncio.create_task(mqtt.run(ignore))
    try:
        await mqtt.wait_connected(10)
        yield mqtt
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_the_largest_chunk_message_fits_the_cap_exactly() -> None:
    for root in ("fedmq", "plant-7/line-3/fedmq"):
        topics = Topics("f" * MAX_ID_LENGTH, root)
        size = max_chunk_size(CAP, topics)
        ref = BlobRef("a" * 64, size * 65_535, size)
        client = "c" * MAX_ID_LENGTH
        header = ChunkHeader(
            "update", topics.federation, client, MAX_ROUND - 1, ref, 65_534, "u" * 64, bytes(64)
        )
        message = encode_chunk(header, bytes(size))
        topic = topics.update(client, MAX_ROUND - 1, 65_534)
        assert publish_packet_size(topic, len(message)) <= CAP
        assert size >= CAP - 2048  # and little is wasted


async def test_mqtt5_states_the_cap_and_nothing_larger_is_sent(
    make_broker: Callable[..., MosquittoBroker],
) -> None:
    broker = make_broker(max_packet_size=CAP)
    async with session(broker.url) as mqtt:
        assert mqtt.max_packet_size == CAP
        with pytest.raises(
            PacketTooLargeError,
            match=r"fedmq/x/blob.*over the broker's maximum packet size of 131072",
        ):
            await mqtt.publish("fedmq/x/blob", bytes(CAP))
        await mqtt.publish("fedmq/x/blob", bytes(CAP - 100))  # the connection is still fine
        assert mqtt.connections == 1


async def test_a_311_broker_refusing_a_packet_is_named_not_a_timeout(
    make_broker: Callable[..., MosquittoBroker],
) -> None:
    broker = make_broker(max_packet_size=CAP)
    async with session(broker.url, protocol="3.1.1") as mqtt:
        assert mqtt.max_packet_size is None  # 3.1.1 has no CONNACK properties
        with pytest.raises(BrokerRefusedError, match="max_packet_size"):
            await mqtt.publish("fedmq/x/blob", bytes(CAP + 1000), timeout=60)


async def test_a_configured_cap_guards_a_311_broker(
    make_broker: Callable[..., MosquittoBroker],
) -> None:
    broker = make_broker(max_packet_size=CAP)
    async with session(broker.url, protocol="3.1.1", max_packet_size=CAP) as mqtt:
        with pytest.raises(PacketTooLargeError):
            await mqtt.publish("fedmq/x/blob", bytes(CAP + 1000))


async def test_auto_chunk_size_fits_the_brokers_cap(
    make_broker: Callable[..., MosquittoBroker], federation: str, tmp_path: Path
) -> None:
    broker = make_broker(max_packet_size=CAP)
    settings = make_settings(broker, federation, tmp_path / "state")
    assert settings.chunk_size == "auto"
    watcher = ScriptedConnection(
        broker.url, federation, subscriptions=[(Topics(federation).round(), 1)]
    )
    async with running_service(settings) as service:
        await watcher.connect()
        try:
            announcement = await watcher.wait_round(1, status="waiting")
        finally:
            await watcher.disconnect()
        assert isinstance(service, AggregatorService)
    fit = max_chunk_size(CAP, Topics(federation))
    assert announcement.chunk_size == fit
    assert announcement.bundle.chunk_size == announcement.params.chunk_size == fit


async def test_an_explicit_chunk_size_that_cannot_fit_stops_the_service(
    make_broker: Callable[..., MosquittoBroker], federation: str, tmp_path: Path
) -> None:
    broker = make_broker(max_packet_size=CAP)
    settings = make_settings(broker, federation, tmp_path / "state", chunk_size=262144)
    service = AggregatorService(settings)
    with pytest.raises(ConfigError, match=r"chunk_size = 262144 .* 131072 bytes"):
        await within(service.run(), 30)


def test_fedmq_serve_exits_78_naming_the_setting_and_the_cap(
    make_broker: Callable[..., MosquittoBroker], federation: str, tmp_path: Path
) -> None:
    broker = make_broker(max_packet_size=CAP)
    config = write_toml(tmp_path / "federation.toml", broker, federation, tmp_path / "state")
    config.write_text(config.read_text().replace("rounds = 1", "rounds = 1\nchunk_size = 262144"))
    log = tmp_path / "serve.log"
    process = serve_process(config, log)
    assert wait_exit(process) == CONFIG_ERROR
    text = log.read_text()
    assert "chunk_size = 262144 does not fit the broker's maximum packet size of 131072" in text


def test_a_configured_cap_is_checked_when_the_config_loads(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"chunk_size = 262144 .*\[broker\] max_packet_size"):
        load_settings(
            None,
            federation=federation,
            bundle=str(bundle_dir()),
            state_dir=str(tmp_path / "state"),
            rounds=1,
            chunk_size=262144,
            broker={"url": broker.url, "max_packet_size": CAP},
        )
