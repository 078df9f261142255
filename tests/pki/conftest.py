"""Fixtures: a plant PKI in a temporary directory, and a production broker for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmq.broker.mosquitto import MosquittoBroker
from pki.mqtt_client import BrokerClient
from pki.plant import Plant, make_plant, start_broker


@pytest.fixture
def plant(tmp_path: Path) -> Plant:
    """A fresh plant PKI for one test."""
    return make_plant(tmp_path / "pki")


@pytest.fixture(scope="module")
def shared_plant(tmp_path_factory: pytest.TempPathFactory) -> Plant:
    """One plant PKI for a whole module (its tests only read it)."""
    return make_plant(tmp_path_factory.mktemp("pki") / "pki")


@pytest.fixture(scope="module")
def production_broker(
    shared_plant: Plant, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    """One production-config broker per module, for the shared plant."""
    broker = start_broker(shared_plant, tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.close()


@pytest.fixture
def connect(
    shared_plant: Plant, production_broker: MosquittoBroker
) -> Iterator[Callable[..., BrokerClient]]:
    """``connect(name)``: a connected client with that identity (closed after the test)."""
    clients: list[BrokerClient] = []

    def factory(name: str, client_id: str | None = None) -> BrokerClient:
        client = BrokerClient(
            production_broker.port,
            client_id=client_id or name,
            ca=shared_plant.ca,
            identity=shared_plant.identity(name),
        )
        clients.append(client)
        assert client.connect(), f"{name} could not connect: {production_broker.log_path}"
        return client

    yield factory
    for client in clients:
        client.close()
