"""Regenerate (or check) the example bundles shipped in ``examples/bundles/``.

    python examples/build_bundles.py            # rebuild all bundles in place
    python examples/build_bundles.py --check    # rebuild in memory, compare, exit 1 on drift

Compilation is deterministic (seeded weights, fixed zip timestamps, stripped ONNX
metadata), so with the pinned torch/onnxscript the rebuilt files are byte-identical.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models

from fedmq.bundle import Bundle, LossName
from fedmq.compile import compile_module

BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"


@dataclass(frozen=True)
class Example:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    loss: LossName


EXAMPLES = (
    Example("digits_mlp", models.digits_mlp, (models.DIGITS_FEATURES,), "cross_entropy"),
    Example("digits_cnn", models.digits_cnn, (1, 8, 8), "cross_entropy"),
    Example(
        "sensor_autoencoder",
        models.sensor_autoencoder,
        (models.SENSOR_CHANNELS, models.SENSOR_WINDOW),
        "mse",
    ),
)


def build(example: Example) -> Bundle:
    """Compile one example model."""
    return compile_module(
        example.factory(), input_shape=example.input_shape, loss=example.loss, name=example.name
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--out", type=Path, default=BUNDLES_DIR)
    args = parser.parse_args(argv)
    drift = []
    for example in EXAMPLES:
        bundle = build(example)
        target = args.out / example.name
        if args.check:
            shipped = Bundle.load(target)
            if shipped.files() != bundle.files():
                drift.append(example.name)
            print(f"{example.name}: {'differs' if example.name in drift else 'identical'}")
        else:
            bundle.write(target)
            sizes = {name: len(data) for name, data in bundle.files().items()}
            print(f"{example.name}: {sum(sizes.values()) / 1024:.1f} KiB {sizes}")
    return 1 if drift else 0


if __name__ == "__main__":
    raise SystemExit(main())
