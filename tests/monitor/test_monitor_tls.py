"""``fedmq monitor`` as a plant runs it: mTLS with the read-only monitor identity.

The production broker (mTLS, CRL, the ACL ``fedmq pki acl`` generated) serves a signed
aggregator with the identity ``fedmq pki aggregator`` issued; the monitor connects with
the certificate of ``fedmq pki monitor`` from a ``monitor.toml``, verifies the
aggregator's signatures with ``aggregator.pub``, and needs no write access at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aggregator.scripted import bundle_dir, running_service
from pki.plant import Plant, make_plant, start_broker

from fedmq.aggregator.config import load_settings
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.timeouts import within
from fedmq.wire.signing import SigningKey

pytestmark = [pytest.mark.broker]

WAIT = 30.0


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Plant:
    return make_plant(tmp_path_factory.mktemp("pki") / "pki")


@pytest.fixture(scope="module")
def production_broker(
    plant: Plant, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MosquittoBroker]:
    broker = start_broker(plant, tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.close()


def aggregator_config(plant: Plant, broker: MosquittoBroker, work: Path) -> Path:
    """federation.toml: the snippet ``fedmq pki aggregator`` wrote, plus the federation."""
    federation = plant.topics.federation
    snippet = plant.pki.layout.federation_snippet(federation)
    text = snippet.read_text().replace(
        'url = "mqtts://broker.plant.local:8883"', f'url = "{broker.url}"'
    )
    path = work / "federation.toml"
    path.write_text(
        f'federation = "{federation}"\nbundle = "{bundle_dir()}"\n'
        f'state_dir = "{work / "state"}"\nrounds = 2\nsettle_s = 0.3\n'
        "status_interval_s = 0.05\n[round]\nmin_agents = 2\n" + text
    )
    return path


def monitor_config(plant: Plant, broker: MosquittoBroker, work: Path) -> Path:
    """monitor.toml with paths relative to the file, as an operator would write it."""
    layout = plant.pki.layout
    monitor = layout.monitor(plant.monitor)
    path = layout.root / "monitor.toml"
    relative = {
        "ca": layout.ca.cert.relative_to(layout.root),
        "cert": monitor.cert.relative_to(layout.root),
        "key": monitor.key.relative_to(layout.root),
        "pub": layout.aggregator_public_key.relative_to(layout.root),
    }
    path.write_text(
        f'federation = "{plant.topics.federation}"\n'
        f'aggregator_keys = ["{relative["pub"]}"]\n'
        "[broker]\n"
        f'url = "{broker.url}"\n'
        f'ca_file = "{relative["ca"]}"\n'
        f'cert_file = "{relative["cert"]}"\n'
        f'key_file = "{relative["key"]}"\n'
    )
    return path


async def monitor(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from fedmq.cli.app import main; main()",
        "monitor",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await within(process.communicate(), WAIT)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_monitor_identity_reads_a_signed_federation_over_mtls(
    plant: Plant, production_broker: MosquittoBroker, tmp_path: Path
) -> None:
    settings = load_settings(aggregator_config(plant, production_broker, tmp_path))
    assert settings.security is not None
    config = monitor_config(plant, production_broker, tmp_path)
    stranger = tmp_path / "stranger.pub"
    stranger.write_text(SigningKey.generate().public.text() + "\n")
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(running_service(settings))

        code, out, err = await monitor("--config", str(config), "--once", "--json")
        assert code == 0, err
        snapshot = json.loads(out)
        assert snapshot["complete"] is True
        aggregator = snapshot["aggregator"]
        assert aggregator["id"] == plant.aggregator
        assert (aggregator["state"], aggregator["round"]) == ("waiting", 1)
        assert aggregator["signature"] == "verified"
        assert snapshot["round"]["signature"] == "verified"
        assert snapshot["round"]["status"] == "waiting"
        assert snapshot["problems"]["count"] == 0

        # Another key on the command line wins over the file's: nothing verifies.
        code, out, err = await monitor(
            "--config", str(config), "--aggregator-key", str(stranger), "--once", "--json"
        )
        assert code == 0, err
        forged = json.loads(out)
        assert forged["aggregator"] is None
        assert forged["round"] is None
        assert forged["problems"]["count"] == 2
        assert all("signature" in p or "key" in p for p in forged["problems"]["recent"])

    # The aggregator's own configuration is refused: its certificate would take over
    # the aggregator's session (the broker makes the CN the client id).
    code, _, err = await monitor("--config", str(tmp_path / "federation.toml"), "--once")
    assert code == 78
    assert "service's configuration" in err


async def test_no_retained_state_ends_at_the_timeout(
    plant: Plant, production_broker: MosquittoBroker, tmp_path: Path
) -> None:
    config = monitor_config(plant, production_broker, tmp_path)
    code, out, err = await monitor(
        "--config",
        str(config),
        "--federation",
        "nothing-here",
        "--once",
        "--json",
        "--timeout",
        "1",
    )
    assert code == 70
    assert json.loads(out)["complete"] is False
    assert "did not arrive within 1 s" in err
