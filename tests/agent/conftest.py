"""Fixtures for agent tests: digits data, settings for an agent on a test broker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.helpers import write_digits
from edge_agent.config import AgentSettings, parse_settings


@pytest.fixture
def digits_dir(tmp_path: Path) -> Path:
    return write_digits(tmp_path / "data")


@pytest.fixture
def make_settings(
    tmp_path: Path, federation: str, digits_dir: Path
) -> Callable[..., AgentSettings]:
    """Settings for an agent on ``url`` with its own state dir under tmp_path."""

    def factory(url: str, client_id: str = "dev-1", **overrides: Any) -> AgentSettings:
        document: dict[str, Any] = {
            "client_id": client_id,
            "federation": federation,
            "state_dir": str(tmp_path / f"state-{client_id}"),
            "heartbeat_s": 0.5,
            "broker": {"url": url},
            "data": {"path": str(digits_dir)},
            "limits": {"round_retry_s": 0.5, "download_timeout_s": 20},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(document.get(key), dict):
                document[key] = {**document[key], **value}
            else:
                document[key] = value
        return parse_settings(document)

    return factory
