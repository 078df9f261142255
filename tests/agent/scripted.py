"""A scripted aggregator built from fedmq.wire + fedmq.transport, for agent tests.

It publishes real bundles and parameter sets as retained blob chunks, announces rounds,
reassembles update chunks per (client, update id), decodes them and acks them the way
docs/protocol.md says: ``accepted`` once per update id, ``duplicate`` afterwards,
``round_closed`` for rounds it has moved past.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.bundle.bundle import Bundle
from fedmq.timeouts import within
from fedmq.transport.blobs import publish_blob
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.archive import pack_files
from fedmq.wire.blobs import BlobAssembler, BlobRef, blob_ref
from fedmq.wire.chunks import ChunkHeader, decode_chunk
from fedmq.wire.control import (
    Ack,
    AgentStatus,
    RoundAnnouncement,
    decode_control,
    encode_control,
)
from fedmq.wire.signing import SigningKey
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.topics import StatusTopic, Topics, UpdateChunkTopic
from fedmq.wire.training import TrainingConfig
from fedmq.wire.update import UpdateMeta, decode_update

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "examples" / "bundles"
AGGREGATOR_ID = "aggregator"

Array = npt.NDArray[Any]


@dataclass
class Received:
    """One reassembled update."""

    meta: UpdateMeta
    delta: dict[str, Array]
    deliveries: int = 1


@dataclass
class ScriptedAggregator:
    """Drives agents through rounds over a real broker."""

    url: str
    federation: str
    hold_acks: bool = False
    closed_rounds: set[int] = field(default_factory=set)
    updates: dict[str, Received] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)
    statuses: list[AgentStatus] = field(default_factory=list)
    chunks_seen: int = 0
    chunk_uids: set[str] = field(default_factory=set)
    on_chunk: Callable[[UpdateChunkTopic], None] | None = None
    signer: SigningKey | None = None  # signs announcements and acks, like fedmq serve
    chunk_headers: list[ChunkHeader] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.topics = Topics(self.federation)
        self.session = MqttSession(
            BrokerSettings(self.url, f"{self.federation}-{AGGREGATOR_ID}"),
            subscriptions=[
                (self.topics.update_filter(), 1),
                (self.topics.status_filter(), 1),
            ],
        )
        self._assemblers: dict[tuple[str, str], BlobAssembler] = {}
        self.received = asyncio.Event()
        self.status_seen = asyncio.Event()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedAggregator]:
        task = asyncio.create_task(self.session.run(self._handle))
        try:
            await self.session.wait_connected(10)
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def publish_model(
        self,
        bundle_name: str = "digits_mlp",
        chunk_size: int = 4096,
        corrupt: Callable[[bytes], bytes] | None = None,
    ) -> tuple[BlobRef, BlobRef, Bundle]:
        """Publish a shipped bundle and its initial parameters; return their refs."""
        bundle = Bundle.load(BUNDLES / bundle_name)
        archive = pack_files(bundle.files())
        params = encode_tensors(bundle.initial_parameters()).data
        refs = []
        for data in (archive, params):
            ref = blob_ref(data, chunk_size)
            await publish_blob(
                self.session, self.topics, data, ref, sender=AGGREGATOR_ID, round_id=0
            )
            refs.append(ref)
        return refs[0], refs[1], bundle

    async def announce(
        self,
        round_id: int,
        bundle: BlobRef,
        params: BlobRef,
        *,
        codec: str = "raw",
        chunk_size: int = 1024,
        training: TrainingConfig | None = None,
        selected: list[str] | None = None,
        status: str = "open",
        federation: str | None = None,
        upload_slots: int | None = None,
    ) -> RoundAnnouncement:
        now = time.time()
        announcement = RoundAnnouncement(
            federation=federation or self.federation,
            aggregator=AGGREGATOR_ID,
            round=round_id,
            status=status,  # type: ignore[arg-type]
            issued_at=now,
            deadline=now + 600,
            bundle=bundle,
            params=params,
            training=training or TrainingConfig(epochs=1, batch_size=32, lr=0.05),
            codec=codec,
            chunk_size=chunk_size,
            selected=selected,
            upload_slots=upload_slots,
        )
        await self.publish_raw_round(encode_control(announcement, self.signer))
        return announcement

    async def publish_raw_round(self, payload: bytes) -> None:
        await self.session.publish(self.topics.round(), payload, retain=True)

    async def clear_round(self) -> None:
        await self.session.publish(self.topics.round(), b"", retain=True)

    async def wait_updates(self, count: int, timeout: float = 60) -> None:
        async def wait() -> None:
            while len(self.updates) < count:
                self.received.clear()
                await self.received.wait()

        await within(wait(), timeout)

    async def wait_status(
        self, predicate: Callable[[AgentStatus], bool], timeout: float = 30
    ) -> AgentStatus:
        async def wait() -> AgentStatus:
            while True:
                for status in reversed(self.statuses):
                    if predicate(status):
                        return status
                self.status_seen.clear()
                await self.status_seen.wait()

        return await within(wait(), timeout)

    async def _handle(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        payload = message.payload
        if isinstance(parsed, StatusTopic):
            if payload:
                self.statuses.append(decode_control(payload, AgentStatus))
                self.status_seen.set()
            return
        if not isinstance(parsed, UpdateChunkTopic):
            return
        self.chunks_seen += 1
        chunk = decode_chunk(payload)
        header = chunk.header
        assert header.update_id is not None
        self.chunk_uids.add(header.update_id)
        self.chunk_headers.append(header)
        if self.on_chunk is not None:
            self.on_chunk(parsed)
        key = (header.sender, header.update_id)
        assembler = self._assemblers.setdefault(key, BlobAssembler(header.blob))
        assembler.add(header.index, chunk.payload)
        if not assembler.complete:
            return
        del self._assemblers[key]
        meta, delta = decode_update(bytes(assembler.finish()))
        known = self.updates.get(meta.update_id)
        if known is not None:
            known.deliveries += 1
            await self._ack(meta, accepted=True, reason="duplicate")
        elif meta.round in self.closed_rounds:
            await self._ack(meta, accepted=False, reason="round_closed")
        else:
            self.updates[meta.update_id] = Received(
                meta, {name: np.array(value) for name, value in delta.items()}
            )
            await self._ack(meta, accepted=True, reason="accepted")
        self.received.set()

    async def _ack(self, meta: UpdateMeta, *, accepted: bool, reason: str) -> None:
        if self.hold_acks:
            return
        ack = Ack(
            federation=self.federation,
            client=meta.client,
            round=meta.round,
            update_id=meta.update_id,
            accepted=accepted,
            reason=reason,  # type: ignore[arg-type]
            ts=time.time(),
        )
        self.acks.append(ack)
        await self.session.publish(self.topics.ack(meta.client), encode_control(ack, self.signer))

    async def send_ack(self, ack: Ack, signer: SigningKey | None = None) -> None:
        await self.session.publish(self.topics.ack(ack.client), encode_control(ack, signer))
