"""A plant PKI made by the fedmq.pki library, and a production-config broker serving it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmq.broker.mosquitto import (
    MosquittoBroker,
    ProductionMosquittoConfig,
    TlsFiles,
    find_mosquitto,
)
from fedmq.pki.directory import PkiDirectory, aggregator_client_id
from fedmq.pki.layout import CertPaths
from fedmq.wire.topics import Topics

BROKER_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Plant:
    """A PKI with two devices, the aggregator of one federation and a monitor."""

    pki: PkiDirectory
    topics: Topics
    devices: tuple[str, str]
    aggregator: str
    monitor: str

    @property
    def ca(self) -> Path:
        return self.pki.layout.ca.cert

    def identity(self, name: str) -> CertPaths:
        layout = self.pki.layout
        if name in self.devices:
            bundle = layout.bundle(name)
            return CertPaths(bundle.path(bundle.CERT), bundle.path(bundle.KEY))
        if name == self.aggregator:
            return layout.aggregator(name)
        if name == self.monitor:
            return layout.monitor(name)
        raise KeyError(name)

    def tls_files(self) -> TlsFiles:
        layout = self.pki.layout
        return TlsFiles(layout.ca.cert, layout.broker.cert, layout.broker.key, layout.crl)


def make_plant(root: Path, federation: str | None = None) -> Plant:
    """Issue everything a federation needs with the fedmq.pki library."""
    federation = federation or f"t{uuid.uuid4().hex[:10]}"
    pki, _ = PkiDirectory.create(root, "plant7")
    devices = ("press-a", "press-b")
    for device in devices:
        pki.device(device, federation=federation, install_dir=".")
    aggregator = pki.aggregator(federation).entry.cn
    assert aggregator == aggregator_client_id(federation)
    monitor = pki.monitor("monitor").entry.cn
    pki.broker(list(BROKER_HOSTS))
    pki.write_text(pki.layout.acl, pki.acl([federation]).text())
    return Plant(pki, Topics(federation), devices, aggregator, monitor)


def start_broker(plant: Plant, state_dir: Path) -> MosquittoBroker:
    """Mosquitto from production.conf.template with the plant's files, on a free port."""
    if find_mosquitto() is None:
        pytest.fail(
            "mosquitto is not installed; `make test` installs it (apt-get install mosquitto)"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    config = ProductionMosquittoConfig(tls=plant.tls_files(), acl_file=plant.pki.layout.acl)
    broker = MosquittoBroker(config, state_dir)
    broker.start()
    return broker
