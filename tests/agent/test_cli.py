"""``fedmq-agent`` as a process: exit codes, systemd notifications, SIGTERM, kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.helpers import agent_command, eventually, spawn_agent, write_config
from agent.scripted import ScriptedAggregator
from edge_agent.config import AgentSettings
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.exit_codes import CONFIG_ERROR as EXIT_CONFIG
from fedmq.wire.training import TrainingConfig

SIGTERM_EXIT_LIMIT = 10.0  # seconds: the requirement (systemd's default is 90)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
        check=False,
    )


def minimal_config(data: Path) -> str:
    return (
        f'client_id = "a"\nfederation = "f"\n[broker]\nurl = "mqtt://h"\n[data]\npath = "{data}"\n'
    )


def test_bad_config_exits_with_the_config_code_and_a_clear_message(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'client_id = "has space"\nfederation = "f"\n[broker]\nurl = "mqtt://h"\n'
        f'[data]\npath = "{tmp_path}"\n'
    )
    result = run_cli("run", "--config", str(config))
    assert result.returncode == EXIT_CONFIG
    assert "configuration error" in result.stderr
    assert "client_id" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_and_bad_environment_are_config_errors(tmp_path: Path) -> None:
    assert run_cli("run", "--config", str(tmp_path / "absent.toml")).returncode == EXIT_CONFIG
    config = tmp_path / "agent.toml"
    config.write_text(minimal_config(tmp_path))
    result = run_cli("check", "--config", str(config), env={"FEDMQ_AGENT_THREADS": "lots"})
    assert result.returncode == EXIT_CONFIG
    assert "threads" in result.stderr


def test_check_prints_the_effective_config_without_secrets(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(minimal_config(tmp_path))
    result = run_cli(
        "check",
        "--config-only",  # tmp_path holds no data: see test_check.py for the data half
        "--config",
        str(config),
        env={"FEDMQ_AGENT_BROKER__PASSWORD": "hunter2"},
    )
    assert result.returncode == 0, result.stderr
    assert '"client_id": "a"' in result.stdout
    assert "hunter2" not in result.stdout


def test_usage_errors_exit_2() -> None:
    assert run_cli().returncode == 2
    assert run_cli("run").returncode == 2


def test_locked_state_dir_is_a_config_error(
    broker: MosquittoBroker, make_settings: Callable[..., AgentSettings], tmp_path: Path
) -> None:
    from edge_agent.state import StateDir

    settings = make_settings(broker.url)
    holder = StateDir(settings.state_dir, settings.federation)
    try:
        result = subprocess.run(
            agent_command(write_config(tmp_path / "agent.toml", settings)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        holder.close()
    assert result.returncode == EXIT_CONFIG
    assert "another fedmq-agent" in result.stderr


class NotifyListener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def seen(self, field: str) -> bool:
        return any(field in message.split("\n") for message in self.drain())


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    notify = NotifyListener(tmp_path / "notify.sock")
    yield notify
    notify.sock.close()


@pytest.mark.broker
@pytest.mark.slow
async def test_sigterm_during_training_exits_0_quickly_and_says_so(
    broker: MosquittoBroker,
    federation: str,
    make_settings: Callable[..., AgentSettings],
    tmp_path: Path,
    listener: NotifyListener,
) -> None:
    settings = make_settings(broker.url)
    config = write_config(tmp_path / "agent.toml", settings)
    aggregator = ScriptedAggregator(broker.url, federation)
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model("digits_cnn")
        process = spawn_agent(
            config,
            tmp_path / "agent.log",
            {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"},
        )
        try:
            await eventually(lambda: listener.seen("READY=1"), what="READY=1")
            # Long enough to be interrupted: ~12 000 CNN steps.
            long_training = TrainingConfig(epochs=1000, batch_size=32, lr=0.01)
            await aggregator.announce(1, bundle, params, training=long_training)
            # Heartbeats keep coming while the worker thread trains.
            training = await aggregator.wait_status(lambda s: s.state == "training")
            await eventually(
                lambda: (
                    sum(s.state == "training" and s.ts > training.ts for s in aggregator.statuses)
                    >= 2
                ),
                what="heartbeats during training",
            )
            assert listener.seen("WATCHDOG=1")
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, SIGTERM_EXIT_LIMIT * 2)
            elapsed = time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
        log = (tmp_path / "agent.log").read_text()
        assert code == 0, log
        assert elapsed < SIGTERM_EXIT_LIMIT, log
        assert listener.seen("STOPPING=1")
        await aggregator.wait_status(lambda s: s.state == "offline")
    assert aggregator.updates == {}
    assert not any(Path(settings.state_dir, "outbox").iterdir())
    progress = [s.progress for s in aggregator.statuses if s.state == "training" and s.progress]
    assert progress
    assert progress == sorted(progress)


@pytest.mark.broker
@pytest.mark.slow
async def test_kill_9_mid_upload_then_restart_resends_the_outbox_exactly_once(
    broker: MosquittoBroker,
    federation: str,
    make_settings: Callable[..., AgentSettings],
    tmp_path: Path,
) -> None:
    settings = make_settings(broker.url)
    config = write_config(tmp_path / "agent.toml", settings)
    log = tmp_path / "agent.log"
    aggregator = ScriptedAggregator(broker.url, federation, hold_acks=True)
    process = spawn_agent(config, log)
    killed: list[int] = []

    def kill_on_first_chunk(_topic: object) -> None:
        if not killed:
            killed.append(process.pid)
            process.send_signal(signal.SIGKILL)

    aggregator.on_chunk = kill_on_first_chunk
    try:
        async with aggregator.running():
            bundle, params, _ = await aggregator.publish_model()
            await aggregator.wait_status(lambda s: s.state == "idle")
            await aggregator.announce(1, bundle, params, chunk_size=1024)
            await eventually(lambda: bool(killed), what="the first update chunk")
            assert await asyncio.to_thread(process.wait, 30) == -signal.SIGKILL
            # The broker publishes the dead agent's last will.
            await aggregator.wait_status(lambda s: s.state == "offline")
            (first_uid,) = aggregator.chunk_uids

            aggregator.hold_acks = False
            process = spawn_agent(config, log)
            await aggregator.wait_updates(1)
            await eventually(
                lambda: not any(Path(settings.state_dir, "outbox").iterdir()),
                what="the outbox to empty",
            )
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert aggregator.chunk_uids == {first_uid}  # re-sent, never retrained
    assert list(aggregator.updates) == [first_uid]
    assert [a.update_id for a in aggregator.acks] == [first_uid]
    assert "sending update" in log.read_text()


def test_unreadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    cert = tmp_path / "device.pem"
    cert.write_text("not a certificate")
    config.write_text(
        f'client_id = "a"\nfederation = "f"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[broker]\nurl = "mqtts://127.0.0.1:1"\ncert_file = "{cert}"\n'
        f'[data]\npath = "{tmp_path}"\n'
    )
    result = run_cli("run", "--config", str(config))
    assert result.returncode == EXIT_CONFIG
    assert "TLS" in result.stderr
