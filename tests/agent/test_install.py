"""Installing the global model for local inference (edge_agent.install).

The models are real standalone ONNX models (what ``fedmq export`` writes) of the digits
MLP with different weights; the reader is a separate process loading them with
onnxruntime while the installer replaces them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.helpers import eventually
from agent.install_support import Model, announcement, make_models, probe_input, run_model
from edge_agent.config import InstallConfig, parse_settings
from edge_agent.install import ModelInstaller, metadata_path, select_release
from fedmq.buffers import Buffer
from fedmq.errors import ConfigError
from fedmq.timeouts import within
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import ModelReleases

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models() -> list[Model]:
    return make_models(16)


class Blobs:
    """An in-memory stand-in for the agent's blob cache and receiver: counts downloads."""

    def __init__(self, models: list[Model]) -> None:
        self.data = {m.sha256: m.data for m in models}
        self.fetched: list[str] = []

    async def fetch(self, ref: BlobRef) -> Buffer:
        self.fetched.append(ref.sha256)
        return self.data[ref.sha256]


@contextlib.asynccontextmanager
async def running(installer: ModelInstaller) -> AsyncIterator[ModelInstaller]:
    task = asyncio.create_task(installer.run())
    try:
        await installer.wait_loaded()
        yield installer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def installer_for(
    config: InstallConfig, federation: str, blobs: Blobs, errors: list[str] | None = None
) -> ModelInstaller:
    return ModelInstaller(
        config,
        federation,
        "dev-1",
        blobs.fetch,
        on_error=(errors if errors is not None else []).append,
        clock=time.time,
    )


def read_metadata(path: Path) -> dict[str, Any]:
    return json.loads(metadata_path(path).read_text())


# ---------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("select", "checkpoint", "expected"),
    [
        ("latest", None, ("latest", 3)),
        ("best", None, ("best", 1)),
        ("pinned", 1, ("best", 1)),
        ("pinned", 3, ("latest", 3)),
        ("pinned", 2, None),
    ],
)
def test_selection(
    models: list[Model], select: str, checkpoint: int | None, expected: tuple[str, int] | None
) -> None:
    config = InstallConfig.model_validate(
        {"path": "/nonexistent/model.onnx", "select": select, "checkpoint": checkpoint}
    )
    releases = announcement("f", latest=models[2], best=models[0]).models
    assert releases is not None
    choice = select_release(releases, config)
    assert (None if choice is None else (choice[0], choice[1].checkpoint)) == expected
    assert select_release(None, config) is None
    assert select_release(ModelReleases(), config) is None


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"select": "pinned"}, "checkpoint is set exactly when"),
        ({"checkpoint": 3}, "checkpoint is set exactly when"),
        ({"hook_topic": "plant/+/model"}, "no wildcards"),
        ({"hook_command": []}, "hook_command"),
        ({"select": "newest"}, "select"),
    ],
)
def test_install_table_errors_name_the_key(
    tmp_path: Path, digits_dir: Path, table: dict[str, Any], problem: str
) -> None:
    document = {
        "client_id": "dev-1",
        "federation": "f",
        "broker": {"url": "mqtt://127.0.0.1:1883"},
        "data": {"path": str(digits_dir)},
        "install": {"path": str(tmp_path / "model.onnx"), **table},
    }
    with pytest.raises(ConfigError, match=problem):
        parse_settings(document)


def test_the_documented_install_table_is_valid(digits_dir: Path) -> None:
    text = (REPO / "docs" / "agent.md").read_text(encoding="utf-8")
    section = text.split("## Installing the global model for local inference", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    document = tomllib.loads(example)
    document.update(
        client_id="press-07",
        federation="line-3",
        broker={"url": "mqtt://127.0.0.1:1883"},
        data={"path": str(digits_dir)},
    )
    install = parse_settings(document).install
    assert install is not None
    assert (install.select, install.hook_topic) == ("best", "plant/press-07/inference/model")
    assert install.path == Path("/var/lib/plant-inference/model.onnx")


# ---------------------------------------------------------------------------- installing


async def test_installs_once_keeps_it_across_restarts_and_runs_the_hook(
    tmp_path: Path, federation: str, models: list[Model], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMQ_AGENT_BROKER__PASSWORD", "secret")
    path = tmp_path / "inference" / "model.onnx"
    path.parent.mkdir()
    hook_log = tmp_path / "hook.jsonl"
    hook = (
        "import json, os, sys\n"
        "env = {k: v for k, v in os.environ.items() if k.startswith('FEDMQ_')}\n"
        "open(sys.argv[1], 'a').write(json.dumps(env) + '\\n')\n"
    )
    config = InstallConfig(path=path, hook_command=[sys.executable, "-c", hook, str(hook_log)])
    blobs = Blobs(models)
    a, b, c = models[:3]

    def hooks() -> list[dict[str, str]]:
        if not hook_log.exists():
            return []
        return [json.loads(line) for line in hook_log.read_text().splitlines()]

    async with running(installer_for(config, federation, blobs)) as installer:
        installer.offer(announcement(federation, latest=a))
        await eventually(lambda: len(hooks()) == 1, what="the first install and its hook")
        assert path.read_bytes() == a.data
        meta = read_metadata(path)
        assert (meta["sha256"], meta["checkpoint"], meta["release"]) == (a.sha256, 1, "latest")
        assert meta["federation"] == federation
        [env] = hooks()
        assert env["FEDMQ_MODEL_SHA256"] == a.sha256
        assert env["FEDMQ_MODEL_PATH"] == str(path)
        assert env["FEDMQ_MODEL_CHECKPOINT"] == "1"
        assert not [k for k in env if k.startswith("FEDMQ_AGENT_")]  # no secrets for hooks
        # The same model announced again, then as a later checkpoint with its evaluation:
        # nothing is downloaded or replaced, the metadata follows.
        installer.offer(announcement(federation, latest=a))
        relabelled = Model(7, a.data, a.output)
        installer.offer(announcement(federation, latest=relabelled, metrics={"eval_loss": 0.5}))
        await eventually(lambda: read_metadata(path)["checkpoint"] == 7, what="the metadata")
        assert read_metadata(path)["metrics"] == {"eval_loss": 0.5}
        assert blobs.fetched == [a.sha256]
        assert len(hooks()) == 1

    # A restart: the installed model is known from the file itself.
    async with running(installer_for(config, federation, blobs)) as installer:
        assert installer.installed is not None
        assert installer.installed.sha256 == a.sha256
        installer.offer(announcement(federation, latest=relabelled, metrics={"eval_loss": 0.5}))
        installer.offer(announcement(federation, latest=b))
        await eventually(lambda: installer.installs == 1, what="the install of b")
        await eventually(lambda: len(hooks()) == 2, what="the hook of b")  # before stopping
        assert blobs.fetched == [a.sha256, b.sha256]  # a was not downloaded again
        assert path.read_bytes() == b.data

    # A crash between the two renames: the model is c, the metadata still says b.
    path.write_bytes(c.data)
    async with running(installer_for(config, federation, blobs)) as installer:
        assert installer.installed is None  # file and metadata disagree
        installer.offer(announcement(federation, latest=c))
        await eventually(lambda: read_metadata(path)["sha256"] == c.sha256, what="recovery")
        assert blobs.fetched == [a.sha256, b.sha256]  # c is in place already
        await eventually(lambda: len(hooks()) == 3, what="the hook of the completed install")


async def test_a_reader_never_sees_a_partial_model(
    tmp_path: Path, federation: str, models: list[Model]
) -> None:
    """Several successive installs while another process keeps loading the model.

    Every load must succeed and compute what one of the complete versions computes,
    and the metadata must never name a model newer than the file it sits beside.
    """
    path = tmp_path / "model.onnx"
    x_file = tmp_path / "x.npy"
    np.save(x_file, probe_input())
    stop = tmp_path / "stop"
    order = {m.sha256: index for index, m in enumerate(models)}
    outputs = {m.sha256: hashlib.sha256(m.output).hexdigest() for m in models}
    reader = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        READER,
        str(path),
        str(x_file),
        str(stop),
        stdout=subprocess.PIPE,
    )
    assert reader.stdout is not None
    samples: list[dict[str, str]] = []

    async def until_loaded(sha256: str) -> None:
        assert reader.stdout is not None
        while True:
            line = await within(reader.stdout.readline(), 60)
            assert line, "the reader stopped"
            sample = json.loads(line)
            samples.append(sample)
            if sample.get("model") == sha256 and sample.get("meta") == sha256:
                return

    blobs = Blobs(models)
    try:
        async with running(installer_for(InstallConfig(path=path), federation, blobs)) as inst:
            for count, model in enumerate(models, 1):
                inst.offer(announcement(federation, latest=model))
                await until_loaded(model.sha256)  # the reader has seen this version whole
                # The files are in place before the installer's thread hands back, so the
                # count can trail the reader by a moment.
                await eventually(lambda n=count: inst.installs == n, what=f"install {count}")
    finally:
        stop.touch()
        assert reader.stdout is not None
        rest, _ = await reader.communicate()
        samples += [json.loads(line) for line in rest.splitlines()]
    errors = [s for s in samples if "error" in s]
    assert not errors, errors[:3]
    assert len(samples) > len(models)
    for sample in samples:
        loaded, meta = sample["model"], sample["meta"]
        assert loaded in order, "a model file that is no complete version"
        assert sample["output"] == outputs[loaded]
        assert order[loaded] >= order[meta], "metadata naming a model not in place yet"


READER = textwrap.dedent(
    """
    import hashlib, json, sys
    from pathlib import Path
    import numpy as np
    import onnxruntime as ort

    path, x, stop = Path(sys.argv[1]), np.load(sys.argv[2]), Path(sys.argv[3])
    meta_path = path.with_name(path.name + ".json")
    providers = ["CPUExecutionProvider"]
    while not stop.exists():
        try:
            meta_text = meta_path.read_text()  # the metadata first, then the model
            data = path.read_bytes()
        except FileNotFoundError:
            continue  # nothing installed yet
        sample = {"model": hashlib.sha256(data).hexdigest()}
        try:
            sample["meta"] = json.loads(meta_text)["sha256"]
            session = ort.InferenceSession(data, providers=providers)
            out = session.run(None, {session.get_inputs()[0].name: x})[0]
            sample["output"] = hashlib.sha256(np.asarray(out, np.float32).tobytes()).hexdigest()
            ort.InferenceSession(str(path), providers=providers)  # by path, as services do
        except Exception as exc:
            sample["error"] = repr(exc)
        print(json.dumps(sample), flush=True)
    """
)


def test_a_write_that_fails_leaves_the_old_model_and_the_agent_running(
    tmp_path: Path, federation: str
) -> None:
    """A real write failure: a file size limit (RLIMIT_FSIZE) below the second model's size.

    The small models are the digits CNN's, the large one the MLP's; the installer runs
    in a child process, which the limit applies to.
    """
    small = make_models(2, "digits_cnn", first=1)
    large = make_models(1, "digits_mlp", first=2)[0]
    assert len(large.data) > 2 * max(len(m.data) for m in small)
    limit = (len(large.data) + max(len(m.data) for m in small)) // 2
    files = {}
    for name, model in (("first", small[0]), ("large", large), ("third", small[1])):
        files[name] = tmp_path / f"{name}.onnx"
        files[name].write_bytes(model.data)
    target = tmp_path / "installed" / "model.onnx"
    target.parent.mkdir()
    script = CHILD.format(
        repo=str(REPO),
        federation=federation,
        target=str(target),
        limit=limit,
        **{name: str(path) for name, path in files.items()},
        checkpoints=[small[0].checkpoint, large.checkpoint, small[1].checkpoint],
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    # After the failure: the first model, whole, with its metadata; the error says why.
    assert report["after_failure"] == {"model": small[0].sha256, "meta": small[0].sha256}
    assert "File too large" in report["error"]
    assert "install of checkpoint 2 failed" in result.stderr
    assert "the installed model is unchanged" in result.stderr
    assert report["leftovers"] == []  # no temporary left in the directory
    # ... and the agent's installer went on: the next model installed.
    assert hashlib.sha256(target.read_bytes()).hexdigest() == small[1].sha256
    assert read_metadata(target)["sha256"] == small[1].sha256
    assert run_model(target.read_bytes(), probe_input("digits_cnn")) == small[1].output


CHILD = """
import asyncio, hashlib, json, logging, resource, sys, time
from pathlib import Path
sys.path[:0] = [{repo!r} + "/tests"]
from agent.install_support import Model, announcement
from edge_agent.config import InstallConfig
from edge_agent.install import ModelInstaller, metadata_path

logging.basicConfig(level=logging.INFO)
target = Path({target!r})
checkpoints = {checkpoints!r}
models = [
    Model(checkpoint, Path(path).read_bytes(), b"")
    for checkpoint, path in zip(checkpoints, [{first!r}, {large!r}, {third!r}])
]
blobs = {{m.sha256: m.data for m in models}}

async def fetch(ref):
    return blobs[ref.sha256]

async def until(predicate):
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)

async def main():
    errors = []
    installer = ModelInstaller(
        InstallConfig(path=target), {federation!r}, "dev-1", fetch, on_error=errors.append,
        clock=time.time,
    )
    task = asyncio.create_task(installer.run())
    installer.offer(announcement({federation!r}, latest=models[0]))
    await until(lambda: installer.installs == 1)
    # Every file this process writes from now on is capped below the large model.
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    installer.offer(announcement({federation!r}, latest=models[1]))
    await until(lambda: installer.failures == 1)
    meta = json.loads(metadata_path(target).read_text())["sha256"]
    after = {{"model": hashlib.sha256(target.read_bytes()).hexdigest(), "meta": meta}}
    leftovers = sorted(p.name for p in target.parent.iterdir() if p.name.endswith(".tmp"))
    installer.offer(announcement({federation!r}, latest=models[2]))
    await until(lambda: installer.installs == 2)
    task.cancel()
    print(json.dumps({{"after_failure": after, "error": errors[0], "leftovers": leftovers}}))

asyncio.run(main())
"""


def test_the_versions_differ(models: list[Model]) -> None:
    # The reader test is only meaningful if every version computes something else.
    assert len({m.output for m in models}) == len(models)
    assert len({m.sha256 for m in models}) == len(models)
