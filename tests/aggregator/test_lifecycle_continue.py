"""Continue and warm-start on a real Mosquitto and a real `fedmq serve`.

Raising ``rounds`` continues a finished federation; lowering it below what ran, or
changing the bundle, is a configuration error (exit 78) that says what to do; a new
federation starts from an export or another federation's state directory (``initial``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from aggregator.scripted import (
    ScriptedAgent,
    bundle_dir,
    initial_params,
    make_settings,
    random_delta,
    records,
    running_service,
    serve_process,
    wait_exit,
    wait_for,
    write_toml,
)
from fedmq import exit_codes
from fedmq.aggregator.export import export_onnx
from fedmq.aggregator.service import AggregatorService
from fedmq.aggregator.store import checkpoint_file, checkpoint_rounds
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.bundle import Bundle
from fedmq.bundle.manifest import MANIFEST_FILE, Manifest
from fedmq.errors import ConfigError
from fedmq.wire.control import RoundAnnouncement
from fedmq.wire.tensors import decode_tensors, encode_tensors

pytestmark = [pytest.mark.broker, pytest.mark.slow]

Params = dict[str, np.ndarray]


def _checkpoint(state: Path, round_id: int) -> Params:
    blob = checkpoint_file(state, round_id).read_bytes()
    return {name: np.array(value) for name, value in decode_tensors(blob).items()}


def _assert_equal(got: Params, expected: Params) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


async def _train(agent: ScriptedAgent, round_id: int, seed: int) -> RoundAnnouncement:
    """Wait for ``round_id`` to open, send one update into it and wait for its ack."""
    announcement = await agent.wait_round(round_id)
    ack = await agent.wait_ack(await agent.send_update(round_id, random_delta(seed)))
    assert ack.reason == "accepted", ack
    return announcement


async def _finished_federation(broker: MosquittoBroker, federation: str, state: Path) -> Params:
    """A federation of one agent that ran one round; its final model."""
    agent = await ScriptedAgent(broker, federation, "a").start()
    try:
        async with running_service(make_settings(broker, federation, state)):
            await _train(agent, 1, seed=1)
            await agent.wait_round(1, "finished")
    finally:
        await agent.stop()
    final = _checkpoint(state, 1)
    assert not np.array_equal(final["0.weight"], initial_params()["0.weight"])
    return final


def _prepare_fails(broker: MosquittoBroker, federation: str, state: Path, **kw: object) -> str:
    """The ConfigError message of a service that cannot start on ``state``."""
    service = AggregatorService(make_settings(broker, federation, state, **kw))
    with pytest.raises(ConfigError) as caught:
        service.prepare()
    return str(caught.value)


async def test_raising_rounds_continues_a_finished_federation(
    broker: MosquittoBroker, federation: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    a = await ScriptedAgent(broker, federation, "a").start()
    try:
        async with running_service(make_settings(broker, federation, state, rounds=1)):
            await _train(a, 1, seed=1)
            await a.wait_round(1, "finished")
        # As many rounds as it ran: it stays finished.
        async with running_service(make_settings(broker, federation, state, rounds=1)) as same:
            await wait_for(lambda: same.finished)
            assert (same.coordinator.phase, same.coordinator.round) == ("finished", 1)
        assert checkpoint_rounds(state) == [0, 1]

        with caplog.at_level(logging.INFO, logger="fedmq"):
            async with running_service(make_settings(broker, federation, state, rounds=3)) as svc:
                second = await _train(a, 2, seed=2)
                # The round-2 model is the finished federation's final one, bit for bit.
                _assert_equal(await a.fetch_params(second), _checkpoint(state, 1))
                # A subscriber arriving now gets the new round, not the old `finished`.
                late = await ScriptedAgent(broker, federation, "late").start(announce=False)
                await late.wait_until(lambda: bool(late.rounds))
                assert late.rounds[0].round >= 2
                assert late.rounds[0].status != "finished"
                await late.stop(offline=False)
                await _train(a, 3, seed=3)
                await a.wait_round(3, "finished")
                await wait_for(lambda: svc.finished)
        assert f"federation {federation!r} continues from round 1 to 3" in caplog.text
    finally:
        await a.stop()
    # Checkpoint numbering and the round records go on from the finished federation.
    assert checkpoint_rounds(state) == [0, 1, 2, 3]
    assert [(r.round, r.outcome) for r in records(state)] == [(n, "closed") for n in (1, 2, 3)]
    for round_id in (2, 3):
        before, after = _checkpoint(state, round_id - 1), _checkpoint(state, round_id)
        for name, delta in random_delta(round_id).items():
            np.testing.assert_allclose(after[name], before[name] + delta, rtol=1e-6, atol=1e-7)


async def test_lowering_rounds_below_what_ran_is_a_configuration_error(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    a = await ScriptedAgent(broker, federation, "a").start()
    try:
        async with running_service(make_settings(broker, federation, state, rounds=3)):
            await _train(a, 1, seed=1)
            await _train(a, 2, seed=2)
            await a.wait_round(3)  # stopped with round 3 under way
        message = _prepare_fails(broker, federation, state, rounds=2)
        assert "rounds = 2 is below round 3" in message
        assert "set rounds >= 3" in message
        async with running_service(make_settings(broker, federation, state, rounds=3)) as svc:
            await _train(a, 3, seed=3)
            await wait_for(lambda: svc.finished)
    finally:
        await a.stop()
    # The real command: write_toml says rounds = 1, below the 3 that ran.
    config = write_toml(tmp_path / "federation.toml", broker, federation, state)
    log = tmp_path / "serve.log"
    process = serve_process(config, log)
    assert wait_exit(process) == exit_codes.CONFIG_ERROR
    output = log.read_text()
    assert f"rounds = 1 is below the 3 rounds federation '{federation}' has already run" in output
    assert checkpoint_rounds(state) == [0, 1, 2, 3]  # nothing was touched


async def test_a_new_federation_starts_from_an_export_or_a_state_directory(
    broker: MosquittoBroker, federation: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "source"
    final = await _finished_federation(broker, federation, source)
    exported = tmp_path / "model.onnx"
    assert export_onnx(source, bundle_dir(), exported) == 1

    for name, initial in (("export", str(exported)), ("dir", str(source))):
        fed = f"{federation}-{name}"
        state = tmp_path / f"state-{name}"
        agent = await ScriptedAgent(broker, fed, "b").start()
        try:
            settings = make_settings(broker, fed, state, initial=initial)
            async with running_service(settings):
                opened = await agent.wait_round(1)
                _assert_equal(await agent.fetch_params(opened), final)
        finally:
            await agent.stop()
        _assert_equal(_checkpoint(state, 0), final)  # round 0 is the source's model

        # Restarted, the directory goes on from its own checkpoints; `initial` is not read.
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fedmq"):
            service = AggregatorService(make_settings(broker, fed, state, initial=initial))
            service.prepare()
            service.store.close()
        assert "is not read again" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fedmq"):
            other = str(source) + "@0"
            service = AggregatorService(make_settings(broker, fed, state, initial=other))
            service.prepare()
            service.store.close()
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert f"initial = {other!r} is ignored" in warning.getMessage()
        assert "use a new state_dir" in warning.getMessage()


async def test_an_initial_model_that_does_not_fit_the_bundle_exits_78(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    # digits_cnn's export as the start of a digits_mlp federation: other names, shapes.
    bundle = Bundle.load(bundle_dir("digits_cnn"))
    source = tmp_path / "source"
    (source / "checkpoints").mkdir(parents=True)
    checkpoint_file(source, 0).write_bytes(bytes(encode_tensors(bundle.initial_parameters()).data))
    state = tmp_path / "state"
    config = write_toml(tmp_path / "federation.toml", broker, federation, state)
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("rounds = 1\n", f'rounds = 1\ninitial = "{source}"\n'))
    log = tmp_path / "serve.log"
    assert wait_exit(serve_process(config, log)) == exit_codes.CONFIG_ERROR
    output = log.read_text(encoding="utf-8")
    assert f"initial = '{source}' (round 0 of state directory {source})" in output
    assert "does not fit the bundle 'digits_mlp'" in output
    assert "0.weight: shape [8, 1, 3, 3], the bundle's [64, 64]" in output
    assert "2.weight: missing" in output
    assert "… and" in output  # more problems than listed
    assert not (state / "state.json").exists()  # nothing started


async def test_another_bundle_is_refused_with_how_to_start_a_new_federation(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    final = await _finished_federation(broker, federation, source)
    # The same model recompiled under another name: another bundle archive.
    bundle = Bundle.load(bundle_dir())
    files = bundle.files()
    manifest = bundle.manifest.model_copy(update={"name": "digits_mlp_v2"})
    files[MANIFEST_FILE] = Manifest.model_validate(manifest.model_dump()).to_json()
    renamed = Bundle.from_files(files).write(tmp_path / "bundle-v2")

    message = _prepare_fails(broker, federation, source, bundle=str(renamed))
    assert "the bundle of a federation cannot change" in message
    assert "a new federation id and a new state_dir" in message
    assert f'initial = "{source}"' in message

    # Doing what it says: the new federation starts from the old one's weights.
    fed = f"{federation}-v2"
    state = tmp_path / "state-v2"
    agent = await ScriptedAgent(broker, fed, "a").start()
    try:
        settings = make_settings(broker, fed, state, bundle=str(renamed), initial=str(source))
        async with running_service(settings):
            _assert_equal(await agent.fetch_params(await agent.wait_round(1)), final)
    finally:
        await agent.stop()
