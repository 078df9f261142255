"""Agent configuration: a TOML file overridden by ``FEDMQ_AGENT_`` environment variables.

Environment variables beat the file so a systemd unit (``Environment=``, credentials)
can override one setting without editing it; nested fields use ``__``, e.g.
``FEDMQ_AGENT_BROKER__PASSWORD``.  Every error becomes a :class:`~fedmq.errors.ConfigError`
naming the file and the field, which the CLI turns into its configuration exit code.
See ``docs/agent.md`` for the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from fedmq.config_file import EnvFirstSettings, describe, read_toml, resolve_paths
from fedmq.errors import ConfigError
from fedmq.log_format import LogFormat
from fedmq.transport.broker_config import TLS_FILE_KEYS, BrokerSection
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.wire.ids import Identifier, TopicRoot
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits, MiB
from fedmq.wire.signing import SigningKey, TrustedKeys, read_signing_key, read_verify_key

ENV_PREFIX = "FEDMQ_AGENT_"
DEFAULT_STATE_DIR = Path("/var/lib/fedmq-agent")
DEFAULT_HEARTBEAT = 10.0  # seconds: the aggregator declares an agent gone after ~3 missed
DEFAULT_MAX_BLOB_MB = 256  # MiB: a bundle or parameter set; matches the wire default
DEFAULT_CACHE_MAX_MB = 512  # MiB: keeps the current and previous model of a few federations
DEFAULT_DOWNLOAD_TIMEOUT = 600.0  # seconds: 20 MB over a slow plant network, with margin
DEFAULT_MAX_TRAIN_SECONDS = 3600.0  # seconds: a round that trains longer is abandoned
# seconds: ceiling of the first wait after a failed round (the wait is jittered between
# half and all of it, so a plant of devices does not retry in lockstep); doubles up to 10 min
DEFAULT_ROUND_RETRY = 10.0
DEFAULT_ACK_TIMEOUT = 60.0  # seconds: re-send an unacknowledged update after this long
# MiB a download must leave free on the state directory's file system: room for the
# outbox, the residual and the logs of the plant software sharing the disk.
DEFAULT_MIN_FREE_MB = 32
DEFAULT_OUTBOX_MAX_AGE = 24 * 3600.0  # seconds: the broker's session expiry; older is moot
MAX_THREADS = 256


def _entry_point(value: str | None) -> str | None:
    if value is None:
        return None
    module, sep, function = value.partition(":")
    names = [*module.split("."), *function.split(".")]
    if not sep or not all(name.isidentifier() for name in names):
        raise ValueError(f"entry point {value!r} must look like 'package.module:function'")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """``[data]``: where local training data comes from (see docs/agent.md, "Data layout")."""

    path: Path | None = Field(None, description="directory of .npz or .csv files")
    entry_point: Annotated[str | None, AfterValidator(_entry_point)] = Field(
        None, description="'module:function' returning arrays, instead of path"
    )
    module_path: Path | None = Field(None, description="directory prepended to sys.path")
    options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for entry_point"
    )
    format: Literal["auto", "npz", "csv"] = "auto"
    target: Literal["label", "input"] = Field(
        "label", description="'input' for autoencoders: the label is the input itself"
    )
    x_key: str = Field("x", min_length=1, description="array name of the inputs in .npz files")
    y_key: str = Field("y", min_length=1, description="array name of the labels in .npz files")
    label_column: str = Field("label", min_length=1, description="CSV column holding the label")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="held out when no eval/ dir")
    seed: int = Field(0, description="seed of the evaluation split")
    max_examples: int | None = Field(None, ge=1, description="use at most this many examples")

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.path is None) == (self.entry_point is None):
            raise ValueError("set exactly one of data.path and data.entry_point")
        if self.path is not None and not self.path.is_dir():
            raise ValueError(f"data.path {str(self.path)!r} is not a directory")
        if self.module_path is not None and not self.module_path.is_dir():
            raise ValueError(f"data.module_path {str(self.module_path)!r} is not a directory")
        return self


class LimitsConfig(_Section):
    """``[limits]``: resources one round may take."""

    max_blob_mb: int = Field(DEFAULT_MAX_BLOB_MB, ge=1, le=4096)
    cache_max_mb: int = Field(DEFAULT_CACHE_MAX_MB, ge=1)
    download_timeout_s: float = Field(DEFAULT_DOWNLOAD_TIMEOUT, gt=0)
    max_train_seconds: float = Field(DEFAULT_MAX_TRAIN_SECONDS, gt=0)
    round_retry_s: float = Field(
        DEFAULT_ROUND_RETRY, gt=0, description="first retry delay (ceiling; jittered)"
    )
    min_free_mb: int = Field(
        DEFAULT_MIN_FREE_MB, ge=0, description="free space a download must leave (MiB)"
    )

    def decode_limits(self) -> DecodeLimits:
        """Wire decode limits with this agent's blob size cap."""
        size = self.max_blob_mb * MiB
        return DecodeLimits(
            max_blob_bytes=size,
            max_decoded_bytes=size,
            max_chunks=DEFAULT_LIMITS.max_chunks,
        )


class OutboxConfig(_Section):
    """``[outbox]``: how long an unacknowledged update is kept and re-sent."""

    ack_timeout_s: float = Field(DEFAULT_ACK_TIMEOUT, gt=0)
    max_age_s: float = Field(DEFAULT_OUTBOX_MAX_AGE, gt=0)


class MetricsConfig(_Section):
    """``[metrics]``: a Prometheus node_exporter textfile, rewritten after every round."""

    textfile: Path | None = Field(
        None,
        description="e.g. /var/lib/node_exporter/textfile_collector/fedmq_agent.prom (None: off)",
    )

    @model_validator(mode="after")
    def _prom(self) -> MetricsConfig:
        if self.textfile is not None and self.textfile.suffix != ".prom":
            raise ValueError(
                f"metrics.textfile {str(self.textfile)!r} must end in .prom "
                "(node_exporter reads only those)"
            )
        return self


class SecurityConfig(_Section):
    """``[security]``: the aggregator's pinned key and this device's signing key.

    Without this table the agent obeys unsigned control messages: development brokers
    only (the agent logs a warning at start).
    """

    aggregator_keys: list[Path] = Field(
        min_length=1,
        max_length=8,
        description="the aggregator's public signing keys (two while rotating)",
    )
    signing_key: Path = Field(description="this device's Ed25519 secret key (update signing)")

    @model_validator(mode="after")
    def _files(self) -> SecurityConfig:
        for path in [*self.aggregator_keys, self.signing_key]:
            if not path.is_file():
                raise ValueError(f"{str(path)!r} does not exist or is not a file")
        return self

    def trusted_keys(self) -> TrustedKeys:
        """The pinned aggregator keys.

        Raises:
            ConfigError: a key file is unreadable or not a public key.
        """
        return TrustedKeys(read_verify_key(path) for path in self.aggregator_keys)

    def device_key(self) -> SigningKey:
        """This device's signing key.

        Raises:
            ConfigError: the file is unreadable or not a secret key.
        """
        return read_signing_key(self.signing_key)


DEFAULT_HOOK_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_HOOK_TIMEOUT = 30.0  # seconds a hook command may run before it is killed


def _hook_topic(value: str | None) -> str | None:
    if value is not None and (
        not value or "+" in value or "#" in value or "\0" in value or len(value) > 256
    ):
        raise ValueError(f"hook_topic {value!r} must be a topic name (no wildcards, 1-256 chars)")
    return value


class InstallConfig(_Section):
    """``[install]``: install the global model for local inference (docs/agent.md).

    The model is a standalone ONNX file the aggregator announces (``[delivery]`` there);
    it replaces ``path`` atomically, with its metadata beside it in ``<path>.json``.
    """

    path: Path = Field(description="the model file a local inference service loads")
    select: Literal["latest", "best", "pinned"] = Field(
        "latest", description="latest, best (by federated evaluation) or pinned (checkpoint)"
    )
    checkpoint: int | None = Field(
        None, ge=0, description="with select = pinned: the checkpoint (round) to install"
    )
    hook_command: list[str] | None = Field(
        None,
        min_length=1,
        description="argv run after each install (FEDMQ_MODEL_* in its environment)",
    )
    hook_timeout_s: float = Field(DEFAULT_HOOK_TIMEOUT, gt=0, le=3600)
    hook_topic: Annotated[str | None, AfterValidator(_hook_topic)] = Field(
        None, description="retained JSON message on this topic of hook_broker after each install"
    )
    hook_broker: BrokerSection = Field(
        default_factory=lambda: BrokerSection(url=DEFAULT_HOOK_BROKER),
        description="the local broker of hook_topic (not the federation's broker)",
    )

    @model_validator(mode="after")
    def _selection(self) -> InstallConfig:
        if (self.select == "pinned") != (self.checkpoint is not None):
            raise ValueError("install.checkpoint is set exactly when install.select = 'pinned'")
        if self.path.name in ("", ".", "..") or self.path.is_dir():
            raise ValueError(f"install.path {str(self.path)!r} must name a file")
        if self.hook_command is not None and not all(self.hook_command):
            raise ValueError("install.hook_command holds an empty argument")
        return self


class AgentSettings(EnvFirstSettings):
    """Everything ``fedmq-agent run`` needs; see docs/agent.md for each field."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    client_id: Identifier = Field(description="this device's id: MQTT client id and topic level")
    federation: Identifier
    topic_root: TopicRoot = "fedmq"
    state_dir: Path = DEFAULT_STATE_DIR
    threads: int = Field(1, ge=1, le=MAX_THREADS, description="onnxruntime intra-op threads")
    heartbeat_s: float = Field(DEFAULT_HEARTBEAT, ge=0.05, le=3600)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: LogFormat = Field("text", description="text, or json: one object per line")
    broker: BrokerSection
    data: DataConfig
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    outbox: OutboxConfig = Field(default_factory=OutboxConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    security: SecurityConfig | None = None
    install: InstallConfig | None = None

    def broker_settings(self) -> BrokerSettings:
        """Connection settings for :class:`fedmq.transport.mqtt.MqttSession`."""
        return self.broker.session_settings(self.client_id)


def parse_settings(document: dict[str, Any], source: str = "<config>") -> AgentSettings:
    """Validate a parsed TOML document (plus the environment) into settings.

    Raises:
        ConfigError: naming ``source`` and every offending field.
    """
    try:
        return AgentSettings(**document)
    except ValidationError as exc:
        raise ConfigError(f"invalid agent configuration in {source}:\n{describe(exc)}") from exc


def load_settings(path: Path) -> AgentSettings:
    """Read ``path`` (TOML), apply ``FEDMQ_AGENT_*`` overrides and validate.

    Relative paths in the file are relative to the file's directory.

    Raises:
        ConfigError: unreadable file, TOML syntax error (with line and column), or
            invalid values.
    """
    document = read_toml(path, "agent configuration")
    base = path.resolve().parent
    resolve_paths(base, document, ("state_dir",))
    resolve_paths(base, document.get("data"), ("path", "module_path"))
    resolve_paths(base, document.get("broker"), TLS_FILE_KEYS)
    resolve_paths(base, document.get("metrics"), ("textfile",))
    install = document.get("install")
    resolve_paths(base, install, ("path",))
    if isinstance(install, dict):
        resolve_paths(base, install.get("hook_broker"), TLS_FILE_KEYS)
    security = document.get("security")
    resolve_paths(base, security, ("signing_key",))
    if isinstance(security, dict) and isinstance(security.get("aggregator_keys"), list):
        security["aggregator_keys"] = [
            str(base / key) if isinstance(key, str) else key for key in security["aggregator_keys"]
        ]
    settings = parse_settings(document, str(path))
    if settings.security is not None:
        try:  # the key files' contents, so a bad key is a start-up error naming the file
            settings.security.trusted_keys()
            settings.security.device_key()
        except ConfigError as exc:
            raise ConfigError(f"invalid agent configuration in {path}: {exc}") from exc
    return settings
