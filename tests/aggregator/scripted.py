"""Scripted agents built from fedmq.wire + fedmq.transport, and a running-service helper.

A scripted agent does what docs/protocol.md asks of an agent (retained status with a
last will, heartbeats, round and ack subscriptions, chunked uploads) but trains
nothing: tests choose the deltas, so the expected global model is plain numpy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.aggregator.config import AggregatorSettings, load_settings
from fedmq.aggregator.service import AggregatorService
from fedmq.aggregator.store import read_records
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.bundle import Bundle
from fedmq.coordinator.records import RoundRecord
from fedmq.errors import TransportError
from fedmq.transport.blobs import BlobReceiver, publish_chunks
from fedmq.transport.message import Message
from fedmq.transport.mqtt import BrokerSettings, LastWill, MqttSession
from fedmq.wire.blobs import blob_ref
from fedmq.wire.control import (
    Ack,
    AgentStatus,
    AggregatorStatus,
    RoundAnnouncement,
    decode_control,
    encode_control,
)
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import decode_tensors, encode_tensors
from fedmq.wire.topics import AckTopic, AggregatorStatusTopic, BlobChunkTopic, RoundTopic, Topics
from fedmq.wire.update import UpdateMeta, encode_update

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "examples" / "bundles"
WAIT = 60.0  # seconds: generous, for a busy 2-core CI machine


def bundle_dir(name: str = "digits_mlp") -> Path:
    return BUNDLES / name


def make_settings(
    broker: MosquittoBroker, federation: str, state_dir: Path, **overrides: Any
) -> AggregatorSettings:
    """Aggregator settings for tests: the digits MLP, fast status, short settle."""
    values: dict[str, Any] = {
        "federation": federation,
        "bundle": str(bundle_dir()),
        "state_dir": str(state_dir),
        "rounds": 1,
        "broker": {"url": broker.url},
        "settle_s": 0.3,
        "status_interval_s": 0.05,
        "heartbeat_s": 1.0,
        "dropout_grace_s": 1.0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return load_settings(None, **values)


def update_shapes(bundle: str = "digits_mlp") -> dict[str, tuple[int, ...]]:
    manifest = Bundle.load(bundle_dir(bundle)).manifest
    return {name: manifest.tensor(name).shape for name in manifest.update_names}


def random_delta(
    seed: int, bundle: str = "digits_mlp", scale: float = 0.01
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (scale * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in update_shapes(bundle).items()
    }


def initial_params(bundle: str = "digits_mlp") -> dict[str, np.ndarray]:
    return Bundle.load(bundle_dir(bundle)).initial_parameters()


def fedavg(
    base: Mapping[str, np.ndarray], deltas: list[tuple[int, Mapping[str, np.ndarray]]]
) -> dict[str, np.ndarray]:
    """Direct numpy FedAvg of (examples, delta) pairs on top of ``base``."""
    total = sum(n for n, _ in deltas)
    return {
        name: (
            base[name].astype(np.float64)
            + sum(n * d[name].astype(np.float64) for n, d in deltas) / total
        ).astype(np.float32)
        for name in deltas[0][1]
    }


@contextlib.asynccontextmanager
async def running_service(settings: AggregatorSettings) -> AsyncIterator[AggregatorService]:
    """An in-process aggregator; stopped (gracefully) on exit."""
    service = AggregatorService(settings)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(
            asyncio.wait(
                [task, asyncio.ensure_future(service.wait_started())],
                return_when=asyncio.FIRST_COMPLETED,
            ),
            WAIT,
        )
        if task.done():
            task.result()  # raise the startup failure
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(task, WAIT)


def records(state_dir: Path) -> list[RoundRecord]:
    return list(read_records(state_dir))


async def wait_for(predicate: Any, timeout: float = WAIT, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until true (behaviour, not timing, is asserted)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


class ScriptedAgent:
    """An agent whose updates are chosen by the test."""

    def __init__(
        self,
        broker: MosquittoBroker,
        federation: str,
        client: str,
        *,
        heartbeat_s: float = 1.0,
        chunk_size: int = 4096,
    ) -> None:
        self.client = client
        self.federation = federation
        self.topics = Topics(federation)
        self.heartbeat_s = heartbeat_s
        self.chunk_size = chunk_size
        offline = AgentStatus(
            client=client, state="offline", heartbeat_s=heartbeat_s, ts=time.time()
        )
        self.session = MqttSession(
            BrokerSettings(broker.url, client, persistent_session=False),
            subscriptions=[
                (self.topics.round(), 1),
                (self.topics.ack(client), 1),
                (self.topics.aggregator_status(), 1),
            ],
            will=LastWill(self.topics.status(client), encode_control(offline)),
        )
        self.rounds: list[RoundAnnouncement] = []
        self.acks: list[Ack] = []
        self.statuses: list[AggregatorStatus] = []
        self.receiver = BlobReceiver(self.session, self.topics)
        self._tasks: list[asyncio.Task[None]] = []

    async def _handle(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        payload = message.payload
        assert isinstance(payload, bytes | bytearray)
        if isinstance(parsed, RoundTopic) and payload:
            self.rounds.append(decode_control(payload, RoundAnnouncement))
        elif isinstance(parsed, AckTopic):
            self.acks.append(decode_control(payload, Ack))
        elif isinstance(parsed, BlobChunkTopic):
            await self.receiver.feed(message, parsed)
        elif isinstance(parsed, AggregatorStatusTopic) and payload:
            self.statuses.append(decode_control(payload, AggregatorStatus))

    async def start(self, *, announce: bool = True) -> ScriptedAgent:
        """Connect; unless ``announce`` is False, say online and keep heartbeating."""
        self._tasks.append(asyncio.create_task(self.session.run(self._handle)))
        await self.session.wait_connected(WAIT)
        if announce:
            await self.publish_status()
            self._tasks.append(asyncio.create_task(self._heartbeat()))
        return self

    async def publish_status(self, state: str = "online") -> None:
        status = AgentStatus(
            client=self.client,
            state=state,
            heartbeat_s=self.heartbeat_s,
            ts=time.time(),  # type: ignore[arg-type]
        )
        await self.session.publish(
            self.topics.status(self.client), encode_control(status), retain=True
        )

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            with contextlib.suppress(TransportError):  # like an agent: retry next beat
                await self.publish_status()

    async def stop(self, *, offline: bool = True) -> None:
        """Disconnect, saying offline first unless ``offline`` is False."""
        heartbeat, self._tasks[1:] = self._tasks[1:], []
        for task in heartbeat:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if offline:
            with contextlib.suppress(TransportError):
                await self.publish_status("offline")
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def silence(self) -> None:
        """Stop heartbeating but stay connected (an agent that hung)."""
        for task in self._tasks[1:]:
            task.cancel()
        del self._tasks[1:]

    async def wait_round(self, round_id: int, status: str = "open") -> RoundAnnouncement:
        def found() -> RoundAnnouncement | None:
            for announcement in reversed(self.rounds):
                if announcement.round == round_id and announcement.status == status:
                    return announcement
            return None

        await wait_for(lambda: found() is not None)
        result = found()
        assert result is not None
        return result

    async def send_bytes(
        self,
        round_id: int,
        data: bytes,
        update_id: str,
        *,
        federation: str | None = None,
        sender: str | None = None,
    ) -> None:
        ref = blob_ref(data, self.chunk_size)
        await publish_chunks(
            self.session,
            data,
            ref,
            lambda index: self.topics.update(self.client, round_id, index),
            kind="update",
            federation=federation or self.federation,
            sender=sender or self.client,
            round_id=round_id,
            update_id=update_id,
        )

    def envelope(
        self,
        round_id: int,
        tensors: Mapping[str, np.ndarray],
        *,
        update_id: str | None = None,
        examples: int = 100,
        base_round: int | None = None,
        metrics: Mapping[str, float] | None = None,
        federation: str | None = None,
        codec: str = "raw",
    ) -> tuple[str, bytes]:
        uid = update_id or uuid.uuid4().hex
        meta = UpdateMeta(
            federation=federation or self.federation,
            client=self.client,
            round=round_id,
            base_round=round_id if base_round is None else base_round,
            update_id=uid,
            num_examples=examples,
            metrics=dict(metrics or {}),
            created_at=time.time(),
        )
        return uid, encode_update(meta, encode_tensors(tensors, CodecSpec.parse(codec)).data)

    async def send_update(self, round_id: int, tensors: Mapping[str, np.ndarray], **kw: Any) -> str:
        uid, data = self.envelope(round_id, tensors, **kw)
        await self.send_bytes(round_id, data, uid)
        return uid

    def rejected(self) -> dict[str, int]:
        """Rejection counts of the latest aggregator status."""
        return dict(self.statuses[-1].rejected) if self.statuses else {}

    async def wait_ack(self, update_id: str, count: int = 1) -> Ack:
        await wait_for(lambda: sum(a.update_id == update_id for a in self.acks) >= count)
        return [a for a in self.acks if a.update_id == update_id][count - 1]

    async def fetch_params(self, announcement: RoundAnnouncement) -> dict[str, np.ndarray]:
        blob = await self.receiver.fetch(announcement.params, WAIT)
        return {name: np.array(array) for name, array in decode_tensors(blob).items()}


async def read_status(broker: MosquittoBroker, federation: str) -> AggregatorStatus:
    """The retained aggregator status, as a fresh subscriber sees it."""
    topics = Topics(federation)
    seen: list[AggregatorStatus] = []

    async def handle(message: Message) -> None:
        payload = message.payload
        if isinstance(payload, bytes | bytearray) and payload:
            seen.append(decode_control(payload, AggregatorStatus))

    session = MqttSession(
        BrokerSettings(broker.url, f"probe-{uuid.uuid4().hex[:8]}", persistent_session=False),
        subscriptions=[(topics.aggregator_status(), 1)],
    )
    task = asyncio.create_task(session.run(handle))
    try:
        await wait_for(lambda: bool(seen))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return seen[-1]


# A device process we can kill -9: connects with a last will, says online, sleeps.
_DEVICE = """
import sys, time
from paho.mqtt import client as mqtt
host, port, topic, online, offline, client = sys.argv[1:7]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client, protocol=mqtt.MQTTv5)
c.will_set(topic, offline.encode(), qos=1, retain=True)
c.connect(host, int(port), keepalive=30)
c.loop_start()
c.publish(topic, online.encode(), qos=1, retain=True).wait_for_publish()
print("ready", flush=True)
while True:
    time.sleep(1)
"""


class DeviceProcess:
    """A separate process holding an agent's MQTT connection, to kill -9 mid-round."""

    def __init__(
        self, broker: MosquittoBroker, federation: str, client: str, heartbeat_s: float = 30.0
    ) -> None:
        topics = Topics(federation)
        online = AgentStatus(client=client, state="online", heartbeat_s=heartbeat_s, ts=time.time())
        offline = AgentStatus(
            client=client, state="offline", heartbeat_s=heartbeat_s, ts=time.time()
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _DEVICE,
                broker.host,
                str(broker.port),
                topics.status(client),
                encode_control(online).decode(),
                encode_control(offline).decode(),
                client,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "ready", line

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


FLEET_CHUNK = 64 * 1024  # bytes per upload chunk of a fleet


class Fleet:
    """Many agent ids behind one MQTT connection (the dev broker enforces no ACLs)."""

    def __init__(self, broker: MosquittoBroker, federation: str, clients: list[str]) -> None:
        self.topics = Topics(federation)
        self.federation = federation
        self.clients = clients
        self.session = MqttSession(
            BrokerSettings(broker.url, f"fleet-{uuid.uuid4().hex[:8]}", persistent_session=False),
            subscriptions=[(self.topics.round(), 1), (f"{self.topics.prefix}/ack/+", 1)],
        )
        self.acks: list[Ack] = []
        self.rounds: list[RoundAnnouncement] = []
        self._task: asyncio.Task[None] | None = None

    async def _handle(self, message: Message) -> None:
        parsed = self.topics.parse(message.topic)
        payload = message.payload
        assert isinstance(payload, bytes | bytearray)
        if isinstance(parsed, AckTopic):
            self.acks.append(decode_control(payload, Ack))
        elif isinstance(parsed, RoundTopic) and payload:
            self.rounds.append(decode_control(payload, RoundAnnouncement))

    async def start(self) -> Fleet:
        self._task = asyncio.create_task(self.session.run(self._handle))
        await self.session.wait_connected(WAIT)
        for client in self.clients:
            status = AgentStatus(client=client, state="online", heartbeat_s=60.0, ts=time.time())
            await self.session.publish(
                self.topics.status(client), encode_control(status), retain=True
            )
        return self

    async def stop(self) -> None:
        for client in self.clients:  # do not leave retained statuses behind
            await self.session.publish(self.topics.status(client), b"", retain=True)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def send(
        self, client: str, round_id: int, tensors: Mapping[str, np.ndarray], examples: int
    ) -> str:
        uid = uuid.uuid4().hex
        meta = UpdateMeta(
            self.federation, client, round_id, round_id, uid, examples, {}, time.time()
        )
        data = encode_update(meta, encode_tensors(tensors).data)
        ref = blob_ref(data, FLEET_CHUNK)
        await publish_chunks(
            self.session,
            data,
            ref,
            lambda index: self.topics.update(client, round_id, index),
            kind="update",
            federation=self.federation,
            sender=client,
            round_id=round_id,
            update_id=uid,
        )
        return uid


def write_toml(
    path: Path, broker: MosquittoBroker, federation: str, state_dir: Path, extra: str = ""
) -> Path:
    """A federation.toml for a subprocess aggregator."""
    path.write_text(
        f"""
federation = "{federation}"
bundle = "{bundle_dir()}"
state_dir = "{state_dir}"
rounds = 1
settle_s = 0.3
status_interval_s = 0.05
heartbeat_s = 1.0
dropout_grace_s = 1.0
log_level = "DEBUG"

[broker]
url = "{broker.url}"
{extra}
""",
        encoding="utf-8",
    )
    return path


def serve_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``fedmq serve --config <config>`` as a real process (kill -9 is real)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    with open(log, "ab") as stream:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from fedmq.cli.app import main; main()",
                "serve",
                "--config",
                str(config),
            ],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
        )


def wait_exit(process: subprocess.Popen[bytes], timeout: float = WAIT) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
