"""Tensor sets: every codec round-trips within its stated bound; hostile input is refused."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq.errors import (
    DecompressionError,
    LimitExceededError,
    LocalProtocolError,
    MalformedMessageError,
    TruncatedMessageError,
    UnsupportedCodecError,
    UnsupportedDtypeError,
    UnsupportedVersionError,
)
from fedmq.wire.framing import encode_frame
from fedmq.wire.limits import DecodeLimits
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import NO_COMPRESSION, Compression, decode_tensors, encode_tensors

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7)
float_dtypes = st.sampled_from([np.float16, np.float32, np.float64])
other_dtypes = st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.int64, np.bool_])
codecs = st.sampled_from(["raw", "fp16", "int8", "int8:3", "topk", "topk:0.3", "topk:1"])
compressions = st.sampled_from([Compression(), Compression(shuffle=False), NO_COMPRESSION])


def float_arrays(dtype: Any) -> st.SearchStrategy[np.ndarray]:
    # Bounded magnitudes: fp16 refuses values beyond its range by design.
    return hnp.arrays(dtype, shapes, elements=st.floats(-1e3, 1e3, width=16))


@st.composite
def tensor_sets(draw: st.DrawFn) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.text(min_size=1, max_size=12), max_size=5, unique=True))
    result = {}
    for name in names:
        if draw(st.booleans()):
            result[name] = draw(float_arrays(draw(float_dtypes)))
        else:
            result[name] = draw(hnp.arrays(draw(other_dtypes), shapes))
    return result


def _assert_within_bound(codec: CodecSpec, original: np.ndarray, decoded: np.ndarray) -> None:
    x = original.astype(np.float64).reshape(-1)
    d = decoded.astype(np.float64).reshape(-1)
    if codec.name == "raw" or original.dtype.kind not in "f":
        np.testing.assert_array_equal(d, x)
    elif codec.name == "fp16":
        bound = np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)
        if original.dtype == np.float16:
            bound = np.zeros_like(x)
        assert np.all(np.abs(x - d) <= bound)
    elif codec.name == "int8":
        for start in range(0, x.size, codec.block):
            block = x[start : start + codec.block]
            scale = np.float32(np.abs(block).max() / 127.0)
            # float32 arithmetic adds a few ulps on top of scale/2, and decoding back to
            # the original dtype rounds once more (half an ulp: 2**-11 for float16).
            rounding = max(1e-6, float(np.finfo(original.dtype).eps))
            tol = float(scale) / 2 * (1 + 1e-5) + np.abs(block).max() * rounding
            assert np.all(np.abs(block - d[start : start + codec.block]) <= tol)
    else:
        kept = d != 0
        np.testing.assert_array_equal(d[kept], x[kept])
        k = max(1, int(np.ceil(codec.fraction * x.size))) if x.size else 0
        assert np.count_nonzero(kept) <= k
        if x.size and k < x.size:
            # Everything dropped is no larger than the smallest magnitude kept.
            dropped = np.abs(x[~kept & (x != 0)])
            if dropped.size and kept.any():
                assert dropped.max() <= np.abs(d[kept]).min()


@settings(max_examples=150, deadline=None)
@given(tensor_sets(), codecs, compressions)
def test_round_trip_preserves_names_dtypes_shapes(
    tensors: dict[str, np.ndarray], codec_text: str, compression: Compression
) -> None:
    codec = CodecSpec.parse(codec_text)
    encoded = encode_tensors(tensors, codec, compression=compression)
    decoded = decode_tensors(encoded.data)
    assert list(decoded) == list(tensors)
    for name, original in tensors.items():
        assert decoded[name].dtype == original.dtype
        assert decoded[name].shape == original.shape
        _assert_within_bound(codec, original, decoded[name])
        if name in encoded.lost:
            # What was lost is exactly the gap, so error feedback loses nothing.
            recovered = decoded[name].astype(np.float64) + encoded.lost[name].astype(np.float64)
            np.testing.assert_allclose(
                recovered, original.astype(np.float64), rtol=1e-6, atol=1e-30
            )
        elif codec.lossy and original.dtype.kind == "f" and original.dtype != np.float16:
            pytest.fail(f"lossy codec {codec} reported no loss for {name!r}")


@given(st.data())
def test_truncated_prefix_raises_truncated(data: st.DataObject) -> None:
    tensors = data.draw(tensor_sets())
    encoded = encode_tensors(tensors, CodecSpec.parse(data.draw(codecs))).data
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(TruncatedMessageError):
        decode_tensors(encoded[:cut])


def test_every_truncated_prefix_raises_truncated() -> None:
    tensors = {"w": np.linspace(-1, 1, 40, dtype=np.float32).reshape(5, 8), "n": np.arange(3)}
    encoded = encode_tensors(tensors, CodecSpec.parse("int8:16")).data
    for cut in range(len(encoded)):
        with pytest.raises(TruncatedMessageError):
            decode_tensors(encoded[:cut])


def test_raw_uncompressed_decode_is_zero_copy() -> None:
    weights = np.arange(1000, dtype=np.float32)
    data = bytearray(encode_tensors({"w": weights}, compression=NO_COMPRESSION).data)
    decoded = decode_tensors(data)["w"]
    np.testing.assert_array_equal(decoded, weights)
    assert decoded.base is not None  # a view into `data`, not a copy
    data[-4:] = struct.pack("<f", 7.0)
    assert decoded[-1] == 7.0


def test_int8_error_bound_and_residual_on_a_real_sized_tensor() -> None:
    rng = np.random.default_rng(1)
    delta = (rng.standard_normal(100_000) * 0.01).astype(np.float32)
    encoded = encode_tensors({"d": delta}, CodecSpec("int8", block=256))
    decoded = decode_tensors(encoded.data)["d"]
    scales = np.abs(np.pad(delta, (0, -delta.size % 256)).reshape(-1, 256)).max(axis=1) / 127
    bound = np.repeat(scales, 256)[: delta.size] / 2 * (1 + 1e-5)
    assert np.all(np.abs(delta - decoded) <= bound)
    np.testing.assert_allclose(decoded + encoded.lost["d"], delta, atol=1e-9)


def test_topk_keeps_largest_and_reports_rest_as_lost() -> None:
    values = np.array([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, -2.0], dtype=np.float32)
    encoded = encode_tensors({"v": values}, CodecSpec("topk", fraction=0.5))
    decoded = decode_tensors(encoded.data)["v"]
    np.testing.assert_array_equal(decoded, [0, -5.0, 0, 3.0, 0, 0, 1.0, -2.0])
    np.testing.assert_array_equal(encoded.lost["v"], np.float32([0.1, 0, 0.2, 0, -0.05, 0, 0, 0]))


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk"])
def test_lossy_codecs_refuse_non_finite_values(codec: str) -> None:
    with pytest.raises(LocalProtocolError, match="NaN or Inf"):
        encode_tensors({"x": np.array([1.0, np.nan], np.float32)}, CodecSpec.parse(codec))


def test_fp16_refuses_out_of_range_values() -> None:
    with pytest.raises(LocalProtocolError, match="float16"):
        encode_tensors({"x": np.array([1e6], np.float32)}, CodecSpec("fp16"))


def test_unsupported_dtype_is_refused_on_encode() -> None:
    with pytest.raises(UnsupportedDtypeError):
        encode_tensors({"x": np.array([1 + 2j])})


@pytest.mark.parametrize("text", ["gzip", "int8:x", "topk:2", "topk:0", "fp16:3", "int8:0"])
def test_bad_codec_specs(text: str) -> None:
    with pytest.raises((UnsupportedCodecError, LocalProtocolError)):
        CodecSpec.parse(text)


def test_codec_spec_text_round_trips() -> None:
    for text in ["raw", "fp16", "int8:128", "topk:0.05"]:
        assert str(CodecSpec.parse(text)) == text


# ---- malformed inputs: each raises a specific error ------------------------------------


def _frame(entries: list[dict[str, Any]], body: bytes, **header: Any) -> bytes:
    fields = {"tensors": entries, "compression": "none", "raw_len": len(body)}
    fields.update(header)
    return encode_frame("tensors", fields, body)


def _entry(**overrides: Any) -> dict[str, Any]:
    entry = {"name": "w", "dtype": "float32", "shape": [2], "codec": "raw", "len": 8}
    entry["shuffle"] = False
    entry.update(overrides)
    return entry


def _zstd_bomb() -> bytes:
    # 64 MiB of zeros in ~2 KB.  The header claims 8 bytes; the zstd frame declares
    # 64 MiB, which zstandard would allocate regardless of max_output_size.
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * 1024 * 1024))
    return encode_frame(
        "tensors", {"tensors": [_entry()], "compression": "zstd", "raw_len": 8}, bomb
    )


def _zstd_unknown_size_bomb() -> bytes:
    compressor = zstandard.ZstdCompressor(level=19, write_content_size=False)
    bomb = compressor.compress(b"\0" * (64 * 1024 * 1024))
    return encode_frame(
        "tensors", {"tensors": [_entry()], "compression": "zstd", "raw_len": 8}, bomb
    )


MALFORMED: list[tuple[str, bytes, type[Exception]]] = [
    ("not-msgpack", b"FMQ\x01\x00\x00\x00\x03\xc1\xc1\xc1", MalformedMessageError),
    ("not-fedmq", b"GIF89a" + b"\0" * 20, UnsupportedVersionError),
    ("wrong-version", b"FMQ\x09" + b"\0" * 10, UnsupportedVersionError),
    ("empty", b"", TruncatedMessageError),
    ("header-not-map", b"FMQ\x01\x00\x00\x00\x01\x90", MalformedMessageError),
    ("wrong-kind", encode_frame("update", {}), MalformedMessageError),
    ("unknown-dtype", _frame([_entry(dtype="complex64")], b"\0" * 8), UnsupportedDtypeError),
    ("numpy-object-dtype", _frame([_entry(dtype="object")], b"\0" * 8), UnsupportedDtypeError),
    ("unknown-codec", _frame([_entry(codec="lz4")], b"\0" * 8), UnsupportedCodecError),
    (
        "unknown-compression",
        _frame([_entry()], b"\0" * 8, compression="lzma"),
        UnsupportedCodecError,
    ),
    (
        "shape-over-limits",
        _frame([_entry(shape=[1 << 20, 1 << 20], len=4 << 40)], b""),
        LimitExceededError,
    ),
    ("rank-over-limits", _frame([_entry(shape=[1] * 9, len=4)], b"\0" * 8), LimitExceededError),
    ("negative-dim", _frame([_entry(shape=[-2])], b"\0" * 8), MalformedMessageError),
    ("bool-dim", _frame([_entry(shape=[True])], b"\0" * 8), MalformedMessageError),
    ("length-mismatch", _frame([_entry(len=12)], b"\0" * 16), MalformedMessageError),
    ("raw-len-mismatch", _frame([_entry()], b"\0" * 8, raw_len=16), MalformedMessageError),
    ("raw-len-over-limits", _frame([_entry()], b"\0" * 8, raw_len=1 << 40), LimitExceededError),
    ("duplicate-names", _frame([_entry(), _entry()], b"\0" * 16), MalformedMessageError),
    ("missing-field", _frame([{"name": "w"}], b""), MalformedMessageError),
    ("entry-not-map", _frame([[1, 2]], b""), MalformedMessageError),
    (
        "int8-on-ints",
        _frame([_entry(dtype="int32", codec="int8", block=4)], b"\0" * 8),
        MalformedMessageError,
    ),
    (
        "topk-index-out-of-range",
        _frame(
            [_entry(codec="topk", k=1, len=8)],
            struct.pack("<If", 5, 1.0),
        ),
        MalformedMessageError,
    ),
    (
        "topk-indices-not-increasing",
        _frame(
            [_entry(codec="topk", k=2, len=16, shape=[4])],
            struct.pack("<IIff", 1, 0, 1.0, 2.0),
        ),
        MalformedMessageError,
    ),
    ("zstd-bomb-declared-size", _zstd_bomb(), DecompressionError),
    ("zstd-bomb-unknown-size", _zstd_unknown_size_bomb(), DecompressionError),
    (
        "zstd-garbage",
        encode_frame(
            "tensors", {"tensors": [_entry()], "compression": "zstd", "raw_len": 8}, b"junkjunk"
        ),
        DecompressionError,
    ),
    (
        "trailing-bytes",
        _frame([_entry()], b"\0" * 8) + b"extra",
        MalformedMessageError,
    ),
    (
        "header-over-limits",
        b"FMQ\x01" + struct.pack(">I", 1 << 30) + b"\0" * 16,
        LimitExceededError,
    ),
]


@pytest.mark.parametrize(
    ("data", "error"), [(d, e) for _, d, e in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_malformed_inputs_raise_specific_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_tensors(data)


def test_too_many_tensors() -> None:
    tensors = {f"t{i}": np.zeros(1, np.float32) for i in range(5)}
    with pytest.raises(LimitExceededError, match="tensor count"):
        decode_tensors(encode_tensors(tensors).data, DecodeLimits(max_tensors=4))


def test_decoded_bytes_limit_counts_sparse_expansion() -> None:
    # topk makes a small message decode to a large dense tensor: bounded by max_decoded_bytes.
    big = np.zeros(1_000_000, np.float32)
    big[3] = 1.0
    message = encode_tensors({"x": big}, CodecSpec("topk", fraction=1e-6)).data
    assert len(message) < 1000
    with pytest.raises(LimitExceededError, match="decoded tensor bytes"):
        decode_tensors(message, DecodeLimits(max_decoded_bytes=1_000_000))


def test_declared_size_checked_before_decompression(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = zstandard.ZstdDecompressor

    class Spy(real):  # type: ignore[misc, valid-type]
        def decompress(self, *args: Any, **kwargs: Any) -> bytes:
            calls.append(1)
            return super().decompress(*args, **kwargs)

    monkeypatch.setattr(zstandard, "ZstdDecompressor", Spy)
    message = encode_tensors({"x": np.zeros(1000, np.float32)}).data
    with pytest.raises(LimitExceededError):
        decode_tensors(message, DecodeLimits(max_elements_per_tensor=999))
    assert calls == []


def test_msgpack_header_with_unhashable_key_is_malformed() -> None:
    header = b"\x81\x91\x01\x01"  # {[1]: 1}
    data = b"FMQ\x01" + struct.pack(">I", len(header)) + header
    with pytest.raises(MalformedMessageError):
        decode_tensors(data)
    assert msgpack.packb({"a": 1})  # msgpack itself is fine
