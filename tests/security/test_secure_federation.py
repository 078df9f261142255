"""A signed federation (real ``AggregatorService``, real agents) under attack from the broker.

The attackers are clients on the same broker without any registered key, as an
unauthenticated client on a plant broker without ACLs would be.  Each attack from the
original report must fail with a logged reason while the honest agents keep training.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from agent.helpers import running_agent
from aggregator.scripted import ScriptedAgent, random_delta, records, running_service, wait_for
from aggregator.scripted import make_settings as service_settings

from edge_agent.config import AgentSettings
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.testing.scripted_clients import ScriptedClients, ScriptedConnection
from fedmq.wire.blobs import blob_ref
from fedmq.wire.chunks import ChunkHeader, encode_chunk
from fedmq.wire.control import RoundAnnouncement, decode_control
from fedmq.wire.signing import SigningKey, TrustedKeys
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.topics import Topics
from security.keys import Keys

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HONEST = ("press-1", "press-2")
FAKE_IDS = 300  # retained statuses of made-up ids: more than the roster would show


async def test_signed_federation_survives_impersonation_and_floods(
    broker: MosquittoBroker,
    federation: str,
    tmp_path: Path,
    keys: Keys,
    make_settings: Callable[..., AgentSettings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = service_settings(
        broker,
        federation,
        tmp_path / "state",
        rounds=2,
        security=keys.aggregator_security(),
        round={"deadline_s": 60.0, "min_agents": 2},
        exit_when_finished=False,  # still counting the flood after the last round
    )
    trusted = TrustedKeys([keys.aggregator.public])
    fakes = ScriptedClients(broker.url, federation, [f"ghost-{i:03d}" for i in range(FAKE_IDS)])
    attacker = ScriptedConnection(
        broker.url,
        federation,
        subscriptions=[(Topics(federation).round(), 1)],
        client_id=f"mallory-{uuid.uuid4().hex[:6]}",
    )
    agents = [
        make_settings(broker.url, client, security=keys.agent_security(client)) for client in HONEST
    ]
    shapes_delta = random_delta(0, scale=1.0)
    async with contextlib.AsyncExitStack() as stack:
        # The flood of retained statuses is on the broker before the aggregator starts.
        await fakes.start()
        stack.push_async_callback(fakes.stop)
        await attacker.connect()
        stack.push_async_callback(attacker.disconnect)
        service = await stack.enter_async_context(running_service(settings))
        for agent_settings in agents:
            await stack.enter_async_context(running_agent(agent_settings))
        announcement = await attacker.wait_round(1)
        # 1. the announcement is signed and selects only registered devices
        assert announcement.selected is not None
        assert sorted(announcement.selected) == sorted(HONEST)
        # 2. an update under press-1's id claiming 10^9 examples: unsigned, then signed by
        #    a key that is not press-1's
        _, forged = attacker.update_envelope(
            HONEST[0], 1, encode_tensors(shapes_delta).data, examples=10**9
        )
        await attacker.upload(HONEST[0], 1, "forged-1", forged)
        await attacker.upload(HONEST[0], 1, "forged-2", forged, signer=SigningKey.generate())
        # 3. reassembly slots claimed by made-up ids (first chunks of huge updates)
        for i in range(100):
            _, data = attacker.update_envelope(
                f"ghost-{i:03d}", 1, encode_tensors(shapes_delta).data, examples=1
            )
            topic, message = attacker.upload_messages(f"ghost-{i:03d}", 1, f"slot-{i}", data)[0]
            await attacker.session.publish(topic, message, qos=1)
        await wait_for(lambda: service.statistics().rounds_closed >= 2, timeout=60)
        await wait_for(lambda: service.statistics().rejected.get("unknown_client", 0) >= 100)
        stats = service.statistics()
    rounds = records(settings.state_dir)
    assert [r.outcome for r in rounds[:2]] == ["closed", "closed"]
    first = rounds[0]
    assert sorted(c.client for c in first.contributions) == sorted(HONEST)
    assert all(c.examples < 1000 for c in first.contributions)  # the real counts, not 10^9
    assert stats.rejected.get("bad_signature", 0) >= 2
    # The announcement the attacker saw verifies with the pinned key, and only with it.
    document = announcement.model_dump_json().encode()
    decode_control(document, RoundAnnouncement, trusted=trusted)
    messages = [r.getMessage() for r in caplog.records]
    assert any("is not signed by 'press-1'" in m for m in messages), messages[-20:]
    assert any("update chunk is not signed" in m for m in messages)


async def test_deleted_and_forged_blob_chunks_are_republished(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    settings = service_settings(broker, federation, tmp_path / "state", chunk_size=4096)
    attacker = ScriptedConnection(
        broker.url, federation, subscriptions=[(Topics(federation).round(), 1)]
    )
    topics = Topics(federation)
    async with contextlib.AsyncExitStack() as stack:
        service = await stack.enter_async_context(running_service(settings))
        await attacker.connect()
        stack.push_async_callback(attacker.disconnect)
        announcement = await attacker.wait_round(1, status="waiting")
        # Delete one chunk of the parameters, replace one chunk of the bundle.
        await attacker.session.publish(topics.blob(announcement.params.sha256, 0), b"", retain=True)
        forged = encode_chunk(
            ChunkHeader("blob", federation, settings.client_id, 1, announcement.bundle, 1),
            bytes(announcement.bundle.chunk_length(1)),
        )
        await attacker.session.publish(
            topics.blob(announcement.bundle.sha256, 1), forged, retain=True
        )
        await wait_for(lambda: service.coordinator.blob_guard.repairs >= 2)
        # A device joining now downloads both blobs intact.
        newcomer = ScriptedAgent(broker, federation, "late-joiner")
        await newcomer.start(announce=False)
        stack.push_async_callback(newcomer.stop, offline=False)
        for ref in (announcement.params, announcement.bundle):
            blob = await newcomer.receiver.fetch(ref, 10)
            assert blob_ref(bytes(blob), ref.chunk_size) == ref
