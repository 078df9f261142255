"""What the agent's jobs share while it runs: one object, built once the state dir is open.

:meth:`edge_agent.daemon.Agent.run` opens the state directory, the blob cache, the MQTT
session and the blob receiver, and puts them in one :class:`AgentContext` that it hands
to the round runner (:mod:`edge_agent.rounds`) and the uploader
(:mod:`edge_agent.uploader`).  None of them exists before ``run()`` and all of them
exist after, so no job ever asks whether one is there yet.

The jobs run on one event loop, so the context's plain fields need no lock; the
training thread touches only the status board (see :mod:`edge_agent.status`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_agent.blob_cache import BlobCache
from edge_agent.config import AgentSettings
from edge_agent.state import StateDir
from edge_agent.status import StatusBoard
from edge_agent.trust import ControlTrust
from fedmq.transport.blob_receiver import BlobReceiver
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.control import AgentState
from fedmq.wire.limits import DecodeLimits
from fedmq.wire.signing import SigningKey
from fedmq.wire.topics import Topics


@dataclass
class Counters:
    """What the agent has done so far; each job counts its own (see ``AgentStatistics``)."""

    rounds_trained: int = 0
    rounds_failed: int = 0
    updates_committed: int = 0
    updates_acked: int = 0
    updates_dropped: int = 0
    uploads: int = 0
    refused_messages: int = 0  # control messages refused: unsigned, forged, replayed


@dataclass
class AggregatorPresence:
    """What the agent last heard of the aggregator's retained status.

    Uploads wait for an aggregator known to be subscribed: after a broker restart the
    agent is often back before the aggregator, and chunks sent then are lost.
    """

    seen: bool = False  # any aggregator status ever (brokers or ACLs may hide it)
    online: bool = False
    connection: int = 0  # our connection number when it last said it was online
    restarts: int = 0  # offline -> online transitions seen

    def update(self, state: str, connection: int) -> bool:
        """Record a status; True if the aggregator just came (back) online."""
        came_back = state != "offline" and (not self.online or connection != self.connection)
        if came_back and self.seen:
            self.restarts += 1
        self.seen = True
        self.online = state != "offline"
        if self.online:
            self.connection = connection
        return came_back

    def ready(self, connection: int) -> bool:
        """Whether to upload now, on our connection number ``connection``."""
        return not self.seen or (self.online and self.connection == connection)


@dataclass
class AgentContext:
    """The running agent's resources and the signals its jobs pass each other.

    Attributes:
        trust: decodes and verifies control messages.
        device_key: signs this device's updates (None: unsigned, development).
        status_changed: set to publish the status now rather than at the next heartbeat.
        outbox_kick: set when the outbox may have something to do (a commit, an ack, a
            reconnect).
        is_stopping: true once shutdown began: no new rounds, no new uploads.
        uploading: the uploader is sending; "idle" is then shown as "uploading".
    """

    settings: AgentSettings
    topics: Topics
    limits: DecodeLimits
    clock: Callable[[], float]
    status: StatusBoard
    counters: Counters
    state_dir: StateDir
    cache: BlobCache
    session: MqttSession
    receiver: BlobReceiver
    status_changed: asyncio.Event
    outbox_kick: asyncio.Event
    is_stopping: Callable[[], bool]
    trust: ControlTrust
    device_key: SigningKey | None = None
    uploading: bool = False
    aggregator: AggregatorPresence = field(default_factory=AggregatorPresence)
    # Blobs other jobs are downloading (the installer's model): kept when a round cleans up.
    protected_blobs: set[str] = field(default_factory=set)

    @property
    def client(self) -> str:
        """This agent's client id."""
        return self.settings.client_id

    def task_name(self, job: str) -> str:
        """The name of one of the agent's tasks, ``fedmq[<client>].<job>``."""
        return f"fedmq[{self.client}].{job}"

    def set_state(self, state: AgentState, round_id: int | None = None) -> None:
        """Show ``state`` (for ``round_id``) and publish it at once."""
        if state == "idle" and self.uploading:
            state = "uploading"  # an upload outlives the round that committed it
        self.status.set(state, round_id)
        self.status_changed.set()
