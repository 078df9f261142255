"""The coordinator's configuration: round policy, async buffer, stopping rule.

Plain frozen dataclasses (the service maps ``federation.toml`` onto them), so the
state machine can be built in a unit test with two lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from fedmq.coordinator.intake import DEFAULT_MAX_PENDING, DEFAULT_RESEND_AFTER, DEFAULT_TTL
from fedmq.coordinator.releases import DeliveryPolicy
from fedmq.coordinator.roster import DEFAULT_HEARTBEAT, DROPOUT_GRACE, MISSED_HEARTBEATS
from fedmq.coordinator.screening import ScreeningPolicy
from fedmq.coordinator.selection import SelectAll, Selection
from fedmq.errors import ConfigError
from fedmq.wire.blobs import DEFAULT_CHUNK_SIZE
from fedmq.wire.control import RoundTask
from fedmq.wire.ids import MAX_ID_LENGTH, validate_id
from fedmq.wire.limits import DEFAULT_LIMITS
from fedmq.wire.signing import SigningKey, VerifyKey
from fedmq.wire.topics import DEFAULT_ROOT
from fedmq.wire.training import TrainingConfig

DEFAULT_DEADLINE = 300.0  # seconds: a few local epochs on an edge CPU plus upload
DEFAULT_SETTLE = 2.0  # seconds after (re)start for retained agent statuses to arrive
# Seconds after the aggregator's own reconnect before anyone counts as gone: a broker
# restart fires every agent's last will at once, and agents reconnect with a jittered
# backoff that has grown to ~1.6 s after three failed attempts.
DEFAULT_RECONNECT_SETTLE = 5.0
DEFAULT_DEDUPE_ROUNDS = 8  # closed rounds whose update ids are remembered for duplicates
# Agents the roster tracks at most: statuses from further ids are ignored and counted, so
# a flood of made-up ids neither grows memory nor the announcement's selection list.
DEFAULT_MAX_AGENTS = 1000
# Announcement bytes besides the selection list (refs, training config): generous.
_ANNOUNCEMENT_BASE = 16 * 1024

LateUpdates = Literal["drop", "fold"]


@dataclass(frozen=True)
class SyncPolicy:
    """When a synchronous round closes.

    Args:
        deadline_s: seconds from announcement to deadline.
        target_updates: close as soon as this many on-time updates are accepted
            (None: one per selected agent).
        min_updates: quorum: at the deadline close if at least this many arrived.
        extension_s: below quorum at the deadline, extend once by this much (None:
            ``deadline_s``), then fail the round.
        selection: which online agents are asked.
        min_agents: agents that must be online before a round opens (None: ``min_updates``).
        late_updates: an update for an earlier round is dropped (``stale_round``) or
            folded into the current round with weight ``1/sqrt(1 + staleness)``.
        max_staleness: oldest base round (in rounds) a late update may come from.
        evaluate_every: every round whose number is a multiple of this is evaluate-only:
            the agents evaluate the global model and do not train (0: none; at least 2).
        evaluate_final: the last round (``rounds``, or the one after ``[target_metric]``
            was reached) is evaluate-only: each device's figures for the final model.
    """

    deadline_s: float = DEFAULT_DEADLINE
    target_updates: int | None = None
    min_updates: int = 1
    extension_s: float | None = None
    selection: Selection = field(default_factory=SelectAll)
    min_agents: int | None = None
    late_updates: LateUpdates = "drop"
    max_staleness: int = 1
    evaluate_every: int = 0
    evaluate_final: bool = False

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ConfigError(f"deadline_s {self.deadline_s} must be positive")
        if self.min_updates < 1:
            raise ConfigError(f"min_updates {self.min_updates} must be at least 1")
        if self.target_updates is not None and self.target_updates < self.min_updates:
            raise ConfigError(
                f"target_updates {self.target_updates} is below min_updates {self.min_updates}"
            )
        if self.extension_s is not None and not self.extension_s > 0:
            raise ConfigError(f"extension_s {self.extension_s} must be positive")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness {self.max_staleness} must be >= 0")
        if self.evaluate_every < 0 or self.evaluate_every == 1:
            raise ConfigError(
                f"evaluate_every {self.evaluate_every} must be 0 (off) or at least 2 "
                "(1 would evaluate in every round and never train)"
            )

    @property
    def agents_needed(self) -> int:
        """Online agents required before a round opens."""
        return max(self.min_updates, self.min_agents or 0)

    def task(self, number: int, last: int) -> RoundTask:
        """What round ``number`` of a federation ending with round ``last`` asks for."""
        if self.evaluate_final and number == last:
            return "evaluate"
        if self.evaluate_every and number % self.evaluate_every == 0:
            return "evaluate"
        return "train"


@dataclass(frozen=True)
class AsyncPolicy:
    """FedBuff: aggregate every ``buffer_size`` accepted updates.

    Args:
        buffer_size: ``K``, updates per new model version.
        max_staleness: updates trained on a model more than this many versions old are
            rejected (``stale_round``); the others weigh ``1/sqrt(1 + staleness)``.
        deadline_s: longest wait between versions: at the deadline a buffer holding at
            least ``min_updates`` is aggregated early, otherwise the deadline moves on.
        min_updates: smallest buffer aggregated at the deadline.
    """

    buffer_size: int = 10
    max_staleness: int = 10
    deadline_s: float = DEFAULT_DEADLINE
    min_updates: int = 1

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.min_updates < 1:
            raise ConfigError("buffer_size and min_updates must be at least 1")
        if self.min_updates > self.buffer_size:
            raise ConfigError(
                f"min_updates {self.min_updates} is above buffer_size {self.buffer_size}"
            )
        if self.max_staleness < 0 or not self.deadline_s > 0:
            raise ConfigError("max_staleness must be >= 0 and deadline_s positive")


@dataclass(frozen=True)
class TargetMetric:
    """Stop early once a round's example-weighted metric reaches ``value``."""

    name: str
    value: float
    mode: Literal["max", "min"] = "max"

    def reached(self, metrics: dict[str, float]) -> bool:
        """True if ``metrics`` has the metric at or beyond the target."""
        current = metrics.get(self.name)
        if current is None:
            return False
        return current >= self.value if self.mode == "max" else current <= self.value


@dataclass(frozen=True)
class SecurityPolicy:
    """Signing and device identity.

    Args:
        signer: the aggregator's key; signs every announcement, ack and status.
        devices: the device registry, client id to the public key its updates are
            signed with.  Only registered devices are known; an update counts only when
            its topic's client id and a valid signature by that client's key agree.
    """

    signer: SigningKey
    devices: Mapping[str, VerifyKey]


def selection_fits(
    max_agents: int, max_control_bytes: int = DEFAULT_LIMITS.max_control_bytes
) -> bool:
    """Whether an announcement selecting ``max_agents`` agents fits what agents accept."""
    return _ANNOUNCEMENT_BASE + max_agents * (MAX_ID_LENGTH + 3) <= max_control_bytes


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator needs besides the model and the strategy.

    Args:
        federation: federation id.
        aggregator_id: our MQTT client id (announced; signs blob chunks).
        rounds: rounds to run (failed rounds count).
        mode: ``sync`` rounds or ``async`` FedBuff.
        root: topic root.
        sync: synchronous round policy.
        buffer: asynchronous (FedBuff) policy.
        training: local training config announced to agents.
        codec: codec agents encode their deltas with.
        chunk_size: chunk size of our blobs and of the agents' uploads, bytes.
        target_metric: optional early stop.
        heartbeat_s: heartbeat assumed for statuses without one, seconds.
        missed_heartbeats: silent periods before an agent counts as gone.
        dropout_grace_s: seconds an agent that went offline may take to come back before
            a round stops waiting for it (a broker restart fires every last will).
        agents: allow list of agent ids (None: any agent that posts a status).
        settle_s: wait after (re)start before opening a round, for retained statuses.
        reconnect_settle_s: after our own reconnect, wait this long before judging
            dropouts and deadlines (agents are reconnecting too).
        max_pending_updates: updates in reassembly at once.
        pending_ttl_s: idle seconds before a partial update is dropped.
        dedupe_rounds: closed rounds whose update ids still get ``duplicate`` acks.
        max_agents: agents the roster tracks at most (statuses of more are ignored).
        resend_after_s: an update in reassembly idle this long gets a resend request.
        broker_queue: the broker's queue limit for our session (``max_queued_messages``);
            uploads are paced to fit it (:mod:`~fedmq.coordinator.pacing`). None: no pacing.
        security: signing key and device registry (None: unsigned, development only).
        screening: example-count cap and update-norm screen (``[screening]``).
        delivery: release standalone inference models for the devices to install
            (``[delivery]``, :mod:`~fedmq.coordinator.releases`); None: none.
    """

    federation: str
    aggregator_id: str
    rounds: int
    mode: Literal["sync", "async"] = "sync"
    root: str = DEFAULT_ROOT
    sync: SyncPolicy = field(default_factory=SyncPolicy)
    buffer: AsyncPolicy = field(default_factory=AsyncPolicy)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    codec: str = "raw"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    target_metric: TargetMetric | None = None
    heartbeat_s: float = DEFAULT_HEARTBEAT
    missed_heartbeats: int = MISSED_HEARTBEATS
    dropout_grace_s: float = DROPOUT_GRACE
    agents: frozenset[str] | None = None
    settle_s: float = DEFAULT_SETTLE
    reconnect_settle_s: float = DEFAULT_RECONNECT_SETTLE
    max_pending_updates: int = DEFAULT_MAX_PENDING
    pending_ttl_s: float = DEFAULT_TTL
    dedupe_rounds: int = DEFAULT_DEDUPE_ROUNDS
    max_agents: int = DEFAULT_MAX_AGENTS
    resend_after_s: float = DEFAULT_RESEND_AFTER
    broker_queue: int | None = None
    security: SecurityPolicy | None = None
    screening: ScreeningPolicy = field(default_factory=ScreeningPolicy)
    delivery: DeliveryPolicy | None = None

    @property
    def signer(self) -> SigningKey | None:
        """The key control messages are signed with (None: unsigned)."""
        return self.security.signer if self.security is not None else None

    def __post_init__(self) -> None:
        if self.max_agents < 1 or not selection_fits(self.max_agents):
            raise ConfigError(
                f"max_agents {self.max_agents} must be between 1 and the largest fleet whose "
                "selection fits an announcement agents accept (about 3600)"
            )
        validate_id(self.federation, "federation id")
        validate_id(self.aggregator_id, "aggregator client id")
        if self.rounds < 1:
            raise ConfigError(f"rounds {self.rounds} must be at least 1")
        if not self.heartbeat_s > 0 or self.missed_heartbeats < 1:
            raise ConfigError("heartbeat_s must be positive and missed_heartbeats >= 1")
        if self.dropout_grace_s < 0:
            raise ConfigError(f"dropout_grace_s {self.dropout_grace_s} must be >= 0")
        if self.settle_s < 0:
            raise ConfigError(f"settle_s {self.settle_s} must be >= 0")
        if self.reconnect_settle_s < 0:
            raise ConfigError(f"reconnect_settle_s {self.reconnect_settle_s} must be >= 0")
