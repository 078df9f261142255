"""Every retained message under a topic filter, as a fresh subscriber receives them.

MQTT has no "end of retained messages" marker: a broker sends a subscription's
retained messages right after the SUBACK, then whatever is published later.  So
:func:`retained_snapshot` subscribes (waiting for the SUBACK), publishes a marker
with a random payload on a topic of its own that the same connection is subscribed
to, and stops collecting when the marker comes back: the broker queued every retained
message of the subscription before it routed the later marker to us.  Absence is then
proven by the marker, never by waiting and seeing nothing.

A broker may drop messages beyond its queue limits (Mosquitto's
``max_queued_messages``), so a caller that must be sure (``fedmq clear``) scans again
after acting and repeats until a scan finds nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

from paho.mqtt.client import topic_matches_sub

from fedmq.errors import TransportError
from fedmq.timeouts import wait_event
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession

log = logging.getLogger(__name__)

SCAN_TIMEOUT = 30.0  # seconds: connect, subscribe and receive a federation's retained state


@dataclass
class RetainedSnapshot:
    """The retained messages found, and the live session (to publish on, e.g. clears).

    Attributes:
        messages: topic -> payload of every retained message received before the marker.
        session: the connected session that collected them.
    """

    messages: dict[str, bytes]
    session: MqttSession


@contextlib.asynccontextmanager
async def retained_snapshot(
    settings: BrokerSettings,
    topic_filter: str,
    marker_topic: str,
    *,
    timeout: float = SCAN_TIMEOUT,
) -> AsyncIterator[RetainedSnapshot]:
    """Connect, collect every retained message under ``topic_filter``, yield them.

    Args:
        settings: how to reach the broker (a clean session is used whatever it says:
            no queued messages from an earlier run may be mistaken for retained ones).
        topic_filter: what to collect, e.g. ``fedmq/line-3/#``.
        marker_topic: a topic only this client uses; it need not match the filter.
        timeout: seconds for the connection, the subscription and the marker.

    Raises:
        TransportError: no connection, or the marker did not come back in time (the
            broker may refuse this client's publish on ``marker_topic``: check its ACL).
        ConfigError: the TLS files cannot be loaded.
    """
    settings = dataclasses.replace(settings, persistent_session=False)
    settings.tls_context()  # unreadable TLS files: ConfigError before connecting
    nonce = secrets.token_hex(16).encode()
    messages: dict[str, bytes] = {}
    marker_seen = asyncio.Event()
    subscriptions = [(topic_filter, 1)]
    if not topic_matches_sub(topic_filter, marker_topic):
        subscriptions.append((marker_topic, 1))

    async def handle(message: Message) -> None:
        if marker_seen.is_set():
            return  # published after the scan: live traffic, not retained state
        if message.topic == marker_topic and message.payload == nonce:
            marker_seen.set()
        elif message.retain and message.payload and topic_matches_sub(topic_filter, message.topic):
            messages[message.topic] = message.payload

    # The subscriptions are made (SUBACK awaited) before the session reports connected.
    session = MqttSession(settings, subscriptions=subscriptions)
    task = asyncio.create_task(session.run(handle), name=f"retained-scan[{settings.client_id}]")
    try:
        await _wait_connected(session, task, timeout)
        await session.publish(marker_topic, nonce, qos=1, timeout=timeout)
        if not await wait_event(marker_seen, timeout):
            raise TransportError(
                f"the marker published on {marker_topic} did not come back within "
                f"{timeout:g} s: may this client publish and subscribe there?"
            )
        log.debug("%d retained messages under %s", len(messages), topic_filter)
        yield RetainedSnapshot(messages, session)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _wait_connected(session: MqttSession, task: asyncio.Task[None], timeout: float) -> None:
    connected = asyncio.create_task(session.wait_connected(timeout))
    await asyncio.wait([connected, task], return_when=asyncio.FIRST_COMPLETED)
    if task.done():  # the session loop itself failed (e.g. bad TLS settings)
        connected.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await connected
        task.result()
        raise TransportError(f"the session to {session.settings.url} ended before connecting")
    connected.result()
