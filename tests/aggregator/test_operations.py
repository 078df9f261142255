"""Watching a real federation the way a plant does: Prometheus metrics scraped over HTTP,
the agents' node_exporter textfiles, JSON log lines, and ``fedmq report`` of the state
directory, on a real Mosquitto with two real (training) agents and one that sends garbage."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent.helpers import agent_command, running_agent, write_config, write_digits
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import fedmq
from aggregator.scripted import (
    ScriptedAgent,
    make_settings,
    random_delta,
    records,
    running_service,
    serve_process,
    wait_exit,
    wait_for,
    write_toml,
)
from edge_agent.config import AgentSettings, parse_settings
from fedmq.aggregator import reporting
from fedmq.aggregator.service import AggregatorService
from fedmq.aggregator.store import StateStore
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.cli.commands import app
from fedmq.errors import ConfigError
from fedmq.log_format import make_handler
from fedmq.report.build import write_report

pytestmark = [pytest.mark.broker, pytest.mark.slow]

DEVICES = ("dev-1", "dev-2")
ROUNDS = 2


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a Prometheus exposition, by (name, sorted labels)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            return str(reply.read().decode())

    return await asyncio.to_thread(get)  # the endpoint runs on this event loop


async def scrape_until(port: int, name: str, expected: float, **labels: str) -> Samples:
    """Scrape until ``name`` reaches ``expected`` (the service writes, then reports)."""
    found: Samples = {}

    async def scraped() -> bool:
        found.update(samples(await scrape(port)))
        return found.get((name, tuple(sorted(labels.items())))) == expected

    for _ in range(500):
        if await scraped():
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never reached {expected}")


@contextlib.contextmanager
def json_log(federation: str) -> Iterator[io.StringIO]:
    """JSON lines of everything logged at INFO and above, as ``fedmq serve`` writes them."""
    stream = io.StringIO()
    handler = make_handler("json", stream=stream, federation=federation)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def agent_settings(
    broker: MosquittoBroker, federation: str, tmp: Path, client: str
) -> AgentSettings:
    return parse_settings(
        {
            "client_id": client,
            "federation": federation,
            "state_dir": str(tmp / f"state-{client}"),
            "heartbeat_s": 0.5,
            "broker": {"url": broker.url},
            "data": {"path": str(write_digits(tmp / f"data-{client}"))},
            "limits": {"round_retry_s": 0.5, "download_timeout_s": 20},
            "metrics": {"textfile": str(tmp / "textfiles" / f"{client}.prom")},
        }
    )


async def test_a_run_is_measured_logged_and_reported(
    broker: MosquittoBroker, federation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The "waiting for" line at every change rather than at most every 10 s.
    monkeypatch.setattr(reporting, "WAITING_INTERVAL", 0.0)
    monkeypatch.setattr(reporting, "TICK", 0.05)
    state = tmp_path / "aggregator"
    (tmp_path / "textfiles").mkdir()
    settings = make_settings(
        broker,
        federation,
        state,
        rounds=ROUNDS,
        exit_when_finished=False,  # scraped once more after the last round
        round={"min_agents": 3, "deadline_s": 60},
        training={"epochs": 1, "lr": 0.1},
        metrics_port=0,
        metrics_address="127.0.0.1",
    )
    nan = {k: np.full_like(v, np.nan) for k, v in random_delta(0).items()}
    bad = await ScriptedAgent(broker, federation, "bad").start()
    with json_log(federation) as lines:
        async with contextlib.AsyncExitStack() as stack:
            service = await stack.enter_async_context(running_service(settings))
            port = service.metrics_port
            assert port
            for client in DEVICES:
                await stack.enter_async_context(
                    running_agent(agent_settings(broker, federation, tmp_path, client))
                )
            for round_id in range(1, ROUNDS + 1):
                await bad.wait_round(round_id)
                ack = await bad.wait_ack(await bad.send_update(round_id, nan))
                assert ack.reason == "non_finite"
                if round_id == 1:
                    during = samples(await scrape(port))  # while the round collects
                    await wait_for(lambda: len(records(state)) >= 1)
                    # The state directory of the running service is read, not disturbed.
                    live = write_report(state, tmp_path / "live-report")
                    assert [v.number for v in live.history.rounds] == [1]
            after = await scrape_until(
                port, "fedmq_round_duration_seconds_count", ROUNDS, outcome="closed"
            )
            for client in DEVICES:  # the textfile is rewritten after each round
                path = tmp_path / "textfiles" / f"{client}.prom"
                await wait_for(lambda path=path: _last_round(path) == ROUNDS)
    await bad.stop()

    # -- the metrics endpoint, during the run and after it
    assert value(during, "fedmq_current_round") == 1
    assert value(during, "fedmq_round_phase", phase="collecting") == 1
    assert value(during, "fedmq_agents_online") == 3
    assert value(during, "fedmq_updates_total", result="rejected", reason="non_finite") == 1
    assert value(after, "fedmq_rounds_total", outcome="closed", reason="all_reported") == ROUNDS
    assert value(after, "fedmq_updates_total", result="accepted", reason="on_time") == 2 * ROUNDS
    assert value(after, "fedmq_updates_total", result="rejected", reason="non_finite") == ROUNDS
    assert value(after, "fedmq_round_duration_seconds_count", outcome="closed") == ROUNDS
    assert value(after, "fedmq_fold_duration_seconds_count") == 2 * ROUNDS
    assert value(after, "fedmq_persist_duration_seconds_count", what="record") == ROUNDS
    assert value(after, "fedmq_persist_duration_seconds_count", what="checkpoint") == ROUNDS + 1
    assert value(after, "fedmq_persist_duration_seconds_count", what="updates") >= 1
    assert value(after, "fedmq_round_phase", phase="finished") == 1
    assert value(after, "fedmq_bytes_received_total") > value(during, "fedmq_bytes_received_total")
    assert value(after, "fedmq_bytes_sent_total") > 0
    assert value(after, "fedmq_last_round_metric", metric="eval_accuracy") > 0
    info = {
        "federation": federation,
        "aggregator": settings.client_id,
        "version": fedmq.__version__,
    }
    assert value(after, "fedmq_aggregator_info", **info) == 1

    # -- the agents' textfiles
    for client in DEVICES:
        found = samples(_read(tmp_path / "textfiles" / f"{client}.prom"))
        ids = {"client": client, "federation": federation}
        assert value(found, "fedmq_agent_rounds_trained_total", **ids) == ROUNDS
        assert value(found, "fedmq_agent_rounds_failed_total", **ids) == 0
        assert value(found, "fedmq_agent_last_round", **ids) == ROUNDS
        assert value(found, "fedmq_agent_training_seconds_total", **ids) > 0
        assert value(found, "fedmq_agent_bytes_sent_total", **ids) > 0
        assert value(found, "fedmq_agent_reconnects_total", **ids) == 0
    assert not list((tmp_path / "textfiles").glob(".*"))  # no temporary left behind

    # -- JSON log lines: every line parses, the round's story is there with its ids
    logged = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert logged
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in logged)
    served = [r for r in logged if r["logger"].startswith("fedmq.aggregator")]
    assert all(r["federation"] == federation for r in served)

    def find(pattern: str, **fields: Any) -> dict[str, Any]:
        for r in logged:
            if re.search(pattern, r["message"]) and all(r.get(k) == v for k, v in fields.items()):
                return r
        raise AssertionError(f"no line like {pattern!r} {fields}: {[r['message'] for r in logged]}")

    find(r"^round 1 open: 3 agents selected \(bad, dev-1, dev-2\)", round=1)
    find(
        r"^rejected update \S+ from bad \(round 1\): non_finite",
        round=1,
        client="bad",
        reason="non_finite",
    )
    find(r"^round 1: accepted update \S+ from dev-1", round=1, client="dev-1")
    # Every accepted line counts towards the target, also the one that closes its round
    # (the coordinator has moved on to the next round by the time it is logged).
    accepted = [r["message"] for r in served if " accepted update " in r["message"]]
    assert len(accepted) == 2 * ROUNDS
    assert all(re.search(r"\(\d+ examples\), [12]/3$", m) for m in accepted), accepted
    find(r"^round 1: \d/3 updates in, waiting for", round=1)
    find(
        r"^round 2 closed \(all_reported\) after [\d.]+ s: 2 updates from dev-\d, dev-\d; "
        r"rejected non_finite 1; metrics .*eval_accuracy=",
        round=2,
    )
    find(r"^round 1: trained in", round=1)  # an agent's line, from inside its round task

    # -- fedmq report of the finished run
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(state), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text(encoding="utf-8")
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == 4
    for name in images:
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(png) > 5_000, name
    assert federation in page
    rows = (out / "rounds.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 1 + ROUNDS
    assert "eval_accuracy" in rows[0]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def _last_round(path: Path) -> float | None:
    for family in text_string_to_metric_families(_read(path)):
        if family.name == "fedmq_agent_last_round":
            return family.samples[0].value
    return None


async def test_both_services_write_json_lines_from_their_command_lines(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    config = write_toml(
        tmp_path / "federation.toml",
        broker,
        federation,
        tmp_path / "aggregator",
        extra="[round]\nmin_agents = 1\ndeadline_s = 60\n",
    )
    served_log, agent_log = tmp_path / "serve.log", tmp_path / "agent.log"
    serve = serve_process(config, served_log, "--log-format", "json", "--metrics-port", "0")
    agent_config = write_config(
        tmp_path / "agent.toml", agent_settings(broker, federation, tmp_path, "dev-1")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDMQ_", "NOTIFY_"))}
    with open(agent_log, "ab") as sink:
        agent = subprocess.Popen(
            [*agent_command(agent_config), "--log-format", "json"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            env=env,
        )
    try:
        assert await asyncio.to_thread(wait_exit, serve) == 0  # the one round, then finished
    finally:
        agent.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_exit, agent)  # type: ignore[arg-type]
    served = [json.loads(line) for line in served_log.read_text(encoding="utf-8").splitlines()]
    devices = [json.loads(line) for line in agent_log.read_text(encoding="utf-8").splitlines()]
    assert all(line["federation"] == federation for line in served + devices)
    assert all(line["client"] == "dev-1" for line in devices)
    messages = {line["message"]: line for line in served}
    assert any(m.startswith("Prometheus metrics on http://0.0.0.0:") for m in messages)
    opened = next(line for m, line in messages.items() if m.startswith("round 1 open"))
    assert opened["round"] == 1
    closed = next(line for m, line in messages.items() if m.startswith("round 1 closed"))
    assert "1 update from dev-1" in closed["message"]
    trained = next(line for line in devices if line["message"].startswith("round 1: trained"))
    assert trained["round"] == 1


async def test_a_metrics_port_in_use_is_a_configuration_error(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(
            broker, federation, tmp_path / "state", metrics_port=port, metrics_address="127.0.0.1"
        )
        service = AggregatorService(settings)
        with pytest.raises(ConfigError, match=rf"cannot serve metrics on 127.0.0.1:{port}"):
            await service.run()
    StateStore(tmp_path / "state").close()  # the failed start released the directory
