"""Decoding never allocates more than ``max_decoded_bytes``, measured with tracemalloc.

numpy reports its array allocations to tracemalloc, and zstandard's ``bytes`` results are
Python objects, so the traced peak is what decoding really holds on the Python side.  The
crafted sets are a few KB of zstd (zeros compress ~30000:1) that declare tensors just
under the limit: the decoder before the streamed one kept the whole decompressed body
alive next to the decoded arrays (or a float32 dequantisation buffer next to a float64
result) and peaked at 1.4-1.9x the limit; topk's index expansion reached 11x.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zstandard

from fedmq.errors import LimitExceededError
from fedmq.wire.framing import encode_frame
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits, KiB, MiB
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import Compression, decode_tensors, encode_tensors

LIMIT = 16 * MiB
# Python objects around the arrays: the msgpack header, dicts, views, ufunc buffers.
SLACK = 128 * KiB
HEADROOM = 2 * MiB  # the encoder's zstd window ring (512 KiB at level 1) and scratch


def _peak(action: Callable[[], Any]) -> tuple[Any, int]:
    """``(result, peak bytes allocated while running action)``; the result stays alive."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - before


def _zstd_set(entry: dict[str, Any], body: bytes | None = None) -> bytes:
    """A one-tensor set whose body (zeros unless given) is zstd-compressed."""
    length = entry["len"]
    raw = body if body is not None else bytes(length + (-length % 8))
    compressed = zstandard.ZstdCompressor(level=1, write_content_size=True).compress(raw)
    header = {"tensors": [entry], "compression": "zstd", "raw_len": len(raw)}
    return encode_frame("tensors", header, compressed)


def _entry(name: str, dtype: str, count: int, codec: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": [count], "codec": codec, **fields}


def _limits(limit: int = LIMIT) -> DecodeLimits:
    # The body limit is separate from the decoded one: let the decoded limit bind.
    return DecodeLimits(
        max_decoded_bytes=limit, max_blob_bytes=8 * limit, max_elements_per_tensor=limit
    )


def _crafted(kind: str, budget: int) -> bytes:
    """A few-KB set of ``kind`` whose decoded arrays take about ``budget`` bytes."""
    if kind == "raw-shuffled-float32":  # the default update encoding: planes, then values
        n = budget // 4
        return _zstd_set(_entry("w", "float32", n, "raw", shuffle=True, len=4 * n))
    if kind == "raw-float64":
        n = budget // 8
        return _zstd_set(_entry("w", "float64", n, "raw", shuffle=False, len=8 * n))
    if kind == "fp16-shuffled-float64":  # dequantised to 4x the body
        n = budget // 8
        return _zstd_set(_entry("w", "float64", n, "fp16", shuffle=True, len=2 * n))
    if kind == "fp16-float32":
        n = budget // 4
        return _zstd_set(_entry("w", "float32", n, "fp16", shuffle=False, len=2 * n))
    if kind == "int8-float64":  # dequantised to 8x the body
        n = budget // 8
        blocks = -(-n // 256)
        return _zstd_set(_entry("w", "float64", n, "int8", block=256, len=n + 4 * blocks))
    if kind == "topk-float32":  # a dense result from k (index, value) pairs
        n = budget // 4
        k = n // 64
        body = np.zeros(k * 8 + (-(k * 8) % 8), np.uint8)
        body[: 4 * k].view("<u4")[1:] = 64  # indices 0, 64, 128, ...
        return _zstd_set(_entry("w", "float32", n, "topk", k=k, len=8 * k), body.tobytes())
    raise AssertionError(kind)


KINDS = [
    "raw-shuffled-float32",
    "raw-float64",
    "fp16-shuffled-float64",
    "fp16-float32",
    "int8-float64",
    "topk-float32",
]


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_few_kb_set_decodes_within_its_limit(kind: str) -> None:
    message = _crafted(kind, LIMIT - HEADROOM)
    assert len(message) < 64 * KiB
    decoded, peak = _peak(lambda: decode_tensors(message, _limits()))
    arrays = sum(array.nbytes for array in decoded.values())
    assert arrays >= LIMIT - HEADROOM - 16  # it did decode (and tracemalloc saw it)
    assert arrays <= peak <= LIMIT + SLACK, f"peak {peak / MiB:.2f} MiB, limit 16 MiB"


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "raw-float64"])
def test_arrays_that_fit_are_refused_when_decoding_them_would_not(kind: str) -> None:
    # The arrays alone are 16 bytes under the limit; the scratch and zstd's window ring
    # decoding needs on top are counted too, and the set is refused before anything is
    # allocated or decompressed.
    message = _crafted(kind, LIMIT - 16)

    def refuse() -> None:
        with pytest.raises(LimitExceededError, match="decoding memory"):
            decode_tensors(message, _limits())

    _, peak = _peak(refuse)
    assert peak <= SLACK


def test_views_of_a_body_decompressed_in_one_go_need_only_the_arrays() -> None:
    # Unshuffled raw tensors are views of the decompressed body: exactly the arrays.
    message = _crafted("raw-float64", LIMIT)
    decoded, peak = _peak(lambda: decode_tensors(message, _limits()))
    assert decoded["w"].nbytes == LIMIT
    assert peak <= LIMIT + SLACK


def test_the_default_limits_hold_for_a_few_kb_set_declaring_256_mib() -> None:
    # The reported case: under DEFAULT_LIMITS this message used to peak at 2x 256 MiB.
    limit = DEFAULT_LIMITS.max_decoded_bytes
    n = (limit - HEADROOM) // 4
    message = _zstd_set(_entry("w", "float32", n, "raw", shuffle=True, len=4 * n))
    assert len(message) < 16 * KiB
    decoded, peak = _peak(lambda: decode_tensors(message))
    assert decoded["w"].nbytes == 4 * n
    assert peak <= limit + SLACK
    del decoded


def test_int8_blocks_larger_than_the_tensor_cost_nothing() -> None:
    # One element per tensor in a block of 2**24: the old decoder padded every tensor to
    # a whole block (64 MiB each) while declaring 4 bytes.
    entries = [_entry(f"t{i}", "float32", 1, "int8", block=1 << 24, len=5) for i in range(64)]
    body = b"".join(np.float32(0.5).tobytes() + b"\x02" + bytes(3) for _ in entries)
    header = {"tensors": entries, "compression": "none", "raw_len": len(body)}
    message = encode_frame("tensors", header, body)
    decoded, peak = _peak(lambda: decode_tensors(message, _limits(64 * KiB)))
    assert all(float(array[0]) == 1.0 for array in decoded.values())
    assert peak <= SLACK


@pytest.mark.parametrize("codec", ["raw", "fp16", "int8", "topk:0.05"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_an_honest_update_decodes_within_what_its_schema_allows(codec: str, shuffle: bool) -> None:
    # An update the size of a 1M-parameter model: arrays plus bounded scratch, no body.
    rng = np.random.default_rng(0)
    delta = {f"layer{i}": rng.standard_normal(125_000).astype(np.float32) for i in range(8)}
    compression = Compression(shuffle=shuffle)
    message = encode_tensors(delta, CodecSpec.parse(codec), compression=compression).data
    arrays = 4 * 1_000_000
    decoded, peak = _peak(lambda: decode_tensors(message))
    assert sum(a.nbytes for a in decoded.values()) == arrays
    assert peak <= arrays + 1 * MiB
