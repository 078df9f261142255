"""Where the broker is and who we are to it: the settings of one MQTT session."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fedmq.errors import ConfigError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
KEEPALIVE = 30  # seconds: a dead agent's last will fires within 1.5x this
SESSION_EXPIRY = 24 * 3600  # seconds: queued QoS 1 messages survive a day-long outage


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens, parsed from ``mqtt://host:port`` or ``mqtts://host:port``."""

    scheme: Literal["mqtt", "mqtts"]
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL.

        Raises:
            ConfigError: unknown scheme, missing host, or bad port.
        """
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS:
            raise ConfigError(f"broker URL {url!r} must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} has no host")
        try:
            port = parts.port or DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r} has an invalid port") from exc
        return cls(parts.scheme, parts.hostname, port)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach and authenticate to the broker.

    Args:
        url: ``mqtt://host:port`` or ``mqtts://host:port``.
        client_id: MQTT client identifier (the device id for agents).
        username: optional username (with mTLS, Mosquitto can take it from the cert CN).
        password: optional password.
        ca_file: CA bundle to verify the broker (mqtts); system CAs when None.
        cert_file: client certificate for mTLS.
        key_file: private key of ``cert_file``.
        protocol: MQTT protocol version; 3.1.1 for brokers without MQTT 5.
        persistent_session: keep subscriptions and queued QoS 1 messages across reconnects.
        keepalive: seconds between pings; also how fast the broker notices a dead client.
        max_packet_size: the broker's packet cap in bytes, for brokers that do not state
            it in their MQTT 5 CONNACK (3.1.1); the smaller of the two applies.
    """

    url: str
    client_id: str
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    persistent_session: bool = True
    keepalive: int = KEEPALIVE
    session_expiry: int = SESSION_EXPIRY
    max_packet_size: int | None = None

    @property
    def address(self) -> BrokerAddress:
        """The parsed broker URL."""
        return BrokerAddress.parse(self.url)

    def tls_context(self) -> ssl.SSLContext | None:
        """TLS context for ``mqtts://`` URLs (None for plaintext)."""
        if self.address.scheme != "mqtts":
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.cert_file is not None:
                context.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files for {self.url}: {exc}") from exc
        return context


@dataclass(frozen=True)
class LastWill:
    """Message the broker publishes for us when we vanish without disconnecting."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
