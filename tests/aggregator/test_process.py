"""`fedmq serve` as a real process: kill -9 and restart, SIGTERM, exit codes, export."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from aggregator.scripted import (
    ScriptedAgent,
    bundle_dir,
    checkpoint_params,
    fedavg,
    random_delta,
    read_status,
    records,
    serve_process,
    wait_exit,
    wait_for,
    write_toml,
)
from fedmq import exit_codes
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.bundle import Bundle
from fedmq.wire.tensors import decode_tensors

pytestmark = [pytest.mark.broker, pytest.mark.slow]


async def test_kill_9_mid_round_then_restart_counts_every_update_once(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    config = write_toml(
        tmp_path / "federation.toml", broker, federation, state, "[round]\nmin_agents = 4\n"
    )
    log = tmp_path / "serve.log"
    agents = [await ScriptedAgent(broker, federation, name).start() for name in "abcd"]
    a, b, c, d = agents
    deltas = {agent.client: (10 * (i + 1), random_delta(i)) for i, agent in enumerate(agents)}

    async def send(agent: ScriptedAgent, update_id: str | None = None) -> str:
        examples, delta = deltas[agent.client]
        return await agent.send_update(1, delta, examples=examples, update_id=update_id)

    first = serve_process(config, log)
    try:
        announcement = await a.wait_round(1)
        base = await a.fetch_params(announcement)
        ua = await send(a)
        ub = await send(b)
        await a.wait_ack(ua)
        await b.wait_ack(ub)
        uc = await send(c)  # in flight when the aggregator dies: stored or not, acked or not
        first.send_signal(signal.SIGKILL)
        assert wait_exit(first) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    second = serve_process(config, log)
    try:
        # Agents re-send what was not acked; a re-sends an acked update too (a redelivery).
        await send(c, update_id=uc)
        await send(a, update_id=ua)
        await send(d)
        finished = await a.wait_round(1, "finished")
        final = checkpoint_params(state, finished)
        # The restart re-acks stored updates ("accepted"); the re-send is a "duplicate".
        await wait_for(lambda: any(k.update_id == ua and k.reason == "duplicate" for k in a.acks))
        assert {k.reason for k in a.acks if k.update_id == ua} <= {"accepted", "duplicate"}
        assert wait_exit(second) == 0  # exits by itself after the last round
    finally:
        if second.poll() is None:
            second.kill()
    expected = fedavg(base, [deltas[name] for name in "abcd"])
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-7)
    [record] = records(state)
    assert sorted(x.client for x in record.contributions) == ["a", "b", "c", "d"]
    assert len({x.update_id for x in record.contributions}) == 4
    for agent in agents:
        await agent.stop()


async def test_sigterm_stops_cleanly_and_a_restart_resumes_the_round(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    config = write_toml(
        tmp_path / "federation.toml", broker, federation, state, "[round]\nmin_agents = 2\n"
    )
    log = tmp_path / "serve.log"
    a, b = [await ScriptedAgent(broker, federation, name).start() for name in "ab"]
    first = serve_process(config, log)
    try:
        opened = await a.wait_round(1)
        await a.wait_ack(await a.send_update(1, random_delta(1)))
        first.send_signal(signal.SIGTERM)
        assert wait_exit(first) == exit_codes.OK
    finally:
        if first.poll() is None:
            first.kill()
    assert (await read_status(broker, federation)).state == "offline"
    second = serve_process(config, log)
    try:
        await wait_for_resumed(a, opened.deadline)
        await b.wait_ack(await b.send_update(1, random_delta(2)))
        await a.wait_round(1, "finished")
        assert wait_exit(second) == exit_codes.OK
    finally:
        if second.poll() is None:
            second.kill()
    [record] = records(state)
    assert [x.client for x in record.contributions] == ["a", "b"]

    # The trained model exports as a standalone ONNX model.
    out = tmp_path / "model.onnx"
    exported = _cli("export", "--config", str(config), "--round", "1", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    checkpoint = decode_tensors((state / "checkpoints" / "000001.params").read_bytes())
    bundle = Bundle.load(bundle_dir())
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    standalone = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    reference = ort.InferenceSession(bundle.model_onnx).run(
        None, {"input": x, **{name: np.asarray(v) for name, v in checkpoint.items()}}
    )[0]
    np.testing.assert_allclose(standalone, reference, rtol=1e-6)
    initial = ort.InferenceSession(bundle.model_onnx).run(None, {"input": x})[0]
    assert not np.allclose(standalone, initial)
    for agent in (a, b):
        await agent.stop()


async def wait_for_resumed(agent: ScriptedAgent, deadline: float) -> None:
    """The restarted aggregator announces the same round with the same deadline."""
    count = len(agent.rounds)

    await wait_for(lambda: len(agent.rounds) > count)
    resumed = agent.rounds[-1]
    assert (resumed.round, resumed.deadline, resumed.status) == (1, deadline, "open")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from fedmq.cli.app import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_configuration_errors_exit_with_ex_config(tmp_path: Path) -> None:
    bad = tmp_path / "federation.toml"
    bad.write_text('federation = "x"\nrounds = 0\n', encoding="utf-8")
    result = _cli("serve", "--config", str(bad))
    assert result.returncode == exit_codes.CONFIG_ERROR
    assert "rounds" in result.stderr
    missing = _cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == exit_codes.CONFIG_ERROR
    no_bundle = tmp_path / "no-bundle.toml"
    no_bundle.write_text(
        f'federation = "x"\nrounds = 1\nbundle = "{tmp_path}"\nstate_dir = "{tmp_path / "s"}"\n',
        encoding="utf-8",
    )
    assert _cli("serve", "--config", str(no_bundle)).returncode == exit_codes.CONFIG_ERROR


async def test_a_busy_state_directory_exits_with_ex_ioerr(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    config = write_toml(tmp_path / "federation.toml", broker, federation, state)
    log = tmp_path / "serve.log"
    first = serve_process(config, log)
    try:
        watcher = await ScriptedAgent(broker, federation, "watcher").start(announce=False)
        from aggregator.scripted import wait_for

        await wait_for(lambda: bool(watcher.statuses))  # the first one is up
        second = _cli("serve", "--config", str(config))
        assert second.returncode == exit_codes.STATE_FAILURE
        assert "in use" in second.stderr
        missing_round = _cli(
            "export", "--config", str(config), "--round", "5", "--out", str(tmp_path / "m.onnx")
        )
        assert missing_round.returncode == exit_codes.STATE_FAILURE
        await watcher.stop(offline=False)
    finally:
        first.send_signal(signal.SIGTERM)
        assert wait_exit(first) == exit_codes.OK
