"""``monitor.toml``: where ``fedmq monitor`` connects, as whom, and what it watches.

::

    federation = "line-3"                     # optional: --federation wins
    topic_root = "fedmq"                      # optional: --root wins
    aggregator_keys = ["pki/aggregator/aggregator.pub"]   # optional: verify signatures

    [broker]                                  # the [broker] table of every fedmq file
    url = "mqtts://broker.plant.local:8883"
    ca_file = "pki/ca.pem"
    cert_file = "pki/monitor/monitor.pem"     # fedmq pki monitor: the read-only identity
    key_file = "pki/monitor/monitor.key"

Relative paths are relative to the file.  Command-line options win over the file.

Only these keys: a ``federation.toml`` or ``agent.toml`` is refused, because its
``[broker]`` names that service's certificate, and a broker running with
``use_username_as_clientid`` would hand the monitor that service's MQTT session,
disconnecting the aggregator or agent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from fedmq.config_file import describe, read_toml, resolve_paths
from fedmq.errors import ConfigError
from fedmq.transport.broker_config import TLS_FILE_KEYS, BrokerSection
from fedmq.wire.ids import Identifier, validate_root

SERVICE_KEYS = ("state_dir", "bundle", "client_id")  # keys only service configurations have


def _root(value: str) -> str:
    return validate_root(value)


class MonitorFile(BaseModel):
    """The contents of ``monitor.toml`` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    federation: Identifier | None = None
    topic_root: Annotated[str, AfterValidator(_root)] | None = None
    aggregator_keys: list[Path] = Field(default_factory=list, max_length=8)
    broker: BrokerSection


def broker_table(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    """The file's top level (without ``[broker]``) and its ``[broker]`` table, paths resolved.

    Raises:
        ConfigError: unreadable, not TOML, a service's configuration, or no ``[broker]``.
    """
    document = read_toml(path, "monitor configuration")
    service = [key for key in SERVICE_KEYS if key in document]
    if service:
        raise ConfigError(
            f"{path} looks like a service's configuration (it has {', '.join(service)}): "
            "its [broker] identity would take over that service's MQTT session; give "
            "the monitor its own file with the monitor certificate (fedmq pki monitor)"
        )
    broker = document.pop("broker", None)
    if not isinstance(broker, dict):
        raise ConfigError(f"{path} has no [broker] table")
    base = path.resolve().parent
    resolve_paths(base, broker, TLS_FILE_KEYS)
    keys = document.get("aggregator_keys")
    if isinstance(keys, list):
        holder = {str(i): key for i, key in enumerate(keys)}
        resolve_paths(base, holder, holder.keys())
        document["aggregator_keys"] = [holder[str(i)] for i in range(len(keys))]
    return document, broker


def validate_file(path: Path, top: dict[str, object], broker: dict[str, object]) -> MonitorFile:
    """Validate the (possibly overridden) contents of ``path``.

    Raises:
        ConfigError: naming every offending key.
    """
    try:
        return MonitorFile.model_validate({**top, "broker": broker})
    except ValidationError as exc:
        raise ConfigError(f"invalid monitor configuration {path}:\n{describe(exc)}") from None
