"""Fixtures for security tests: keys, and the agent tests' data and settings factories."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent.conftest import digits_dir, make_settings

from security.keys import Keys

__all__ = ["digits_dir", "keys", "make_settings"]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")
