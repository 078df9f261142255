"""What signing costs: per round on the device and on the aggregator, and on the device install.

    python bench/security.py [--agents 100]

In one run, side by side (ratios, since machines here are noisy):

1. **Device, per round**: verify the signed announcement and the signed ack, sign the
   update statement; against one round of local training of the shipped digits MLP
   (one epoch over 1437 digits, onnxruntime, one thread: what the shipped demo trains).
2. **Aggregator, per round of ``--agents`` updates**: sign the announcement, one ack per
   update and a status per update, verify every update's signature; against folding the
   same updates into FedAvg (what the round costs without signing).
3. **Device install**: the size of PyNaCl and what it pulls in (cffi, pycparser)
   against the whole device install (the core dependencies' files in this venv), and
   the resident memory ``import nacl.signing`` adds to a Python process, against the
   agent's own import (``import edge_agent.daemon``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "examples" / "bundles" / "digits_mlp"  # the CNN sits beside it
REPEATS = 7
CRYPTO_DISTS = ("pynacl", "cffi", "pycparser")
CORE = ("aiomqtt", "msgpack", "numpy", "onnxruntime", "pydantic", "pydantic-settings", "zstandard")


def median_time(work: Callable[[], object], repeats: int = REPEATS) -> float:
    work()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def device_round() -> None:
    from sklearn.datasets import load_digits

    from fedmq.bundle import Bundle
    from fedmq.runtime import Trainer
    from fedmq.wire.blobs import blob_ref
    from fedmq.wire.control import Ack, RoundAnnouncement, decode_control, encode_control
    from fedmq.wire.signing import SigningKey, TrustedKeys, update_statement
    from fedmq.wire.training import TrainingConfig

    digits = load_digits()
    x = (digits.data[:1437] / 16).astype(np.float32)
    y = digits.target[:1437].astype(np.int64)
    config = TrainingConfig(epochs=1, batch_size=32, lr=0.05)
    trains = {}
    for name, shape in (("digits_mlp", (-1, 64)), ("digits_cnn", (-1, 1, 8, 8))):
        bundle = Bundle.load(BUNDLE.parent / name)
        trainer = Trainer(bundle, threads=1)
        params = bundle.initial_parameters()
        inputs = x.reshape(shape)
        trains[name] = median_time(
            lambda t=trainer, p=params, i=inputs: t.train(p, i, y, config), 3
        )

    aggregator, device = SigningKey.generate(), SigningKey.generate()
    trusted = TrustedKeys([aggregator.public])
    ref = blob_ref(b"x" * 100_000, 4096)
    now = time.time()
    announcement = encode_control(
        RoundAnnouncement(
            federation="plant",
            aggregator="agg",
            round=1,
            issued_at=now,
            deadline=now + 60,
            bundle=ref,
            params=ref,
            selected=[f"press-{i:04d}" for i in range(100)],
        ),
        aggregator,
    )
    ack = encode_control(
        Ack(
            federation="plant",
            client="press-0001",
            round=1,
            update_id="u1",
            accepted=True,
            reason="accepted",
            ts=now,
        ),
        aggregator,
    )
    statement = update_statement("plant", "press-0001", 1, "u1", bytes(32), 100_000)

    def crypto() -> None:
        decode_control(announcement, RoundAnnouncement, trusted=trusted)
        decode_control(ack, Ack, trusted=trusted)
        device.sign(statement)

    def plain() -> None:
        decode_control(announcement, RoundAnnouncement)
        decode_control(ack, Ack)

    signed = median_time(crypto)
    unsigned = median_time(plain)
    print("device, per round")
    print(f"  decode announcement + ack, unsigned   {unsigned * 1e3:9.3f} ms")
    print(f"  same, verified, plus signing update   {signed * 1e3:9.3f} ms")
    for name, train in trains.items():
        print(f"  {name} training, 1 epoch        {train * 1e3:9.1f} ms")
        print(f"    signing overhead / training         {(signed - unsigned) / train:9.2e}")


def aggregator_round(agents: int) -> None:
    from fedmq.strategies.config import StrategyConfig, build_strategy
    from fedmq.strategies.layout import ModelLayout
    from fedmq.wire.control import Ack, AggregatorStatus, encode_control
    from fedmq.wire.signing import SigningKey, update_statement

    key = SigningKey.generate()
    devices = [SigningKey.generate() for _ in range(agents)]
    statements = [
        update_statement("plant", f"press-{i:04d}", 1, f"u{i}", bytes(32), 100_000)
        for i in range(agents)
    ]
    signatures = [d.sign(s) for d, s in zip(devices, statements, strict=True)]
    now = time.time()
    acks = [
        Ack(
            federation="plant",
            client=f"press-{i:04d}",
            round=1,
            update_id=f"u{i}",
            accepted=True,
            reason="accepted",
            ts=now,
        )
        for i in range(agents)
    ]
    status = AggregatorStatus(aggregator="agg", state="collecting", round=1, ts=now)

    def crypto() -> None:
        for device, statement, signature in zip(devices, statements, signatures, strict=True):
            device.public.verify(statement, signature)
        for ack in acks:
            encode_control(ack, key)
            encode_control(status, key)

    def plain() -> None:
        for ack in acks:
            encode_control(ack)
            encode_control(status)

    from fedmq.bundle import Bundle

    manifest = Bundle.load(BUNDLE).manifest
    shapes = {name: manifest.tensor(name).shape for name in manifest.update_names}
    rng = np.random.default_rng(0)
    deltas = [
        {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        for _ in range(agents)
    ]
    strategy = build_strategy(StrategyConfig())
    layout = ModelLayout.from_shapes(shapes)

    def fold() -> None:
        strategy.begin_round(1, layout)
        for delta in deltas:
            strategy.fold(delta, 100.0)

    signed = median_time(crypto)
    unsigned = median_time(plain)
    folded = median_time(fold)
    print(f"aggregator, per round of {agents} updates")
    print(f"  fold {agents} updates into FedAvg          {folded * 1e3:9.1f} ms")
    print(f"  encode {agents} acks + statuses, unsigned  {unsigned * 1e3:9.1f} ms")
    print(f"  same, signed, plus {agents} verifications  {signed * 1e3:9.1f} ms")
    print(f"  signing overhead / fold                 {(signed - unsigned) / folded:9.2f}")
    print(f"  signing overhead per update             {(signed - unsigned) / agents * 1e3:9.3f} ms")


def dist_bytes(name: str) -> int:
    dist = metadata.distribution(name)
    total = 0
    for file in dist.files or []:
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            total += path.stat().st_size
    return total


def requirements_closure(names: tuple[str, ...]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for requirement in dist.requires or []:
            if "extra ==" in requirement:
                continue
            head = requirement.split(";")[0]
            for sep in "<>=!~[ (":
                head = head.split(sep)[0]
            todo.append(head.strip())
    return seen


def rss_kib(code: str) -> int:
    # VmHWM, not ru_maxrss: the latter survives exec and would report the forking parent's.
    script = (
        f"{code}\nimport re; "
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[-1])


def footprint() -> None:
    crypto = sum(dist_bytes(n) for n in CRYPTO_DISTS)
    closure = requirements_closure(CORE) - set(CRYPTO_DISTS)
    core = sum(dist_bytes(n) for n in closure)
    base = statistics.median(rss_kib("pass") for _ in range(3))
    nacl = statistics.median(rss_kib("import nacl.signing") for _ in range(3))
    agent = statistics.median(rss_kib("import edge_agent.daemon") for _ in range(3))
    print("device install")
    print(f"  core dependencies without crypto      {core / 2**20:9.1f} MiB ({len(closure)} dists)")
    print(f"  pynacl + cffi + pycparser             {crypto / 2**20:9.1f} MiB")
    print(f"  crypto / rest of the install          {crypto / core:9.3f}")
    print(f"  RSS: import nacl.signing adds         {(nacl - base) / 1024:9.1f} MiB")
    print(
        f"  RSS: import edge_agent.daemon adds    {(agent - base) / 1024:9.1f} MiB (nacl included)"
    )
    print(f"  nacl share of the agent's import RSS  {(nacl - base) / (agent - base):9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=100, help="updates per aggregator round")
    args = parser.parse_args()
    device_round()
    aggregator_round(args.agents)
    footprint()


if __name__ == "__main__":
    main()
