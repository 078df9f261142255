"""Train-step speed and memory: onnxruntime + numpy (the device) vs PyTorch eager.

    python bench/train_step.py [--steps 200]

For each model (batch 32, one thread each) it times a full local-training step on the
device path (``Trainer.train``: batch gather, train_step.onnx, numpy SGD) and the same
step in PyTorch eager (forward, backward, ``torch.optim.SGD``), and prints the ratio
(< 1: the device path is faster).  Then it measures the peak RSS of two fresh processes
that train the CNN for 100 steps, one with onnxruntime and one with torch.

Needs the compile extra (torch) to build the bundles and the reference; the
onnxruntime child process never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BATCH = 32
REPEATS = 5  # timing runs per model; the median is reported
RSS_STEPS = 100


def mlp() -> object:
    from torch import nn

    return nn.Sequential(
        nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def cnn() -> object:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def conv1d() -> object:
    from torch import nn

    return nn.Sequential(
        nn.Conv1d(3, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


def gru() -> object:
    import torch
    from torch import nn

    class GRUClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(8, 32, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    return GRUClassifier()


MODELS: dict[str, tuple[Callable[[], object], tuple[int, ...], int]] = {
    "MLP 784-256-128-10": (mlp, (784,), 10),
    "CNN 28x28": (cnn, (1, 28, 28), 10),
    "Conv1d 3x128": (conv1d, (3, 128), 4),
    "GRU 20x8 h32": (gru, (20, 8), 4),
}


def data(shape: tuple[int, ...], classes: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps * BATCH, *shape), dtype=np.float32)
    return x, rng.integers(0, classes, steps * BATCH)


def time_onnxruntime(bundle_dir: Path, shape: tuple[int, ...], classes: int, steps: int) -> float:
    from fedmq.bundle import Bundle
    from fedmq.runtime import Trainer
    from fedmq.wire.training import TrainingConfig

    bundle = Bundle.load(bundle_dir)
    trainer = Trainer(bundle, threads=1)
    params = bundle.initial_parameters()
    x, y = data(shape, classes, steps)
    config = TrainingConfig(batch_size=BATCH, lr=0.01, optimizer="sgd")
    trainer.train(params, x[: 5 * BATCH], y[: 5 * BATCH], config)  # warm-up
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        trainer.train(params, x, y, config)
        runs.append((time.perf_counter() - start) / steps)
    return statistics.median(runs)


def time_torch(
    factory: Callable[[], object], shape: tuple[int, ...], classes: int, steps: int
) -> float:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = factory()
    assert isinstance(model, torch.nn.Module)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x_np, y_np = data(shape, classes, steps)
    x, y = torch.tensor(x_np), torch.tensor(y_np)

    def run(count: int) -> None:
        order = torch.randperm(len(x))
        for step in range(count):
            index = order[step * BATCH : (step + 1) * BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    run(5)  # warm-up
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run(steps)
        runs.append((time.perf_counter() - start) / steps)
    return statistics.median(runs)


def rss_child(kind: str, bundle_dir: str) -> None:
    """Train the CNN for RSS_STEPS steps in this fresh process; print RSS figures in MiB."""
    shape, classes = MODELS["CNN 28x28"][1:]
    if kind == "onnxruntime":
        from fedmq.bundle import Bundle
        from fedmq.runtime import Trainer
        from fedmq.wire.training import TrainingConfig

        imported = peak_rss_mib()
        bundle = Bundle.load(bundle_dir)
        x, y = data(shape, classes, RSS_STEPS)
        Trainer(bundle).train(bundle.initial_parameters(), x, y, TrainingConfig(batch_size=BATCH))
        assert "torch" not in sys.modules
    else:
        import torch  # noqa: F401 - counted in the import figure

        imported = peak_rss_mib()
        time_torch(cnn, shape, classes, RSS_STEPS // REPEATS)
    print(json.dumps({"imports": imported, "peak": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident set size.

    ``VmHWM`` rather than ``getrusage``: Linux carries ``ru_maxrss`` across ``execve``, so
    a child forked from this (large, torch-importing) parent would report the parent's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # non-Linux fallback


def measure_rss(kind: str, bundle_dir: Path) -> dict[str, float]:
    completed = subprocess.run(
        [sys.executable, __file__, "--rss-child", kind, str(bundle_dir)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    result: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timing run")
    parser.add_argument("--rss-child", nargs=2, metavar=("KIND", "BUNDLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return

    import torch

    from fedmq.compile import compile_module

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bundles: dict[str, Path] = {}
        for name, (factory, shape, _) in MODELS.items():
            torch.manual_seed(0)
            model = factory()
            assert isinstance(model, torch.nn.Module)
            bundle = compile_module(model, input_shape=shape, loss="cross_entropy", name="bench")
            bundles[name] = bundle.write(Path(tmp) / name.split()[0])
        for name, (factory, shape, classes) in MODELS.items():
            ort_step = time_onnxruntime(bundles[name], shape, classes, args.steps)
            torch_step = time_torch(factory, shape, classes, args.steps)
            rows.append((name, ort_step * 1e3, torch_step * 1e3, ort_step / torch_step))
        rss_ort = measure_rss("onnxruntime", bundles["CNN 28x28"])
        rss_torch = measure_rss("torch", bundles["CNN 28x28"])

    print(f"train step, batch {BATCH}, 1 thread, median of {REPEATS} x {args.steps} steps")
    print(f"{'model':<20} {'onnxruntime ms':>15} {'torch ms':>10} {'ratio':>7}")
    for name, ort_ms, torch_ms, ratio in rows:
        print(f"{name:<20} {ort_ms:>15.3f} {torch_ms:>10.3f} {ratio:>7.2f}")
    data_mib = RSS_STEPS * BATCH * 28 * 28 * 4 / 2**20
    print(f"RSS of a fresh process training the CNN {RSS_STEPS} steps ({data_mib:.0f} MiB data):")
    print(f"{'':<22}{'after imports':>14} {'peak':>8}")
    for label, rss in (("onnxruntime + numpy", rss_ort), ("torch", rss_torch)):
        print(f"{label:<22}{rss['imports']:>10.1f} MiB {rss['peak']:>4.0f} MiB")


if __name__ == "__main__":
    main()
