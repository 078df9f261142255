"""Agent configuration: TOML + FEDMQ_AGENT_ environment, clear errors, never a crash."""

from __future__ import annotations

import string
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import AgentSettings, load_settings, parse_settings
from fedmq.errors import ConfigError

MINIMAL = """
client_id = "press-07"
federation = "line-3"
[broker]
url = "mqtt://127.0.0.1:1883"
[data]
path = "{data}"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text.replace("{data}", str(tmp_path)), encoding="utf-8")
    return path


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.client_id == "press-07"
    assert settings.topic_root == "fedmq"
    assert settings.threads == 1
    assert settings.heartbeat_s == 10
    assert settings.state_dir == Path("/var/lib/fedmq-agent")
    assert settings.data.eval_fraction == 0.2
    assert settings.limits.max_blob_mb == 256
    broker = settings.broker_settings()
    assert broker.client_id == "press-07"
    assert broker.persistent_session
    assert broker.address.port == 1883


def test_relative_paths_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    config = project / "agent.toml"
    config.write_text('state_dir = "state"\n' + MINIMAL.replace("{data}", "data"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # not the project: the file's directory is what counts
    settings = load_settings(Path("project/agent.toml"))
    assert settings.data.path == (project / "data").resolve()
    assert settings.state_dir == (project / "state").resolve()


def test_shipped_example_config_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "agent.toml"
    document = tomllib.loads(example.read_text(encoding="utf-8"))
    # The example names device paths; point them at files that exist here.
    document["data"]["path"] = str(tmp_path)
    for key in ("ca_file", "cert_file", "key_file"):
        (tmp_path / key).write_text("")
        document["broker"][key] = str(tmp_path / key)
    for name in ("aggregator.pub", "device.sign"):
        (tmp_path / name).write_text("")
    document["security"]["aggregator_keys"] = [str(tmp_path / "aggregator.pub")]
    document["security"]["signing_key"] = str(tmp_path / "device.sign")
    settings = parse_settings(document, str(example))
    assert settings.broker.url.startswith("mqtts://")
    assert settings.client_id == "press-07"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_AGENT_CLIENT_ID", "press-08")
    monkeypatch.setenv("FEDMQ_AGENT_BROKER__URL", "mqtt://broker.local:1999")
    monkeypatch.setenv("FEDMQ_AGENT_BROKER__PASSWORD", "s3cret")
    monkeypatch.setenv("FEDMQ_AGENT_THREADS", "2")
    settings = load_settings(write(tmp_path, MINIMAL))
    assert settings.client_id == "press-08"
    assert settings.threads == 2
    assert settings.broker_settings().address.port == 1999
    assert settings.broker_settings().password == "s3cret"
    assert "s3cret" not in settings.model_dump_json()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param(("client_id", '"bad/id"'), "client_id", id="client-id-with-slash"),
        pytest.param(("client_id", '"+"'), "client_id", id="client-id-wildcard"),
        pytest.param(("federation", '""'), "federation", id="empty-federation"),
        pytest.param(("threads", "0"), "threads", id="zero-threads"),
        pytest.param(("heartbeat_s", "-1"), "heartbeat_s", id="negative-heartbeat"),
        pytest.param(("colour", '"blue"'), "colour", id="unknown-key"),
        pytest.param(("topic_root", '"a/#"'), "topic_root", id="wildcard-root"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    key, value = change
    lines = [line for line in MINIMAL.splitlines() if not line.startswith(f"{key} =")]
    text = f"{key} = {value}\n" + "\n".join(lines)
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        pytest.param('[broker]\nurl = "http://x"', "mqtt://", id="http-url"),
        pytest.param('[broker]\nurl = "mqtt://"', "no host", id="no-host"),
        pytest.param(
            '[broker]\nurl = "mqtt://h"\nca_file = "/etc/ca.pem"', "mqtts", id="tls-on-plain"
        ),
        pytest.param(
            '[broker]\nurl = "mqtts://h"\nca_file = "/nonexistent.pem"', "does not exist", id="ca"
        ),
        pytest.param('[data]\npath = "/nonexistent"', "not a directory", id="no-data-dir"),
        pytest.param('[data]\nentry_point = "no-colon"', "module:function", id="bad-entry"),
        pytest.param(
            '[data]\npath = "{data}"\nentry_point = "m:f"', "exactly one", id="two-sources"
        ),
        pytest.param("[data]\neval_fraction = 1.0", "eval_fraction", id="all-eval"),
    ],
)
def test_bad_sections_name_the_problem(tmp_path: Path, section: str, message: str) -> None:
    header = 'client_id = "a"\nfederation = "b"\n'
    defaults = {"broker": '[broker]\nurl = "mqtt://h"', "data": '[data]\npath = "{data}"'}
    name = section.split("]", maxsplit=1)[0][1:]
    defaults[name] = section
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, header + "\n".join(defaults.values())))


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 2"):
        load_settings(write(tmp_path, 'client_id = "a"\nfederation = \n'))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml")


ids = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=64).filter(
    lambda s: s[0].isalnum()
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(client=ids, federation=ids, threads=st.integers(1, 256))
def test_any_valid_identifiers_are_accepted(
    tmp_path: Path, client: str, federation: str, threads: int
) -> None:
    settings = parse_settings(
        {
            "client_id": client,
            "federation": federation,
            "threads": threads,
            "broker": {"url": "mqtt://h"},
            "data": {"path": str(tmp_path)},
        }
    )
    assert (settings.client_id, settings.federation, settings.threads) == (
        client,
        federation,
        threads,
    )


toml_values = st.recursive(
    st.none().map(lambda _: "x")
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(min_size=1, max_size=10), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150)
@given(document=st.dictionaries(st.text(min_size=1, max_size=12), toml_values, max_size=6))
def test_arbitrary_documents_fail_only_with_config_error(document: dict[str, object]) -> None:
    try:
        result = parse_settings(document)
    except ConfigError:
        return
    assert isinstance(result, AgentSettings)


@settings(max_examples=150)
@given(text=st.text(max_size=200))
def test_arbitrary_file_text_fails_only_with_config_error(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "agent.toml"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError):
            load_settings(path)
