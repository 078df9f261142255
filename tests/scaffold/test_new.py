"""`fedmq new`: a project that loads with the real loaders, simulates, deploys and compiles."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simulate.support import clean_env, cli
from typer.testing import CliRunner

from edge_agent.config import load_settings as load_agent_settings
from edge_agent.data import fit_to_model, load_raw
from fedmq.aggregator.config import load_settings as load_aggregator_settings
from fedmq.aggregator.store import read_records
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.bundle import Bundle
from fedmq.cli.app import app
from fedmq.errors import ConfigError
from fedmq.scaffold import TEMPLATES, create_project, module_name
from fedmq.simulate import Simulation, SimulationOptions

EXPECTED = {
    "README.md",
    "agent.toml",
    "federation.toml",
    "model.py",
    "bundle/manifest.json",
    "bundle/model.onnx",
    "bundle/parameters.npz",
    "bundle/train_step.onnx",
}


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("template", TEMPLATES)
def test_a_new_project_loads_with_the_real_loaders(tmp_path: Path, template: str) -> None:
    directory = tmp_path / f"line-{template}"
    project = create_project(directory, template)
    assert _files(directory) == EXPECTED | {f"{project.module}.py"}
    text = "".join(
        p.read_text() for p in directory.glob("*.*") if p.suffix in (".md", ".toml", ".py")
    )
    assert "{{" not in text
    assert project.name in (directory / "README.md").read_text()

    aggregator = load_aggregator_settings(directory / "federation.toml")
    agent = load_agent_settings(directory / "agent.toml")
    assert aggregator.federation == agent.federation == directory.name
    assert aggregator.bundle == (directory / "bundle").resolve()
    assert agent.data.module_path == directory.resolve()
    bundle = Bundle.load(aggregator.bundle)
    train, evaluation = load_raw(agent.data)  # imports the project's module, calls load()
    dataset = fit_to_model(train, evaluation, bundle.manifest, agent.data.target)
    assert dataset.num_train > 50
    assert dataset.num_eval > 0
    for source in (directory / "model.py", directory / f"{project.module}.py"):
        compile(source.read_text(), str(source), "exec")  # valid Python after rendering


def test_refusals(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        create_project(tmp_path / "taken")
    with pytest.raises(ConfigError, match="unknown template"):
        create_project(tmp_path / "x", "imagenet")
    with pytest.raises(ConfigError, match="federation id"):
        create_project(tmp_path / "has space")
    with pytest.raises(ConfigError, match="at most 40"):
        create_project(tmp_path / ("n" * 41))
    result = CliRunner().invoke(app, ["new", str(tmp_path / "taken")])
    assert result.exit_code == 2
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@settings(max_examples=50)
@given(st.text(min_size=1, max_size=40))
def test_module_names_are_identifiers(name: str) -> None:
    module = module_name(name)
    assert module.isidentifier()
    assert module.endswith("_data")


def test_the_cli_prints_the_next_steps(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["new", str(tmp_path / "press7"), "--template", "sensors"])
    assert result.exit_code == 0, result.output
    assert f"fedmq simulate --project {tmp_path / 'press7'}" in result.output
    assert (tmp_path / "press7" / "press7_data.py").is_file()


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize(
    ("template", "metric"), [("digits", "test_accuracy"), ("sensors", "test_auroc")]
)
async def test_a_new_project_simulates_unchanged(
    tmp_path: Path, template: str, metric: str
) -> None:
    directory = tmp_path / f"sim-{template}"
    create_project(directory, template)
    options = SimulationOptions(agents=3, rounds=2, project=directory, out=tmp_path / "report")
    result = await Simulation(options).run()
    assert result.notes == []  # every agent got its own data, and there is a test set
    assert [row.outcome for row in result.rows] == ["closed", "closed"]
    assert all(row.updates_accepted == 3 for row in result.rows)
    first, last = (getattr(row, metric) for row in result.rows)
    initial = result.summary["initial"][metric]
    assert first is not None
    assert last is not None
    assert last > initial  # the project's own load_test() scored the model, which learned
    assert result.summary["run"]["federation"] == directory.name


@pytest.mark.broker
@pytest.mark.slow
def test_a_new_project_deploys_with_serve_and_two_agents(
    broker: MosquittoBroker, federation: str, tmp_path: Path
) -> None:
    directory = tmp_path / federation  # a federation id no other test uses on this broker
    create_project(directory, "digits")
    env = clean_env()
    serve_env = {**env, "FEDMQ_BROKER__URL": broker.url, "FEDMQ_ROUNDS": "1"}
    agent_env = {**env, "FEDMQ_AGENT_BROKER__URL": broker.url}
    second = {
        **agent_env,
        "FEDMQ_AGENT_CLIENT_ID": f"{federation}-device-1",
        "FEDMQ_AGENT_STATE_DIR": str(directory / "state" / "device-1"),
        "FEDMQ_AGENT_DATA__OPTIONS": '{"device": 1, "num_devices": 2}',
    }
    agent = [sys.executable, "-m", "edge_agent", "run", "--config", str(directory / "agent.toml")]
    logs = [open(tmp_path / f"{name}.log", "wb") for name in ("serve", "a0", "a1")]  # noqa: SIM115
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(
            subprocess.Popen(
                cli("serve", "--config", str(directory / "federation.toml")),
                env=serve_env,
                stdout=logs[0],
                stderr=logs[0],
            )
        )
        processes.append(subprocess.Popen(agent, env=agent_env, stdout=logs[1], stderr=logs[1]))
        processes.append(subprocess.Popen(agent, env=second, stdout=logs[2], stderr=logs[2]))
        assert processes[0].wait(120) == 0  # the aggregator exits after its last round
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(30)
        for log in logs:
            log.close()
    [record] = read_records(directory / "state" / "aggregator")
    assert record.outcome == "closed"
    assert sorted(c.client for c in record.contributions) == [
        f"{federation}-device-0",
        f"{federation}-device-1",
    ]
    export = subprocess.run(
        cli(
            "export",
            "--config",
            str(directory / "federation.toml"),
            "--out",
            str(tmp_path / "m.onnx"),
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 1000


@pytest.mark.compile
@pytest.mark.parametrize("template", TEMPLATES)
def test_the_shipped_bundle_is_the_compiled_model(
    tmp_path: Path, template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / f"c-{template}"
    create_project(directory, template)
    readme = (directory / "README.md").read_text()
    [command] = re.findall(r"fedmq compile (\S+ --input-shape \S+ --loss \S+) -o", readme)
    reference, _, shape, _, loss = command.split()
    out = tmp_path / "compiled"
    monkeypatch.chdir(tmp_path)  # the README's paths are relative to the project's parent
    result = CliRunner().invoke(
        app, ["compile", reference, "--input-shape", shape, "--loss", loss, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    shipped = Bundle.load(directory / "bundle")
    compiled = Bundle.load(out)
    assert compiled.manifest.tensors == shipped.manifest.tensors
    assert compiled.manifest.loss == shipped.manifest.loss
    for name, value in shipped.initial_parameters().items():
        np.testing.assert_array_equal(compiled.initial_parameters()[name], value, err_msg=name)
