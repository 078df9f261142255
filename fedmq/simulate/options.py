"""What ``fedmq simulate`` was asked to do, checked before anything starts (pure).

Every problem is a :class:`~fedmq.errors.ConfigError` naming the option, so the command
exits with a clear message before it starts a broker or writes a file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pydantic import ValidationError

from fedmq.config_file import describe
from fedmq.datasets.partition import PartitionSpec
from fedmq.errors import (
    ConfigError,
    InvalidIdentifierError,
    LocalProtocolError,
    UnsupportedCodecError,
)
from fedmq.simulate.chaos import victim_count
from fedmq.strategies.config import StrategyName
from fedmq.transport.broker_config import BrokerSection
from fedmq.wire.ids import validate_root
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.training import OptimizerName

ModelName = Literal["digits_mlp", "digits_cnn", "sensor_autoencoder"]
BrokerChoice = Literal["auto", "mosquitto", "embedded"]

MODELS: tuple[str, ...] = get_args(ModelName)
BROKERS: tuple[str, ...] = get_args(BrokerChoice)
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)

DEFAULT_MODEL: ModelName = "digits_mlp"
DEFAULT_AGENTS = 10
DEFAULT_ROUNDS = 5  # a quick look; the README demo asks for 20
MAX_AGENTS = 5000  # in-process agents on one event loop (1000 measured on 2 cores)
# Each subprocess agent is a Python interpreter with onnxruntime loaded (~70 MB RSS).
MAX_PROCESS_AGENTS = 256
MAX_ROUNDS = 100_000
MAX_DEADLINE = 24 * 3600.0  # seconds
MAX_EPOCHS = 1000  # as TrainingConfig allows
MAX_LR = 10.0  # as TrainingConfig allows
MAX_BATCH = 65536  # as TrainingConfig allows
# The external broker's password: an environment variable, never an option (a command
# line is visible to every user of the machine).  The one FEDMQ_* variable the
# simulator accepts: no settings source reads it (check_environment).
PASSWORD_ENV = "FEDMQ_SIMULATE_PASSWORD"
# Options naming the [broker] fields they set, for error messages.
BROKER_OPTIONS = {
    "url": "--broker",
    "username": "--username",
    "password": PASSWORD_ENV,
    "ca_file": "--ca-file",
    "cert_file": "--cert-file",
    "key_file": "--key-file",
    "protocol": "--protocol",
    "max_packet_size": "--max-packet-size",
}


@dataclass(frozen=True)
class TrainingOverrides:
    """Local-training settings given on the command line (None: the model's default)."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    optimizer: OptimizerName | None = None

    def as_dict(self) -> dict[str, object]:
        """The given values as ``TrainingConfig`` fields."""
        values: dict[str, object] = {
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
        }
        return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class SimulationOptions:
    """A validated ``fedmq simulate`` invocation.

    Args:
        agents: number of simulated devices.
        rounds: rounds to run (None: the project's ``rounds``, or ``DEFAULT_ROUNDS``).
        partition: how the training data is split across agents.
        codec: update codec (None: the project's, or ``raw``).
        strategy: aggregation strategy (None: the project's, or ``fedavg``).
        drop_rate: fraction of each round's agents that vanish mid-round.
        processes: run agents as ``fedmq-agent`` subprocesses instead of in-process.
        model: a shipped example model (ignored with ``project``).
        project: a ``fedmq new`` project directory.
        seed: seed of the data split and of the choice of dropped agents.
        out: report directory (None: ``reports/<name>-<timestamp>``).
        broker: which broker to start (ignored with ``external_broker``).
        external_broker: a running broker to use instead of starting one (``--broker
            mqtt(s)://…``): its address, credentials, TLS files, protocol and packet cap.
        topic_root: topic root of the run (None: ``fedmq-sim-<random>`` on an external
            broker, the project's or ``fedmq`` on a private one).
        deadline_s: round deadline (None: the default for simulations).
        training: local-training overrides.
        keep_updates: keep every update envelope seen on the wire in the report.
        broker_queue: the external broker's ``max_queued_messages``, told to the
            aggregator (``[broker] max_queued_messages``): uploads are paced to fit it.
        evaluate_final: the last round is evaluate-only (``[round] evaluate_final``): the
            report shows each agent's figures for the final model.
    """

    agents: int = DEFAULT_AGENTS
    rounds: int | None = None
    partition: PartitionSpec = field(default_factory=lambda: PartitionSpec("iid"))
    codec: str | None = None
    strategy: StrategyName | None = None
    drop_rate: float = 0.0
    processes: bool = False
    model: ModelName = DEFAULT_MODEL
    project: Path | None = None
    seed: int = 0
    out: Path | None = None
    broker: BrokerChoice = "auto"
    external_broker: BrokerSection | None = None
    topic_root: str | None = None
    deadline_s: float | None = None
    training: TrainingOverrides = field(default_factory=TrainingOverrides)
    keep_updates: bool = False
    evaluate_final: bool = False
    broker_queue: int | None = None

    def __post_init__(self) -> None:
        limit = MAX_PROCESS_AGENTS if self.processes else MAX_AGENTS
        if not 1 <= self.agents <= limit:
            where = " with --processes" if self.processes else ""
            raise ConfigError(f"--agents must be between 1 and {limit}{where}, got {self.agents}")
        if self.rounds is not None and not 1 <= self.rounds <= MAX_ROUNDS:
            raise ConfigError(f"--rounds must be between 1 and {MAX_ROUNDS}, got {self.rounds}")
        if not (math.isfinite(self.drop_rate) and 0.0 <= self.drop_rate < 1.0):
            raise ConfigError(
                f"--drop-rate must be a fraction in [0, 1) (someone has to stay), "
                f"got {self.drop_rate}"
            )
        if self.broker_queue is not None and (
            self.external_broker is None or self.broker_queue < 1
        ):
            raise ConfigError(
                "--max-queued-messages takes a positive count, and only with --broker "
                "mqtt(s)://HOST:PORT (a private broker's queue is unlimited)"
            )
        if self.drop_rate > 0 and self.agents < 2:
            raise ConfigError("--drop-rate needs at least 2 agents: one must stay")
        if self.deadline_s is not None and not (
            math.isfinite(self.deadline_s) and 0 < self.deadline_s <= MAX_DEADLINE
        ):
            raise ConfigError(
                f"--deadline must be in (0, {MAX_DEADLINE:g}] seconds, got {self.deadline_s}"
            )
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.broker not in BROKERS:
            raise ConfigError(
                f"--broker must be one of {', '.join(BROKERS)} or mqtt(s)://HOST:PORT, "
                f"got {self.broker!r}"
            )
        if self.topic_root is not None:
            try:
                validate_root(self.topic_root)
            except InvalidIdentifierError as exc:
                raise ConfigError(f"--topic-root: {exc}") from None
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ConfigError(
                f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        if self.codec is not None:
            try:
                CodecSpec.parse(self.codec)
            except (UnsupportedCodecError, LocalProtocolError) as exc:
                raise ConfigError(f"--codec: {exc}") from None
        _check_training(self.training)

    def victims(self, selected: int) -> int:
        """How many of ``selected`` agents vanish in a round (:func:`victim_count`)."""
        return victim_count(self.drop_rate, selected)


def _check_training(training: TrainingOverrides) -> None:
    if training.epochs is not None and not 1 <= training.epochs <= MAX_EPOCHS:
        raise ConfigError(f"--epochs must be between 1 and {MAX_EPOCHS}, got {training.epochs}")
    if training.lr is not None and not (math.isfinite(training.lr) and 0 < training.lr <= MAX_LR):
        raise ConfigError(f"--lr must be in (0, {MAX_LR:g}], got {training.lr}")
    if training.batch_size is not None and not 1 <= training.batch_size <= MAX_BATCH:
        raise ConfigError(
            f"--batch-size must be between 1 and {MAX_BATCH}, got {training.batch_size}"
        )
    if training.optimizer is not None and training.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {training.optimizer!r}"
        )


def is_broker_url(text: str) -> bool:
    """True when ``--broker`` names an external broker rather than one to start."""
    return "://" in text


def external_broker(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    protocol: str = "5",
    max_packet_size: int | None = None,
) -> BrokerSection:
    """The ``[broker]`` settings every part of a simulation uses on an external broker.

    The same fields as ``[broker]`` of ``federation.toml`` and ``agent.toml``, validated
    by the same model; files are made absolute (subprocess agents read them from TOML
    files elsewhere).

    Raises:
        ConfigError: naming the option (a credential in the URL is refused: it would
            be printed and written to the report).
    """
    if "@" in url.partition("://")[2].partition("/")[0]:
        raise ConfigError(
            f"--broker: put no credentials in the URL; use --username and {PASSWORD_ENV}"
        )
    try:
        return BrokerSection(
            url=url,
            username=username,
            password=password,  # pydantic makes it a SecretStr
            ca_file=ca_file.resolve() if ca_file is not None else None,
            cert_file=cert_file.resolve() if cert_file is not None else None,
            key_file=key_file.resolve() if key_file is not None else None,
            protocol=protocol,  # validated: "5" or "3.1.1"
            max_packet_size=max_packet_size,
        )
    except ValidationError as exc:
        raise ConfigError(f"invalid broker settings:\n{_option_names(describe(exc))}") from None


def _option_names(text: str) -> str:
    """``describe()`` lines in the words of the command line: ``--ca-file``, not ``ca_file``."""
    text = text.replace("  <root>: ", "  ").replace("  url: ", "  --broker: ")
    for field_name, option in BROKER_OPTIONS.items():
        if field_name != "url":  # "url" is also a plain word in messages
            text = re.sub(rf"\b{field_name}\b", option, text)
    return text


_FRACTION = re.compile(r"\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?P<pct>%?)\s*")


def parse_fraction(text: str, option: str) -> float:
    """Parse ``0.25``, ``.25`` or ``25%``.

    Raises:
        ConfigError: anything else.
    """
    match = _FRACTION.fullmatch(text)
    if match is None:
        raise ConfigError(f"{option} must be a fraction such as 0.25 or 25%, got {text!r}")
    value = float(match["num"])
    return value / 100 if match["pct"] else value


def parse_partition(text: str) -> PartitionSpec:
    """Parse ``--partition`` (``iid`` or ``dirichlet:ALPHA``).

    Raises:
        ConfigError: naming the option.
    """
    try:
        return PartitionSpec.parse(text.strip())
    except ConfigError as exc:
        raise ConfigError(f"--partition: {exc}") from None
