"""``fedmq simulate --broker mqtt://…``: rehearsing on a broker the simulator does not own.

The "external" broker is a Mosquitto started by the test with a restrictive profile: a
128 KiB packet cap (AWS IoT Core's), MQTT 3.1.1 only as far as the simulator knows
(``--protocol 3.1.1``: no CONNACK tells it the cap, ``--max-packet-size`` does), and
password authentication, so every part of the run must carry the credentials.

Absence of what the run retained is proven, never waited for: a fresh subscriber to
``<root>/#`` reads until its own marker message comes back
(:func:`fedmq.transport.retained.retained_snapshot`), which the broker delivers only
after every retained message of the subscription.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import secrets
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.errors import ConfigError
from fedmq.simulate import Simulation, SimulationOptions
from fedmq.simulate.options import PASSWORD_ENV, external_broker
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.transport.retained import retained_snapshot
from simulate.support import alive, cli, run_watching

pytestmark = [pytest.mark.broker, pytest.mark.slow]

USER, PASSWORD = "rehearsal", "s3cret-" + secrets.token_hex(4)
PACKET_CAP = 131072  # bytes: AWS IoT Core's 128 KB
WAIT = 10.0  # seconds for a broker operation on loopback
FEDERATION = "sim-digits-mlp"  # the shipped digits MLP's federation id


def password_file(path: Path, user: str, password: str) -> Path:
    """A Mosquitto 2 password file (what ``mosquitto_passwd`` writes: PBKDF2-SHA512)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    encoded = f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    path.write_text(f"{user}:{encoded}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def plant_broker(make_broker: Callable[..., MosquittoBroker], tmp_path: Path) -> MosquittoBroker:
    """A restrictive broker that refuses anonymous clients."""
    passwords = password_file(tmp_path / "passwd", USER, PASSWORD)
    return make_broker(
        max_packet_size=PACKET_CAP,
        max_inflight_messages=20,
        extra_lines=["allow_anonymous false", f"password_file {passwords}"],
    )


def credentials(broker: MosquittoBroker, client_id: str) -> BrokerSettings:
    return BrokerSettings(broker.url, client_id, username=USER, password=PASSWORD, protocol="3.1.1")


async def retained_under(broker: MosquittoBroker, root: str) -> dict[str, bytes]:
    """Every retained message under ``<root>/#``, as a fresh subscriber gets them."""
    probe = credentials(broker, f"probe-{secrets.token_hex(4)}")
    async with retained_snapshot(
        probe, f"{root}/#", f"probe/{probe.client_id}/marker", timeout=WAIT
    ) as scan:
        return scan.messages


def session_present(broker: MosquittoBroker, client_id: str) -> bool:
    """Whether the broker still holds a persistent session for ``client_id``."""
    flags: list[bool] = []
    connected = threading.Event()
    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=paho.MQTTv311,
    )
    client.username_pw_set(USER, PASSWORD)

    def on_connect(*args: object) -> None:
        flags.append(bool(getattr(args[2], "session_present", False)))
        connected.set()

    client.on_connect = on_connect
    address = broker.url.removeprefix("mqtt://").rsplit(":", 1)
    client.connect(address[0], int(address[1]))
    client.loop_start()
    try:
        assert connected.wait(WAIT), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return flags[0]


def simulate_command(broker: MosquittoBroker, out: Path, *extra: str) -> list[str]:
    return cli(
        "simulate",
        *("--agents", "2", "--epochs", "1", "--out", str(out)),
        *("--broker", broker.url, "--username", USER, "--protocol", "3.1.1"),
        *("--max-packet-size", str(PACKET_CAP)),
        *extra,
    )


def topic_root(stderr: str) -> str:
    found = re.search(r"topic root (fedmq-sim-[0-9a-f]{8}),", stderr)
    assert found, stderr
    return found.group(1)


def cleared(stderr: str, root: str) -> int:
    """How many retained messages the run says it cleared under its prefix."""
    found = re.search(rf"cleared (\d+) retained messages under {root}/{FEDERATION}/;", stderr)
    assert found, stderr
    return int(found.group(1))


def test_a_rehearsal_on_a_restrictive_broker_leaves_nothing_behind(
    plant_broker: MosquittoBroker, tmp_path: Path
) -> None:
    out = tmp_path / "rehearsal"
    command = simulate_command(plant_broker, out, "--rounds", "2", "--processes")
    run = run_watching(command, timeout=180, env={PASSWORD_ENV: PASSWORD})

    assert run.returncode == 0, run.stderr
    assert "broker: external at " + plant_broker.url in run.stderr
    assert "round 2/2 closed" in run.stderr
    root = topic_root(run.stderr)
    # The finished announcement, the aggregator's and both agents' statuses, and the
    # released inference models a finished federation keeps for late devices: the latest
    # and the best, one chunk each (one blob when the latest is the best). The aggregator
    # clears the bundle and parameter blobs itself.
    assert cleared(run.stderr, root) in (5, 6)
    assert "ended 4 client sessions" in run.stderr  # two agents, aggregator, observer
    assert asyncio.run(retained_under(plant_broker, root)) == {}
    assert not session_present(plant_broker, f"{root}-agent-000")
    assert not session_present(plant_broker, f"{root}-aggregator")
    # The subprocess agents got the password from their environment, not from a file.
    written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".toml", ".json")]
    assert any(p.suffix == ".toml" for p in written)
    assert not [p for p in written if PASSWORD in p.read_text(errors="replace")]
    assert alive(run.children) == []


def test_ctrl_c_mid_rehearsal_still_clears_the_broker(
    plant_broker: MosquittoBroker, tmp_path: Path
) -> None:
    run = run_watching(
        simulate_command(plant_broker, tmp_path / "interrupted", "--rounds", "1000"),
        timeout=120,
        when=lambda line: "round 1/1000 closed" in line,
        then=lambda process: process.send_signal(signal.SIGINT),
        env={PASSWORD_ENV: PASSWORD},
    )
    assert run.returncode == 130, run.stderr
    root = topic_root(run.stderr)
    # Stopped mid-federation: the open round's blobs (bundle, parameters) were retained too.
    assert cleared(run.stderr, root) >= 6
    assert asyncio.run(retained_under(plant_broker, root)) == {}
    assert alive(run.children) == []


async def test_a_topic_root_in_use_is_refused_before_anything_starts(
    plant_broker: MosquittoBroker, tmp_path: Path
) -> None:
    root = f"plant-{secrets.token_hex(4)}"

    async def ignore(_message: Message) -> None:
        return None

    production = MqttSession(credentials(plant_broker, "production-aggregator"))
    task = asyncio.create_task(production.run(ignore))
    try:
        await production.wait_connected(WAIT)
        await production.publish(
            f"{root}/{FEDERATION}/round", b"{}", qos=1, retain=True, timeout=WAIT
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    options = SimulationOptions(
        agents=1,
        rounds=1,
        out=tmp_path / "refused",
        external_broker=external_broker(
            plant_broker.url, username=USER, password=PASSWORD, protocol="3.1.1"
        ),
        topic_root=root,
    )
    simulation = Simulation(options)
    with pytest.raises(ConfigError, match=rf"{root}/{FEDERATION}/ is in use on "):
        await simulation.run()
    assert simulation.fleet is None  # nothing was started
    assert simulation.cleanup is None  # and nothing of the production federation cleared
    assert list(await retained_under(plant_broker, root)) == [f"{root}/{FEDERATION}/round"]
