"""The agent.toml writer (tomli-w, None left out): tomllib reads back what it writes."""

from __future__ import annotations

import math
import tomllib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.simulate.settings import toml_text

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
