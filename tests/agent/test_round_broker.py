"""Full rounds through a real Mosquitto with the real device runtime and shipped bundles."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.helpers import eventually, running_agent, write_digits
from agent.scripted import ScriptedAggregator
from edge_agent.config import AgentSettings
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.datasets.sensors import sensor_windows

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def digits_csv(directory: Path) -> dict[str, Any]:
    npz = write_digits(directory / "npz") / "train.npz"
    with np.load(npz) as arrays:
        x, y = arrays["x"], arrays["y"]
    header = ",".join([*(f"px{i}" for i in range(64)), "digit"])
    rows = [
        ",".join([*(f"{v:.4f}" for v in features), str(label)])
        for features, label in zip(x, y, strict=True)
    ]
    (directory / "csv").mkdir()
    (directory / "csv" / "shift-1.csv").write_text("\n".join([header, *rows]) + "\n")
    return {"path": str(directory / "csv"), "label_column": "digit"}


def digits_npz(directory: Path) -> dict[str, Any]:
    return {"path": str(write_digits(directory / "npz"))}


def sensor_npz(directory: Path) -> dict[str, Any]:
    directory.mkdir()
    np.savez(directory / "windows.npz", x=sensor_windows(0, 200).x)
    return {"path": str(directory), "target": "input"}


@pytest.mark.parametrize(
    ("bundle_name", "make_data", "codec", "eval_metric"),
    [
        pytest.param("digits_mlp", digits_npz, "raw", "eval_accuracy", id="mlp-npz-raw"),
        pytest.param("digits_cnn", digits_csv, "int8", "eval_accuracy", id="cnn-csv-int8"),
        pytest.param("sensor_autoencoder", sensor_npz, "topk:0.1", "eval_mse", id="ae-topk"),
    ],
)
async def test_two_full_rounds_with_the_real_runtime(
    broker: MosquittoBroker,
    federation: str,
    make_settings: Callable[..., AgentSettings],
    tmp_path: Path,
    bundle_name: str,
    make_data: Callable[[Path], dict[str, Any]],
    codec: str,
    eval_metric: str,
) -> None:
    settings = make_settings(broker.url, data=make_data(tmp_path / "source"))
    aggregator = ScriptedAggregator(broker.url, federation)
    async with aggregator.running():
        bundle_ref, params_ref, bundle = await aggregator.publish_model(bundle_name)
        async with running_agent(settings) as agent:
            for round_id in (1, 2):
                await aggregator.announce(round_id, bundle_ref, params_ref, codec=codec)
                await aggregator.wait_updates(round_id)
                await eventually(
                    lambda n=round_id: agent.statistics().updates_acked == n,  # type: ignore[misc]
                    what="the ack",
                )
            stats = agent.statistics()
        status = await aggregator.wait_status(lambda s: s.state == "idle" and s.round == 2)
    assert stats.rounds_trained == 2
    assert status.bundle == bundle_ref.sha256
    assert status.versions["onnxruntime"]
    manifest = bundle.manifest
    for received in aggregator.updates.values():
        meta = received.meta
        assert meta.client == settings.client_id
        assert list(received.delta) == list(manifest.update_names)
        assert any(np.abs(d).max() > 0 for d in received.delta.values())
        assert {"train_loss", "num_batches", "eval_loss", eval_metric} <= set(meta.metrics)
        assert meta.num_examples > 0
    residual = Path(settings.state_dir, "residual", f"{bundle_ref.sha256}.tensors")
    assert residual.is_file()
    assert (residual.stat().st_size > 100) == (codec != "raw")  # lossy codecs leave one
