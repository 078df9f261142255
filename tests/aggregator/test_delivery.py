"""The service's inference models ([delivery]): built like `fedmq export`, stored, restored."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from aggregator.scripted import (
    ScriptedAgent,
    bundle_dir,
    initial_params,
    make_settings,
    random_delta,
    running_service,
    wait_released,
)
from aggregator.test_clear import kinds, publish_retained, retained
from fedmq.aggregator.delivery import ModelBuildError, ModelDelivery
from fedmq.aggregator.standalone import standalone_model
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.bundle import Bundle
from fedmq.coordinator.actions import BuildInferenceModel
from fedmq.wire.archive import pack_files
from fedmq.wire.blobs import blob_ref
from fedmq.wire.control import RoundAnnouncement
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.topics import Topics


def request(checkpoint: int, params: bytes | None = None) -> BuildInferenceModel:
    bundle = Bundle.load(bundle_dir())
    blob = params if params is not None else encode_tensors(initial_params()).data
    return BuildInferenceModel(checkpoint, pack_files(bundle.files()), blob)


async def test_models_are_built_as_exported_stored_and_pruned(tmp_path: Path) -> None:
    delivery = ModelDelivery(tmp_path)
    action = request(0)
    delivery.asked(action)
    model = await delivery.build(action)
    assert model == standalone_model(Bundle.load(bundle_dir()), initial_params())
    sha = hashlib.sha256(model).hexdigest()
    assert delivery.path(sha).read_bytes() == model
    ref = blob_ref(model, 4096)
    assert delivery.stored([ref]) == {sha: model}
    delivery.path(sha).write_bytes(model[:-1])  # damaged: not handed back
    assert delivery.stored([ref]) == {}
    delivery.prune([])
    assert not delivery.path(sha).exists()
    # A build a newer request has overtaken is skipped; a broken one says why.
    older, newer = request(1), request(2, b"not a tensor set")
    delivery.asked(older)
    delivery.asked(newer)
    assert await delivery.build(older) is None
    with pytest.raises(ModelBuildError):
        await delivery.build(newer)


@pytest.mark.broker
async def test_a_restarted_finished_federation_publishes_its_releases_again(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    topics = Topics(federation)
    settings = make_settings(
        broker, federation, tmp_path / "state", round={"min_agents": 1, "target_updates": 1}
    )
    agent = await ScriptedAgent(broker, federation, "a").start()
    async with running_service(settings):
        await agent.wait_round(1)
        await agent.wait_ack(await agent.send_update(1, random_delta(1)))
        await wait_released(agent, 1)
    await agent.stop()
    found = kinds(topics, await retained(broker, federation))
    assert found.announcement is not None
    final = RoundAnnouncement.model_validate_json(found.announcement[1])
    assert final.models is not None
    assert final.models.latest is not None
    latest = final.models.latest.model
    assert latest.sha256 in found.blobs
    assert (tmp_path / "state" / "models" / f"{latest.sha256}.onnx").is_file()
    # The broker loses the model's chunks (no persistence); the service comes back.
    await publish_retained(broker, dict.fromkeys(found.blobs[latest.sha256], b""))
    async with running_service(settings) as service:
        assert not service.coordinator.models.missing()  # read back from models/
    again = kinds(topics, await retained(broker, federation))
    assert sorted(again.blobs[latest.sha256]) == sorted(found.blobs[latest.sha256])
    assert again.announcement is not None
    restarted = RoundAnnouncement.model_validate_json(again.announcement[1])
    assert restarted.status == "finished"
    assert restarted.models == final.models
