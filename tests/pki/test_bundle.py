"""A device's provisioning bundle: its files, the agent.toml the agent loads, the archive."""

from __future__ import annotations

import io
import stat
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import load_settings
from fedmq.pki.bundle import ARCHIVE_FILE_MODE
from fedmq.pki.certificates import common_name, read_cert
from fedmq.pki.directory import PkiDirectory
from fedmq.pki.layout import BundleFiles
from fedmq.wire.signing import read_signing_key, read_verify_key

DEPLOY_SAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "agent.toml"
FEDERATION = "line-3"


@pytest.fixture
def pki(tmp_path: Path) -> PkiDirectory:
    pki, _ = PkiDirectory.create(tmp_path / "pki", "plant7")
    return pki


def keys(document: dict[str, Any], prefix: str = "") -> set[str]:
    found = set()
    for key, value in document.items():
        found.add(prefix + key)
        if isinstance(value, dict):
            found |= keys(value, f"{prefix}{key}.")
    return found


def test_the_bundle_holds_what_the_device_needs(pki: PkiDirectory) -> None:
    pki.device("press-07", federation=FEDERATION)
    layout = pki.layout
    bundle = layout.bundle("press-07")
    assert sorted(path.name for path in bundle.directory.iterdir()) == sorted(BundleFiles.NAMES)
    assert stat.S_IMODE(bundle.directory.stat().st_mode) == 0o700
    assert bundle.path(bundle.CA).read_bytes() == layout.ca.cert.read_bytes()
    assert bundle.path(bundle.AGGREGATOR_KEY).read_bytes() == (
        layout.aggregator_public_key.read_bytes()
    )
    assert common_name(read_cert(bundle.path(bundle.CERT))) == "press-07"
    # The aggregator's registry holds the public half of the device's update signing key.
    signing = read_signing_key(bundle.path(bundle.SIGNING_KEY))
    assert read_verify_key(layout.device_key("press-07")) == signing.public
    assert read_verify_key(bundle.path(bundle.AGGREGATOR_KEY)) == (
        read_signing_key(layout.aggregator_signing_key).public
    )


def test_agent_toml_names_the_installed_files(pki: PkiDirectory) -> None:
    pki.device(
        "press-07",
        federation=FEDERATION,
        broker_url="mqtts://mqtt.plant7.example:8883",
        topic_root="plant-7/fedmq",
    )
    bundle = pki.layout.bundle("press-07")
    config = tomllib.loads(bundle.path(bundle.AGENT_CONFIG).read_text(encoding="utf-8"))
    assert config["client_id"] == "press-07"
    assert config["federation"] == FEDERATION
    assert config["topic_root"] == "plant-7/fedmq"
    assert config["state_dir"] == "/var/lib/fedmq-agent"
    assert config["broker"]["url"] == "mqtts://mqtt.plant7.example:8883"
    assert config["broker"]["ca_file"] == "/etc/fedmq/ca.pem"
    assert config["broker"]["cert_file"] == "/etc/fedmq/device.pem"
    assert config["broker"]["key_file"] == "/etc/fedmq/device.key"
    assert config["security"] == {
        "aggregator_keys": ["/etc/fedmq/aggregator.pub"],
        "signing_key": "/etc/fedmq/device.sign",
    }
    assert config["data"]["path"] == "/var/lib/fedmq-agent/data"


def test_agent_toml_keeps_to_the_documented_sample(pki: PkiDirectory) -> None:
    pki.device("press-07", federation=FEDERATION)
    bundle = pki.layout.bundle("press-07")
    written = keys(tomllib.loads(bundle.path(bundle.AGENT_CONFIG).read_text(encoding="utf-8")))
    sample = keys(tomllib.loads(DEPLOY_SAMPLE.read_text(encoding="utf-8")))
    assert written - sample <= {"security", "security.aggregator_keys", "security.signing_key"}


def test_a_relative_bundle_loads_in_place(pki: PkiDirectory) -> None:
    pki.device("press-07", federation=FEDERATION, install_dir=".", state_dir="state")
    bundle = pki.layout.bundle("press-07")
    (bundle.directory / "state" / "data").mkdir(parents=True)
    settings = load_settings(bundle.path(bundle.AGENT_CONFIG))
    assert settings.client_id == "press-07"
    assert settings.federation == FEDERATION
    assert settings.broker.cert_file == bundle.path(bundle.CERT).resolve()
    assert settings.state_dir == (bundle.directory / "state").resolve()
    assert settings.security is not None
    aggregator = read_verify_key(pki.layout.aggregator_public_key)
    assert settings.security.trusted_keys().ids == (aggregator.id,)
    assert settings.security.device_key().public == read_verify_key(
        pki.layout.device_key("press-07")
    )
    # The certificate and key load as the agent's TLS identity.
    assert settings.broker_settings().tls_context() is not None


def test_the_archive_holds_the_bundle_without_absolute_paths(pki: PkiDirectory) -> None:
    issued = pki.device("press-07", federation=FEDERATION, with_archive=True)
    archive = issued.extra["archive"]
    assert archive == pki.layout.bundle_archive("press-07")
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    bundle = pki.layout.bundle("press-07")
    with tarfile.open(fileobj=io.BytesIO(archive.read_bytes()), mode="r:gz") as tar:
        members = tar.getmembers()
        names = [member.name for member in members]
        assert names[0] == "press-07"
        assert sorted(names[1:]) == sorted(f"press-07/{name}" for name in BundleFiles.NAMES)
        for member in members:
            assert not member.name.startswith("/")
            assert ".." not in member.name.split("/")
            if member.isfile():
                assert member.mode == ARCHIVE_FILE_MODE
                extracted = tar.extractfile(member)
                assert extracted is not None
                assert extracted.read() == (bundle.directory / Path(member.name).name).read_bytes()
            else:
                assert member.isdir()
