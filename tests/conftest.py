"""Shared fixtures: a real Mosquitto broker per test session, unique topic roots per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmq.broker.mosquitto import MosquittoBroker, MosquittoConfig, find_mosquitto


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.fail(
            "mosquitto is not installed; `make test` installs it (apt-get install mosquitto)"
        )


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One Mosquitto for the whole session, on a random free port."""
    _require_mosquitto()
    instance = MosquittoBroker(MosquittoConfig(), tmp_path_factory.mktemp("mosquitto"))
    instance.start()
    yield instance
    instance.close()


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Factory for a private broker with its own settings (restarted or killed by the test)."""
    _require_mosquitto()
    started: list[MosquittoBroker] = []

    def factory(**settings: object) -> MosquittoBroker:
        config = MosquittoConfig(**settings)  # type: ignore[arg-type]
        instance = MosquittoBroker(config, tmp_path / f"mosquitto-{len(started)}")
        instance.state_dir.mkdir(parents=True, exist_ok=True)
        instance.start()
        started.append(instance)
        return instance

    yield factory
    for instance in started:
        instance.close()


@pytest.fixture
def federation() -> str:
    """A federation id unique to this test, so tests never see each other's retained topics."""
    return f"t{uuid.uuid4().hex[:12]}"
