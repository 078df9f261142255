"""Scripted agents that train nothing: the caller chooses every update they send.

A scripted connection does an agent's protocol chores on one MQTT session: it records
what it is subscribed to (round announcements, acks, aggregator and agent statuses,
decoded in arrival order), wakes whoever waits for one of them, and uploads update
envelopes in chunks under an agent id's topics.  Its life::

    ScriptedConnection(url, federation, subscriptions=…)   nothing connected yet
      .connect(timeout)        session task started, connected
      .update_envelope(…), .upload(…), .upload_messages(…)   updates, encoded and sent
      .wait_until(predicate)   after every message received, until it holds
      .disconnect()            session task cancelled

:class:`ScriptedClients` speaks for many agent ids on one connection, which the dev
broker allows because it enforces no ACLs (a deployed broker refuses it: the ACLs of
docs/protocol.md): retained ``online`` statuses at start, cleared at stop, so one
process can play a 500-device round.
``tests/aggregator/scripted.py`` builds its one-id agent (last will, heartbeats, blob
downloads) on :class:`ScriptedConnection`; ``bench/aggregate.py`` drives the aggregator
with :class:`ScriptedClients`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self

import numpy.typing as npt

from fedmq.timeouts import wait_event
from fedmq.transport.blobs import publish_chunks
from fedmq.transport.broker_settings import BrokerSettings, LastWill
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.blobs import BlobRef, blob_ref
from fedmq.wire.chunks import encode_blob_chunks
from fedmq.wire.control import (
    Ack,
    AgentStatus,
    AggregatorStatus,
    ResendRequest,
    RoundAnnouncement,
    control_type,
    decode_control,
    encode_control,
)
from fedmq.wire.signing import SigningKey, update_statement
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.topics import (
    AckTopic,
    AggregatorStatusTopic,
    ParsedTopic,
    RoundTopic,
    StatusTopic,
    Topics,
)
from fedmq.wire.update import UpdateMeta, encode_update

SCRIPTED_CHUNK = 64 * 1024  # bytes per upload chunk unless told: a few chunks per test update
SCRIPTED_HEARTBEAT = 60.0  # seconds announced in statuses: longer than any scripted round
WAIT = 60.0  # seconds to connect or for an answer unless told: generous, for a busy 2-core CI


def update_envelope(
    federation: str,
    client: str,
    round_id: int,
    body: bytes,
    *,
    examples: int,
    created_at: float,
    update_id: str | None = None,
    base_round: int | None = None,
    metrics: Mapping[str, float] | None = None,
) -> tuple[str, bytes]:
    """``(update id, envelope)`` of an update around an encoded tensor set (pure).

    Args:
        federation: the federation the header claims.
        client: the sender.
        round_id: the round it answers.
        body: the encoded delta (``encode_tensors(...).data``).
        examples: the example count it claims.
        created_at: Unix time it claims to be made at.
        update_id: its id (default: a random one).
        base_round: the round of the model it started from (default ``round_id``).
        metrics: training metrics it reports.
    """
    uid = update_id or uuid.uuid4().hex
    meta = UpdateMeta(
        federation=federation,
        client=client,
        round=round_id,
        base_round=round_id if base_round is None else base_round,
        update_id=uid,
        num_examples=examples,
        metrics=dict(metrics or {}),
        created_at=created_at,
    )
    return uid, encode_update(meta, body)


class ScriptedConnection:
    """One MQTT session of scripted agents: records the aggregator's messages, uploads.

    Args:
        url: the broker, ``mqtt://host:port``.
        federation: the federation id (topics under the default root).
        subscriptions: ``(filter, qos)`` pairs; messages outside the federation's
            topics are refused by :meth:`Topics.parse`.
        client_id: the MQTT client id (default: ``scripted-<random>``).
        will: the last will, if any.
        chunk_size: bytes per update chunk.
        settings: the whole connection (TLS, identity), instead of ``url``/``client_id``.
    """

    def __init__(
        self,
        url: str,
        federation: str,
        *,
        subscriptions: Sequence[tuple[str, int]],
        client_id: str | None = None,
        will: LastWill | None = None,
        chunk_size: int = SCRIPTED_CHUNK,
        settings: BrokerSettings | None = None,
    ) -> None:
        self.federation = federation
        self.topics = Topics(federation)
        self.chunk_size = chunk_size
        self.rounds: list[RoundAnnouncement] = []
        self.acks: list[Ack] = []
        self.resend_requests: list[ResendRequest] = []
        self.statuses: list[AggregatorStatus] = []
        self.agent_statuses: list[AgentStatus] = []  # of agents, when subscribed to them
        self.session = MqttSession(
            settings
            or BrokerSettings(
                url, client_id or f"scripted-{uuid.uuid4().hex[:8]}", persistent_session=False
            ),
            subscriptions=subscriptions,
            will=will,
        )
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the session

    async def connect(self, timeout: float = WAIT) -> None:
        """Start the session and return once it is connected.

        Raises:
            TransportError: not connected within ``timeout`` seconds.
        """
        self._task = asyncio.create_task(
            self.session.run(self._handle), name=f"scripted[{self.session.settings.client_id}]"
        )
        await self.session.wait_connected(timeout)

    async def disconnect(self) -> None:
        """Cancel the session (no DISCONNECT: the broker fires the will, if any)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _handle(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        payload = message.payload
        if isinstance(parsed, RoundTopic) and payload:
            self.rounds.append(decode_control(payload, RoundAnnouncement))
        elif isinstance(parsed, AckTopic) and control_type(payload) == ResendRequest.TYPE:
            self.resend_requests.append(decode_control(payload, ResendRequest))
        elif isinstance(parsed, AckTopic):
            self.acks.append(decode_control(payload, Ack))
        elif isinstance(parsed, AggregatorStatusTopic) and payload:
            self.statuses.append(decode_control(payload, AggregatorStatus))
        elif isinstance(parsed, StatusTopic) and payload:
            self.agent_statuses.append(decode_control(payload, AgentStatus))
        else:
            await self.on_message(parsed, message)
        self._changed.set()

    async def on_message(self, parsed: ParsedTopic, message: Message) -> None:
        """Handle a message that is no announcement, ack or status (ignored)."""

    # ------------------------------------------------------------------ waiting

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        """Return once ``predicate()`` holds, checking it after every message received.

        Raises:
            TimeoutError: it did not hold within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            self._changed.clear()
            if not await wait_event(self._changed, deadline - time.monotonic()):
                raise TimeoutError(f"not within {timeout:g} s: {predicate}")

    async def wait_round(
        self, round_id: int, status: str = "open", timeout: float = WAIT
    ) -> RoundAnnouncement:
        """The latest announcement of ``round_id`` in ``status``, once there is one.

        Raises:
            TimeoutError: none within ``timeout`` seconds.
        """

        def found() -> RoundAnnouncement | None:
            for announcement in reversed(self.rounds):
                if announcement.round == round_id and announcement.status == status:
                    return announcement
            return None

        await self.wait_until(lambda: found() is not None, timeout)
        result = found()
        assert result is not None
        return result

    async def wait_ack(self, update_id: str, count: int = 1, timeout: float = WAIT) -> Ack:
        """The ``count``-th ack of ``update_id``, once it arrived.

        Raises:
            TimeoutError: fewer within ``timeout`` seconds.
        """
        await self.wait_until(
            lambda: sum(a.update_id == update_id for a in self.acks) >= count, timeout
        )
        return [a for a in self.acks if a.update_id == update_id][count - 1]

    # ------------------------------------------------------------------ updates

    def update_envelope(
        self,
        client: str,
        round_id: int,
        body: bytes,
        *,
        examples: int,
        update_id: str | None = None,
        base_round: int | None = None,
        metrics: Mapping[str, float] | None = None,
        federation: str | None = None,
    ) -> tuple[str, bytes]:
        """``(update id, envelope)`` of an update of ``client`` around encoded tensors."""
        return update_envelope(
            federation or self.federation,
            client,
            round_id,
            body,
            examples=examples,
            update_id=update_id,
            base_round=base_round,
            metrics=metrics,
            created_at=time.time(),
        )

    async def upload(
        self,
        client: str,
        round_id: int,
        update_id: str,
        data: bytes,
        *,
        federation: str | None = None,
        sender: str | None = None,
        signer: SigningKey | None = None,
    ) -> None:
        """Publish ``data`` in chunks under ``client``'s update topics (QoS 1).

        ``federation`` and ``sender`` override what the chunk headers claim; ``signer``
        signs the update as the device would.

        Raises:
            TransportError: a chunk could not be published.
        """
        ref = blob_ref(data, self.chunk_size)
        fed = federation or self.federation
        await publish_chunks(
            self.session,
            data,
            ref,
            lambda index: self.topics.update(client, round_id, index),
            kind="update",
            federation=fed,
            sender=sender or client,
            round_id=round_id,
            update_id=update_id,
            signature=_sign(signer, fed, client, round_id, update_id, ref),
        )

    def upload_messages(
        self,
        client: str,
        round_id: int,
        update_id: str,
        data: bytes,
        signer: SigningKey | None = None,
    ) -> list[tuple[str, bytes]]:
        """``(topic, message)`` of every chunk :meth:`upload` would publish, pre-encoded."""
        ref = blob_ref(data, self.chunk_size)
        return [
            (self.topics.update(client, round_id, index), message)
            for index, message in encode_blob_chunks(
                data,
                ref,
                kind="update",
                federation=self.federation,
                sender=client,
                round_id=round_id,
                update_id=update_id,
                signature=_sign(signer, self.federation, client, round_id, update_id, ref),
            )
        ]


class ScriptedClients(ScriptedConnection):
    """Many agent ids on one connection: retained statuses, uploads, every id's acks.

    Args:
        url: the broker.
        federation: the federation id.
        clients: the agent ids it speaks for.
        chunk_size: bytes per update chunk.
        heartbeat_s: the heartbeat the statuses announce (none is sent: keep it longer
            than the run).
    """

    def __init__(
        self,
        url: str,
        federation: str,
        clients: Sequence[str],
        *,
        chunk_size: int = SCRIPTED_CHUNK,
        heartbeat_s: float = SCRIPTED_HEARTBEAT,
    ) -> None:
        topics = Topics(federation)
        super().__init__(
            url,
            federation,
            subscriptions=[(topics.round(), 1), (f"{topics.prefix}/ack/+", 1)],
            chunk_size=chunk_size,
        )
        self.clients = list(clients)
        self.heartbeat_s = heartbeat_s

    async def start(self, timeout: float = WAIT) -> Self:
        """Connect, then publish every id's retained ``online`` status.

        Raises:
            TransportError: no connection within ``timeout`` seconds, or a status failed.
        """
        await self.connect(timeout)
        for client in self.clients:
            status = AgentStatus(
                client=client, state="online", heartbeat_s=self.heartbeat_s, ts=time.time()
            )
            await self.session.publish(
                self.topics.status(client), encode_control(status), retain=True
            )
        return self

    async def stop(self) -> None:
        """Delete every id's retained status (nothing is left behind), then disconnect."""
        try:
            for client in self.clients:
                await self.session.publish(self.topics.status(client), b"", retain=True)
        finally:
            await self.disconnect()

    async def send(
        self,
        client: str,
        round_id: int,
        tensors: Mapping[str, npt.NDArray[Any]],
        examples: int,
    ) -> str:
        """Encode ``tensors`` (raw codec) as ``client``'s update and upload it; its id."""
        uid, data = self.update_envelope(
            client, round_id, encode_tensors(tensors).data, examples=examples
        )
        await self.upload(client, round_id, uid, data)
        return uid


def _sign(
    signer: SigningKey | None,
    federation: str,
    client: str,
    round_id: int,
    update_id: str,
    ref: BlobRef,
) -> bytes | None:
    if signer is None:
        return None
    statement = update_statement(
        federation, client, round_id, update_id, bytes.fromhex(ref.sha256), ref.size
    )
    return signer.sign(statement)
