"""Rendering production.conf.template, and the queue rule of broker_config/README.md."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedmq.broker.mosquitto import (
    DEFAULT_MAX_QUEUED_MESSAGES,
    MAX_QUEUED_BYTES_LIMIT,
    MosquittoBroker,
    MosquittoConfig,
    ProductionMosquittoConfig,
    TlsFiles,
    queue_limits,
)
from fedmq.errors import ConfigError

TLS = TlsFiles(Path("/p/ca.pem"), Path("/p/broker.pem"), Path("/p/broker.key"), Path("/p/crl.pem"))


def lines(config: ProductionMosquittoConfig, state_dir: Path = Path("/state")) -> list[str]:
    return config.render(state_dir).splitlines()


def test_the_template_renders_the_security_settings() -> None:
    rendered = lines(ProductionMosquittoConfig(tls=TLS, acl_file=Path("/p/acl"), port=1234))
    for line in (
        "listener 1234 127.0.0.1",
        "allow_anonymous false",
        "per_listener_settings false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        "cafile /p/ca.pem",
        "certfile /p/broker.pem",
        "keyfile /p/broker.key",
        "crlfile /p/crl.pem",
        "acl_file /p/acl",
        "persistence true",
        "persistence_location /state/",
        "log_dest file /state/mosquitto.log",
        "max_inflight_messages 20",
        "persistent_client_expiration 7d",
    ):
        assert line in rendered, line
    assert not any("${" in line for line in rendered)
    assert not any(line != line.rstrip() for line in rendered)


def test_an_operator_rendering_listens_everywhere() -> None:
    config = ProductionMosquittoConfig(
        tls=TLS,
        acl_file=Path("/p/acl"),
        port=8883,
        bind_address="",
        user="mosquitto",
        persistence_location=Path("/var/lib/mosquitto"),
        log_file=Path("/var/log/mosquitto/mosquitto.log"),
    )
    rendered = lines(config)
    assert "listener 8883" in rendered
    assert "user mosquitto" in rendered
    assert "persistence_location /var/lib/mosquitto/" in rendered


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"max_queued_bytes": MAX_QUEUED_BYTES_LIMIT + 1}, "C int"),
        ({"max_queued_bytes": -1}, "C int"),
        ({"persistent_client_expiration": "7 days"}, "persistent_client_expiration"),
        ({"acl_file": Path("/p/acl\nallow_anonymous true")}, "line break"),
    ],
)
def test_values_mosquitto_would_misread_are_refused(
    changes: dict[str, object], fragment: str
) -> None:
    settings: dict[str, object] = {"tls": TLS, "acl_file": Path("/p/acl"), **changes}
    with pytest.raises(ConfigError, match=fragment):
        ProductionMosquittoConfig(**settings).render(Path("/state"))  # type: ignore[arg-type]


def test_the_queue_rule() -> None:
    # broker_config/README.md: 200 agents, 4 MiB updates in 256 KiB chunks, one round.
    messages, queued = queue_limits(200, 4 * 1024 * 1024, 256 * 1024, 1)
    assert queued == 2 * 200 * 4 * 1024 * 1024
    assert messages == max(2 * 200 * 16, DEFAULT_MAX_QUEUED_MESSAGES)
    messages, _ = queue_limits(10_000, 100 * 1024, 16 * 1024, 1)  # 6.25 chunks: 7
    assert messages == 2 * 10_000 * math.ceil(100 / 16) > DEFAULT_MAX_QUEUED_MESSAGES
    with pytest.raises(ConfigError, match="memory_limit"):
        queue_limits(500, 4 * 1000 * 1000, 256 * 1024, 1)  # 4 GB: more than a C int
    with pytest.raises(ConfigError, match="positive"):
        queue_limits(0, 1, 1, 1)


def test_the_broker_url_says_which_scheme(tmp_path: Path) -> None:
    production = MosquittoBroker(
        ProductionMosquittoConfig(tls=TLS, acl_file=Path("/p/acl"), port=1234), tmp_path
    )
    assert production.url == "mqtts://127.0.0.1:1234"
    assert MosquittoBroker(MosquittoConfig(port=1883), tmp_path).url == "mqtt://127.0.0.1:1883"
