"""The generated acl_file grants exactly the table of broker_config/README.md.

The ACL is evaluated with Mosquitto's own rules (``acl_model``) for every kind of topic
the scheme has, for devices, the aggregator and the monitor; the expected answer is
read from the README's table, so the documentation and the generator cannot drift.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedmq.pki.acl import HEADER, federation_acl
from fedmq.pki.directory import PkiDirectory, aggregator_client_id
from fedmq.pki.errors import InvalidNameError
from fedmq.wire.topics import Topics
from pki.acl_model import AclModel, matches

README = Path(__file__).resolve().parents[2] / "broker_config" / "README.md"
FEDERATION, OTHER = "line-3", "line-4"
AGGREGATOR = aggregator_client_id(FEDERATION)
MONITOR = "monitor"
DEVICES = ("press-a", "press-b")
SHA = "cd" * 32


def readme_table() -> dict[str, tuple[list[str], list[str]]]:
    """Role (agent, aggregator, monitor) -> (publish filters, subscribe filters) as written."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## What each client may do (ACLs)", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    table = {}
    for row in rows:
        client, publish, subscribe = (cell.strip() for cell in row.strip("|").split("|"))
        role = client.split()[0]
        table[role] = (re.findall(r"`([^`]+)`", publish), re.findall(r"`([^`]+)`", subscribe))
    return table


def documented(role: str, name: str, topics: Topics) -> tuple[list[str], list[str]]:
    publish, subscribe = readme_table()[role]

    def concrete(cell: str) -> str:
        return cell.replace("…", topics.prefix).replace("<id>", name)

    return [concrete(cell) for cell in publish], [concrete(cell) for cell in subscribe]


def sample_topics(topics: Topics) -> list[str]:
    """One topic of every kind, for every client name that can appear in one."""
    names = (*DEVICES, AGGREGATOR, MONITOR)
    return [
        topics.round(),
        topics.blob(SHA, 0),
        topics.blob(SHA, 7),
        topics.aggregator_status(),
        *(topics.update(name, 3, 1) for name in names),
        *(topics.status(name) for name in names),
        *(topics.ack(name) for name in names),
    ]


@pytest.fixture(scope="module")
def acl() -> AclModel:
    return AclModel.parse(federation_acl({FEDERATION: AGGREGATOR}, [MONITOR]).text())


def roles() -> list[tuple[str, str]]:
    return [
        ("agent", DEVICES[0]),
        ("agent", DEVICES[1]),
        ("aggregator", AGGREGATOR),
        ("monitor", MONITOR),
    ]


@pytest.mark.parametrize(("role", "name"), roles())
def test_the_acl_grants_exactly_the_documented_table(acl: AclModel, role: str, name: str) -> None:
    topics = Topics(FEDERATION)
    publish, subscribe = documented(role, name, topics)
    wrong = []
    for topic in sample_topics(topics):
        if role != "agent" and name in topic.split("/"):
            continue  # a non-device's own levels: see the next test
        for access, allowed in (("write", publish), ("read", subscribe)):
            expected = any(matches(topic_filter, topic) for topic_filter in allowed)
            if acl.may(name, topic, access) != expected:  # type: ignore[arg-type]
                wrong.append(f"{access} {topic}: expected {expected}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", [AGGREGATOR, MONITOR])
def test_the_agent_patterns_give_nothing_to_other_identities(acl: AclModel, name: str) -> None:
    # Patterns apply to every client: the names of the aggregator and the monitor must
    # not open device topics for them.
    topics = Topics(FEDERATION)
    for topic in (topics.update(name, 1, 0), topics.status(name), topics.ack(name)):
        assert not acl.may(name, topic, "write"), topic
        assert not acl.may(name, topic, "read"), topic


def test_nothing_outside_the_federation_is_granted(acl: AclModel) -> None:
    other = Topics(OTHER)
    for name in (*DEVICES, AGGREGATOR, MONITOR):
        for topic in [*sample_topics(other), "fedmq", "#", "$SYS/broker/uptime"]:
            assert not acl.may(name, topic, "write"), (name, topic)
            assert not acl.may(name, topic, "read"), (name, topic)


def test_the_readme_shows_the_generated_file() -> None:
    generated = federation_acl({FEDERATION: AGGREGATOR}, [MONITOR]).text()
    body = [line for line in generated.removeprefix(HEADER).splitlines() if line]
    shown = README.read_text(encoding="utf-8").splitlines()
    missing = [line for line in body if line not in shown]
    assert not missing, f"broker_config/README.md lacks generated lines: {missing}"


def test_several_federations_and_a_custom_root() -> None:
    text = federation_acl({"a": "agg-a", "b": "agg-b"}, ["hmi"], root="plant-7/fedmq").text()
    model = AclModel.parse(text)
    a, b = Topics("a", "plant-7/fedmq"), Topics("b", "plant-7/fedmq")
    assert model.may("press-1", a.update("press-1", 1, 0), "write")
    assert model.may("press-1", b.update("press-1", 1, 0), "write")
    assert model.may("agg-a", a.round(), "write")
    assert not model.may("agg-a", b.round(), "write")  # each aggregator its own federation
    assert not model.may("agg-a", b.update("press-1", 1, 0), "read")
    assert not model.may("agg-a", b.update("agg-a", 1, 0), "write")
    assert model.may("hmi", a.status("press-1"), "read")
    assert model.may("hmi", b.aggregator_status(), "read")
    assert not model.may("hmi", b.blob(SHA, 0), "read")
    assert text.count("user hmi") == 1


def test_names_are_checked() -> None:
    with pytest.raises(InvalidNameError, match="two roles"):
        federation_acl({FEDERATION: "monitor"}, ["monitor"])
    with pytest.raises(InvalidNameError, match="monitor name"):
        federation_acl({FEDERATION: AGGREGATOR}, ["a+b"])
    with pytest.raises(InvalidNameError, match="federation"):
        federation_acl({"line/3": AGGREGATOR})


def test_the_directory_defaults_to_the_monitors_it_issued(tmp_path: Path) -> None:
    pki, _ = PkiDirectory.create(tmp_path / "pki", "plant7")
    assert list(pki.acl([FEDERATION]).users) == [AGGREGATOR]
    pki.monitor("hmi-1")
    pki.monitor("hmi-2")
    pki.revoke("hmi-2")
    acl = pki.acl([FEDERATION])
    assert list(acl.users) == [AGGREGATOR, "hmi-1"]
    assert (
        "user fedmq-aggregator-x" in pki.acl([FEDERATION], aggregator="fedmq-aggregator-x").text()
    )
    with pytest.raises(InvalidNameError, match="one --federation"):
        pki.acl(["a", "b"], aggregator="x")
