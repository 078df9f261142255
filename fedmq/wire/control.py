"""Control messages: JSON, versioned, each with a JSON schema (:func:`control_schemas`).

Round announcements, acks and statuses are JSON so operators can read them with
``mosquitto_sub`` or MQTT Explorer.  Each carries ``v`` (format version) and ``type``.
Decoding is strict: unknown fields, wrong types and oversized payloads are rejected
with a :class:`~fedmq.errors.DecodeError` naming the problem.

Messages an agent acts on carry the aggregator's Ed25519 ``signature``
(:mod:`fedmq.wire.signing`): :func:`encode_control` signs when given a key, and
:func:`decode_control` verifies before it validates when given trusted keys.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from fedmq.buffers import Buffer
from fedmq.errors import (
    LimitExceededError,
    LocalProtocolError,
    MalformedMessageError,
    UnsupportedVersionError,
)
from fedmq.wire.blobs import BlobRef
from fedmq.wire.ids import Identifier
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits
from fedmq.wire.signing import (
    SIGNATURE_FIELD,
    SigningKey,
    TrustedKeys,
    control_signature,
    verify_control,
)
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.topics import MAX_ROUND
from fedmq.wire.training import TrainingConfig

CONTROL_VERSION = 1


def _codec(value: str) -> str:
    CodecSpec.parse(value)  # raises UnsupportedCodecError (a ValueError) when unknown
    return value


RoundNumber = Annotated[int, Field(ge=0, lt=MAX_ROUND)]
Timestamp = Annotated[float, Field(ge=0, allow_inf_nan=False)]
CodecText = Annotated[str, AfterValidator(_codec)]


class ControlMessage(BaseModel):
    """Base of every JSON control message."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str]

    v: Literal[1] = 1
    signature: str | None = Field(
        None, max_length=256, description="ed25519:<key id>:<base64>, see fedmq.wire.signing"
    )


RoundPhase = Literal["waiting", "collecting", "finished"]
"""The round lifecycle's one vocabulary (legal moves: ``fedmq.coordinator.lifecycle``).

``waiting`` for enough agents to open the round, ``collecting`` updates, ``finished``
after the last round.  The aggregator status uses it as is; the announcement says
``open`` for ``collecting`` (what an agent acts on), the one mapping, kept in
``fedmq.coordinator.lifecycle.ANNOUNCED``.
"""

AnnouncedStatus = Literal["open", "waiting", "finished"]

RoundTask = Literal["train", "evaluate"]
"""What a round asks of its agents: ``train`` (the default) or ``evaluate`` the global model."""


class ModelRelease(BaseModel):
    """One global model released for local inference, in ``RoundAnnouncement.models``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: RoundNumber = Field(
        description="the round after which the model was saved (0: the initial model)"
    )
    model: BlobRef = Field(
        description="the standalone ONNX inference model, what `fedmq export` writes"
    )
    metrics: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict,
        max_length=64,
        description="the federated evaluation of this checkpoint (example-weighted), if any",
    )


class ModelReleases(BaseModel):
    """The inference models an aggregator releases: the newest, and the best evaluated."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latest: ModelRelease | None = Field(None, description="the newest global model")
    best: ModelRelease | None = Field(
        None, description="the best by federated evaluation (None: nothing evaluated yet)"
    )


class RoundAnnouncement(ControlMessage):
    """The current round of a federation, retained on ``…/round``.

    ``status`` is ``open`` while updates are collected, ``waiting`` while the round
    waits for enough agents to come online (it addresses nobody yet), and ``finished``
    once the federation has run its last round (agents then go idle).  ``issued_at``
    orders announcements: a signed announcement older than the newest one an agent has
    seen is a replay.
    """

    TYPE: ClassVar[str] = "round"
    type: Literal["round"] = "round"
    federation: Identifier
    aggregator: Identifier
    round: RoundNumber
    status: AnnouncedStatus = "open"
    mode: Literal["sync", "async"] = "sync"
    task: RoundTask = Field(
        "train",
        description="train: train and send a delta; evaluate: evaluate the global model "
        "only and send a report (an update without tensors); the model does not change",
    )
    issued_at: Timestamp
    deadline: Timestamp = Field(description="unix time after which updates may be dropped")
    bundle: BlobRef = Field(description="model bundle archive (train step, model, manifest)")
    params: BlobRef = Field(description="global parameters (tensor set) to start from")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    codec: CodecText = Field("raw", description="codec agents encode their delta with")
    chunk_size: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024)
    upload_slots: int | None = Field(
        None,
        ge=1,
        description="paced uploads: send chunk 0 only, the rest when asked (a resend "
        "request); at most this many agents upload at once. None: send everything",
    )
    selected: list[Identifier] | None = Field(
        None, description="agents asked to train; None = any agent may contribute"
    )
    models: ModelReleases | None = Field(
        None,
        description="inference models agents may install (absent when the aggregator "
        "publishes none: agents older than the field refuse announcements carrying it)",
    )

    # Fields added within version 1, and the value that means "not used".  They are left
    # out rather than sent at that value: agents that predate a field refuse any
    # announcement carrying it (unknown fields are errors), so an aggregator that uses
    # none of them stays readable by them.  Dumps of a decoded announcement then
    # reproduce the signed document.
    _OMITTED_WHEN: ClassVar[dict[str, object]] = {
        "task": "train",
        "upload_slots": None,
        "models": None,
    }

    @model_serializer(mode="wrap")
    def _omit_unused_additions(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name, unused in self._OMITTED_WHEN.items():
                if name in data and data[name] == unused:
                    del data[name]
        return data

    def addresses(self, client: str) -> bool:
        """True if ``client`` is asked to train in this round."""
        return self.status == "open" and (self.selected is None or client in self.selected)


AckReason = Literal[
    "accepted",
    "duplicate",
    "unknown_client",
    "not_selected",
    "wrong_federation",
    "stale_round",
    "future_round",
    "round_closed",
    "malformed",
    "wrong_shape",
    "non_finite",
    "too_large",
    "integrity",
    "outlier",
]


class Ack(ControlMessage):
    """The aggregator's verdict on one update, sent to ``…/ack/<client>``."""

    TYPE: ClassVar[str] = "ack"
    type: Literal["ack"] = "ack"
    federation: Identifier
    client: Identifier
    round: RoundNumber
    update_id: Identifier
    accepted: bool
    reason: AckReason
    detail: str = Field("", max_length=1024)
    ts: Timestamp


MAX_RESEND_INDICES = 4096  # chunk indices one resend request names; more: the next asks


class ResendRequest(ControlMessage):
    """The aggregator asks an agent for chunks of an update it is still missing.

    Sent on ``…/ack/<client>`` (signed, like acks) when an update in reassembly has had
    no chunk for a while: the broker may have dropped some (queues overflow silently).
    The agent re-sends only ``missing``, if it holds the update.
    """

    TYPE: ClassVar[str] = "resend"
    type: Literal["resend"] = "resend"
    federation: Identifier
    client: Identifier
    round: RoundNumber
    update_id: Identifier
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the update blob being sent")
    chunk_size: int = Field(ge=1024, description="the chunking the indices refer to")
    missing: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=MAX_RESEND_INDICES)
    ts: Timestamp


AgentState = Literal[
    "online", "idle", "downloading", "training", "uploading", "declined", "offline"
]

DeclineReason = Literal[
    "data_error",  # the local data is missing, malformed or does not fit the model
    "bundle_incompatible",  # the bundle cannot run here (corrupt, unknown format, runtime)
    "out_of_time",  # training would exceed limits.max_train_seconds
    "out_of_memory",
    "disk_full",
    "training_failed",  # anything else that stopped this round on this device
    "stopping",  # the agent shut down during the round
]


class AgentStatus(ControlMessage):
    """An agent's retained status on ``…/status/<client>``; its last will says offline."""

    TYPE: ClassVar[str] = "agent_status"
    type: Literal["agent_status"] = "agent_status"
    client: Identifier
    state: AgentState
    round: RoundNumber | None = None
    progress: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    bundle: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    versions: dict[str, str] = Field(default_factory=dict, max_length=32)
    last_error: str | None = Field(None, max_length=2048)
    heartbeat_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    declined: DeclineReason | None = Field(
        None, description="why the agent cannot take part in ``round`` (it will not send)"
    )
    ts: Timestamp


AggregatorState = Literal["waiting", "collecting", "finished", "offline"]
"""A round phase, or ``offline`` (the last will, or a clean shutdown)."""

MAX_MISSING_LISTED = 50
"""Ids ``AggregatorStatus.missing`` names at most (``missing_count`` has them all)."""
MAX_RECENT_REJECTIONS = 10
"""Rejections ``AggregatorStatus.recent_rejections`` keeps (the newest)."""
Bytes = Annotated[int, Field(ge=0)]


class _Part(BaseModel):
    """A nested object of a control message: as strict as the message."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RoundSummary(_Part):
    """How the last round ended, in ``AggregatorStatus.last_round``."""

    round: RoundNumber
    outcome: Literal["closed", "failed"]
    reason: str = Field(max_length=128, description="target, deadline, no_quorum, …")
    duration_s: float = Field(ge=0, allow_inf_nan=False, description="opened to closed")
    updates: int = Field(0, ge=0, description="updates folded into the round")
    rejected: int = Field(0, ge=0, description="rejections, every reason")
    bytes_in: Bytes = Field(0, description="update chunk bytes received during the round")
    bytes_out: Bytes = Field(0, description="blob and control bytes published during it")


class FederatedEvaluation(_Part):
    """The newest federated evaluation, in ``AggregatorStatus.evaluation``.

    The agents of round ``round`` evaluated the global model they received (checkpoint
    ``checkpoint`` = ``round`` - 1) on their local evaluation data before training (or,
    in an evaluate-only round, instead of training).
    """

    round: RoundNumber
    checkpoint: RoundNumber = Field(description="the global model evaluated")
    task: RoundTask | None = Field(None, description="the round's (None: after a restart)")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        max_length=64,
        description="example-weighted over the devices: eval_loss, eval_accuracy, …",
    )
    devices: int | None = Field(None, ge=0, description="devices that evaluated it")
    examples: int | None = Field(None, ge=0, description="their evaluation examples")


class RecentRejection(_Part):
    """One refused update or chunk, in ``AggregatorStatus.recent_rejections``."""

    client: Identifier
    round: RoundNumber
    reason: str = Field(max_length=64)
    detail: str = Field("", max_length=200)


class AggregatorStatus(ControlMessage):
    """The aggregator's retained status on ``…/aggregator/status``.

    What an operator needs without the state directory: the round and its phase,
    deadline, received/expected, rejections per reason (and the newest few), which
    selected agents have not answered yet, the current round's traffic and how the last
    round ended.  Every field after ``ts`` was added within version 1 and has a default,
    so statuses of older aggregators still decode.
    """

    TYPE: ClassVar[str] = "aggregator_status"
    type: Literal["aggregator_status"] = "aggregator_status"
    aggregator: Identifier
    state: AggregatorState
    round: RoundNumber | None = None
    deadline: Timestamp | None = None
    received: int = Field(0, ge=0)
    expected: int = Field(0, ge=0)
    rejected: dict[str, int] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(
        default_factory=dict, description="the last closed round's example-weighted metrics"
    )
    ts: Timestamp
    rounds: int | None = Field(None, ge=1, description="rounds the federation runs")
    opened_at: Timestamp | None = Field(None, description="when the collecting round opened")
    missing: list[Identifier] = Field(
        default_factory=list,
        max_length=MAX_MISSING_LISTED,
        description="selected agents that have not answered yet (the first ones, sorted)",
    )
    missing_count: int = Field(0, ge=0, description="how many selected agents have not answered")
    bytes_in: Bytes = Field(0, description="update chunk bytes received in this round so far")
    bytes_out: Bytes = Field(0, description="blob and control bytes published in this round")
    last_round: RoundSummary | None = None
    recent_rejections: list[RecentRejection] = Field(
        default_factory=list, max_length=MAX_RECENT_REJECTIONS
    )
    task: RoundTask = Field("train", description="what the current round asks of its agents")
    evaluation: FederatedEvaluation | None = Field(
        None, description="the newest federated evaluation of a global model"
    )


M = TypeVar("M", bound=ControlMessage)


def encode_control(message: ControlMessage, signer: SigningKey | None = None) -> bytes:
    """Serialise a control message to compact UTF-8 JSON, signed by ``signer`` if given."""
    data = message.model_dump(mode="json")
    if signer is not None:
        data[SIGNATURE_FIELD] = control_signature(data, signer)
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise LocalProtocolError(f"cannot encode {message.TYPE}: {exc}") from exc


def control_type(data: Buffer) -> str | None:
    """The ``type`` of a JSON control message, without validating it (None: unreadable).

    For topics that carry more than one kind (an agent's ack topic: acks and resend
    requests); :func:`decode_control` then checks the message properly.
    """
    view = memoryview(data).cast("B")
    if len(view) > DEFAULT_LIMITS.max_control_bytes:
        return None
    try:
        document = json.loads(bytes(view), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    kind = document.get("type") if isinstance(document, dict) else None
    return kind if isinstance(kind, str) else None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def decode_control(
    data: Buffer,
    kind: type[M],
    limits: DecodeLimits = DEFAULT_LIMITS,
    trusted: TrustedKeys | None = None,
) -> M:
    """Parse a control message of type ``kind``; with ``trusted``, verify its signature.

    Raises:
        LimitExceededError: the payload is larger than ``limits.max_control_bytes``.
        UnsupportedVersionError: ``v`` is not a version this fedmq understands.
        MalformedMessageError: not JSON, the wrong ``type``, or a field fails validation.
        SignatureError: (``trusted`` given) unsigned, signed by an untrusted key, or
            altered; checked before the fields are validated.
    """
    view = memoryview(data).cast("B")
    if len(view) > limits.max_control_bytes:
        raise LimitExceededError(f"{kind.TYPE} message size", len(view), limits.max_control_bytes)
    try:
        document: Any = json.loads(bytes(view), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MalformedMessageError(f"{kind.TYPE} message is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MalformedMessageError(f"{kind.TYPE} message must be a JSON object")
    version = document.get("v")
    if version != CONTROL_VERSION:
        raise UnsupportedVersionError(
            f"{kind.TYPE} message has version {version!r}; this fedmq speaks {CONTROL_VERSION}"
        )
    if document.get("type") != kind.TYPE:
        raise MalformedMessageError(
            f"expected a {kind.TYPE!r} message, got type {document.get('type')!r}"
        )
    if trusted is not None:
        verify_control(document, trusted)
    try:
        return kind.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '<root>'}: {error['msg']}"
            for error in exc.errors(include_url=False)[:5]
        )
        raise MalformedMessageError(f"invalid {kind.TYPE} message: {problems}") from exc


def control_schemas() -> dict[str, dict[str, Any]]:
    """JSON schemas of every control message, keyed by message type."""
    kinds: list[type[ControlMessage]] = [
        RoundAnnouncement,
        Ack,
        ResendRequest,
        AgentStatus,
        AggregatorStatus,
    ]
    return {kind.TYPE: kind.model_json_schema() for kind in kinds}
