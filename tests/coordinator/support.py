"""Helpers for driving the pure coordinator in memory: updates, chunks, statuses, a harness.

The harness plays the service's part synchronously: it verifies updates inline,
"persists" them by reporting them persisted at once, and records what would be
published.  Clock values are explicit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmq.coordinator.actions import (
    Action,
    ArmTimer,
    ClearBlob,
    FederationFinished,
    PersistUpdate,
    Publish,
    PublishBlob,
    RoundClosed,
    SaveCheckpoint,
    SaveRecord,
    SaveState,
    Ticket,
    UpdateRejected,
    VerifyUpdate,
)
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.records import RoundRecord
from fedmq.coordinator.validation import UpdateSchema, verify_assembled
from fedmq.strategies.config import StrategyConfig, build_strategy
from fedmq.strategies.strategy import Strategy
from fedmq.testing.scripted_clients import update_envelope
from fedmq.wire.blobs import blob_ref
from fedmq.wire.chunks import encode_blob_chunks
from fedmq.wire.control import Ack, AgentStatus, RoundAnnouncement, decode_control
from fedmq.wire.signing import SigningKey, update_statement
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.topics import AckTopic, RoundTopic, Topics, UpdateChunkTopic

FEDERATION = "plant7"
SHAPES: dict[str, tuple[int, ...]] = {"fc.weight": (32, 16), "fc.bias": (32,), "bn.mean": (32,)}
TRAINABLE = frozenset({"fc.weight", "fc.bias"})
T0 = 1_000_000.0  # a unix time far from zero, so "now" arithmetic never hits 0


def schema(federation: str = FEDERATION) -> UpdateSchema:
    return UpdateSchema.create(federation, SHAPES, TRAINABLE)


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    params: dict[str, np.ndarray] = {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()
    }
    params["bn.count"] = np.array(7, np.int64)  # an integer buffer: never federated
    return params


def delta(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (scale * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in SHAPES.items()
    }


def envelope(
    client: str,
    round_id: int,
    tensors: Mapping[str, np.ndarray],
    *,
    update_id: str | None = None,
    examples: int = 10,
    base_round: int | None = None,
    metrics: Mapping[str, float] | None = None,
    federation: str = FEDERATION,
    codec: str = "raw",
) -> tuple[str, bytes]:
    body = encode_tensors(tensors, CodecSpec.parse(codec)).data
    return update_envelope(
        federation,
        client,
        round_id,
        body,
        examples=examples,
        created_at=T0,
        update_id=update_id,
        base_round=base_round,
        metrics=metrics,
    )


def chunks(
    data: bytes,
    client: str,
    round_id: int,
    update_id: str,
    *,
    chunk_size: int = 1024,
    federation: str = FEDERATION,
    sender: str | None = None,
    signer: SigningKey | None = None,
) -> list[tuple[UpdateChunkTopic, bytes]]:
    ref = blob_ref(data, chunk_size)
    signature = None
    if signer is not None:
        statement = update_statement(
            federation, client, round_id, update_id, bytes.fromhex(ref.sha256), ref.size
        )
        signature = signer.sign(statement)
    return [
        (UpdateChunkTopic(client, round_id, index), message)
        for index, message in encode_blob_chunks(
            data,
            ref,
            kind="update",
            federation=federation,
            sender=sender or client,
            round_id=round_id,
            update_id=update_id,
            signature=signature,
        )
    ]


def status(client: str, state: str = "online", heartbeat_s: float = 10.0) -> AgentStatus:
    return AgentStatus(client=client, state=state, heartbeat_s=heartbeat_s, ts=T0)  # type: ignore[arg-type]


def config(**overrides: Any) -> CoordinatorConfig:
    values: dict[str, Any] = {
        "federation": FEDERATION,
        "aggregator_id": "agg",
        "rounds": 3,
        "settle_s": 0.0,
    }
    values.update(overrides)
    return CoordinatorConfig(**values)


@dataclass
class Harness:
    """Runs a coordinator, executing its actions the way the service would (synchronously)."""

    coordinator: Coordinator
    now: float = T0
    published: list[Publish] = field(default_factory=list)
    blobs: list[PublishBlob] = field(default_factory=list)
    cleared: list[ClearBlob] = field(default_factory=list)
    records: list[RoundRecord] = field(default_factory=list)
    checkpoints: dict[int, SaveCheckpoint] = field(default_factory=dict)
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    stored: list[Ticket] = field(default_factory=list)
    rejected: list[UpdateRejected] = field(default_factory=list)
    closed: list[RoundClosed] = field(default_factory=list)
    finished: list[FederationFinished] = field(default_factory=list)
    timer: float | None = None
    hold_persist: bool = False  # leave PersistUpdate tickets pending (crash tests)
    pending: list[Ticket] = field(default_factory=list)
    log: list[Action] = field(default_factory=list)
    live: dict[str, float] = field(default_factory=dict)  # agents that keep heartbeating

    @classmethod
    def create(
        cls,
        cfg: CoordinatorConfig | None = None,
        strategy: Strategy | None = None,
        *,
        bundle: bytes = b"bundle-archive",
        start: bool = True,
    ) -> Harness:
        cfg = cfg or config()
        strategy = strategy or build_strategy(StrategyConfig())
        coordinator = Coordinator(
            cfg, strategy, schema(cfg.federation), bundle, initial_params(), now=T0
        )
        harness = cls(coordinator)
        if start:
            harness.run(coordinator.start(harness.now))
        return harness

    def run(self, actions: Iterable[Action]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            self.log.append(action)
            match action:
                case Publish():
                    self.published.append(action)
                case PublishBlob():
                    self.blobs.append(action)
                case ClearBlob():
                    self.cleared.append(action)
                case SaveRecord():
                    self.records.append(action.record)
                case SaveCheckpoint():
                    self.checkpoints[action.round] = action
                case SaveState():
                    self.snapshots.append(action.snapshot)
                case UpdateRejected():
                    self.rejected.append(action)
                case RoundClosed():
                    self.closed.append(action)
                case FederationFinished():
                    self.finished.append(action)
                case ArmTimer():
                    self.timer = action.at
                case VerifyUpdate():
                    result = verify_assembled(action.key, action.assembler, self.coordinator.schema)
                    queue[:0] = self.coordinator.verified(result, self.now)
                case PersistUpdate():
                    self.stored.append(action.ticket)
                    if self.hold_persist:
                        self.pending.append(action.ticket)
                    else:
                        queue[:0] = self.coordinator.persisted(action.ticket, self.now)

    # -- events

    def status(self, client: str, state: str = "online", heartbeat_s: float = 10.0) -> None:
        if state == "offline":
            self.live.pop(client, None)
        else:
            self.live[client] = heartbeat_s
        self.run(self.coordinator.on_status(client, status(client, state, heartbeat_s), self.now))

    def silence(self, client: str) -> None:
        """Stop ``client``'s heartbeats (it hung or lost its network)."""
        self.live.pop(client, None)

    def online(self, *clients: str, heartbeat_s: float = 10.0) -> None:
        for client in clients:
            self.status(client, heartbeat_s=heartbeat_s)

    def send(self, data: bytes, client: str, round_id: int, update_id: str, **kw: Any) -> None:
        for topic, message in chunks(data, client, round_id, update_id, **kw):
            self.run(self.coordinator.receive_chunk(topic, message, self.now))

    def update(
        self, client: str, round_id: int, tensors: Mapping[str, np.ndarray], **kw: Any
    ) -> str:
        uid, data = envelope(client, round_id, tensors, **kw)
        self.send(data, client, round_id, uid)
        return uid

    def advance(self, seconds: float) -> None:
        """Let time pass; live agents heartbeat on time, timers fire when due."""
        end = self.now + seconds
        while self.now < end:
            step = min([end - self.now, *(hb / 2 for hb in self.live.values())])
            self.now += step
            for client, heartbeat in list(self.live.items()):
                self.run(
                    self.coordinator.on_status(
                        client, status(client, "online", heartbeat), self.now
                    )
                )
            if self.timer is not None and self.timer <= self.now:
                self.run(self.coordinator.on_timer(self.now))
        self.run(self.coordinator.on_timer(self.now))

    def release(self) -> None:
        """Report every held ticket persisted."""
        held, self.pending = self.pending, []
        for ticket in held:
            self.run(self.coordinator.persisted(ticket, self.now))

    # -- views

    def acks(self, client: str | None = None) -> list[Ack]:
        topics = self.coordinator.topics
        found = []
        for message in self.published:
            parsed = topics.parse(message.topic)
            if isinstance(parsed, AckTopic) and (client is None or parsed.client == client):
                found.append(decode_control(message.payload, Ack))
        return found

    def announcements(self) -> list[RoundAnnouncement]:
        topics = self.coordinator.topics
        return [
            decode_control(m.payload, RoundAnnouncement)
            for m in self.published
            if isinstance(topics.parse(m.topic), RoundTopic)
        ]


def topics() -> Topics:
    return Topics(FEDERATION)
