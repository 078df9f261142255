"""``fedmq pki …`` through typer's CliRunner: exit codes, messages, the files it writes."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from fedmq.cli.app import app
from fedmq.exit_codes import CONFIG_ERROR, OK, USAGE
from fedmq.pki.directory import PkiDirectory
from fedmq.wire.signing import read_signing_key, read_verify_key

FEDERATION = "line-3"


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, ["pki", *args], env=env)


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    result = run("init", "--plant", "plant7", "--dir", str(directory))
    assert result.exit_code == OK, result.output
    return directory


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.exit_code == OK
    for command in ("init", "device", "aggregator", "monitor", "broker", "revoke", "acl"):
        assert command in result.output
    assert "broker-config" in result.output


def test_init_prints_the_aggregator_security_lines(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    result = run("init", "--plant", "plant7", "--dir", str(directory))
    assert result.exit_code == OK, result.output
    assert "[security]" in result.output
    assert f'signing_key = "{(directory / "aggregator" / "aggregator.sign").absolute()}"' in (
        result.output
    )
    assert f'devices = "{(directory / "devices").absolute()}"' in result.output


def test_init_refuses_an_existing_ca_unless_forced(pki_dir: Path) -> None:
    before = (pki_dir / "ca.pem").read_bytes()
    result = run("init", "--plant", "plant7", "--dir", str(pki_dir))
    assert result.exit_code == CONFIG_ERROR
    assert "ca.pem" in result.output
    assert "--force" in result.output
    assert (pki_dir / "ca.pem").read_bytes() == before
    result = run("init", "--plant", "plant7", "--dir", str(pki_dir), "--force")
    assert result.exit_code == OK, result.output
    assert (pki_dir / "ca.pem").read_bytes() != before


def test_commands_need_an_initialised_directory(tmp_path: Path) -> None:
    result = run("device", "press-07", "--federation", FEDERATION, "--dir", str(tmp_path / "x"))
    assert result.exit_code == CONFIG_ERROR
    assert "fedmq pki init" in result.output


def test_device_writes_the_bundle_and_refuses_to_repeat_unforced(pki_dir: Path) -> None:
    args = ("device", "press-07", "--federation", FEDERATION, "--dir", str(pki_dir))
    result = run(*args, "--archive")
    assert result.exit_code == OK, result.output
    assert "press-07" in result.output
    assert (pki_dir / "bundles" / "press-07" / "agent.toml").is_file()
    assert (pki_dir / "bundles" / "press-07.tar.gz").is_file()
    assert (pki_dir / "devices" / "press-07.pub").is_file()

    result = run(*args)
    assert result.exit_code == CONFIG_ERROR
    assert "--force" in result.output
    result = run(*args, "--force", "--install-dir", "/opt/fedmq")
    assert result.exit_code == OK, result.output
    assert "revoked the certificate it replaces" in result.output
    config = tomllib.loads((pki_dir / "bundles" / "press-07" / "agent.toml").read_text())
    assert config["broker"]["cert_file"] == "/opt/fedmq/device.pem"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("device", "press/07", "--federation", FEDERATION), "device id 'press/07'"),
        (("device", "press-07", "--federation", "a b"), "federation id"),
        (("device", "p", "--federation", "f", "--broker-url", "mqtt://b"), "mqtts://"),
        (("broker", "--host", "not a host"), "--host"),
        (("revoke", "press-99"), "no certificate was issued to 'press-99'"),
        (("acl", "--federation", "a", "--federation", "b", "--aggregator", "x"), "one"),
    ],
)
def test_bad_input_exits_with_the_config_error_code(
    pki_dir: Path, args: tuple[str, ...], fragment: str
) -> None:
    result = run(*args, "--dir", str(pki_dir))
    assert result.exit_code == CONFIG_ERROR, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_missing_required_options_are_usage_errors(pki_dir: Path) -> None:
    assert run("device", "press-07", "--dir", str(pki_dir)).exit_code == USAGE
    assert run("broker", "--dir", str(pki_dir)).exit_code == USAGE
    assert run("init").exit_code == USAGE


def test_aggregator_prints_and_writes_its_federation_toml_lines(pki_dir: Path) -> None:
    result = run(
        "aggregator",
        "--federation",
        FEDERATION,
        "--broker-url",
        "mqtts://broker.example:8883",
        "--dir",
        str(pki_dir),
    )
    assert result.exit_code == OK, result.output
    cn = f"fedmq-aggregator-{FEDERATION}"
    assert f'client_id = "{cn}"' in result.output
    snippet = pki_dir / "aggregator" / f"federation-security-{FEDERATION}.toml"
    document = tomllib.loads(snippet.read_text())
    absolute = pki_dir.absolute()
    assert document["broker"] == {
        "url": "mqtts://broker.example:8883",
        "client_id": cn,
        "ca_file": str(absolute / "ca.pem"),
        "cert_file": str(absolute / "aggregator" / f"{cn}.pem"),
        "key_file": str(absolute / "aggregator" / f"{cn}.key"),
    }
    assert document["security"] == {
        "signing_key": str(absolute / "aggregator" / "aggregator.sign"),
        "devices": str(absolute / "devices"),
    }
    for line in snippet.read_text().splitlines()[3:]:
        assert line in result.output  # what is printed is what is written


def test_the_whole_plant_from_the_command_line(pki_dir: Path) -> None:
    env = {"FEDMQ_PKI_DIR": str(pki_dir)}  # --dir from the environment
    assert run("monitor", env=env).exit_code == OK
    result = run("broker", "--host", "broker.plant.local", "--host", "10.0.0.5", env=env)
    assert result.exit_code == OK, result.output
    assert run("device", "press-07", "--federation", FEDERATION, env=env).exit_code == OK

    result = run("acl", "--federation", FEDERATION, env=env)
    assert result.exit_code == OK, result.output
    acl = (pki_dir / "mosquitto" / "acl").read_text()
    assert "user monitor" in acl
    assert f"user fedmq-aggregator-{FEDERATION}" in acl
    assert run("acl", "--federation", FEDERATION, env=env).exit_code == CONFIG_ERROR
    assert run("acl", "--federation", FEDERATION, "--force", env=env).exit_code == OK

    result = run("revoke", "press-07", env=env)
    assert result.exit_code == OK, result.output
    assert "reload" in result.output
    assert not (pki_dir / "devices" / "press-07.pub").exists()
    assert run("revoke", "press-07", env=env).exit_code == CONFIG_ERROR

    result = run("list", env=env)
    assert result.exit_code == OK, result.output
    for name in ("press-07", "monitor", "broker.plant.local"):
        assert name in result.output
    entries = PkiDirectory.open(pki_dir).index().entries
    assert [entry.cn for entry in entries if entry.revoked] == ["press-07"]


def test_broker_config_fills_in_the_pki_files(pki_dir: Path) -> None:
    assert run("broker", "--host", "localhost", "--dir", str(pki_dir)).exit_code == OK
    result = run(
        "broker-config",
        "--dir",
        str(pki_dir),
        "--agents",
        "200",
        "--update-mb",
        "4",
        "--chunk-kib",
        "512",
    )
    assert result.exit_code == OK, result.output
    assert "not made yet: acl" in result.output
    text = (pki_dir / "mosquitto" / "mosquitto.conf").read_text()
    absolute = pki_dir.absolute()
    for line in (
        f"cafile {absolute / 'ca.pem'}",
        f"certfile {absolute / 'broker' / 'broker.pem'}",
        f"keyfile {absolute / 'broker' / 'broker.key'}",
        f"crlfile {absolute / 'crl.pem'}",
        f"acl_file {absolute / 'mosquitto' / 'acl'}",
        "listener 8883",
        "user mosquitto",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "max_queued_messages 100000",
        f"max_queued_bytes {2 * 200 * 4 * 1024 * 1024}",
        f"max_packet_size {1024 * 1024}",
        "persistence_location /var/lib/mosquitto/",
        "log_dest file /var/log/mosquitto/mosquitto.log",
    ):
        assert line in text.splitlines(), line
    assert "${" not in text

    result = run(
        "broker-config", "--dir", str(pki_dir), "--install-dir", "/etc/mosquitto/fedmq", "--force"
    )
    assert result.exit_code == OK, result.output
    text = (pki_dir / "mosquitto" / "mosquitto.conf").read_text()
    assert "crlfile /etc/mosquitto/fedmq/crl.pem" in text.splitlines()
    assert "install -m 0600 -o mosquitto" in result.output


def test_broker_config_refuses_a_queue_mosquitto_cannot_express(pki_dir: Path) -> None:
    result = run("broker-config", "--dir", str(pki_dir), "--agents", "500", "--update-mb", "4")
    assert result.exit_code == CONFIG_ERROR
    assert "max_queued_bytes" in result.output
    assert "memory_limit" in result.output


def test_signing_key_makes_a_second_pair_for_a_rotation(pki_dir: Path) -> None:
    old = (pki_dir / "aggregator" / "aggregator.sign").read_bytes()
    result = run("signing-key", "--name", "aggregator-2", "--dir", str(pki_dir))
    assert result.exit_code == OK, result.output
    secret = pki_dir / "aggregator" / "aggregator-2.sign"
    assert secret.stat().st_mode & 0o777 == 0o600
    key = read_signing_key(secret)
    assert read_verify_key(pki_dir / "aggregator" / "aggregator-2.pub") == key.public
    assert (pki_dir / "aggregator" / "aggregator.sign").read_bytes() == old
    again = run("signing-key", "--name", "aggregator-2", "--dir", str(pki_dir))
    assert again.exit_code == CONFIG_ERROR
    assert "--force" in again.output
