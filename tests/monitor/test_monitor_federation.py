"""``fedmq monitor`` and ``mosquitto_sub`` watching a real federation on a real Mosquitto.

A real ``AggregatorService`` and real agents (``edge_agent.Agent``) on a private broker,
so the documented ``fedmq/+/…`` filters see this federation only.  Round 1 closes at
its target of two updates; in round 2, chosen so that the round stays open:

- ``press-1`` trains and is accepted (received 1 of 2 expected);
- ``press-2`` is still training (its training is held back): a straggler;
- ``press-3`` cannot train (its training fails at once): it declines the round;
- ``press-4`` vanishes mid-training (``Agent.abort()``: the broker fires its last
  will): offline, a dropout;
- ``mallory``, a scripted client, uploads bytes that are no update: rejected as
  ``malformed``.

Every wait is for the messages that prove the state, then the monitor is run as the
``fedmq`` command (``--once --json``) and as the live view.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aggregator.scripted import ScriptedAgent, running_service
from aggregator.scripted import make_settings as service_settings
from rich.console import Console

from edge_agent.config import AgentSettings
from edge_agent.daemon import Agent
from edge_agent.rounds import RoundOutput
from edge_agent.systemd import Notifier
from edge_agent.training import run_in_thread
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.errors import TrainingCancelled, TrainingError
from fedmq.monitor.live import watch
from fedmq.monitor.state import MonitorState
from fedmq.monitor.view import render
from fedmq.testing.scripted_clients import ScriptedConnection
from fedmq.timeouts import within
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.wire.control import AgentStatus, AggregatorStatus, RoundAnnouncement, decode_control

pytestmark = [pytest.mark.broker]

WAIT = 30.0
Work = Callable[[], RoundOutput]
Runner = Callable[[Work, str], Awaitable[RoundOutput]]


def trains_only(release: asyncio.Event, *rounds: int) -> Runner:
    """Train the given rounds; hold any other round's training until ``release``."""

    async def runner(function: Work, name: str) -> RoundOutput:
        if int(name.rsplit("-", 1)[1]) in rounds:
            return await run_in_thread(function, name)
        await release.wait()  # "still training"
        raise TrainingCancelled("released by the test")

    return runner


async def cannot_train(function: Work, name: str) -> RoundOutput:
    raise TrainingError("cannot read data/train.npz: truncated file")


class RunningAgent:
    """An in-process agent with the training runner of the test."""

    def __init__(self, settings: AgentSettings, runner: Runner) -> None:
        self.agent = Agent(settings, notifier=Notifier({}), train_runner=runner)
        self.task = asyncio.create_task(self.agent.run())

    async def kill(self) -> None:
        """Vanish like a device losing power: the broker publishes the last will."""
        self.agent.abort()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def agent_running(settings: AgentSettings, runner: Runner) -> AsyncIterator[RunningAgent]:
    running = RunningAgent(settings, runner)
    try:
        await within(running.agent.wait_ready(), WAIT)
        yield running
    finally:
        if not running.task.done():
            running.agent.request_stop()
        with contextlib.suppress(asyncio.CancelledError):
            await within(running.task, WAIT)


def fedmq_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from fedmq.cli.app import main; main()", *args]


async def run(command: list[str], timeout: float = WAIT) -> tuple[int, str, str]:
    """Run a command without blocking the event loop the federation runs on."""
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await within(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class Probe(ScriptedConnection):
    """Records every control message of the federation (what a monitor may read)."""

    def latest(self, client: str) -> AgentStatus | None:
        return next((s for s in reversed(self.agent_statuses) if s.client == client), None)

    def status(self) -> AggregatorStatus | None:
        return self.statuses[-1] if self.statuses else None


def stable_round_two(probe: Probe) -> bool:
    status = probe.status()
    if status is None or (status.state, status.round) != ("collecting", 2):
        return False
    trained, held, sick, gone = (
        probe.latest(c) for c in ("press-1", "press-2", "press-3", "press-4")
    )
    return (
        status.received == 1
        and status.rejected.get("malformed") == 1
        and status.missing == ["press-2", "press-4"]
        and trained is not None
        and (trained.state, trained.round) == ("idle", 2)
        and held is not None
        and (held.state, held.round) == ("training", 2)
        and sick is not None
        and (sick.state, sick.round, sick.declined) == ("declined", 2, "training_failed")
        and gone is not None
        and gone.state == "offline"
    )


async def test_a_federation_seen_by_fedmq_monitor_and_mosquitto_sub(
    make_broker: Callable[..., MosquittoBroker],
    federation: str,
    tmp_path: Path,
    make_settings: Callable[..., AgentSettings],
) -> None:
    broker = make_broker()
    settings = make_settings_for_service(broker, federation, tmp_path)
    release = asyncio.Event()  # lets the held trainings end when the test is over
    agents = {
        "press-1": trains_only(release, 1, 2),
        "press-2": trains_only(release, 1),
        "press-3": cannot_train,
        "press-4": trains_only(release),
    }
    probe = Probe(
        broker.url,
        federation,
        subscriptions=[
            (f"fedmq/{federation}/round", 1),
            (f"fedmq/{federation}/status/+", 1),
            (f"fedmq/{federation}/aggregator/status", 1),
        ],
    )
    async with contextlib.AsyncExitStack() as stack:
        await probe.connect()
        stack.push_async_callback(probe.disconnect)
        service = await stack.enter_async_context(running_service(settings))
        running: dict[str, RunningAgent] = {}
        for client, runner in agents.items():
            agent_settings = make_settings(
                broker.url, client, limits={"round_retry_s": 60.0, "download_timeout_s": 20}
            )
            running[client] = await stack.enter_async_context(agent_running(agent_settings, runner))
        stack.callback(release.set)  # before the agents stop
        mallory = ScriptedAgent(broker, federation, "mallory")
        await mallory.start()
        stack.push_async_callback(mallory.stop)

        await probe.wait_round(2, timeout=WAIT)
        await mallory.send_bytes(2, b"these bytes are no fedmq update", "mallory-2")
        await probe.wait_until(
            lambda: (
                (s := probe.latest("press-4")) is not None and (s.state, s.round) == ("training", 2)
            ),
            WAIT,
        )
        await running["press-4"].kill()  # the broker fires its last will: offline
        await probe.wait_until(lambda: stable_round_two(probe), WAIT)
        assert service.statistics().rounds_closed == 1

        # ---- fedmq monitor --once --json, as a script would run it
        code, out, err = await run(
            fedmq_command(
                "monitor", "--broker", broker.url, "--federation", federation, "--once", "--json"
            )
        )
        assert code == 0, err
        snapshot = json.loads(out)
        (tmp_path / "snapshot.json").write_text(out)
        check_snapshot(snapshot)

        # ---- the live view of the same state, drawn to text
        console = Console(record=True, width=140, color_system=None)
        console.print(render(snapshot))
        check_view(console.export_text())

        # ---- the live loop itself, until it has seen the dropout
        state = MonitorState(federation)
        stop = asyncio.Event()
        screen = Console(file=io.StringIO(), record=True, width=140, color_system=None)
        settings_live = BrokerSettings(broker.url, "monitor-live", persistent_session=False)
        live = asyncio.create_task(watch(settings_live, state, screen, refresh_s=0.05, stop=stop))
        await within(wait_for_state(state, lambda s: s["dropouts"] == ["press-4"]), WAIT)
        stop.set()
        await within(live, WAIT)
        check_view(screen.export_text())

        # ---- mosquitto_sub with the documented filters: every message is JSON
        await check_mosquitto_sub(broker, federation)


def make_settings_for_service(broker: MosquittoBroker, federation: str, tmp_path: Path) -> Any:
    return service_settings(
        broker,
        federation,
        tmp_path / "state",
        rounds=3,
        round={"deadline_s": 120.0, "min_agents": 5, "target_updates": 2},
        exit_when_finished=False,
    )


async def wait_for_state(state: MonitorState, predicate: Callable[[dict[str, Any]], bool]) -> None:
    while not (state.baseline and predicate(state.snapshot(time.time()))):
        await asyncio.sleep(0.02)


def check_snapshot(snapshot: dict[str, Any]) -> None:
    assert snapshot["complete"] is True
    aggregator = snapshot["aggregator"]
    assert (aggregator["state"], aggregator["round"], aggregator["rounds"]) == ("collecting", 2, 3)
    assert (aggregator["received"], aggregator["expected"]) == (1, 2)
    assert aggregator["missing"] == ["press-2", "press-4"]
    assert aggregator["missing_count"] == 2
    assert 60 < aggregator["deadline_in_s"] <= 120
    assert aggregator["bytes_in"] > 0
    assert aggregator["bytes_out"] > 0
    assert aggregator["signature"] == "unverified"
    last = aggregator["last_round"]
    assert (last["round"], last["outcome"], last["reason"], last["updates"]) == (
        1,
        "closed",
        "target",
        2,
    )
    assert last["bytes_in"] > 0
    assert last["duration_s"] > 0
    states = {a["client"]: a["state"] for a in snapshot["agents"]}
    assert states == {
        "mallory": "online",
        "press-1": "idle",
        "press-2": "training",
        "press-3": "declined",
        "press-4": "offline",
    }
    assert snapshot["stragglers"] == ["press-2"]
    assert snapshot["dropouts"] == ["press-4"]
    assert snapshot["declined"] == ["press-3"]
    counts = snapshot["counts"]
    assert (counts["selected"], counts["received"], counts["expected"]) == (5, 1, 2)
    assert (counts["stragglers"], counts["dropouts"], counts["declined"]) == (1, 1, 1)
    assert snapshot["rejections"]["by_reason"] == {"malformed": 1}
    [rejection] = [r for r in snapshot["rejections"]["recent"] if r["round"] == 2]
    assert (rejection["client"], rejection["reason"]) == ("mallory", "malformed")
    [point] = snapshot["history"]
    assert point["round"] == 1
    assert point["outcome"] == "closed"
    assert point["loss"] is not None
    assert point["accuracy"] is not None
    assert snapshot["problems"]["count"] == 0


def check_view(text: str) -> None:
    assert "collecting  round 2/3" in text
    assert "received 1 / expected 2  missing 2" in text
    assert "stragglers: press-2" in text
    assert "dropouts: press-4" in text
    assert "declined: press-3" in text
    assert "last round 1: closed (target)" in text
    assert "rejections this round: malformed 1" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 6}
    assert "offline" in rows["press-4 *"]
    assert "declined: training_failed" in rows["press-3 *"]
    assert "truncated file" in rows["press-3 *"]
    assert "training" in rows["press-2 *"]
    rejection = next(line for line in text.splitlines() if "not a fedmq message" in line)
    assert "mallory" in rejection
    assert "malformed" in rejection


async def check_mosquitto_sub(broker: MosquittoBroker, federation: str) -> None:
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        pytest.fail("mosquitto_sub is not installed; `make test` installs mosquitto-clients")
    # The retained messages: one announcement, one aggregator status, five agent statuses.
    code, out, err = await run(
        [
            binary,
            "-h",
            broker.host,
            "-p",
            str(broker.port),
            "-v",
            "-t",
            "fedmq/+/round",
            "-t",
            "fedmq/+/status/+",
            "-t",
            "fedmq/+/aggregator/status",
            "-C",
            "7",
        ]
    )
    assert code == 0, err
    seen: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        topic, _, payload = line.partition(" ")
        assert topic.startswith(f"fedmq/{federation}/")
        seen[topic] = json.loads(payload)
    prefix = f"fedmq/{federation}"
    assert seen[f"{prefix}/round"]["type"] == "round"
    decode_control(json.dumps(seen[f"{prefix}/round"]).encode(), RoundAnnouncement)
    status = seen[f"{prefix}/aggregator/status"]
    assert status["type"] == "aggregator_status"
    assert status["missing"] == ["press-2", "press-4"]
    agents = {t: m for t, m in seen.items() if "/status/" in t and "/aggregator/" not in t}
    assert agents
    assert all(m["type"] == "agent_status" for m in agents.values())
