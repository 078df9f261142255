"""Reading the systemd units of deploy/ and running systemd-analyze on them offline."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
AGENT_UNIT = DEPLOY / "fedmq-agent.service"
AGGREGATOR_UNIT = DEPLOY / "fedmq-aggregator.service"
MOSQUITTO_DROP_IN = DEPLOY / "mosquitto.service.d" / "fedmq.conf"
# Where distributions keep packaged units (Debian 12 merges /lib into /usr/lib).
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


@dataclass(frozen=True)
class Unit:
    """A unit file as systemd reads it: every assignment, repeated keys kept in order."""

    path: Path
    sections: dict[str, dict[str, list[str]]]

    @classmethod
    def read(cls, path: Path) -> Unit:
        sections: dict[str, dict[str, list[str]]] = {}
        current: dict[str, list[str]] | None = None
        for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], defaultdict(list))
                continue
            assert current is not None, f"{path}:{number}: assignment outside a section"
            assert not line.endswith("\\"), f"{path}:{number}: continuation lines unsupported"
            key, sep, value = line.partition("=")
            assert sep, f"{path}:{number}: not an assignment: {raw!r}"
            current[key.strip()].append(value.strip())
        return cls(path, sections)

    def values(self, key: str, section: str = "Service") -> list[str]:
        """Every value assigned to ``key``, in order (the units never reset a list)."""
        return list(self.sections.get(section, {}).get(key, []))

    def get(self, key: str, section: str = "Service") -> str:
        """The one value of ``key`` (the last assignment wins, as in systemd)."""
        assigned = self.sections.get(section, {}).get(key)
        assert assigned, f"{self.path.name}: [{section}] {key}= is not set"
        return assigned[-1]

    def has(self, key: str, section: str = "Service") -> bool:
        return key in self.sections.get(section, {})


def systemd_analyze() -> str:
    """The systemd-analyze binary; skips (with the reason) only when it is absent."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip(
            "systemd-analyze is not installed: `make test` installs it (Debian package "
            "systemd); it verifies units offline, without systemd running"
        )
    return found


def staging_root(root: Path) -> Path:
    """A file system root systemd-analyze --root= can load units from.

    It needs the packaged units (targets, sockets) that every service depends on by
    default; the units under test go to ``<root>/etc/systemd/system``.
    """
    target = root / "usr" / "lib" / "systemd" / "system"
    target.mkdir(parents=True, exist_ok=True)
    for directory in dict.fromkeys(d.resolve() for d in SYSTEM_UNIT_DIRS if d.is_dir()):
        shutil.copytree(directory, target, symlinks=True, dirs_exist_ok=True)
    if not (target / "multi-user.target").exists():
        pytest.fail(f"no packaged systemd units in {', '.join(map(str, SYSTEM_UNIT_DIRS))}")
    (root / "etc" / "systemd" / "system").mkdir(parents=True, exist_ok=True)
    return root


def fake_executable(root: Path, path: str) -> None:
    """An executable at ``path`` inside ``root`` (verify checks that ExecStart= exists)."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    target.chmod(0o755)


def executables(unit: Unit) -> list[str]:
    """The programs a unit's Exec*= lines run (prefixes like '-' and '!' stripped)."""
    programs = []
    for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop"):
        for line in unit.values(key):
            program = line.split()[0].lstrip("-@:+!")
            programs.append(program)
    return programs


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of ``units`` (names) under ``root``, offline."""
    return subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--generators=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
