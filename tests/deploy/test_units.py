"""The systemd units of deploy/: systemd accepts them, and every name they use is real.

``systemd-analyze verify --root=`` loads a unit the way systemd would (unknown keys,
bad values and missing executables are reported) without systemd running, so it runs
in CI containers.  The other tests tie each path, flag, credential, variable and exit
code in the units to the code and the docs, so renaming one side breaks a test.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from deploy.units import (
    AGENT_UNIT,
    AGGREGATOR_UNIT,
    DEPLOY,
    MOSQUITTO_DROP_IN,
    REPO,
    SYSTEM_UNIT_DIRS,
    Unit,
    executables,
    fake_executable,
    staging_root,
    systemd_analyze,
    verify,
)
from edge_agent.config import DEFAULT_STATE_DIR, ENV_PREFIX, AgentSettings
from fedmq import exit_codes
from fedmq.aggregator.config import AggregatorSettings

UNITS = {"agent": AGENT_UNIT, "aggregator": AGGREGATOR_UNIT}
DOCS = {"agent": REPO / "docs" / "agent.md", "aggregator": REPO / "docs" / "aggregator.md"}
EXAMPLES = {"agent": DEPLOY / "agent.toml", "aggregator": DEPLOY / "federation.toml"}
SETTINGS: dict[str, tuple[str, type[BaseModel]]] = {
    "agent": (ENV_PREFIX, AgentSettings),
    "aggregator": ("FEDMQ_", AggregatorSettings),
}
PROVISION = DEPLOY / "provision-agent.sh"
MAX_EXPOSURE = 2.5  # systemd-analyze security: both score 1.4 on systemd 252 ("OK" < 4)


def unit(kind: str) -> Unit:
    return Unit.read(UNITS[kind])


# ---------------------------------------------------------------- systemd accepts them


def test_systemd_analyze_verify_accepts_both_units(tmp_path: Path) -> None:
    root = staging_root(tmp_path / "root")
    for path in UNITS.values():
        shutil.copy(path, root / "etc" / "systemd" / "system" / path.name)
        for program in executables(Unit.read(path)):
            fake_executable(root, program)  # the venvs are not installed here
    result = verify(root, *(path.name for path in UNITS.values()))
    # verify exits 0 on unknown keys and invalid values: its output must be empty too.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above is not vacuous: a bad key and a missing program are reported."""
    root = staging_root(tmp_path / "root")
    text = AGENT_UNIT.read_text(encoding="utf-8").replace("MemoryMax=", "MemroyMax=")
    (root / "etc" / "systemd" / "system" / AGENT_UNIT.name).write_text(text, encoding="utf-8")
    result = verify(root, AGENT_UNIT.name)
    assert "Unknown key" in result.stderr
    assert "MemroyMax" in result.stderr
    assert "is not executable" in result.stderr


def test_mosquitto_drop_in_is_valid_for_the_packaged_unit(tmp_path: Path) -> None:
    root = staging_root(tmp_path / "root")
    packaged = next(
        (d / "mosquitto.service" for d in SYSTEM_UNIT_DIRS if (d / "mosquitto.service").exists()),
        None,
    )
    units = root / "etc" / "systemd" / "system"
    if packaged is None:  # mosquitto from elsewhere: a unit shaped like Debian's
        (units / "mosquitto.service").write_text(
            "[Unit]\nDescription=Mosquitto MQTT Broker\n[Service]\nType=notify\n"
            "ExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf\n",
            encoding="utf-8",
        )
        packaged = units / "mosquitto.service"
    for program in executables(Unit.read(packaged)):
        fake_executable(root, program)
    drop_ins = units / "mosquitto.service.d"
    drop_ins.mkdir()
    shutil.copy(MOSQUITTO_DROP_IN, drop_ins / MOSQUITTO_DROP_IN.name)
    result = verify(root, "mosquitto.service")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    drop_in = Unit.read(MOSQUITTO_DROP_IN)
    # The systemd side only: the broker settings stay in the file the packaged unit
    # passes to -c (rendered by `fedmq pki broker-config`).
    config = drop_in.get("AssertPathExists", "Unit")
    assert f"-c {config}" in " ".join(Unit.read(packaged).values("ExecStart"))
    assert int(drop_in.get("LimitNOFILE")) >= 65536
    assert drop_in.get("Restart") in ("always", "on-failure")


@pytest.mark.parametrize("kind", sorted(UNITS))
def test_security_exposure_stays_low(kind: str, tmp_path: Path) -> None:
    root = staging_root(tmp_path / "root")
    shutil.copy(UNITS[kind], root / "etc" / "systemd" / "system")
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", f"--root={root}", UNITS[kind].name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


# ---------------------------------------------------------------- the hardening asked for


@pytest.mark.parametrize("kind", sorted(UNITS))
def test_units_are_notify_sandboxed_and_bounded(kind: str) -> None:
    u = unit(kind)
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "Restart": "on-failure",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    assert {key: u.get(key) for key in expected} == expected
    assert float(u.get("WatchdogSec")) > 0
    assert re.fullmatch(r"\d+[KMG]", u.get("MemoryMax"))
    assert 1 <= int(u.get("CPUWeight")) <= 10000
    assert u.get("StateDirectory")


def test_restart_prevent_exit_status_is_the_configuration_error() -> None:
    agent = {int(code) for code in unit("agent").get("RestartPreventExitStatus").split()}
    aggregator = {int(code) for code in unit("aggregator").get("RestartPreventExitStatus").split()}
    assert agent == {exit_codes.CONFIG_ERROR}
    # The aggregator's unusable state directory needs an operator too (docs/aggregator.md).
    assert aggregator == {exit_codes.CONFIG_ERROR, exit_codes.STATE_FAILURE}
    documented = DOCS["aggregator"].read_text(encoding="utf-8")
    for code in aggregator:
        assert f"`RestartPreventExitStatus={code}`" in documented


# ---------------------------------------------------------------- every name is real


def _scripts() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    scripts: dict[str, str] = pyproject["project"]["scripts"]
    return scripts


@pytest.mark.parametrize("kind", sorted(UNITS))
def test_exec_start_runs_a_real_command_with_real_flags(kind: str) -> None:
    argv = shlex.split(unit(kind).get("ExecStart"))
    program = Path(argv[0])
    assert program.name in _scripts(), f"{program.name} is no console script in pyproject"
    subcommand = argv[1]
    installed = Path(sys.executable).parent / program.name  # this venv's console script
    help_text = subprocess.run(
        [str(installed), subcommand, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    flags = [arg for arg in argv[2:] if arg.startswith("-")]
    assert flags
    for flag in flags:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
            f"{program.name} {subcommand} has no {flag}"
        )
    # The venv the unit runs from is the one the docs (and, for the agent, the
    # provisioning script) install.
    venv = str(program.parent.parent)
    assert venv in DOCS[kind].read_text(encoding="utf-8")
    if kind == "agent":
        assert f"DEFAULT_PREFIX={venv} " in PROVISION.read_text(encoding="utf-8")


@pytest.mark.parametrize("kind", sorted(UNITS))
def test_config_path_is_the_documented_one(kind: str) -> None:
    argv = shlex.split(unit(kind).get("ExecStart"))
    config = argv[argv.index("--config") + 1]
    assert config == f"/etc/fedmq/{EXAMPLES[kind].name}"
    assert f"--config {config}" in DOCS[kind].read_text(encoding="utf-8")
    assert config in EXAMPLES[kind].read_text(encoding="utf-8")  # its header names it


def test_state_directories_match_the_code_and_the_examples() -> None:
    agent_dir = Path("/var/lib") / unit("agent").get("StateDirectory")
    assert agent_dir == DEFAULT_STATE_DIR
    agent_example = tomllib.loads(EXAMPLES["agent"].read_text(encoding="utf-8"))
    assert Path(agent_example["state_dir"]) == DEFAULT_STATE_DIR
    aggregator_dir = Path("/var/lib") / unit("aggregator").get("StateDirectory")
    federation = tomllib.loads(EXAMPLES["aggregator"].read_text(encoding="utf-8"))
    assert Path(federation["state_dir"]) == aggregator_dir


def _field(settings: type[BaseModel], dotted: list[str]) -> bool:
    """Whether ``settings`` has the nested field ``dotted`` (Optional sections unwrapped)."""
    model: type[BaseModel] | None = settings
    for name in dotted:
        if model is None or name not in model.model_fields:
            return False
        annotation = model.model_fields[name].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return True


def _example_value(kind: str, dotted: list[str]) -> object:
    value: object = tomllib.loads(EXAMPLES[kind].read_text(encoding="utf-8"))
    for name in dotted:
        assert isinstance(value, dict)
        value = value.get(name)
    return value


@pytest.mark.parametrize("kind", sorted(UNITS))
def test_credentials_replace_exactly_the_key_files_the_config_names(kind: str) -> None:
    u = unit(kind)
    prefix, settings = SETTINGS[kind]
    credentials = dict(entry.split(":", 1) for entry in u.values("LoadCredential"))
    assert credentials, "the private keys reach the service as credentials"
    overridden: dict[str, str] = {}
    for assignment in u.values("Environment"):
        variable, _, value = assignment.partition("=")
        assert variable.startswith(prefix), variable
        dotted = variable.removeprefix(prefix).lower().split("__")
        assert _field(settings, dotted), f"{variable} names no setting of {settings.__name__}"
        name = value.removeprefix("/run/credentials/%n/")
        assert name in credentials, f"{variable} points at no loaded credential"
        overridden[name] = ".".join(dotted)
    assert set(overridden) == set(credentials), "every credential is used"
    for name, source in credentials.items():
        # The credential replaces the very file the example configuration names.
        assert _example_value(kind, overridden[name].split(".")) == source
        assert source.startswith("/etc/fedmq/")


def test_provisioning_installs_the_files_the_agent_unit_loads() -> None:
    script = PROVISION.read_text(encoding="utf-8")
    secret = re.search(r'^SECRET_FILES="([^"]*)"', script, re.MULTILINE)
    assert secret is not None
    loaded = {Path(entry.split(":", 1)[1]).name for entry in unit("agent").values("LoadCredential")}
    assert set(secret[1].split()) == loaded
    assert re.search(r"^ETC=/etc/fedmq\b", script, re.MULTILINE)
    assert re.search(r"^UNIT_NAME=fedmq-agent\.service\b", script, re.MULTILINE)
