"""Footprint of the edge agent on a device: install size, import time, peak RSS of a round.

Measures, in one run:

1. the size of a fresh venv holding ``pip install .[agent]`` (created ``--without-pip``
   and filled by this interpreter's pip, as a device image would be; pip's own size is
   printed separately), with the largest packages;
2. the agent's import time in that venv (median of several cold-ish starts, minus the
   interpreter's own start-up);
3. the peak RSS (VmHWM) of the real ``fedmq-agent run`` process from that venv while it
   trains one round of the digits MLP and of the digits CNN (full 1797-example digits
   set, 5 epochs), driven over a private Mosquitto by a scripted aggregator.

Targets (issue 5): venv <= 150 MB, RSS <= 100 MB.

    .venv/bin/python bench/agent_footprint.py [--venv DIR] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.bundle.bundle import Bundle
from fedmq.timeouts import within
from fedmq.transport.blobs import publish_blob
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.archive import pack_files
from fedmq.wire.blobs import blob_ref
from fedmq.wire.chunks import decode_chunk
from fedmq.wire.control import RoundAnnouncement, encode_control
from fedmq.wire.tensors import encode_tensors
from fedmq.wire.topics import Topics, UpdateChunkTopic
from fedmq.wire.training import TrainingConfig

REPO = Path(__file__).resolve().parents[1]
VENV_TARGET_MB = 150
RSS_TARGET_MB = 100
IMPORT_RUNS = 5
ROUND_TIMEOUT = 300  # seconds: generous for a busy 2-core CI machine
MiB = 1024 * 1024
THIRD_PARTY_FLOOR = ("onnxruntime", "numpy", "numpy.libs", "zstandard")


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (apparent sizes of regular files)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def make_venv(venv: Path) -> None:
    print(f"creating {venv} and installing .[agent] (takes a minute)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{REPO}[agent]",
        ],
        check=True,
    )


def report_size(venv: Path) -> float:
    site = next((venv / "lib").glob("python3*/site-packages"))
    sizes = sorted(((du(p), p.name) for p in site.iterdir()), reverse=True)
    total = du(venv)
    print(f"\nvenv size: {total / MiB:.1f} MB (target <= {VENV_TARGET_MB} MB)")
    for size, name in sizes[:8]:
        print(f"  {size / MiB:7.1f} MB  {name}")
    floor = sum(size for size, name in sizes if name in THIRD_PARTY_FLOOR)
    ours = sum(size for size, name in sizes if name.startswith(("fedmq", "edge_agent")))
    print(
        f"  onnxruntime + numpy + zstandard alone: {floor / MiB:.1f} MB; "
        f"fedmq + edge_agent code: {ours / MiB:.1f} MB"
    )
    print("  (created --without-pip; a venv with pip inside adds ~10 MB for pip itself)")
    return total / MiB


def import_time(python: Path) -> float:
    def timed(code: str) -> float:
        runs = []
        for _ in range(IMPORT_RUNS):
            start = time.perf_counter()
            subprocess.run([str(python), "-c", code], check=True)
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    baseline = timed("pass")
    agent = timed("import edge_agent.daemon, edge_agent.cli")
    print(
        f"\nagent import time: {agent - baseline:.2f} s "
        f"(process start {agent:.2f} s, bare interpreter {baseline:.2f} s)"
    )
    return agent - baseline


def write_digits(directory: Path) -> None:
    from sklearn.datasets import load_digits  # bench side only, never on the device

    bunch = load_digits()
    directory.mkdir(parents=True, exist_ok=True)
    np.savez(
        directory / "train.npz",
        x=(bunch.data / 16.0).astype(np.float32),
        y=bunch.target.astype(np.int64),
    )


@contextlib.asynccontextmanager
async def session_running(session: MqttSession, handler) -> AsyncIterator[None]:  # type: ignore[no-untyped-def]
    task = asyncio.create_task(session.run(handler))
    try:
        await session.wait_connected(10)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def memory_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS) and the current anonymous/file-backed split, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


async def round_rss(
    agent_bin: Path, broker: MosquittoBroker, bundle_name: str, work: Path
) -> tuple[dict[str, float], float]:
    federation = f"bench-{bundle_name.replace('_', '-')}"
    topics = Topics(federation)
    data_dir = work / "data"
    if not data_dir.exists():
        write_digits(data_dir)
    config = work / f"{bundle_name}.toml"
    config.write_text(
        f'client_id = "bench-device"\nfederation = "{federation}"\n'
        f'state_dir = "{work / ("state-" + bundle_name)}"\nheartbeat_s = 2\n'
        f'[broker]\nurl = "{broker.url}"\n[data]\npath = "{data_dir}"\n',
        encoding="utf-8",
    )
    done = asyncio.Event()

    async def handle(message: Message) -> None:
        parsed = topics.parse(message.topic)
        if isinstance(parsed, UpdateChunkTopic):
            chunk = decode_chunk(message.payload)
            if chunk.header.index == chunk.header.blob.count - 1:
                done.set()

    session = MqttSession(
        BrokerSettings(broker.url, f"{federation}-aggregator"),
        subscriptions=[(topics.update_filter(), 1)],
    )
    async with session_running(session, handle):
        bundle = Bundle.load(REPO / "examples" / "bundles" / bundle_name)
        refs = []
        for data in (pack_files(bundle.files()), encode_tensors(bundle.initial_parameters()).data):
            ref = blob_ref(data)
            await publish_blob(session, topics, data, ref, sender="aggregator", round_id=0)
            refs.append(ref)
        process = subprocess.Popen(
            [str(agent_bin), "run", "--config", str(config), "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL,
        )
        try:
            now = time.time()
            announcement = RoundAnnouncement(
                federation=federation,
                aggregator="aggregator",
                round=1,
                issued_at=now,
                deadline=now + ROUND_TIMEOUT,
                bundle=refs[0],
                params=refs[1],
                training=TrainingConfig(epochs=5, batch_size=32, lr=0.05),
            )
            started = time.perf_counter()
            await session.publish(topics.round(), encode_control(announcement), retain=True)
            await within(done.wait(), ROUND_TIMEOUT)
            seconds = time.perf_counter() - started
            rss = memory_mb(process.pid)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
        await session.publish(topics.round(), b"", retain=True)
    return rss, seconds


async def measure_rounds(agent_bin: Path, work: Path) -> dict[str, float]:
    results = {}
    with MosquittoBroker() as broker:
        for name in ("digits_mlp", "digits_cnn"):
            rss, seconds = await round_rss(agent_bin, broker, name, work)
            print(
                f"peak RSS over a {name} round: {rss['VmHWM']:.1f} MB (round took "
                f"{seconds:.1f} s; after it: {rss['RssAnon']:.1f} MB private, "
                f"{rss['RssFile']:.1f} MB file-backed shared-library pages)"
            )
            results[name] = rss["VmHWM"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, help="reuse (or create) the agent venv here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary venv")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedmq-footprint-"))
    venv = args.venv or work / "venv"
    try:
        if not (venv / "bin" / "fedmq-agent").exists():
            make_venv(venv)
        size = report_size(venv)
        import_time(venv / "bin" / "python")
        print()
        rss = asyncio.run(measure_rounds(venv / "bin" / "fedmq-agent", work))
    finally:
        if not args.keep and args.venv is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "data", ignore_errors=True)
    worst = max(rss.values())
    print(
        f"\nsummary: venv {size:.0f} MB ({'PASS' if size <= VENV_TARGET_MB else 'OVER'} "
        f"<= {VENV_TARGET_MB}), peak RSS {worst:.0f} MB "
        f"({'PASS' if worst <= RSS_TARGET_MB else 'OVER'} <= {RSS_TARGET_MB})"
    )


if __name__ == "__main__":
    main()
