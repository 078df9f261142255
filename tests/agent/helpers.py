"""Helpers for agent tests: real digits data on disk, an in-process agent, polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import AgentSettings
from edge_agent.daemon import Agent
from edge_agent.systemd import Notifier
from fedmq.timeouts import within

DIGITS_EXAMPLES = 360  # enough for a real round, few enough to train in well under a second


def write_digits(directory: Path, count: int = DIGITS_EXAMPLES, *, image: bool = False) -> Path:
    """Write scikit-learn's bundled digits as ``train.npz`` (x scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data[:count] / 16.0).astype(np.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(directory / "train.npz", x=x, y=bunch.target[:count].astype(np.int64))
    return directory


AGENT_READY_TIMEOUT = 10.0  # seconds: a local broker accepts the connection in milliseconds
AGENT_STOP_TIMEOUT = 15.0  # seconds: above the agent's STOP_GRACE plus the offline publish


@contextlib.asynccontextmanager
async def running_agent(
    settings: AgentSettings, notifier: Notifier | None = None
) -> AsyncIterator[Agent]:
    """Run an agent in this event loop until it is ready; stop it cleanly on exit."""
    agent = Agent(settings, notifier=notifier or Notifier({}))
    task = asyncio.create_task(agent.run())
    try:
        await within(agent.wait_ready(), AGENT_READY_TIMEOUT)  # raises what run() failed with
        yield agent
    finally:
        agent.request_stop()
        await within(task, AGENT_STOP_TIMEOUT)


async def eventually(predicate: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    """Wait until ``predicate()`` holds (polling), or fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.05)


def write_config(path: Path, settings: AgentSettings) -> Path:
    """Write ``settings`` as the TOML file ``fedmq-agent run --config`` reads."""
    broker = settings.broker
    data = settings.data
    lines = [
        f'client_id = "{settings.client_id}"',
        f'federation = "{settings.federation}"',
        f'state_dir = "{settings.state_dir}"',
        f"heartbeat_s = {settings.heartbeat_s}",
        "[broker]",
        f'url = "{broker.url}"',
        "[data]",
        f'path = "{data.path}"',
        "[limits]",
        f"round_retry_s = {settings.limits.round_retry_s}",
        f"download_timeout_s = {settings.limits.download_timeout_s}",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def agent_command(config: Path, command: str = "run") -> list[str]:
    """The agent as a separate process, exactly as systemd starts it."""
    return [sys.executable, "-m", "edge_agent", command, "--config", str(config)]


def spawn_agent(
    config: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``fedmq-agent run`` with stderr going to ``log``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FEDMQ_", "NOTIFY_"))}
    environ.update(env or {})
    with open(log, "ab") as sink:
        return subprocess.Popen(
            agent_command(config), stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, env=environ
        )
