"""Fixtures for monitor tests: the agent tests' data and settings factories."""

from __future__ import annotations

from agent.conftest import digits_dir, make_settings

__all__ = ["digits_dir", "make_settings"]
