"""Model installs on a real Mosquitto: a signed agent refusing forged releases, and a real
``fedmq serve`` federation whose final model a real agent installs and hooks announce."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from aggregator.scripted import serve_process, wait_exit, write_toml
from security.keys import Keys

from agent.helpers import eventually, running_agent
from agent.install_support import announcement, make_models, probe_input, run_model
from edge_agent.config import AgentSettings
from edge_agent.install import metadata_path
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.testing.scripted_clients import ScriptedConnection
from fedmq.transport.blobs import publish_blob
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.control import RoundAnnouncement, encode_control
from fedmq.wire.signing import SigningKey

pytestmark = [pytest.mark.broker]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


async def test_only_a_signed_announcement_gets_its_model_installed(
    broker: MosquittoBroker,
    federation: str,
    tmp_path: Path,
    keys: Keys,
    make_settings: Callable[..., AgentSettings],
) -> None:
    honest, other = make_models(2)
    target = tmp_path / "inference" / "model.onnx"
    target.parent.mkdir()
    settings = make_settings(
        broker.url,
        security=keys.agent_security("dev-1"),
        install={"path": str(target)},
    )
    publisher = ScriptedConnection(broker.url, federation, subscriptions=[])
    await publisher.connect()
    try:
        # Both models' chunks are retained: only the announcement decides.
        for model in (honest, other):
            await publish_blob(
                publisher.session,
                publisher.topics,
                model.data,
                model.ref,
                sender="agg",
                round_id=5,
            )

        async def announce(message: RoundAnnouncement, signer: SigningKey | None) -> None:
            await publisher.session.publish(
                publisher.topics.round(), encode_control(message, signer), retain=True
            )

        await announce(announcement(federation, latest=honest), keys.aggregator)
        async with running_agent(settings) as agent:
            installer = agent.installer
            assert installer is not None
            await eventually(lambda: installer.installs == 1, what="the signed release")
            assert target.read_bytes() == honest.data
            # Unsigned, and signed by a key the agent does not pin: refused, nothing fetched.
            await announce(announcement(federation, latest=other), None)
            await announce(announcement(federation, latest=other), SigningKey.generate())
            await eventually(lambda: agent.statistics().refused_messages >= 2, what="refusals")
            assert target.read_bytes() == honest.data
            assert json.loads(metadata_path(target).read_text())["sha256"] == honest.sha256
            cache = settings.state_dir / "cache"
            assert not (cache / "blobs" / other.sha256).exists()
            assert not (cache / "partial" / other.sha256).exists()
            assert installer.installs == 1
            # The same release, signed: installed (the refusal was the signature's doing).
            await announce(announcement(federation, latest=other), keys.aggregator)
            await eventually(lambda: installer.installs == 2, what="the signed second release")
            assert target.read_bytes() == other.data
    finally:
        await publisher.disconnect()


async def test_a_federation_delivers_its_final_model_to_the_device(
    broker: MosquittoBroker,
    federation: str,
    tmp_path: Path,
    make_settings: Callable[..., AgentSettings],
) -> None:
    """``fedmq serve`` (a process) and an agent: the installed model is ``fedmq export``'s."""
    state = tmp_path / "aggregator"
    config = write_toml(tmp_path / "federation.toml", broker, federation, state)
    text = config.read_text().replace("rounds = 1\n", "rounds = 2\n")
    config.write_text(
        text + '\n[delivery]\npublish_models = true\nbest_metric = "eval_loss"\nbest_mode = "min"\n'
    )
    target = tmp_path / "inference" / "model.onnx"
    target.parent.mkdir()
    hook_file = tmp_path / "hook.txt"
    hook_topic = f"plant/{uuid.uuid4().hex[:8]}/model"
    settings = make_settings(
        broker.url,
        install={
            "path": str(target),
            "hook_command": [
                sys.executable,
                "-c",
                "import os, sys; open(sys.argv[1], 'a').write("
                "os.environ['FEDMQ_MODEL_CHECKPOINT'] + ' ' + os.environ['FEDMQ_MODEL_SHA256']"
                " + '\\n')",
                str(hook_file),
            ],
            "hook_topic": hook_topic,
            "hook_broker": {"url": broker.url},  # this broker stands in for a local one
        },
    )
    log = tmp_path / "serve.log"
    # A local service's view of the hook topic (this broker stands in for a local one).
    received: list[Message] = []

    async def keep(message: Message) -> None:
        received.append(message)

    listener = MqttSession(
        BrokerSettings(broker.url, f"listener-{uuid.uuid4().hex[:6]}", persistent_session=False),
        subscriptions=[(hook_topic, 1)],
    )
    listening = asyncio.create_task(listener.run(keep))
    serve = serve_process(config, log)
    try:
        async with running_agent(settings) as agent:
            installer = agent.installer
            assert installer is not None
            await eventually(
                lambda: installer.installed is not None and installer.installed.checkpoint == 2,
                timeout=90,
                what="the final model installed",
            )
            installed = installer.installed
            assert installed is not None

            def announced() -> list[str]:
                return [json.loads(m.payload)["sha256"] for m in received if m.payload]

            await eventually(lambda: installed.sha256 in announced(), what="the hook message")
            assert wait_exit(serve) == 0, log.read_text()[-3000:]
    finally:
        if serve.poll() is None:
            serve.kill()
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    exported = tmp_path / "exported.onnx"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from fedmq.cli.app import main; main()",
            "export",
            "--config",
            str(config),
            "--round",
            "2",
            "--out",
            str(exported),
        ],
        check=True,
        capture_output=True,
    )
    model = target.read_bytes()
    assert hashlib.sha256(model).hexdigest() == installed.sha256
    x = probe_input()
    assert run_model(model, x) == run_model(exported.read_bytes(), x)
    assert model == exported.read_bytes()  # the same serialisation, byte for byte
    assert np.isfinite(np.frombuffer(run_model(model, x), np.float32)).all()
    ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])  # loads from its path
    meta = json.loads(metadata_path(target).read_text())
    assert (meta["federation"], meta["checkpoint"], meta["release"]) == (federation, 2, "latest")
    # The hook command ran after each install, the last one for checkpoint 2.
    last = hook_file.read_text().splitlines()[-1]
    assert last == f"2 {installed.sha256}"
    # The finished federation keeps its final release retained for devices that come later.
    late = make_settings(
        broker.url, client_id="dev-late", install={"path": str(tmp_path / "late.onnx")}
    )
    async with running_agent(late) as agent:
        installer = agent.installer
        assert installer is not None
        await eventually(lambda: installer.installs == 1, what="a late device's install")
    assert (tmp_path / "late.onnx").read_bytes() == model
