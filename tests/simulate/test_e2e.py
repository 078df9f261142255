"""End to end: real Mosquitto (or amqtt), the real aggregator, real agents, real ONNX.

Covers the federation's promises under a simulation: the global model is exactly the
FedAvg of the updates that went over the wire; rounds close by their deadline when a
third of the devices are killed mid-round; a broker restart mid-round loses no accepted
update; and nothing the simulator started outlives it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge_agent.config import AgentSettings
from fedmq.aggregator.store import read_records
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.datasets.digits import load_digits_split
from fedmq.simulate import Simulation, SimulationError, SimulationOptions, TrainingOverrides
from fedmq.simulate.fleet import InProcessFleet, ProcessFleet
from fedmq.simulate.workloads import builtin_bundle_dir
from fedmq.wire.control import Ack
from simulate.support import alive, check_fedavg, cli, run_watching

pytestmark = [pytest.mark.broker, pytest.mark.slow]

CHANCE = 0.1  # ten digit classes


def _assert_nothing_left(simulation: Simulation) -> None:
    assert simulation.broker is not None
    assert not simulation.broker.is_running()
    fleet = simulation.fleet
    if isinstance(fleet, ProcessFleet):
        assert fleet.pids()  # it did start processes...
        assert alive(fleet.pids()) == []  # ...and every one has exited


async def test_subprocess_agents_train_and_the_model_is_the_fedavg_of_the_wire(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report"
    options = SimulationOptions(
        agents=5, rounds=3, processes=True, broker="mosquitto", out=out, keep_updates=True
    )
    simulation = Simulation(options)
    result = await simulation.run()

    assert [row.outcome for row in result.rows] == ["closed"] * 3
    assert all(row.updates_accepted == 5 for row in result.rows)
    assert result.rows[-1].test_accuracy is not None
    assert result.rows[-1].test_accuracy > 5 * CHANCE
    records = check_fedavg(out, builtin_bundle_dir("digits_mlp"))
    assert [len(r.contributions) for r in records] == [5, 5, 5]
    # The exported model is the last checkpoint, standalone, and as accurate as reported.
    _, test = load_digits_split()
    session = ort.InferenceSession(str(out / "model.onnx"))
    predicted = session.run(None, {"input": test.x})[0].argmax(axis=1)
    assert np.mean(predicted == test.y) == pytest.approx(result.rows[-1].test_accuracy)
    assert result.summary["bytes"]["up"] == sum(row.bytes_up for row in result.rows) > 0
    for name in ("rounds.csv", "rounds.json", "summary.json", "summary.txt", "metrics.png"):
        assert (out / name).stat().st_size > 0
    _assert_nothing_left(simulation)


async def test_killing_a_third_of_the_agents_mid_round_closes_every_round_by_its_deadline(
    tmp_path: Path,
) -> None:
    options = SimulationOptions(
        agents=6,
        rounds=3,
        processes=True,
        drop_rate=1 / 3,
        deadline_s=30,
        broker="mosquitto",
        out=tmp_path / "report",
        training=TrainingOverrides(epochs=1),
    )
    simulation = Simulation(options)
    result = await simulation.run()

    records = list(read_records(result.out / "aggregator"))
    assert len(records) == 3
    for record in records:
        victims = simulation.dropped[record.round]
        assert record.selected is not None
        assert len(victims) == options.victims(len(record.selected)) >= 1
        assert set(victims) <= set(record.selected)
        assert record.outcome == "closed"
        assert record.closed_at < record.deadline  # closed by, indeed well before, the deadline
        assert not record.extended
        contributors = {c.client for c in record.contributions}
        survivors = set(record.selected) - set(victims)
        # The kill -9 races the announcement: a victim quick enough to upload before it
        # dies has contributed, and then the round may close on its target instead.
        assert survivors <= contributors <= set(record.selected)
        if contributors == survivors:
            assert record.reason == "dropouts"
        else:
            assert record.reason == "target"
    assert len(records[0].selected or ()) == 6  # round 1: the whole fleet, a third killed
    assert len(simulation.dropped[1]) == 2
    assert [row.dropped_agents for row in result.rows] == [
        len(simulation.dropped[r]) for r in (1, 2, 3)
    ]
    _assert_nothing_left(simulation)


async def test_a_broker_restart_mid_round_loses_no_accepted_update(
    make_broker: Callable[..., MosquittoBroker], tmp_path: Path
) -> None:
    broker = make_broker(persistence=True)
    restarts: list[int] = []

    def restart_after_the_first_ack_of_round_2(ack: Ack) -> None:
        if ack.round == 2 and ack.accepted and not restarts:
            restarts.append(ack.round)
            # Synchronous on purpose: the aggregator shares this event loop, so updates
            # the broker already delivered to it are neither stored nor acked while the
            # broker goes away; the agents (on their own loop) are mid-upload.
            broker.restart()

    out = tmp_path / "report"
    options = SimulationOptions(agents=5, rounds=3, out=out, keep_updates=True)
    simulation = Simulation(options, broker=broker, on_ack=restart_after_the_first_ack_of_round_2)
    result = await simulation.run()

    assert restarts == [2]
    records = check_fedavg(out, builtin_bundle_dir("digits_mlp"))
    assert [r.outcome for r in records] == ["closed"] * 3
    for record in records:
        assert sorted(c.client for c in record.contributions) == sorted(record.selected or ())
        assert len(record.contributions) == 5
    service = simulation.service
    assert service is not None
    assert service.statistics().updates_accepted == 15  # each accepted update counted once
    fleet = simulation.fleet
    assert isinstance(fleet, InProcessFleet)
    stats = fleet.statistics()
    assert all(s.connections >= 2 for s in stats.values())  # every agent rejoined
    assert all(s.rounds_trained == 3 for s in stats.values())
    assert result.rows[-1].test_accuracy is not None
    assert result.rows[-1].test_accuracy > 5 * CHANCE


def test_the_quickstart_command_writes_a_report_and_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = run_watching(
        cli(
            "simulate",
            "--agents",
            "10",
            "--rounds",
            "2",
            "--partition",
            "dirichlet:0.5",
            "--broker",
            "mosquitto",
            "--out",
            str(out),
        ),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == f"report: {out}"
    assert "broker: mosquitto" in run.stderr
    assert "round 2/2 closed" in run.stderr
    for name in ("rounds.csv", "summary.txt", "metrics.png", "model.onnx", "simulate.log"):
        assert (out / name).is_file()
    assert run.children  # the broker ran as a child...
    assert alive(run.children) == []  # ...and is gone


def test_the_embedded_broker_runs_a_federation(tmp_path: Path) -> None:
    out = tmp_path / "embedded"
    run = run_watching(
        cli(
            "simulate", "--agents", "3", "--rounds", "2", "--broker", "embedded", "--out", str(out)
        ),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "broker: embedded" in run.stderr
    summary = (out / "summary.txt").read_text()
    assert "rounds closed 2, failed 0" in summary
    assert alive(run.children) == []


def test_ctrl_c_stops_every_process_it_started(tmp_path: Path) -> None:
    def interrupt(process: subprocess.Popen[str]) -> None:
        process.send_signal(signal.SIGINT)

    run = run_watching(
        cli(
            "simulate",
            "--agents",
            "3",
            "--rounds",
            "1000",
            "--processes",
            "--broker",
            "mosquitto",
            "--out",
            str(tmp_path / "interrupted"),
        ),
        timeout=120,
        when=lambda line: "round 1/1000 closed" in line,
        then=interrupt,
    )
    assert run.returncode == 130, run.stderr
    assert "interrupted" in run.stderr
    assert len(run.children) >= 4  # the broker and three agents
    assert alive(run.children) == []


def test_a_simulator_killed_with_sigkill_takes_its_children_along(tmp_path: Path) -> None:
    def kill(process: subprocess.Popen[str]) -> None:
        process.send_signal(signal.SIGKILL)

    run = run_watching(
        cli(
            "simulate",
            "--agents",
            "2",
            "--rounds",
            "1000",
            "--processes",
            "--broker",
            "mosquitto",
            "--out",
            str(tmp_path / "killed"),
        ),
        timeout=120,
        when=lambda line: "round 1/1000 closed" in line,
        then=kill,
    )
    assert run.returncode == -signal.SIGKILL
    assert len(run.children) >= 3  # the broker and two agents
    for _ in range(100):  # the kernel delivers the death signals asynchronously
        if not alive(run.children):
            break
        time.sleep(0.05)
    assert alive(run.children) == []


async def test_an_agent_that_cannot_start_fails_the_run_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmq.simulate import settings as simulated

    original = simulated.agent_settings

    def unusable_state_dir(*args: Any, **kwargs: Any) -> AgentSettings:
        settings = original(*args, **kwargs)
        # /proc refuses new directories: the agent stops with its configuration error.
        return settings.model_copy(update={"state_dir": Path("/proc/fedmq-cannot-write")})

    monkeypatch.setattr(simulated, "agent_settings", unusable_state_dir)
    simulation = Simulation(SimulationOptions(agents=2, rounds=1, out=tmp_path / "report"))
    with pytest.raises(SimulationError, match="failed to start"):
        await simulation.run()
    assert simulation.broker is not None
    assert not simulation.broker.is_running()
    assert simulation.service is None  # devices come first: the aggregator never started
