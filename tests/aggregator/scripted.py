"""Scripted agents on fedmq.testing's scripted connections, and a running-service helper.

A scripted agent does what docs/protocol.md asks of an agent (retained status with a
last will, heartbeats, round and ack subscriptions, chunked uploads) but trains
nothing: tests choose the deltas, so the expected global model is plain numpy.
:class:`~fedmq.testing.scripted_clients.ScriptedClients` plays many agents at once.
``WAIT`` (seconds) is generous, for a busy 2-core CI machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.aggregator.config import AggregatorSettings, load_settings
from fedmq.aggregator.service import AggregatorService
from fedmq.aggregator.store import checkpoint_file, read_records
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.bundle import Bundle
from fedmq.coordinator.records import RoundRecord
from fedmq.errors import TransportError
from fedmq.testing.scripted_clients import (
    WAIT,
    ScriptedConnection,
)
from fedmq.timeouts import within
from fedmq.transport.blob_receiver import BlobReceiver
from fedmq.transport.broker_settings import LastWill
from fedmq.transport.message import Message
from fedmq.wire.control import AgentStatus, AggregatorStatus, RoundAnnouncement, encode_control
from fedmq.wire.signing import SigningKey
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import decode_tensors, encode_tensors
from fedmq.wire.topics import BlobChunkTopic, ParsedTopic, Topics

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "examples" / "bundles"


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
    started = asyncio.create_task(service.wait_started())
    try:
        await asyncio.wait([task, started], timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raise the startup failure
        if not started.done():
            raise AssertionError(f"the aggregator did not start within {WAIT} s")
        yield service
    finally:
        started.cancel()
        service.request_stop()
        await within(task, WAIT)


def records(state_dir: Path) -> list[RoundRecord]:
    return list(read_records(state_dir))


def checkpoint_params(state_dir: Path, announcement: RoundAnnouncement) -> dict[str, np.ndarray]:
    """The model a ``finished`` announcement names, from the aggregator's checkpoint.

    A finished federation clears its retained blobs, so the final model is read where
    ``fedmq export`` reads it; the announcement must name exactly that blob.
    """
    blob = checkpoint_file(state_dir, announcement.round).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == announcement.params.sha256
    return {name: np.array(array) for name, array in decode_tensors(blob).items()}


async def wait_for(predicate: Any, timeout: float = WAIT, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until true (behaviour, not timing, is asserted).

    For conditions no message announces (service counters, files); a scripted client's
    own messages are waited for with its ``wait_until``.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


class ScriptedAgent(ScriptedConnection):
    """One agent whose updates are chosen by the test: last will, heartbeats, downloads."""

    def __init__(
        self,
        broker: MosquittoBroker,
        federation: str,
        client: str,
        *,
        heartbeat_s: float = 1.0,
        chunk_size: int = 4096,
        signer: SigningKey | None = None,
    ) -> None:
        topics = Topics(federation)
        offline = AgentStatus(
            client=client, state="offline", heartbeat_s=heartbeat_s, ts=time.time()
        )
        super().__init__(
            broker.url,
            federation,
            subscriptions=[
                (topics.round(), 1),
                (topics.ack(client), 1),
                (topics.aggregator_status(), 1),
            ],
            client_id=client,
            will=LastWill(topics.status(client), encode_control(offline)),
            chunk_size=chunk_size,
        )
        self.client = client
        self.heartbeat_s = heartbeat_s
        self.signer = signer  # signs this agent's updates (a registered device)
        self.receiver = BlobReceiver(self.session, self.topics)
        self._heartbeat: asyncio.Task[None] | None = None

    async def on_message(self, parsed: ParsedTopic, message: Message) -> None:
        if isinstance(parsed, BlobChunkTopic):
            await self.receiver.feed(message, parsed)

    async def start(self, *, announce: bool = True) -> ScriptedAgent:
        """Connect; unless ``announce`` is False, say online and keep heartbeating."""
        await self.connect(WAIT)
        if announce:
            await self.publish_status()
            self._heartbeat = asyncio.create_task(self._beat())
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

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            with contextlib.suppress(TransportError):  # like an agent: retry next beat
                await self.publish_status()

    async def stop(self, *, offline: bool = True) -> None:
        """Disconnect, saying offline first unless ``offline`` is False."""
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if offline:
            with contextlib.suppress(TransportError):
                await self.publish_status("offline")
        await self.disconnect()

    def silence(self) -> None:
        """Stop heartbeating but stay connected (an agent that hung)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    async def send_bytes(
        self,
        round_id: int,
        data: bytes,
        update_id: str,
        *,
        federation: str | None = None,
        sender: str | None = None,
        signer: SigningKey | None = None,
    ) -> None:
        await self.upload(
            self.client,
            round_id,
            update_id,
            data,
            federation=federation,
            sender=sender,
            signer=signer or self.signer,
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
        return self.update_envelope(
            self.client,
            round_id,
            encode_tensors(tensors, CodecSpec.parse(codec)).data,
            examples=examples,
            update_id=update_id,
            base_round=base_round,
            metrics=metrics,
            federation=federation,
        )

    async def send_update(self, round_id: int, tensors: Mapping[str, np.ndarray], **kw: Any) -> str:
        uid, data = self.envelope(round_id, tensors, **kw)
        await self.send_bytes(round_id, data, uid)
        return uid

    def rejected(self) -> dict[str, int]:
        """Rejection counts of the latest aggregator status."""
        return dict(self.statuses[-1].rejected) if self.statuses else {}

    async def fetch_params(self, announcement: RoundAnnouncement) -> dict[str, np.ndarray]:
        blob = await self.receiver.fetch(announcement.params, WAIT)
        return {name: np.array(array) for name, array in decode_tensors(blob).items()}


async def read_status(
    broker: MosquittoBroker,
    federation: str,
    until: Callable[[AggregatorStatus], bool] = lambda status: True,
) -> AggregatorStatus:
    """The retained aggregator status, as a fresh subscriber sees it.

    ``until``: wait for the first status that satisfies it (the aggregator publishes its
    status just after the announcement, so right after a round change the retained
    status may still be the previous one).
    """
    topics = Topics(federation)
    probe = ScriptedConnection(
        broker.url,
        federation,
        subscriptions=[(topics.aggregator_status(), 1)],
        client_id=f"probe-{uuid.uuid4().hex[:8]}",
    )
    await probe.connect(WAIT)
    try:
        await probe.wait_until(lambda: bool(probe.statuses) and until(probe.statuses[-1]), WAIT)
    finally:
        await probe.disconnect()
    return probe.statuses[-1]


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


def serve_process(config: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``fedmq serve --config <config> [args]`` as a real process (kill -9 is real)."""
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
                *args,
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


async def wait_released(agent: ScriptedAgent, checkpoint: int, timeout: float = 60) -> None:
    """Wait for a finished announcement that names ``checkpoint``'s inference model.

    The first ``finished`` announcement comes before the final model is built (off the
    event loop); the release is announced again once it is.
    """

    def released() -> bool:
        return any(
            a.status == "finished"
            and a.models
            and a.models.latest
            and a.models.latest.checkpoint == checkpoint
            for a in agent.rounds
        )

    await agent.wait_until(released, timeout)
