"""The aggregator's outgoing messages: queued by the coordinator's actions, sent in order.

Network actions are queued rather than awaited while the coordinator's lock is held, so
a broker outage never blocks the state machine; one task sends them in order, because
an announcement must follow the blobs it names.  A failed publish is logged and
dropped: retained state is published again after the reconnect, and an agent whose
ack was lost re-sends and is acked as a duplicate.
"""

from __future__ import annotations

import asyncio
import logging

from fedmq.coordinator.actions import ClearBlob, Publish, PublishBlob
from fedmq.errors import TransportError
from fedmq.transport.blobs import clear_blob, publish_blob
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.topics import Topics

log = logging.getLogger(__name__)

Outgoing = Publish | PublishBlob | ClearBlob


class Outbound:
    """A FIFO of outgoing messages and the loop that sends them.

    Args:
        session: the service's MQTT session.
        topics: the federation's topics.
        sender: our client id, written into blob chunk headers.
    """

    def __init__(self, session: MqttSession, topics: Topics, sender: str) -> None:
        self._session = session
        self._topics = topics
        self._sender = sender
        self._queue: asyncio.Queue[Outgoing] = asyncio.Queue()

    def put(self, action: Outgoing) -> None:
        """Queue ``action`` behind everything queued before it."""
        self._queue.put_nowait(action)

    async def wait_sent(self) -> None:
        """Wait until everything queued so far was sent (or failed)."""
        await self._queue.join()

    async def run(self) -> None:
        """Send queued messages one after the other, forever."""
        while True:
            action = await self._queue.get()
            try:
                await self._send(action)
            except TransportError as exc:
                log.warning("publish failed: %s", exc)
            finally:
                self._queue.task_done()

    async def _send(self, action: Outgoing) -> None:
        session, topics = self._session, self._topics
        match action:
            case Publish():
                await session.publish(
                    action.topic, action.payload, qos=action.qos, retain=action.retain
                )
            case PublishBlob():
                await publish_blob(
                    session,
                    topics,
                    action.data,
                    action.ref,
                    sender=self._sender,
                    round_id=action.round,
                    indices=action.indices,
                )
            case ClearBlob():
                await clear_blob(session, topics, action.ref, action.first)
