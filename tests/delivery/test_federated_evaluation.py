"""Federated evaluation end to end: a real Mosquitto, the real aggregator, real agents.

The figures the round records hold for each device (and their example-weighted mean)
are what a direct onnxruntime evaluation of the global model, read from its checkpoint,
gives on that device's evaluation data; the evaluate-only last round leaves the model
as it was and yields a per-device table of the final model.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from agent.helpers import running_agent
from aggregator.scripted import bundle_dir, make_settings, records, running_service, wait_for

from edge_agent.config import AgentSettings
from edge_agent.data import fit_to_model, load_raw
from fedmq.aggregator.store import checkpoint_file
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.bundle import Bundle
from fedmq.bundle.manifest import INPUT_NAME, OUTPUT_NAME
from fedmq.wire.tensors import decode_tensors

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# Three devices with different slices (and amounts) of the digits: different figures.
DEVICES = {"press-1": (0, 300), "press-2": (300, 500), "press-3": (500, 900)}
ROUNDS = 3  # two training rounds, then the evaluate-only round of the final model


def _device_data(directory: Path, begin: int, end: int) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    directory.mkdir(parents=True)
    np.savez(
        directory / "train.npz",
        x=(digits.data[begin:end] / 16.0).astype(np.float32),
        y=digits.target[begin:end].astype(np.int64),
    )
    return directory


def _direct_evaluation(
    session: ort.InferenceSession, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> dict[str, float]:
    """Loss and accuracy of ``params`` on (x, y): model.onnx in onnxruntime, numpy after."""
    feeds = dict(params)
    feeds[INPUT_NAME] = x
    (logits,) = session.run([OUTPUT_NAME], feeds)
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -log_softmax[np.arange(len(y)), y].mean()
    accuracy = float(np.mean(logits.argmax(axis=1) == y))
    return {"eval_loss": float(loss), "eval_accuracy": accuracy, "eval_examples": float(len(y))}


async def test_recorded_federated_evaluation_equals_a_direct_evaluation_of_each_checkpoint(
    broker: MosquittoBroker,
    federation: str,
    tmp_path: Path,
    make_settings_agent: Callable[..., AgentSettings],
) -> None:
    state = tmp_path / "state"
    settings = make_settings(
        broker,
        federation,
        state,
        rounds=ROUNDS,
        round={"min_agents": len(DEVICES), "deadline_s": 60.0, "evaluate_final": True},
        training={"epochs": 1, "batch_size": 32, "lr": 0.1},
        retention={"keep_last": 0, "keep_every": 1},  # every checkpoint, to compare with
        exit_when_finished=False,
    )
    agents = {
        client: make_settings_agent(
            broker.url,
            client,
            data={"path": str(_device_data(tmp_path / client, *rows))},
        )
        for client, rows in DEVICES.items()
    }
    async with contextlib.AsyncExitStack() as stack:
        service = await stack.enter_async_context(running_service(settings))
        for agent in agents.values():
            await stack.enter_async_context(running_agent(agent))
        await wait_for(lambda: service.finished, timeout=120)
        status = service.coordinator.status(time.time())
    train_1, train_2, final = records(state)
    assert [r.task for r in (train_1, train_2, final)] == ["train", "train", "evaluate"]
    assert [r.outcome for r in (train_1, train_2, final)] == ["closed"] * 3

    # The evaluate-only round left the model as it was.
    final_params = checkpoint_file(state, 3).read_bytes()
    assert final_params == checkpoint_file(state, 2).read_bytes()
    assert checkpoint_file(state, 3, "optimizer").read_bytes() == (
        checkpoint_file(state, 2, "optimizer").read_bytes()
    )
    assert all(c.weight == 0 for c in final.contributions)

    # Each device's evaluation split, as the agent makes it, evaluated directly.
    manifest = Bundle.load(bundle_dir()).manifest
    splits = {}
    for client, agent in agents.items():
        train, evaluation = load_raw(agent.data)
        dataset = fit_to_model(train, evaluation, manifest)
        splits[client] = (dataset.x_eval, dataset.y_eval)
    session = ort.InferenceSession(str(bundle_dir() / "model.onnx"))
    stored = json.loads((state / "state.json").read_text())["evaluations"]
    for record in (train_1, train_2, final):
        checkpoint = record.round - 1
        params = decode_tensors(checkpoint_file(state, checkpoint).read_bytes())
        direct = {
            client: _direct_evaluation(session, params, x, y) for client, (x, y) in splits.items()
        }
        devices = record.device_evaluations()
        assert sorted(devices) == sorted(DEVICES)
        for client, figures in devices.items():
            assert figures == pytest.approx(direct[client], rel=1e-5, abs=1e-6), client
        total = sum(d["eval_examples"] for d in direct.values())
        pooled = {
            name: sum(d[name] * d["eval_examples"] for d in direct.values()) / total
            for name in ("eval_loss", "eval_accuracy")
        }
        assert record.evaluation == pytest.approx(
            {**pooled, "examples": total, "devices": float(len(DEVICES))}, rel=1e-5
        )
        assert stored[str(checkpoint)] == pytest.approx(pooled, rel=1e-5)
    # Training moved the model between the evaluations (the initial model is the worst).
    losses = [r.evaluation["eval_loss"] for r in (train_1, train_2, final)]
    assert losses[0] > losses[1] > losses[2]
    assert final.evaluated_checkpoint == 2
    assert status.evaluation is not None
    assert (status.evaluation.checkpoint, status.evaluation.task) == (2, "evaluate")
    assert status.evaluation.devices == len(DEVICES)
