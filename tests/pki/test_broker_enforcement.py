"""What a broker running production.conf.template enforces, with certificates from fedmq pki.

One broker serves the module (``production_broker``); each test publishes payloads no
other test uses, so retained messages of earlier tests never confuse it.  A message that
must not arrive is followed by an allowed marker (see ``mqtt_client``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from paho.mqtt.reasoncodes import ReasonCode

from fedmq.broker.mosquitto import MosquittoBroker
from pki.mqtt_client import BrokerClient, Received, marker
from pki.plant import Plant, make_plant, start_broker

pytestmark = [pytest.mark.broker]

NOT_AUTHORIZED = 0x87  # MQTT 5 PUBACK reason of a publish the ACL denies
SHA = "ab" * 32
Connect = Callable[..., BrokerClient]


def unique(label: str) -> bytes:
    return f"{label}-{uuid.uuid4().hex}".encode()


def denied(reason: ReasonCode) -> bool:
    return reason.value == NOT_AUTHORIZED


def payloads(messages: list[Received]) -> set[bytes]:
    return {message.payload for message in messages}


# ------------------------------------------------------------------ who gets in


def test_a_plant_identity_connects_over_mutual_tls(connect: Connect, shared_plant: Plant) -> None:
    client = connect(shared_plant.devices[0])
    assert client.connack is not None
    assert not client.connack.is_failure


def test_a_client_without_a_certificate_is_refused(
    shared_plant: Plant, production_broker: MosquittoBroker
) -> None:
    with BrokerClient(
        production_broker.port, client_id="anon", ca=shared_plant.ca, identity=None
    ) as client:
        assert not client.connect()


def test_plaintext_mqtt_is_refused(production_broker: MosquittoBroker) -> None:
    with BrokerClient(
        production_broker.port, client_id="plain", ca=None, identity=None, tls=False
    ) as client:
        assert not client.connect()


def test_a_certificate_from_a_foreign_ca_is_refused(
    shared_plant: Plant, production_broker: MosquittoBroker, tmp_path: Path
) -> None:
    # Same device name, same layout, another CA: what a cloned provisioning kit makes.
    foreign = make_plant(tmp_path / "foreign", shared_plant.topics.federation)
    with BrokerClient(
        production_broker.port,
        client_id=shared_plant.devices[0],
        ca=shared_plant.ca,  # the client trusts the real broker ...
        identity=foreign.identity(foreign.devices[0]),  # ... but presents a foreign cert
    ) as client:
        assert not client.connect()


def test_a_revoked_certificate_is_refused_after_a_reload(plant: Plant, tmp_path: Path) -> None:
    broker = start_broker(plant, tmp_path / "mosquitto")
    try:
        revoked, kept = plant.devices

        def attempt(name: str) -> bool:
            with BrokerClient(
                broker.port, client_id=name, ca=plant.ca, identity=plant.identity(name)
            ) as client:
                return client.connect()

        assert attempt(revoked)
        plant.pki.revoke(revoked)
        broker.reload()  # SIGHUP: Mosquitto reloads certificates and the CRL
        deadline = time.monotonic() + 5
        while attempt(revoked):  # the broker applies the signal in its next loop turn
            assert time.monotonic() < deadline, "the revoked certificate is still accepted"
        assert attempt(kept)
        assert broker.is_running()
    finally:
        broker.close()


def test_a_device_cannot_take_over_another_devices_session(
    connect: Connect, shared_plant: Plant
) -> None:
    a, b = shared_plant.devices
    victim = connect(b)
    victim.subscribe(shared_plant.topics.ack(b))
    # A presents B's client id; use_username_as_clientid makes it A's own CN.
    connect(a, client_id=b)
    aggregator = connect(shared_plant.aggregator)
    done = marker()
    assert not aggregator.publish(shared_plant.topics.ack(b), done).is_failure
    victim.until(shared_plant.topics.ack(b), done)
    assert victim.disconnects == 0


# ------------------------------------------------------------------ devices


def test_a_device_cannot_publish_into_another_devices_topics(
    connect: Connect, shared_plant: Plant
) -> None:
    topics = shared_plant.topics
    a, b = shared_plant.devices
    aggregator = connect(shared_plant.aggregator)
    aggregator.subscribe(topics.update_filter())
    aggregator.subscribe(topics.status_filter())
    device = connect(a)
    forged = [unique("forged-update"), unique("forged-status")]
    assert denied(device.publish(topics.update(b, 1, 0), forged[0]))
    assert denied(device.publish(topics.status(b), forged[1], retain=True))
    own = unique("own-status")
    assert not device.publish(topics.status(a), own, retain=True).is_failure
    done = marker()
    assert not device.publish(topics.update(a, 1, 0), done).is_failure
    received = aggregator.until(topics.update(a, 1, 0), done)
    assert own in payloads(received)
    assert payloads(received).isdisjoint(forged)


def test_a_device_cannot_read_other_devices_traffic(connect: Connect, shared_plant: Plant) -> None:
    topics = shared_plant.topics
    a, b = shared_plant.devices
    aggregator = connect(shared_plant.aggregator)
    aggregator.subscribe(topics.update_filter())
    aggregator.subscribe(topics.status_filter())
    snoop = connect(a)
    assert snoop.subscribe("#")[0].value == 1  # granted: Mosquitto filters on delivery
    other = connect(b)
    secret = [unique("b-update"), unique("b-status")]
    assert not other.publish(topics.update(b, 2, 0), secret[0]).is_failure
    assert not other.publish(topics.status(b), secret[1], retain=True).is_failure
    # The aggregator got both, so the broker has routed them to every allowed subscriber.
    assert secret[1] in payloads(aggregator.until(topics.status(b), secret[1]))
    done = marker()
    aggregator.publish(topics.ack(a), done)
    assert payloads(snoop.until(topics.ack(a), done)).isdisjoint(secret)
    # A new subscription gets the retained statuses it may read: none of B's.
    snoop.subscribe(topics.status_filter())
    done = marker()
    aggregator.publish(topics.ack(a), done)
    assert payloads(snoop.until(topics.ack(a), done)).isdisjoint(secret)


def test_a_device_cannot_write_control_topics(connect: Connect, shared_plant: Plant) -> None:
    topics = shared_plant.topics
    a, b = shared_plant.devices
    observer = connect(b)
    observer.subscribe("#")  # b reads round, blobs and its acks
    device = connect(a)
    forged = {
        topics.round(): unique("forged-round"),
        topics.blob(SHA, 0): unique("forged-blob"),
        topics.ack(b): unique("forged-ack"),
        topics.ack(a): unique("forged-own-ack"),
        topics.aggregator_status(): unique("forged-aggregator-status"),
    }
    for topic, payload in forged.items():
        assert denied(device.publish(topic, payload, retain=True)), topic
    done = marker()
    connect(shared_plant.aggregator).publish(topics.ack(b), done)
    assert payloads(observer.until(topics.ack(b), done)).isdisjoint(forged.values())


# ------------------------------------------------------------------ monitor


def test_the_monitor_reads_control_topics_only(connect: Connect, shared_plant: Plant) -> None:
    topics = shared_plant.topics
    a = shared_plant.devices[0]
    monitor = connect(shared_plant.monitor)
    assert monitor.subscribe("#")[0].value == 1
    aggregator = connect(shared_plant.aggregator)
    device = connect(a)
    hidden = [unique("update"), unique("blob"), unique("ack")]
    shown = [unique("round"), unique("aggregator-status"), unique("agent-status")]
    assert not device.publish(topics.update(a, 3, 0), hidden[0]).is_failure
    assert not aggregator.publish(topics.blob(SHA, 0), hidden[1], retain=True).is_failure
    assert not aggregator.publish(topics.ack(a), hidden[2]).is_failure
    assert not aggregator.publish(topics.round(), shown[0], retain=True).is_failure
    assert not aggregator.publish(topics.aggregator_status(), shown[1], retain=True).is_failure
    assert not device.publish(topics.status(a), shown[2], retain=True).is_failure
    done = marker()
    aggregator.publish(topics.round(), done)
    received = payloads(monitor.until(topics.round(), done))
    assert received.isdisjoint(hidden)
    assert set(shown) <= received


def test_the_monitor_cannot_write_anything(connect: Connect, shared_plant: Plant) -> None:
    topics = shared_plant.topics
    a = shared_plant.devices[0]
    aggregator = connect(shared_plant.aggregator)
    aggregator.subscribe(topics.update_filter())
    aggregator.subscribe(topics.status_filter())
    device = connect(a)
    device.subscribe("#")
    monitor = connect(shared_plant.monitor)
    forged = {
        topics.round(): unique("round"),
        topics.blob(SHA, 0): unique("blob"),
        topics.ack(a): unique("ack"),
        topics.update(a, 1, 0): unique("update"),
        topics.status(a): unique("status"),
        topics.status(shared_plant.monitor): unique("own-status"),
        topics.update(shared_plant.monitor, 1, 0): unique("own-update"),
        topics.aggregator_status(): unique("aggregator-status"),
    }
    for topic, payload in forged.items():
        assert denied(monitor.publish(topic, payload)), topic
    done = marker()
    device.publish(topics.status(a), done)
    assert payloads(aggregator.until(topics.status(a), done)).isdisjoint(forged.values())
    done = marker()
    aggregator.publish(topics.ack(a), done)
    assert payloads(device.until(topics.ack(a), done)).isdisjoint(forged.values())


# ------------------------------------------------------------------ aggregator


def test_the_aggregator_does_its_job(connect: Connect, shared_plant: Plant) -> None:
    topics = shared_plant.topics
    a = shared_plant.devices[0]
    aggregator = connect(shared_plant.aggregator)
    aggregator.subscribe(topics.update_filter())
    aggregator.subscribe(topics.status_filter())
    device = connect(a)
    for topic_filter in (topics.round(), topics.blob_filter(SHA), topics.ack(a)):
        device.subscribe(topic_filter)
    monitor = connect(shared_plant.monitor)
    monitor.subscribe(topics.aggregator_status())

    sent = {
        topics.round(): unique("round"),
        topics.blob(SHA, 0): unique("blob"),
        topics.ack(a): unique("ack"),
    }
    for topic, payload in sent.items():
        assert not aggregator.publish(topic, payload, retain=topic != topics.ack(a)).is_failure
    done = marker()
    aggregator.publish(topics.ack(a), done)
    assert set(sent.values()) <= payloads(device.until(topics.ack(a), done))

    update, status = unique("update"), unique("status")
    assert not device.publish(topics.update(a, 4, 0), update).is_failure
    assert not device.publish(topics.status(a), status, retain=True).is_failure
    assert update in payloads(aggregator.until(topics.status(a), status))

    online = unique("online")
    assert not aggregator.publish(topics.aggregator_status(), online, retain=True).is_failure
    monitor.until(topics.aggregator_status(), online)
