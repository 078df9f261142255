"""deploy/provision-agent.sh, run for real under a staging root (no root, no systemd).

The bundle is written here the way ``fedmq pki device`` lays it out (fake certificate
files: nothing opens TLS; real Ed25519 keys: ``fedmq-agent check`` reads them).  fedmq
is installed from a wheel built from this checkout with ``--no-deps``, so nothing is
downloaded; the provisioned venv borrows this test venv's dependencies through a
``.pth`` file so that the script's own ``fedmq-agent check`` can run.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.units import AGENT_UNIT, REPO, staging_root, verify
from edge_agent.config import load_settings
from fedmq.wire.signing import SigningKey

SCRIPT = REPO / "deploy" / "provision-agent.sh"
PUBLIC = ("agent.toml", "ca.pem", "device.pem", "aggregator.pub")
SECRET = ("device.key", "device.sign")
SOURCES = ("pyproject.toml", "README.md", "fedmq", "edge_agent", "broker_config")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of this checkout, built offline from a copy (the tree stays untouched)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(path, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "dist"),
            source,
        ],
        check=True,
        timeout=300,
    )
    [built] = (work / "dist").glob("fedmq-*.whl")
    return built


def write_bundle(directory: Path, data_dir: Path, state_dir: Path) -> Path:
    """A device bundle: the six files, agent.toml naming the others by relative path."""
    directory.mkdir(parents=True)
    for name in ("ca.pem", "device.pem", "device.key"):
        (directory / name).write_text(f"-----BEGIN {name}-----\nnot a real one\n")
    (directory / "device.sign").write_text(SigningKey.generate().text() + "\n")
    (directory / "aggregator.pub").write_text(SigningKey.generate().public.text() + "\n")
    (directory / "agent.toml").write_text(
        f"""
client_id = "press-07"
federation = "line-3"
state_dir = "{state_dir}"

[broker]
url = "mqtts://broker.plant.local:8883"
ca_file = "ca.pem"
cert_file = "device.pem"
key_file = "device.key"

[security]
aggregator_keys = ["aggregator.pub"]
signing_key = "device.sign"

[data]
path = "{data_dir}"
""",
        encoding="utf-8",
    )
    return directory


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    return write_bundle(tmp_path / "press-07", data, tmp_path / "state")


def provision(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDMQ_", "PYTHON"))}
    env["PYTHON"] = sys.executable  # the venv's base interpreter is this Python's
    result = subprocess.run(
        ["sh", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def borrow_dependencies(venv: Path) -> None:
    """Let the provisioned venv import this venv's dependencies (no download)."""
    [site] = venv.glob("lib/python3*/site-packages")
    (site / "zz-test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


@pytest.mark.slow
def test_provisioning_installs_everything_and_converges(
    tmp_path: Path, bundle: Path, wheel: Path
) -> None:
    root = tmp_path / "root"
    options = ("--root", root, "--package", wheel, "--no-deps")
    first = provision(*options, "--no-check", bundle)
    assert "creating the venv" in first.stdout

    venv = root / "opt" / "fedmq-agent"
    agent = venv / "bin" / "fedmq-agent"
    assert os.access(agent, os.X_OK)
    assert agent.read_text().startswith(f"#!{venv}/bin/python")
    etc = root / "etc" / "fedmq"
    assert mode(etc) == 0o755
    for name in PUBLIC:
        assert (etc / name).read_bytes() == (bundle / name).read_bytes()
        assert mode(etc / name) == 0o644, name
    for name in SECRET:
        assert (etc / name).read_bytes() == (bundle / name).read_bytes()
        assert mode(etc / name) == 0o600, name  # root-only: the unit's LoadCredential=
    unit = root / "etc" / "systemd" / "system" / AGENT_UNIT.name
    assert unit.read_bytes() == AGENT_UNIT.read_bytes()
    if shutil.which("systemctl"):
        wanted = unit.parent / "multi-user.target.wants" / AGENT_UNIT.name
        assert os.readlink(wanted) == f"/etc/systemd/system/{AGENT_UNIT.name}"
    assert sorted(p.name for p in root.iterdir()) == ["etc", "opt"]  # nothing else touched

    # The installed configuration is valid and names the installed files.
    settings = load_settings(etc / "agent.toml")
    assert settings.broker.key_file == (etc / "device.key").resolve()
    assert settings.security is not None
    assert settings.security.signing_key == (etc / "device.sign").resolve()

    # Again, with a new bundle: reuses the venv, replaces the files, runs the check.
    borrow_dependencies(venv)
    (bundle / "ca.pem").write_text("-----BEGIN a renewed CA-----\n")
    second = provision(*options, bundle)
    assert "reusing the venv" in second.stdout
    assert "fedmq-agent check: the configuration is valid" in second.stdout
    assert (etc / "ca.pem").read_text() == "-----BEGIN a renewed CA-----\n"
    assert sorted(p.name for p in etc.iterdir()) == sorted([*PUBLIC, *SECRET])  # no temps

    # systemd accepts the installed unit, and its ExecStart= is the provisioned agent.
    if shutil.which("systemd-analyze"):
        staging_root(root)
        result = verify(root, AGENT_UNIT.name)
        assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.slow
def test_a_tar_gz_bundle_and_another_prefix(tmp_path: Path, bundle: Path, wheel: Path) -> None:
    archive = tmp_path / "press-07.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="press-07")  # as `fedmq pki device --archive` lays it out
    root = tmp_path / "root"
    provision("--root", root, "--package", wheel, "--no-deps", "--no-check", archive)
    assert (root / "etc" / "fedmq" / "device.sign").read_bytes() == (
        bundle / "device.sign"
    ).read_bytes()
    provision(
        "--root", root, "--prefix", "/opt/agents/a", "--package", wheel, "--no-deps",
        "--no-check", archive,
    )  # fmt: skip
    drop_in = root / "etc/systemd/system/fedmq-agent.service.d/provision-prefix.conf"
    assert "ExecStart=/opt/agents/a/bin/fedmq-agent run --config /etc/fedmq/agent.toml" in (
        drop_in.read_text()
    )
    assert os.access(root / "opt/agents/a/bin/fedmq-agent", os.X_OK)
    provision("--root", root, "--package", wheel, "--no-deps", "--no-check", archive)
    assert not drop_in.exists()  # back to the default prefix: the drop-in goes


def _fails(*args: str | Path) -> str:
    result = provision(*args, check=False)
    assert result.returncode != 0
    assert not result.stdout.strip() or "error" not in result.stdout
    return result.stderr


@pytest.fixture
def clean_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    yield root
    # Every refusal below happens before anything is installed.
    assert not (root / "etc").exists()
    assert not (root / "opt").exists()


def test_a_bundle_missing_a_key_is_refused(bundle: Path, clean_root: Path) -> None:
    (bundle / "device.sign").unlink()
    assert "lacks device.sign" in _fails("--root", clean_root, bundle)


def test_an_archive_escaping_its_directory_is_refused(tmp_path: Path, clean_root: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../agent.toml")
    assert "refusing to unpack" in _fails("--root", clean_root, evil)


def test_usage_errors_are_explained(tmp_path: Path, clean_root: Path) -> None:
    assert "no bundle given" in _fails("--root", clean_root)
    assert "unknown option --frobnicate" in _fails("--frobnicate")
    assert "does not exist" in _fails("--root", clean_root, tmp_path / "nowhere")
    assert "--package needs a value" in _fails("--package")
    assert "usage: provision-agent" in provision("--help").stdout
