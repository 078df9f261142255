"""``federation.toml``: the aggregator's configuration (pydantic-settings).

Values come from the TOML file, overridden by ``FEDMQ_*`` environment variables (nested
tables with ``__``: ``FEDMQ_ROUND__DEADLINE_S=120``, ``FEDMQ_BROKER__PASSWORD=…``).
Relative paths in the file are relative to the file.  Every field is documented in
``docs/aggregator.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from fedmq.aggregator.devices import DeviceRegistry
from fedmq.aggregator.retention import DEFAULT_KEEP_EVERY, DEFAULT_KEEP_LAST, CheckpointRetention
from fedmq.config_file import EnvFirstSettings, describe, read_toml, resolve_paths
from fedmq.coordinator.intake import DEFAULT_MAX_PENDING, DEFAULT_RESEND_AFTER, DEFAULT_TTL
from fedmq.coordinator.policy import (
    DEFAULT_DEADLINE,
    DEFAULT_DEDUPE_ROUNDS,
    DEFAULT_MAX_AGENTS,
    DEFAULT_RECONNECT_SETTLE,
    DEFAULT_SETTLE,
    AsyncPolicy,
    CoordinatorConfig,
    SecurityPolicy,
    SyncPolicy,
    TargetMetric,
)
from fedmq.coordinator.releases import DeliveryPolicy
from fedmq.coordinator.roster import DEFAULT_HEARTBEAT, DROPOUT_GRACE, MISSED_HEARTBEATS
from fedmq.coordinator.screening import (
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_MIN_HISTORY,
    DEFAULT_NORM_FACTOR,
    DEFAULT_NORM_WINDOW,
    ScreeningPolicy,
)
from fedmq.coordinator.selection import SelectAll, SelectFraction, Selection, SelectList
from fedmq.errors import ConfigError, LocalProtocolError
from fedmq.log_format import LogFormat
from fedmq.strategies.config import StrategyConfig, build_strategy
from fedmq.transport.blobs import check_chunk_fits, fit_chunk_size
from fedmq.transport.broker_config import TLS_FILE_KEYS, BrokerSection, BrokerUrl
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.wire.blobs import DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE
from fedmq.wire.control import CodecText
from fedmq.wire.ids import Identifier, TopicRoot
from fedmq.wire.signing import read_signing_key
from fedmq.wire.topics import DEFAULT_ROOT, Topics
from fedmq.wire.training import TrainingConfig

DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
STATUS_INTERVAL = 0.5  # seconds: coalesce status publishes during bursts of updates
SHUTDOWN_GRACE = 10.0  # seconds: finish storing and acking in-flight updates on SIGTERM


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerConfig(BrokerSection):
    """``[broker]``: where the broker is and who we are to it."""

    url: BrokerUrl = Field(DEFAULT_BROKER_URL, description="mqtt://host:port or mqtts://...")
    client_id: Identifier | None = Field(
        None, description="MQTT client id (default fedmq-aggregator-<federation>)"
    )
    max_queued_messages: int | None = Field(
        None,
        ge=1,
        description="the broker's queue limit for the aggregator's session (Mosquitto "
        "max_queued_messages): uploads are paced so a round fits it (broker_config/README.md)",
    )


class RoundSection(_Section):
    """``[round]``: synchronous round policy."""

    deadline_s: float = Field(DEFAULT_DEADLINE, gt=0)
    target_updates: int | None = Field(None, ge=1, description="None: every selected agent")
    min_updates: int = Field(1, ge=1, description="quorum at the deadline")
    extension_s: float | None = Field(None, gt=0, description="None: deadline_s")
    min_agents: int | None = Field(None, ge=1, description="online before a round opens")
    selection: Literal["all", "fraction", "list"] = "all"
    fraction: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    agents: list[Identifier] = Field(default_factory=list, description="selection = list")
    late_updates: Literal["drop", "fold"] = "drop"
    max_staleness: int = Field(1, ge=0)
    evaluate_every: int = Field(
        0, ge=0, description="rounds numbered by a multiple of this are evaluate-only (0: off)"
    )
    evaluate_final: bool = Field(
        False, description="the last round evaluates the final model on every device"
    )

    def selection_policy(self) -> Selection:
        """The selection rule."""
        if self.selection == "fraction":
            return SelectFraction(self.fraction, self.seed)
        if self.selection == "list":
            return SelectList(frozenset(self.agents))
        return SelectAll()


class FedBuffSection(_Section):
    """``[fedbuff]``: asynchronous mode (FedBuff)."""

    buffer_size: int = Field(10, ge=1, description="K: updates per new model version")
    max_staleness: int = Field(10, ge=0)
    deadline_s: float = Field(DEFAULT_DEADLINE, gt=0)
    min_updates: int = Field(1, ge=1)


class TargetMetricSection(_Section):
    """``[target_metric]``: stop once a round's weighted metric reaches a value."""

    name: str = Field(min_length=1, max_length=64)
    value: float = Field(allow_inf_nan=False)
    mode: Literal["max", "min"] = "max"


class RetentionSection(_Section):
    """``[retention]``: which per-round checkpoints the state directory keeps."""

    keep_last: int = Field(DEFAULT_KEEP_LAST, ge=0, description="newest kept (0: rule off)")
    keep_every: int = Field(
        DEFAULT_KEEP_EVERY, ge=0, description="rounds divisible by this are kept (0: rule off)"
    )

    def policy(self) -> CheckpointRetention:
        """The store's retention policy."""
        return CheckpointRetention(self.keep_last, self.keep_every)


class SecuritySection(_Section):
    """``[security]``: signed control messages and the device registry (see docs/deploy.md)."""

    signing_key: Path = Field(description="the aggregator's Ed25519 secret key (fedmq pki)")
    devices: Path = Field(description="device registry: a directory of <client id>.pub files")

    @model_validator(mode="after")
    def _files(self) -> SecuritySection:
        if not self.signing_key.is_file():
            raise ValueError(f"signing_key {str(self.signing_key)!r} is not a file")
        if not self.devices.is_dir():
            raise ValueError(f"devices {str(self.devices)!r} is not a directory")
        return self


class ScreeningSection(_Section):
    """``[screening]``: hostile-update defenses (see docs/aggregator.md)."""

    max_examples: int = Field(
        DEFAULT_MAX_EXAMPLES, ge=1, description="an update is weighted by at most this"
    )
    norm_mode: Literal["reject", "clip", "off"] = "reject"
    norm_factor: float = Field(DEFAULT_NORM_FACTOR, gt=1, allow_inf_nan=False)
    max_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    norm_window: int = Field(DEFAULT_NORM_WINDOW, ge=1)
    min_history: int = Field(DEFAULT_MIN_HISTORY, ge=1)

    def policy(self) -> ScreeningPolicy:
        """The coordinator's screening policy."""
        return ScreeningPolicy(
            max_examples=self.max_examples,
            norm_mode=self.norm_mode,
            norm_factor=self.norm_factor,
            max_norm=self.max_norm,
            norm_window=self.norm_window,
            min_history=self.min_history,
        )


class DeliverySection(_Section):
    """``[delivery]``: inference models for the devices to install (see docs/aggregator.md)."""

    publish_models: bool = Field(
        True,
        description="build each checkpoint's standalone ONNX model and announce it (latest, "
        "best) as a retained blob; false keeps the announcement readable by older agents",
    )
    best_metric: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="federated evaluation metric the best model is chosen by (None: the "
        "highest eval_accuracy, else the lowest eval_loss)",
    )
    best_mode: Literal["max", "min"] = Field("max", description="max or min of best_metric")

    def policy(self) -> DeliveryPolicy | None:
        """The coordinator's delivery policy (None: no models published)."""
        if not self.publish_models:
            return None
        return DeliveryPolicy(self.best_metric, self.best_mode)


class AggregatorSettings(EnvFirstSettings):
    """Everything ``fedmq serve`` needs; see ``docs/aggregator.md``."""

    model_config = SettingsConfigDict(
        env_prefix="FEDMQ_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    federation: Identifier
    bundle: Path = Field(description="model bundle directory (fedmq compile output)")
    state_dir: Path = Field(description="where checkpoints, updates and records live")
    rounds: int = Field(ge=1)
    initial: str | None = Field(
        None,
        min_length=1,
        description="warm start: the round-0 model of a new state_dir from an exported "
        ".onnx, a checkpoint .params file, or a state directory (dir@round: that round)",
    )
    mode: Literal["sync", "async"] = "sync"
    topic_root: TopicRoot = DEFAULT_ROOT
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    round: RoundSection = Field(default_factory=RoundSection)
    fedbuff: FedBuffSection = Field(default_factory=FedBuffSection)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    codec: CodecText = "raw"
    # Upper bound: a chunk message must fit DecodeLimits.max_message_bytes (4 MiB) with its header.
    chunk_size: Annotated[int, Field(ge=MIN_CHUNK_SIZE, le=2 * 1024 * 1024)] | Literal["auto"] = (
        Field("auto", description="bytes per chunk, or auto: the most that fits the broker")
    )
    target_metric: TargetMetricSection | None = None
    retention: RetentionSection = Field(default_factory=RetentionSection)
    security: SecuritySection | None = Field(
        None, description="None: unsigned, for development brokers only"
    )
    screening: ScreeningSection = Field(default_factory=ScreeningSection)
    delivery: DeliverySection = Field(default_factory=DeliverySection)
    agents: list[Identifier] | None = Field(None, description="allow list (None: any)")
    max_agents: int = Field(DEFAULT_MAX_AGENTS, ge=1, description="agents tracked at most")
    heartbeat_s: float = Field(DEFAULT_HEARTBEAT, gt=0)
    missed_heartbeats: int = Field(MISSED_HEARTBEATS, ge=1)
    dropout_grace_s: float = Field(DROPOUT_GRACE, ge=0)
    settle_s: float = Field(DEFAULT_SETTLE, ge=0)
    reconnect_settle_s: float = Field(DEFAULT_RECONNECT_SETTLE, ge=0)
    max_pending_updates: int = Field(DEFAULT_MAX_PENDING, ge=1)
    pending_ttl_s: float = Field(DEFAULT_TTL, gt=0)
    resend_after_s: float = Field(
        DEFAULT_RESEND_AFTER, gt=0, description="idle seconds before missing chunks are asked for"
    )
    dedupe_rounds: int = Field(DEFAULT_DEDUPE_ROUNDS, ge=1)
    status_interval_s: float = Field(STATUS_INTERVAL, gt=0)
    shutdown_grace_s: float = Field(SHUTDOWN_GRACE, ge=0)
    exit_when_finished: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: LogFormat = Field("text", description="text, or json: one object per line")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="serve Prometheus metrics here (None: off; 0: any)"
    )
    metrics_address: str = Field("0.0.0.0", min_length=1, description="metrics bind address")

    @property
    def client_id(self) -> str:
        """Our MQTT client id: configured, or ``fedmq-aggregator-<federation>``."""
        return self.broker.client_id or f"fedmq-aggregator-{self.federation}"

    def initial_chunk_size(self) -> int:
        """The chunk size before the broker stated its packet cap (if it ever does).

        ``auto``: 256 KiB, or the most that fits ``[broker] max_packet_size``.

        Raises:
            ConfigError: an explicit ``chunk_size`` does not fit ``[broker] max_packet_size``.
        """
        topics = Topics(self.federation, self.topic_root)
        cap = self.broker.max_packet_size
        if self.chunk_size == "auto":
            return fit_chunk_size(DEFAULT_CHUNK_SIZE, cap, topics)
        check_chunk_fits(self.chunk_size, cap, topics, "[broker] max_packet_size")
        return self.chunk_size

    def broker_settings(self) -> BrokerSettings:
        """Settings of the MQTT session."""
        return self.broker.session_settings(self.client_id)

    def coordinator_config(self) -> CoordinatorConfig:
        """The state machine's view of this configuration.

        Raises:
            ConfigError: the combination is inconsistent (e.g. target below quorum).
        """
        r = self.round
        target = self.target_metric
        security = None
        if self.security is not None:
            security = SecurityPolicy(
                signer=read_signing_key(self.security.signing_key),
                devices=DeviceRegistry(self.security.devices).load(),
            )
        return CoordinatorConfig(
            federation=self.federation,
            aggregator_id=self.client_id,
            rounds=self.rounds,
            mode=self.mode,
            root=self.topic_root,
            sync=SyncPolicy(
                deadline_s=r.deadline_s,
                target_updates=r.target_updates,
                min_updates=r.min_updates,
                extension_s=r.extension_s,
                selection=r.selection_policy(),
                min_agents=r.min_agents,
                late_updates=r.late_updates,
                max_staleness=r.max_staleness,
                evaluate_every=r.evaluate_every,
                evaluate_final=r.evaluate_final,
            ),
            buffer=AsyncPolicy(
                buffer_size=self.fedbuff.buffer_size,
                max_staleness=self.fedbuff.max_staleness,
                deadline_s=self.fedbuff.deadline_s,
                min_updates=self.fedbuff.min_updates,
            ),
            training=self.training,
            codec=self.codec,
            chunk_size=self.initial_chunk_size(),
            target_metric=(
                TargetMetric(target.name, target.value, target.mode) if target else None
            ),
            heartbeat_s=self.heartbeat_s,
            missed_heartbeats=self.missed_heartbeats,
            dropout_grace_s=self.dropout_grace_s,
            agents=frozenset(self.agents) if self.agents is not None else None,
            settle_s=self.settle_s,
            reconnect_settle_s=self.reconnect_settle_s,
            max_pending_updates=self.max_pending_updates,
            pending_ttl_s=self.pending_ttl_s,
            dedupe_rounds=self.dedupe_rounds,
            max_agents=self.max_agents,
            resend_after_s=self.resend_after_s,
            broker_queue=self.broker.max_queued_messages,
            security=security,
            screening=self.screening.policy(),
            delivery=self.delivery.policy(),
        )


def _check_quorum_fits_strategy(settings: AggregatorSettings) -> None:
    strategy = settings.strategy
    if strategy.name != "krum":
        return
    smallest = (
        settings.fedbuff.min_updates if settings.mode == "async" else settings.round.min_updates
    )
    needed = strategy.byzantine + 3
    if smallest < needed:
        section = "fedbuff" if settings.mode == "async" else "round"
        raise ConfigError(
            f"Krum with byzantine = {strategy.byzantine} needs at least {needed} updates per "
            f"round: set [{section}] min_updates >= {needed}"
        )


def _check_evaluation_mode(settings: AggregatorSettings) -> None:
    r = settings.round
    if settings.mode == "async" and (r.evaluate_every or r.evaluate_final):
        raise ConfigError(
            "[round] evaluate_every and evaluate_final need mode = sync: FedBuff versions "
            "always train (their agents still evaluate every global model they receive)"
        )


def load_settings(path: Path | None, **overrides: Any) -> AggregatorSettings:
    """Read ``federation.toml`` (if given), apply ``FEDMQ_*`` variables, validate.

    Args:
        path: the TOML file, or None to configure from the environment alone.
        **overrides: values taking the place of the file's (tests).

    Raises:
        ConfigError: the file is missing or not TOML, or a value is invalid; the
            message names the offending keys.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_toml(path, "config file")
        base = path.resolve().parent
        resolve_paths(base, data, ("bundle", "state_dir", "initial"))
        resolve_paths(base, data.get("broker"), TLS_FILE_KEYS)
        resolve_paths(base, data.get("security"), ("signing_key", "devices"))
    data.update(overrides)
    where = f" in {path}" if path is not None else ""
    try:
        settings = AggregatorSettings(**data)
        settings.coordinator_config()  # cross-field checks (quorum vs target, ...)
        build_strategy(settings.strategy)  # e.g. DP noise without a clip norm
        _check_quorum_fits_strategy(settings)
        _check_evaluation_mode(settings)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration{where}:\n{describe(exc)}") from exc
    except (ConfigError, LocalProtocolError) as exc:
        raise ConfigError(f"invalid configuration{where}: {exc}") from exc
    return settings
