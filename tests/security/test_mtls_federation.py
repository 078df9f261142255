"""A whole federation as a plant deploys it: ``fedmq pki`` identities, the production broker.

Mosquitto runs from ``production.conf.template`` (mTLS, CRL, the generated ACL); the
aggregator and two agents use exactly what ``fedmq pki`` wrote for them (the devices'
``agent.toml`` from their bundles, with only the broker address, state and data
directories changed), and a third client with its own valid device certificate
attacks from inside the plant.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from agent.helpers import running_agent, write_digits
from aggregator.scripted import bundle_dir, records, running_service, wait_for
from pki.plant import Plant, make_plant, start_broker

from edge_agent.config import load_settings as load_agent_settings
from fedmq.aggregator.config import load_settings
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.testing.scripted_clients import ScriptedConnection
from fedmq.transport.broker_settings import BrokerSettings

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def plant(tmp_path: Path) -> Plant:
    return make_plant(tmp_path / "pki")


@pytest.fixture
def production_broker(plant: Plant, tmp_path: Path) -> MosquittoBroker:
    broker = start_broker(plant, tmp_path / "mosquitto")
    yield broker  # type: ignore[misc]
    broker.close()


def agent_config(plant: Plant, device: str, broker: MosquittoBroker, work: Path) -> Path:
    """The device's bundle agent.toml, pointed at the test broker and directories."""
    bundle = plant.pki.layout.bundle(device).directory
    text = (bundle / "agent.toml").read_text()
    data = write_digits(work / f"data-{device}")
    text = (
        text.replace('url = "mqtts://broker.plant.local:8883"', f'url = "{broker.url}"')
        .replace('state_dir = "/var/lib/fedmq-agent"', f'state_dir = "{work / device}"')
        .replace('path = "/var/lib/fedmq-agent/data"', f'path = "{data}"')
        .replace("heartbeat_s = 10", "heartbeat_s = 0.5")
    )
    path = bundle / "agent-test.toml"
    path.write_text(text)
    return path


def aggregator_config(plant: Plant, broker: MosquittoBroker, work: Path) -> Path:
    """federation.toml: the snippet ``fedmq pki aggregator`` wrote, plus the federation."""
    federation = plant.topics.federation
    snippet = plant.pki.layout.root / "aggregator" / f"federation-security-{federation}.toml"
    text = snippet.read_text().replace(
        'url = "mqtts://broker.plant.local:8883"', f'url = "{broker.url}"'
    )
    path = work / "federation.toml"
    path.write_text(
        f'federation = "{federation}"\nbundle = "{bundle_dir()}"\n'
        f'state_dir = "{work / "state"}"\nrounds = 2\nsettle_s = 0.3\n'
        "status_interval_s = 0.05\nheartbeat_s = 1.0\nexit_when_finished = false\n"
        "[round]\nmin_agents = 2\ndeadline_s = 60\n" + text
    )
    return path


async def test_a_signed_mtls_federation_with_an_insider_attacking(
    plant: Plant, production_broker: MosquittoBroker, tmp_path: Path
) -> None:
    settings = load_settings(aggregator_config(plant, production_broker, tmp_path))
    assert settings.security is not None
    agents = [
        load_agent_settings(agent_config(plant, d, production_broker, tmp_path))
        for d in plant.devices
    ]
    # press-b's certificate in an insider's hands: it may write only press-b's topics.
    insider_files = plant.identity(plant.devices[1])
    insider = ScriptedConnection(
        production_broker.url,
        plant.topics.federation,
        subscriptions=[(plant.topics.round(), 1)],
        settings=BrokerSettings(
            production_broker.url,
            plant.devices[1],  # the broker makes the client id the certificate's CN anyway
            ca_file=plant.ca,
            cert_file=insider_files.cert,
            key_file=insider_files.key,
            persistent_session=False,
        ),
    )
    async with contextlib.AsyncExitStack() as stack:
        service = await stack.enter_async_context(running_service(settings))
        await stack.enter_async_context(running_agent(agents[0]))
        await wait_for(lambda: service.statistics().connections == 1)
        # The insider impersonates press-a: the ACL drops it at the broker.
        await insider.connect()
        stack.push_async_callback(insider.disconnect)
        announcement = await insider.wait_round(1, status="waiting")
        assert announcement.signature is not None
        _, forged = insider.update_envelope(plant.devices[0], 1, b"", examples=10**9)
        await insider.upload(plant.devices[0], 1, "forged", forged)
        await insider.disconnect()
        # Then the real press-b joins (same identity, so the insider is gone).
        await stack.enter_async_context(running_agent(agents[1]))
        await wait_for(lambda: service.statistics().rounds_closed >= 2, timeout=90)
        stats = service.statistics()
    rounds = records(settings.state_dir)
    assert [r.outcome for r in rounds[:2]] == ["closed", "closed"]
    assert sorted(c.client for c in rounds[0].contributions) == sorted(plant.devices)
    assert all(c.examples < 1000 for c in rounds[0].contributions)
    # The forged upload never reached the aggregator: nothing was rejected at all.
    assert not stats.rejected
