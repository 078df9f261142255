"""A passive MQTT client that watches a federation's traffic for the report.

It subscribes to the update chunks, the acks, the round announcements and the agents'
statuses, as any monitoring tool could, and counts:

- bytes **up** per round: every update chunk payload agents published (re-sends included);
- the acks per round (accepted or not, and when the aggregator decided);
- the announcements (which agents were selected, the size of the blobs they fetch);
- which agents are online (their latest status is not ``offline``).

With ``keep_dir`` it also reassembles every update it sees and stores the envelope as
``<keep_dir>/<round>/<client>@<update id>.update``: the aggregator deletes its copies
once a round is checkpointed, and a test recomputes the global model from these.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.errors import DecodeError, IntegrityError, InvalidTopicError
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.blobs import BlobAssembler
from fedmq.wire.chunks import decode_chunk
from fedmq.wire.control import Ack, AgentStatus, RoundAnnouncement, decode_control
from fedmq.wire.topics import AckTopic, RoundTopic, StatusTopic, Topics, UpdateChunkTopic

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0  # seconds for the observer's first connection


@dataclass
class RoundTraffic:
    """What the observer saw of one round."""

    bytes_up: int = 0
    chunks_up: int = 0
    uploaders: set[str] = field(default_factory=set)
    ack_bytes: int = 0
    accepted: dict[str, float] = field(default_factory=dict)  # update id -> ack time
    rejected: dict[str, str] = field(default_factory=dict)  # update id -> reason


class Observer:
    """Watches one federation on one broker.

    Args:
        broker: connection settings (credentials, TLS files) with a client id unique
            on the broker.
        topics: the federation's topics.
        on_announcement: called for every round announcement, in the event loop.
        on_ack: called for every ack, in the event loop.
        keep_dir: where to store reassembled update envelopes (None: do not keep).
    """

    def __init__(
        self,
        broker: BrokerSettings,
        topics: Topics,
        *,
        on_announcement: Callable[[RoundAnnouncement], None] | None = None,
        on_ack: Callable[[Ack], None] | None = None,
        keep_dir: Path | None = None,
    ) -> None:
        self.topics = topics
        self.rounds: defaultdict[int, RoundTraffic] = defaultdict(RoundTraffic)
        self.announcements: dict[int, RoundAnnouncement] = {}
        self.announcement_bytes: dict[int, int] = {}
        self.online: set[str] = set()
        self.keep_dir = keep_dir
        self._on_announcement = on_announcement
        self._on_ack_hook = on_ack
        self._assembling: dict[tuple[str, str], BlobAssembler] = {}
        self._kept: set[tuple[str, str]] = set()
        # Queued chunks survive a reconnect (chaos tests restart the broker).
        settings = dataclasses.replace(broker, persistent_session=True)
        ack_filter = f"{topics.prefix}/ack/+"
        self._session = MqttSession(
            settings,
            subscriptions=[
                (topics.update_filter(), 1),
                (ack_filter, 1),
                (topics.round(), 1),
                (topics.status_filter(), 1),
            ],
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect and subscribe (returns once connected).

        Raises:
            TransportError: no connection within ``CONNECT_TIMEOUT``.
        """
        self._task = asyncio.create_task(self._session.run(self._handle), name="fedmq-sim.observer")
        await self._session.wait_connected(CONNECT_TIMEOUT)

    async def stop_watching_statuses(self) -> None:
        """Unsubscribe from the agents' statuses (once the aggregator tracks them).

        Every agent publishes a status on each change of state: in a 1000-agent round
        that is thousands of messages the observer need not decode twice.
        """
        await self._session.unsubscribe(self.topics.status_filter())

    async def stop(self) -> None:
        """Disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def first_uploads(self, round_id: int) -> int:
        """Agents whose first observed upload was in ``round_id``."""
        earlier: set[str] = set()
        for number in sorted(self.rounds):
            if number >= round_id:
                break
            earlier |= self.rounds[number].uploaders
        return len(self.rounds[round_id].uploaders - earlier)

    async def _handle(self, message: Message) -> None:
        payload = message.payload
        try:
            parsed = self.topics.parse(message.topic)
        except InvalidTopicError:
            return
        if isinstance(parsed, UpdateChunkTopic):
            traffic = self.rounds[parsed.round]
            traffic.bytes_up += len(payload)
            traffic.chunks_up += 1
            traffic.uploaders.add(parsed.client)
            if self.keep_dir is not None:
                self._keep(parsed, payload)
        elif isinstance(parsed, AckTopic):
            self._on_ack(payload)
        elif isinstance(parsed, StatusTopic):
            self._on_status(parsed.client, payload)
        elif isinstance(parsed, RoundTopic) and payload:
            try:
                announcement = decode_control(payload, RoundAnnouncement)
            except DecodeError as exc:
                log.warning("observer: malformed announcement: %s", exc)
                return
            if announcement.status != "waiting":  # a waiting round is announced again
                self.announcements[announcement.round] = announcement
                self.announcement_bytes[announcement.round] = len(payload)
            if self._on_announcement is not None:
                self._on_announcement(announcement)

    def _on_status(self, client: str, payload: bytes) -> None:
        if not payload:
            self.online.discard(client)  # the retained status was deleted
            return
        try:
            status = decode_control(payload, AgentStatus)
        except DecodeError as exc:
            log.warning("observer: malformed status of %s: %s", client, exc)
            return
        if status.state == "offline":
            self.online.discard(client)
        else:
            self.online.add(client)

    def _on_ack(self, payload: bytes) -> None:
        try:
            ack = decode_control(payload, Ack)
        except DecodeError as exc:
            log.warning("observer: malformed ack: %s", exc)
            return
        traffic = self.rounds[ack.round]
        traffic.ack_bytes += len(payload)
        if ack.accepted:
            traffic.accepted.setdefault(ack.update_id, ack.ts)
        else:
            traffic.rejected[ack.update_id] = ack.reason
        if self._on_ack_hook is not None:
            self._on_ack_hook(ack)

    def _keep(self, topic: UpdateChunkTopic, payload: bytes) -> None:
        try:
            chunk = decode_chunk(payload)
        except (DecodeError, IntegrityError) as exc:
            log.warning("observer: bad update chunk from %s: %s", topic.client, exc)
            return
        update_id = chunk.header.update_id
        assert update_id is not None  # update chunks always carry one
        key = (topic.client, update_id)
        if key in self._kept:
            return  # a re-send of an update already stored
        try:
            assembler = self._assembling.get(key)
            if assembler is None:
                assembler = self._assembling[key] = BlobAssembler(chunk.header.blob)
            assembler.add(chunk.header.index, chunk.payload)
            if not assembler.complete:
                return
            del self._assembling[key]
            data = assembler.finish()
        except (DecodeError, IntegrityError) as exc:
            log.warning("observer: update %s of %s is unusable: %s", update_id, key[0], exc)
            self._assembling.pop(key, None)
            return
        assert self.keep_dir is not None
        directory = self.keep_dir / f"{topic.round:06d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{topic.client}@{update_id}.update").write_bytes(data)
        self._kept.add(key)
