"""Aggregator benchmark: fold speed, robust rules, ingest through Mosquitto, memory.

Run: ``.venv/bin/python bench/aggregate.py`` (``--quick`` for smaller sizes).

Every figure is a ratio to a baseline measured in the same run, so results compare
across noisy machines:

1. streaming FedAvg fold vs the numpy axpy bound ``a += w * b`` on the same number of
   float32 values (target >= 0.5x);
2. coordinate median, trimmed mean and (Multi-)Krum for 20 clients x 1M parameters,
   in seconds and relative to FedAvg on the same cohort;
3. ingest: 50 updates of 1M parameters through a private Mosquitto, MB/s accepted by
   the aggregator (received, verified, fsync'd, folded, acked) vs raw aiomqtt
   publish -> receive of the same bytes in the same chunks (target >= 0.5x);
4. aggregator peak RSS (a real ``fedmq serve`` process) for a round of 10 vs 500
   updates with FedAvg (target <= 1.2x: memory must not grow with the cohort).

The bundle is synthetic (one dense layer, ``--params`` weights): the aggregator never
runs its graphs, it only needs the manifest's tensor names and shapes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psutil
from onnx import TensorProto, helper, numpy_helper

from fedmq.broker.mosquitto import MosquittoBroker, MosquittoConfig
from fedmq.bundle.manifest import Manifest
from fedmq.bundle.parameters import write_parameters
from fedmq.strategies import CoordinateMedian, Krum, TrimmedMean, WeightedMean
from fedmq.strategies.layout import ModelLayout
from fedmq.testing.scripted_clients import ScriptedClients
from fedmq.timeouts import within
from fedmq.transport.broker_settings import BrokerSettings
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.tensors import encode_tensors

MiB = 2**20
CHUNK = 256 * 1024  # bytes: the default upload chunk
WINDOW = 8  # updates in flight in the RSS runs: the same concurrency for 10 and 500
CONNECT_TIMEOUT = 30.0  # seconds for the scripted agents' connection
ANSWER_TIMEOUT = 600.0  # seconds for the aggregator (or the raw receiver) to answer
# The scripted agents announce no heartbeat within a run; updates go in default chunks.
SCRIPTED: dict[str, Any] = {"chunk_size": CHUNK, "heartbeat_s": 600.0}


def best_of(repeats: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def synthetic_delta(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.laplace(0, 1e-3, size=shape).astype(np.float32) for name, shape in shapes.items()
    }


# --------------------------------------------------------------------------- 1. fold


def bench_fold(parameters: int, repeats: int) -> None:
    layers = 8
    sizes = [parameters // layers] * layers
    sizes[-1] += parameters - sum(sizes)
    layout = ModelLayout.from_shapes({f"layer{i}": (n,) for i, n in enumerate(sizes)})
    delta = synthetic_delta(dict(layout.shapes), 0)
    mean = WeightedMean()
    mean.begin(layout)
    fold = best_of(repeats, lambda: mean.add(delta, 3.0))
    a = np.zeros(parameters, np.float32)
    b = np.concatenate(list(delta.values()))

    def axpy() -> None:
        nonlocal a
        a += np.float32(3.0) * b

    bound = best_of(repeats, axpy)
    print(
        f"\n1. streaming FedAvg fold, {parameters / 1e6:g}M float32 parameters in {layers} tensors"
    )
    print(f"   numpy axpy  a += w*b : {parameters * 4 / bound / 2**30:6.2f} GiB/s  (1.00x)")
    print(
        f"   WeightedMean.add     : {parameters * 4 / fold / 2**30:6.2f} GiB/s  "
        f"({bound / fold:.2f}x, target >= 0.5x)"
    )


# --------------------------------------------------------------------------- 2. robust


def bench_robust(clients: int, parameters: int) -> None:
    layout = ModelLayout.from_shapes({"w": (parameters,)})
    cohort = [synthetic_delta({"w": (parameters,)}, seed) for seed in range(clients)]
    rules: list[tuple[str, Any]] = [
        ("fedavg (streaming mean)", WeightedMean()),
        ("coordinate median", CoordinateMedian()),
        ("trimmed mean beta=0.1", TrimmedMean(0.1)),
        ("krum f=2", Krum(2, 1)),
        ("multi-krum f=2 m=5", Krum(2, 5)),
    ]
    size = f"{clients} clients x {parameters / 1e6:g}M parameters"
    print(f"\n2. robust rules, {size} (time to add every update, then reduce)")
    reference = 0.0
    for label, rule in rules:

        def run(rule: Any = rule) -> None:
            rule.begin(layout)
            for update in cohort:
                rule.add(update, 1.0)
            rule.result()

        seconds = best_of(2, run)
        reference = reference or seconds
        print(f"   {label:<24} {seconds:7.3f} s   ({seconds / reference:5.1f}x fedavg)")


# --------------------------------------------------------------------------- bundle


def write_bundle(directory: Path, parameters: int) -> dict[str, tuple[int, ...]]:
    """A one-layer linear model of about ``parameters`` weights, as a bundle directory."""
    width = int(np.sqrt(parameters))
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    bias = np.zeros(width, np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "fc.weight", "fc.bias"], ["output"], transB=1)],
        "linear",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("fc.weight", TensorProto.FLOAT, [width, width]),
            helper.make_tensor_value_info("fc.bias", TensorProto.FLOAT, [width]),
        ],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        initializer=[
            numpy_helper.from_array(weight, "fc.weight"),
            numpy_helper.from_array(bias, "fc.bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model_bytes = model.SerializeToString()
    files = {
        "model.onnx": model_bytes,
        "train_step.onnx": model_bytes,  # never run by the aggregator
        "parameters.npz": write_parameters({"fc.weight": weight, "fc.bias": bias}),
    }
    spec = {"shape": ["batch", width], "dtype": "float32"}
    manifest = Manifest.model_validate(
        {
            "name": "bench-linear",
            "opset": 17,
            "ir_version": 8,
            "loss": "mse",
            "input": spec,
            "label": spec,
            "output": spec,
            "tensors": [
                {
                    "name": "fc.weight",
                    "shape": [width, width],
                    "dtype": "float32",
                    "kind": "parameter",
                    "trainable": True,
                },
                {
                    "name": "fc.bias",
                    "shape": [width],
                    "dtype": "float32",
                    "kind": "parameter",
                    "trainable": True,
                },
            ],
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        }
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_bytes(manifest.to_json())
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {"fc.weight": (width, width), "fc.bias": (width,)}


# --------------------------------------------------------------------------- 3. ingest


async def publish_all(session: MqttSession, messages: list[tuple[str, bytes]]) -> None:
    """Publish pre-encoded messages with QoS 1, 32 in flight (as ``publish_chunks`` does)."""
    window = asyncio.Semaphore(32)

    async def send(topic: str, payload: bytes) -> None:
        try:
            await session.publish(topic, payload, qos=1)
        finally:
            window.release()

    async with asyncio.TaskGroup() as group:
        for topic, payload in messages:
            await window.acquire()
            group.create_task(send(topic, payload))


# The raw baseline's receiver: plain aiomqtt in its own process, like the aggregator.
_RAW_RECEIVER = """
import asyncio, sys
import aiomqtt

async def main():
    host, port, topic, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    async with aiomqtt.Client(host, port, identifier=topic.replace("/", "-")) as client:
        await client.subscribe(topic + "/data/+", qos=1)
        print("ready", flush=True)
        received = 0
        async for _message in client.messages:
            received += 1
            if received == count:
                await client.publish(topic + "/done", b"", qos=1)
                return

asyncio.run(main())
"""


async def raw_throughput(broker: MosquittoBroker, messages: list[bytes]) -> tuple[float, float]:
    """Seconds to publish ``messages`` (QoS 1) until a separate aiomqtt process has them all,
    and the CPU seconds that receiver used."""
    topic = f"bench/{uuid.uuid4().hex}"
    done = asyncio.Event()

    async def handle(_message: Message) -> None:
        done.set()

    receiver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _RAW_RECEIVER,
            broker.host,
            str(broker.port),
            topic,
            str(len(messages)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    publisher = MqttSession(
        BrokerSettings(broker.url, f"pub-{uuid.uuid4().hex[:6]}", persistent_session=False),
        subscriptions=[(f"{topic}/done", 1)],
    )
    task = asyncio.create_task(publisher.run(handle))
    try:
        assert receiver.stdout is not None
        ready = await asyncio.to_thread(receiver.stdout.readline)
        assert ready.strip() == "ready", ready
        await publisher.wait_connected(30)
        watch = psutil.Process(receiver.pid)
        cpu = sum(watch.cpu_times()[:2])
        start = time.perf_counter()
        data = [(f"{topic}/data/{i % 1000}", m) for i, m in enumerate(messages)]
        await publish_all(publisher, data)
        await within(done.wait(), ANSWER_TIMEOUT)
        elapsed = time.perf_counter() - start
        return elapsed, sum(watch.cpu_times()[:2]) - cpu
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        receiver.wait(60)
        if receiver.stdout is not None:
            receiver.stdout.close()


def serve_config(
    work: Path, broker: MosquittoBroker, bundle: Path, federation: str, agents: int
) -> Path:
    """federation.toml for a ``fedmq serve`` process running one round of ``agents``."""
    config = work / f"{federation}.toml"
    config.write_text(
        "\n".join(
            [
                f'federation = "{federation}"',
                f'bundle = "{bundle}"',
                f'state_dir = "{work / ("state-" + federation)}"',
                "rounds = 1",
                "settle_s = 0.5",
                "exit_when_finished = false",
                f"max_pending_updates = {max(64, agents)}",
                'log_level = "WARNING"',
                f'[broker]\nurl = "{broker.url}"',
                f"[round]\nmin_agents = {agents}\ndeadline_s = 3600",
            ]
        ),
        encoding="utf-8",
    )
    return config


def serve(config: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    command = "from fedmq.cli.app import main; main()"
    return subprocess.Popen(
        [sys.executable, "-c", command, "serve", "--config", str(config)], env=env
    )


async def aggregator_throughput(
    broker: MosquittoBroker, work: Path, bundle: Path, body: bytes, updates: int
) -> tuple[float, float, int, int, int]:
    """Seconds from the first chunk to the last ack through a ``fedmq serve`` process, the
    CPU seconds it used meanwhile, the bytes and chunks sent, and the updates accepted."""
    federation = f"ingest{uuid.uuid4().hex[:6]}"
    clients = [f"dev-{i:03d}" for i in range(updates)]
    agents = ScriptedClients(broker.url, federation, clients, **SCRIPTED)
    envelopes = [
        agents.update_envelope(client, 1, body, examples=10 + i) for i, client in enumerate(clients)
    ]
    messages = [
        message
        for (uid, data), client in zip(envelopes, clients, strict=True)
        for message in agents.upload_messages(client, 1, uid, data)
    ]
    process = serve(serve_config(work, broker, bundle, federation, updates))
    try:
        await agents.start(CONNECT_TIMEOUT)
        await agents.wait_round(1, "open", ANSWER_TIMEOUT)
        watch = psutil.Process(process.pid)
        cpu = sum(watch.cpu_times()[:2])
        start = time.perf_counter()
        await publish_all(agents.session, messages)
        await agents.wait_until(lambda: len(agents.acks) >= updates, ANSWER_TIMEOUT)
        elapsed = time.perf_counter() - start
        cpu = sum(watch.cpu_times()[:2]) - cpu
    finally:
        process.terminate()
        process.wait(60)
        await agents.stop()
    total = sum(len(data) for _, data in envelopes)
    accepted = sum(ack.accepted for ack in agents.acks)
    return elapsed, cpu, total, len(messages), accepted


async def bench_ingest(
    broker: MosquittoBroker, work: Path, updates: int, parameters: int, repeats: int
) -> None:
    bundle = work / "bundle-ingest"
    shapes = write_bundle(bundle, parameters)
    # What an agent sends by default: the raw codec, zstd with byte shuffling.
    body = encode_tensors(synthetic_delta(shapes, 1)).data
    best = (float("inf"), 0.0, 0, 0, 0)
    raw = (float("inf"), 0.0)
    for _ in range(repeats):
        best = min(best, await aggregator_throughput(broker, work, bundle, body, updates))
        probe = ScriptedClients(broker.url, "probe", [], **SCRIPTED)
        size = len(probe.update_envelope("dev-000", 1, body, examples=10)[1])
        chunks = [bytes(min(CHUNK, size - i)) for i in range(0, size, CHUNK)] * updates
        raw = min(raw, await raw_throughput(broker, chunks))
    elapsed, cpu, total, count, accepted = best
    raw_elapsed, raw_cpu = raw
    print(
        f"\n3. ingest through Mosquitto: {updates} updates x {parameters / 1e6:g}M parameters "
        f"({total / MiB:.0f} MiB in {count} chunks of {CHUNK // 1024} KiB; best of {repeats})"
    )
    print(
        f"   raw aiomqtt publish -> receive : {total / raw_elapsed / MiB:7.1f} MiB/s  (1.00x)"
        f"   receiver CPU {raw_cpu:.2f} s"
    )
    print(
        f"   aggregator accepted and acked  : {total / elapsed / MiB:7.1f} MiB/s  "
        f"({raw_elapsed / elapsed:.2f}x, target >= 0.5x)   aggregator CPU {cpu:.2f} s "
        f"({1000 * cpu / updates:.1f} ms per update; {accepted}/{updates} accepted)"
    )


# --------------------------------------------------------------------------- 4. RSS


def process_memory(pid: int) -> tuple[int, int]:
    """``(peak, current)`` resident set size of a process, bytes (Linux /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    if len(fields) != 2:
        raise RuntimeError("no VmHWM/VmRSS in /proc: Linux only")
    return fields["VmHWM"], fields["VmRSS"]


async def rss_for(
    broker: MosquittoBroker,
    work: Path,
    bundle: Path,
    shapes: dict[str, tuple[int, ...]],
    updates: int,
) -> tuple[int, int]:
    """Peak RSS of a ``fedmq serve`` process over a round of ``updates``, and its RSS after."""
    federation = f"rss{updates}x{uuid.uuid4().hex[:4]}"
    process = serve(serve_config(work, broker, bundle, federation, updates))
    clients = [f"dev-{i:03d}" for i in range(updates)]
    agents = ScriptedClients(broker.url, federation, clients, **SCRIPTED)
    body = encode_tensors(synthetic_delta(shapes, 2)).data
    try:
        await agents.start(CONNECT_TIMEOUT)
        await agents.wait_round(1, "open", ANSWER_TIMEOUT)
        window = asyncio.Semaphore(WINDOW)

        async def one(i: int, client: str) -> None:
            async with window:
                uid, data = agents.update_envelope(client, 1, body, examples=10 + i)
                await agents.upload(client, 1, uid, data)
                await agents.wait_ack(uid, 1, ANSWER_TIMEOUT)

        async with asyncio.TaskGroup() as group:
            for i, client in enumerate(clients):
                group.create_task(one(i, client))
        await agents.wait_until(
            lambda: any(r.status == "finished" for r in agents.rounds), ANSWER_TIMEOUT
        )
        await asyncio.sleep(1.0)  # the last round's buffers are released
        return process_memory(process.pid)
    finally:
        process.terminate()
        process.wait(60)
        await agents.stop()


async def bench_rss(
    broker: MosquittoBroker, work: Path, small: int, large: int, parameters: int
) -> None:
    bundle = work / "bundle-rss"
    shapes = write_bundle(bundle, parameters)
    few, few_after = await rss_for(broker, work, bundle, shapes, small)
    many, many_after = await rss_for(broker, work, bundle, shapes, large)
    model = sum(int(np.prod(s)) for s in shapes.values()) * 4
    print(
        f"\n4. aggregator RSS, FedAvg, {parameters / 1e6:g}M parameters "
        f"({model / MiB:.1f} MiB model; {large} updates = {large * model / MiB:.0f} MiB of deltas; "
        f"{WINDOW} updates in flight)"
    )
    print("   updates/round       peak RSS           RSS after the round")
    after = f"{few_after / MiB:7.1f} MiB (1.00x)"
    print(f"   {small:>3}           {few / MiB:7.1f} MiB (1.00x)    {after}")
    print(
        f"   {large:>3}           {many / MiB:7.1f} MiB ({many / few:.2f}x)    "
        f"{many_after / MiB:7.1f} MiB ({many_after / few_after:.2f}x)   target <= 1.2x"
    )


# --------------------------------------------------------------------------- main


async def run_broker_benches(args: argparse.Namespace) -> None:
    # Size the broker queue for the burst (see broker_config/README.md).
    config = MosquittoConfig(max_queued_messages=1_000_000, max_queued_bytes=8 * 2**30)
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        with MosquittoBroker(config, work / "broker") as broker:
            await bench_ingest(broker, work, args.ingest_updates, args.params, args.repeats)
            await bench_rss(broker, work, 10, args.rss_updates, args.rss_params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--ingest-updates", type=int, default=50)
    parser.add_argument("--rss-updates", type=int, default=500)
    parser.add_argument("--rss-params", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3, help="ingest runs (best is kept)")
    args = parser.parse_args()
    if args.quick:
        args.params, args.rss_params, args.rss_updates, args.ingest_updates = (
            250_000,
            250_000,
            100,
            20,
        )
    print(json.dumps({"cpus": os.cpu_count(), "numpy": np.__version__, "onnx": onnx.__version__}))
    bench_fold(10_000_000 if not args.quick else 1_000_000, repeats=10)
    bench_fold(1_000_000, repeats=20)
    bench_robust(20, args.params)
    asyncio.run(run_broker_benches(args))


if __name__ == "__main__":
    main()
