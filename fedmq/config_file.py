"""What the aggregator's and the agent's TOML configuration files have in common.

Both read a TOML file, let ``<PREFIX>_*`` environment variables override it (nested
tables joined by ``__``; **the environment wins**, so a systemd drop-in or credential
changes one value without editing the file), resolve relative paths against the file's
directory, and turn validation errors into one :class:`~fedmq.errors.ConfigError` that
names every offending key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from fedmq.errors import ConfigError

MAX_REPORTED_ERRORS = 10


class EnvFirstSettings(BaseSettings):
    """Settings whose environment variables override the values read from the file."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment first, then the TOML document passed as init values."""
        return env_settings, init_settings


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse the TOML file at ``path``.

    Raises:
        ConfigError: the file is missing, unreadable or not TOML (with line and column).
    """
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"cannot read {what} {str(path)!r}: it does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def resolve_paths(base: Path, table: Any, keys: Iterable[str]) -> None:
    """Make relative path values among ``keys`` of ``table`` relative to ``base``.

    Config files are read from wherever a service happens to start (systemd starts
    in ``/``); paths relative to the file keep a project directory relocatable.
    """
    if not isinstance(table, dict):
        return
    for key in keys:
        value = table.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            table[key] = str((base / value).resolve())


def describe(exc: ValidationError) -> str:
    """One line per invalid field: ``dotted.key: problem``."""
    lines = []
    for error in exc.errors(include_url=False)[:MAX_REPORTED_ERRORS]:
        where = ".".join(str(part) for part in error["loc"]) or "<root>"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)
