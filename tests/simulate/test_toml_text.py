"""The agent.toml writer (tomli-w, None left out): tomllib reads back what it writes.

Also what goes into it, and what must not: the external broker's password.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.errors import ConfigError
from fedmq.simulate.options import PASSWORD_ENV, external_broker
from fedmq.simulate.settings import broker_table, check_environment, toml_text

keys = st.text(min_size=1, max_size=8)
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=10,
)
documents = st.dictionaries(keys, values, max_size=6)


@given(documents)
def test_round_trip(document: dict[str, Any]) -> None:
    assert tomllib.loads(toml_text(document)) == document


def test_none_is_left_out_and_nan_survives() -> None:
    parsed = tomllib.loads(toml_text({"a": None, "t": {"x": math.nan, "y": None}, "e": {}}))
    assert set(parsed) == {"t", "e"}
    assert math.isnan(parsed["t"]["x"])
    assert parsed["e"] == {}


def test_agent_document_shape() -> None:
    text = toml_text(
        {
            "client_id": "agent-001",
            "broker": {"url": "mqtt://127.0.0.1:1883", "protocol": "5"},
            "data": {"entry_point": "m:load", "options": {"device": 1, "name": 'q"uote'}},
        }
    )
    assert '[data.options]\ndevice = 1\nname = "q\\"uote"' in text


def test_unsupported_values_are_refused() -> None:
    with pytest.raises(TypeError, match="set"):
        toml_text({"a": {1, 2}})


def test_the_broker_table_written_for_subprocess_agents_holds_no_password(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("a CA")
    section = external_broker(
        "mqtts://broker.plant7.example:8883",
        username="rehearsal",
        password="s3cret",
        ca_file=ca,
        protocol="3.1.1",
        max_packet_size=131072,
    )
    written = broker_table(section, password=False)
    assert tomllib.loads(toml_text({"broker": written}))["broker"] == {
        "url": "mqtts://broker.plant7.example:8883",
        "username": "rehearsal",
        "ca_file": str(ca.resolve()),
        "protocol": "3.1.1",
        "max_packet_size": 131072,
    }
    assert broker_table(section)["password"] == "s3cret"  # in-process agents: in memory


def test_only_the_simulators_own_password_variable_is_accepted() -> None:
    check_environment({PASSWORD_ENV: "s3cret", "HOME": "/root"})
    with pytest.raises(ConfigError, match="FEDMQ_AGENT_BROKER__PASSWORD"):
        check_environment({PASSWORD_ENV: "s3cret", "FEDMQ_AGENT_BROKER__PASSWORD": "x"})
