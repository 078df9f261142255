"""The ``[broker]`` table of ``federation.toml`` and ``agent.toml``: how a client connects.

Where the MQTT broker is (``url``), how to authenticate to it (username and password, or
a client certificate) and which TLS files to trust; :meth:`BrokerSection.session_settings`
turns it into the :class:`~fedmq.transport.mqtt.BrokerSettings` of one session.  The
broker's own configuration (Mosquitto templates, ACLs, queue sizing) is
``broker_config/`` at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator

from fedmq.errors import ConfigError
from fedmq.transport.broker_settings import KEEPALIVE, BrokerAddress, BrokerSettings

TLS_FILE_KEYS = ("ca_file", "cert_file", "key_file")


def _broker_url(value: str) -> str:
    try:
        BrokerAddress.parse(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc
    return value


BrokerUrl = Annotated[str, AfterValidator(_broker_url)]


class BrokerSection(BaseModel):
    """``[broker]``: where the MQTT broker is and how to authenticate to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: BrokerUrl = Field(description="mqtt://host[:port] or mqtts://host[:port]")
    username: str | None = None
    password: SecretStr | None = Field(None, description="prefer the environment variable")
    ca_file: Path | None = Field(None, description="CA bundle for mqtts (system CAs if unset)")
    cert_file: Path | None = Field(None, description="client certificate (mTLS)")
    key_file: Path | None = Field(None, description="private key of cert_file")
    protocol: Literal["5", "3.1.1"] = "5"
    keepalive_s: int = Field(
        KEEPALIVE, ge=5, le=3600, description="the broker fires our last will within 1.5x"
    )
    max_packet_size: int | None = Field(
        None,
        ge=4096,
        description="the broker's packet cap in bytes (MQTT 3.1.1 brokers do not announce it)",
    )

    @model_validator(mode="after")
    def _tls_files(self) -> BrokerSection:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not")
        tls = self.url.startswith("mqtts://")
        for name in TLS_FILE_KEYS:
            path: Path | None = getattr(self, name)
            if path is None:
                continue
            if not tls:
                raise ValueError(f"{name} is set but the broker url is not mqtts://")
            if not path.is_file():
                raise ValueError(f"{name} {str(path)!r} does not exist or is not a file")
        return self

    def session_settings(self, client_id: str) -> BrokerSettings:
        """Settings of a persistent MQTT session as ``client_id``."""
        return BrokerSettings(
            url=self.url,
            client_id=client_id,
            username=self.username,
            password=self.password.get_secret_value() if self.password else None,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            protocol=self.protocol,
            # Queued QoS 1 messages (updates for the aggregator, acks for agents)
            # survive a restart of either side.
            persistent_session=True,
            keepalive=self.keepalive_s,
            max_packet_size=self.max_packet_size,
        )
