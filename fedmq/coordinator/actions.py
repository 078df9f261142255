"""What the coordinator returns: commands to execute and events to report, in order.

The coordinator never performs IO.  Every input method returns a list of actions; the
service executes them in list order (so "save the checkpoint, then the state, then
announce" is expressed by position) and reports back the results the coordinator
needs (:meth:`~fedmq.coordinator.coordinator.Coordinator.verified`,
:meth:`~fedmq.coordinator.coordinator.Coordinator.persisted`).

Two kinds, told apart by their names:

- **commands** (imperative: ``Publish``, ``SaveState`` …) the service must carry out.
  The :data:`DurableCommand` ones carry the durability contract: they are on disk
  before any later action runs, and a failure stops the service.
- **events** (past tense: ``RoundClosed``, ``UpdateRejected`` …) only report what
  happened, for logs, counters and status; skipping one loses no state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fedmq.coordinator.records import RoundRecord
from fedmq.coordinator.validation import UpdateKey, VerifiedUpdate
from fedmq.wire.blobs import BlobAssembler, BlobRef


@dataclass(frozen=True)
class Publish:
    """Publish one MQTT message (control JSON: announcement, ack, status)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class PublishBlob:
    """Publish a blob as retained chunks; must complete before later actions run.

    ``indices`` limits it to some chunks (a repair); None publishes every chunk.
    """

    ref: BlobRef
    data: bytes = field(repr=False)
    round: int
    indices: frozenset[int] | None = None


@dataclass(frozen=True)
class ClearBlob:
    """Delete a blob's retained chunks: no announcement references it any more.

    ``first`` > 0 clears only the chunks from that index on (the surplus of an old,
    finer chunking of a blob that is published again).
    """

    ref: BlobRef
    first: int = 0


@dataclass(frozen=True)
class ArmTimer:
    """Call ``on_timer`` at unix time ``at`` (None: no timer needed)."""

    at: float | None


@dataclass(frozen=True)
class VerifyUpdate:
    """Check and decode a reassembled update (CPU work: run it off the event loop).

    Pass the result of :func:`~fedmq.coordinator.validation.verify_assembled` to
    ``Coordinator.verified``.
    """

    key: UpdateKey
    assembler: BlobAssembler = field(repr=False)


@dataclass(frozen=True)
class Ticket:
    """An update the coordinator will accept once it is durable.

    Args:
        seq: acceptance sequence number (persist and replay in this order).
        fold_round: the round whose aggregate the update joins.
        update: the verified update.
        weight: FedAvg weight (counted examples x staleness discount).
        staleness: rounds between the update's base model and ``fold_round``.
    """

    seq: int
    fold_round: int
    update: VerifiedUpdate = field(repr=False)
    weight: float
    staleness: int

    @property
    def key(self) -> UpdateKey:
        """Which update this ticket is for."""
        return self.update.key


@dataclass(frozen=True)
class PersistUpdate:
    """Write the update durably (fsync, atomic rename), then call ``Coordinator.persisted``.

    Tickets must be persisted and reported in ``seq`` order; on failure call
    ``Coordinator.persist_failed`` (the update is then not acked, and the agent re-sends).
    """

    ticket: Ticket


@dataclass(frozen=True)
class SaveCheckpoint:
    """Durably store the global model after ``round`` (0: the initial model).

    ``params`` is the same tensor-set blob the agents download; ``optimizer`` holds the
    server optimizer state as a tensor set.
    """

    round: int
    params: bytes = field(repr=False)
    optimizer: bytes = field(repr=False)


@dataclass(frozen=True)
class BuildInferenceModel:
    """Build the standalone inference model of ``params`` (what ``fedmq export`` writes).

    CPU work that needs the server's ``onnx`` package: run it off the event loop, store
    the model in the state directory, then pass its bytes to
    ``Coordinator.set_inference_model`` (on failure ``Coordinator.inference_model_failed``).
    A build may be skipped when a newer one is waiting (the newer one supersedes it).
    """

    checkpoint: int
    bundle: bytes = field(repr=False)  # the bundle archive (its model.onnx and manifest)
    params: bytes = field(repr=False)  # the checkpoint's tensor-set blob


@dataclass(frozen=True)
class SaveRecord:
    """Durably store the record of a closed (or failed) round."""

    record: RoundRecord


@dataclass(frozen=True)
class SaveState:
    """Atomically replace the coordinator snapshot (the commit point of round changes)."""

    snapshot: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class PruneUpdates:
    """Delete the stored updates of rounds before ``before``: they live in a checkpoint now."""

    before: int


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True)
class UpdateRejected:
    """An update or chunk was rejected (for logs and counters; any ack is a separate action)."""

    client: str
    round: int
    update_id: str | None
    reason: str
    detail: str


@dataclass(frozen=True)
class Noted:
    """Something worth a log line that is neither a rejection nor a round change."""

    level: Literal["info", "warning"]
    message: str


@dataclass(frozen=True)
class StatusChanged:
    """The aggregator status changed; publish ``Coordinator.status()`` (services may coalesce)."""


@dataclass(frozen=True)
class RoundClosed:
    """A round ended: ``closed`` with a new model, or ``failed`` below quorum."""

    round: int
    outcome: Literal["closed", "failed"]
    reason: str


@dataclass(frozen=True)
class FederationFinished:
    """The federation has run its last round; the service may exit."""

    reason: str


DurableCommand = SaveState | SaveCheckpoint | SaveRecord | PruneUpdates
"""Written to the state directory before the next action runs (``PersistUpdate`` is
durable too, but batched: the coordinator waits for ``persisted`` before relying on it)."""

Command = (
    Publish
    | PublishBlob
    | ClearBlob
    | ArmTimer
    | VerifyUpdate
    | PersistUpdate
    | BuildInferenceModel
    | DurableCommand
)
Event = UpdateRejected | Noted | StatusChanged | RoundClosed | FederationFinished
Action = Command | Event
