"""MqttSession.abort (a crash: the broker fires the last will) and cancelled publishes."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.timeouts import within
from fedmq.transport.broker_settings import BrokerSettings, LastWill
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession

pytestmark = [pytest.mark.broker]


async def _ignore(message: Message) -> None:
    return None


async def test_abort_makes_the_broker_publish_the_last_will(
    broker: MosquittoBroker, federation: str
) -> None:
    topic = f"{federation}/status"
    seen: list[bytes] = []

    async def collect(message: Message) -> None:
        assert isinstance(message.payload, bytes)
        seen.append(message.payload)

    watcher = MqttSession(BrokerSettings(broker.url, f"{federation}-w"), subscriptions=[(topic, 1)])
    device = MqttSession(
        BrokerSettings(broker.url, f"{federation}-d"), will=LastWill(topic, b"offline")
    )
    tasks = [asyncio.create_task(watcher.run(collect)), asyncio.create_task(device.run(_ignore))]
    try:
        await watcher.wait_connected(10)
        await device.wait_connected(10)
        await device.publish(topic, b"online", retain=True)
        device.abort()
        tasks[1].cancel()
        async with asyncio.timeout(10):
            while b"offline" not in seen:
                await asyncio.sleep(0.02)
        assert seen == [b"online", b"offline"]  # no clean DISCONNECT: the will fired
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_cancellation_swallowed_under_publish_is_raised_again(
    broker: MosquittoBroker, federation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = MqttSession(BrokerSettings(broker.url, f"{federation}-p"))
    runner = asyncio.create_task(session.run(_ignore))
    try:
        await session.wait_connected(10)
        client = session._client
        assert client is not None

        async def swallowing_publish(*args: object, **kwargs: object) -> None:
            # What aiomqtt's asyncio.wait_for does on Python 3.11 when the confirmation
            # and the cancellation land in the same loop iteration.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)

        monkeypatch.setattr(client, "publish", swallowing_publish)
        publisher = asyncio.create_task(session.publish(f"{federation}/t", b"x"))
        await asyncio.sleep(0.05)
        publisher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(publisher, 5)
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
