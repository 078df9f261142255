"""Fixtures for delivery tests: the agent tests' data and settings factory."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from agent.conftest import digits_dir, make_settings

from edge_agent.config import AgentSettings

__all__ = ["digits_dir", "make_settings", "make_settings_agent"]


@pytest.fixture
def make_settings_agent(
    make_settings: Callable[..., AgentSettings],
) -> Callable[..., AgentSettings]:
    """The agent settings factory, under a name that does not clash with the service's."""
    return make_settings
