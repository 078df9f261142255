"""Wire codec benchmark: encode+decode throughput and size per codec, against numpy copy.

Run: ``.venv/bin/python bench/wire.py`` (add ``--quick`` for 1M parameters only).

Throughput is reported as a ratio to ``np.copyto`` of the same float32 buffer measured in
the same run, so figures compare across noisy machines; sizes as a ratio to raw float32.
The update is a synthetic model delta: Laplace-distributed values (heavy tails, like SGD
deltas) with a different scale per "layer".
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import NO_COMPRESSION, Compression, decode_tensors, encode_tensors

CODECS = ["raw", "fp16", "int8", "topk:0.01"]
LAYERS = 8


def synthetic_delta(parameters: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = np.full(LAYERS, parameters // LAYERS)
    sizes[-1] += parameters - sizes.sum()
    return {
        f"layer{i}.weight": rng.laplace(0, 10.0 ** -rng.uniform(2, 4), size=int(n)).astype(
            np.float32
        )
        for i, n in enumerate(sizes)
    }


def best_of(repeats: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1M parameters only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sizes = [1_000_000] if args.quick else [1_000_000, 10_000_000]
    compressions = {
        "zstd+shuffle": Compression(),
        "zstd": Compression(shuffle=False),
        "none": NO_COMPRESSION,
    }
    for parameters in sizes:
        delta = synthetic_delta(parameters)
        flat = np.concatenate(list(delta.values()))
        target = np.empty_like(flat)
        copy_time = best_of(args.repeats, lambda: np.copyto(target, flat))  # noqa: B023
        raw_bytes = flat.nbytes
        print(f"\n{parameters / 1e6:g}M float32 parameters ({raw_bytes / 2**20:.1f} MiB)")
        print(f"numpy copy: {raw_bytes / copy_time / 2**30:.2f} GiB/s (the 1.00x reference)")
        header = (
            f"{'codec':<10} {'compression':<13} {'bytes/raw':>9} "
            f"{'encode/copy':>12} {'decode/copy':>12} {'enc+dec/copy':>13}"
        )
        print(header)
        print("-" * len(header))
        for codec_text in CODECS:
            codec = CodecSpec.parse(codec_text)
            for label, compression in compressions.items():
                encoded = encode_tensors(delta, codec, compression=compression)
                encode_time = best_of(
                    args.repeats,
                    lambda: encode_tensors(delta, codec, compression=compression),  # noqa: B023
                )
                decode_time = best_of(
                    args.repeats,
                    lambda: decode_tensors(encoded.data),  # noqa: B023
                )
                # Ratios are slowdowns relative to a plain memory copy: lower is better.
                print(
                    f"{codec_text:<10} {label:<13} {len(encoded.data) / raw_bytes:>9.3f} "
                    f"{encode_time / copy_time:>11.1f}x {decode_time / copy_time:>11.1f}x "
                    f"{(encode_time + decode_time) / copy_time:>12.1f}x"
                )
    print(
        "\nenc/dec ratios: time relative to np.copyto of the same buffer (lower is better);"
        "\nbytes/raw: encoded message size over raw float32 bytes."
    )


if __name__ == "__main__":
    main()
