"""MqttSession against a real Mosquitto: reconnects, resubscribes, stops when cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable

import pytest

from fedmq.backoff import Backoff
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.errors import ConfigError, TransportError
from fedmq.timeouts import within
from fedmq.transport.broker_settings import BrokerAddress, BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession

pytestmark = [pytest.mark.broker]


async def test_resubscribes_and_delivers_after_a_broker_restart(
    make_broker: Callable[..., MosquittoBroker], federation: str
) -> None:
    broker = make_broker()
    received: list[bytes] = []

    async def collect(message: Message) -> None:
        assert isinstance(message.payload, bytes)
        received.append(message.payload)

    # Not persistent: the restarted broker has forgotten every subscription, so only
    # the session's own resubscribe can bring the messages back.
    listener = MqttSession(
        BrokerSettings(broker.url, f"{federation}-l", persistent_session=False),
        subscriptions=[(f"{federation}/x", 1)],
        backoff=Backoff(initial=0.05, maximum=0.2),
    )
    sender = MqttSession(
        BrokerSettings(broker.url, f"{federation}-s"), backoff=Backoff(initial=0.05, maximum=0.2)
    )

    async def ignore(message: Message) -> None:
        return None

    tasks = [asyncio.create_task(listener.run(collect)), asyncio.create_task(sender.run(ignore))]
    try:
        await listener.wait_connected(10)
        await sender.publish(f"{federation}/x", b"before")
        broker.restart()
        # The listener counts a connection only once it has subscribed again.
        for _ in range(400):
            if listener.connections == 2 and listener.is_connected:
                break
            await asyncio.sleep(0.05)
        await sender.publish(f"{federation}/x", b"after", timeout=20)
        for _ in range(200):
            if b"after" in received:
                break
            await asyncio.sleep(0.05)
        assert listener.connections == 2
        assert received == [b"before", b"after"]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_cancel_stops_the_session_even_when_the_broker_hangs(
    make_broker: Callable[..., MosquittoBroker], federation: str
) -> None:
    broker = make_broker()
    session = MqttSession(BrokerSettings(broker.url, f"{federation}-c"))

    async def ignore(message: Message) -> None:
        return None

    task = asyncio.create_task(session.run(ignore))
    await session.wait_connected(10)
    pid = broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # frozen: never answers again
    # Fill the socket buffers so not even the DISCONNECT packet can leave.
    stuck = [
        asyncio.create_task(session.publish(f"{federation}/fill", bytes(1 << 20), qos=0))
        for _ in range(32)
    ]
    await asyncio.sleep(0.5)
    try:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task, 15)
    finally:
        os.kill(pid, signal.SIGCONT)
        for publish in stuck:
            publish.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
    assert not session.is_connected


async def test_subscribing_never_waits_for_an_unresponsive_broker(
    make_broker: Callable[..., MosquittoBroker], federation: str
) -> None:
    # Handlers (un)subscribe, e.g. when a blob completes; waiting there for an ack that
    # never comes would stall the receive loop, which then cannot notice the drop.
    broker = make_broker()
    received: list[str] = []
    payloads: list[bytes] = []

    async def collect(message: Message) -> None:
        received.append(message.topic)
        payloads.append(message.payload)

    session = MqttSession(
        BrokerSettings(broker.url, f"{federation}-u"), subscriptions=[(f"{federation}/a", 1)]
    )
    sender = MqttSession(BrokerSettings(broker.url, f"{federation}-p"))
    tasks = [asyncio.create_task(session.run(collect)), asyncio.create_task(sender.run(collect))]
    try:
        await session.wait_connected(10)
        await sender.wait_connected(10)
        pid = broker.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            await within(session.unsubscribe(f"{federation}/a"), 1.0)
            await within(session.subscribe(f"{federation}/b", 1), 1.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        # Once the broker answers again, both take effect.  It may read the other
        # client's publishes before this client's queued packets, so probe /b until one
        # arrives: the subscribe, and the unsubscribe queued before it, are processed.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while f"{federation}/b" not in received:
            assert loop.time() < deadline, "the queued subscribe never took effect"
            await sender.publish(f"{federation}/b", b"probe")
            await asyncio.sleep(0.1)
        # One sender, one broker: /a would arrive before the marker that follows it.
        await sender.publish(f"{federation}/a", b"1")
        await sender.publish(f"{federation}/b", b"marker")
        while b"marker" not in payloads:
            assert loop.time() < deadline + 10, f"the marker never arrived: {received}"
            await asyncio.sleep(0.05)
        assert f"{federation}/a" not in received
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_publish_without_a_broker_times_out_with_a_transport_error() -> None:
    with contextlib.closing(__import__("socket").socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    session = MqttSession(BrokerSettings(f"mqtt://127.0.0.1:{port}", "lonely"))

    async def ignore(message: Message) -> None:
        return None

    task = asyncio.create_task(session.run(ignore))
    try:
        with pytest.raises(TransportError, match="no connection"):
            await session.publish("a/b", b"x", timeout=0.5)
        assert session.last_error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    "url", ["http://host", "mqtt://", "mqtt://host:notaport", "mqtts//host", "host:1883"]
)
def test_bad_broker_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        BrokerAddress.parse(url)


def test_broker_url_defaults() -> None:
    assert BrokerAddress.parse("mqtt://plant-broker") == BrokerAddress("mqtt", "plant-broker", 1883)
    assert BrokerAddress.parse("mqtts://10.0.0.5").port == 8883


def test_backoff_is_capped_and_jittered() -> None:
    backoff = Backoff(initial=0.1, maximum=2.0)
    delays = [backoff.next_delay() for _ in range(20)]
    assert all(0.05 <= d <= 2.0 for d in delays)
    assert max(delays[10:]) > 1.0  # it grew to the cap
    backoff.reset()
    assert backoff.next_delay() <= 0.1
