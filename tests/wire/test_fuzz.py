"""Fuzzing every decoder a peer's bytes reach: typed errors only, memory within the limits.

Three kinds of input per decoder: random bytes, valid messages with random mutations
(bit flips, overwrites, truncations, insertions, splices), and well-framed messages whose
header fields are random (to get past the parsers into the size and layout logic).  A
decoder may return or raise a :class:`~fedmq.errors.DecodeError`,
:class:`~fedmq.errors.IntegrityError` or :class:`~fedmq.wire.signing.SignatureError`;
anything else (IndexError, OverflowError, zstandard's own errors, MemoryError …) fails.
Each call runs under tracemalloc with small :class:`DecodeLimits`, and its peak
allocation must stay within what those limits allow.

Bounded for CI: 150-300 examples per test, no deadline; the module takes ~10 s.
"""

from __future__ import annotations

import base64
import contextlib
import json
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.errors import DecodeError, IntegrityError, InvalidTopicError
from fedmq.wire.archive import pack_files, unpack_files
from fedmq.wire.blobs import BlobAssembler, blob_ref, split_blob
from fedmq.wire.chunks import ChunkHeader, decode_chunk, encode_blob_chunks, encode_chunk
from fedmq.wire.control import (
    Ack,
    AgentStatus,
    AggregatorStatus,
    ControlMessage,
    RoundAnnouncement,
    decode_control,
    encode_control,
)
from fedmq.wire.framing import decode_frame
from fedmq.wire.limits import DecodeLimits, KiB
from fedmq.wire.signing import (
    SignatureError,
    SigningKey,
    TrustedKeys,
    control_signature,
    verify_control,
)
from fedmq.wire.tensor_codecs import CodecSpec
from fedmq.wire.tensors import NO_COMPRESSION, Compression, decode_tensors, encode_tensors
from fedmq.wire.topics import Topics
from fedmq.wire.update import UpdateMeta, decode_update, decode_update_meta, encode_update

LIMITS = DecodeLimits(
    max_message_bytes=64 * KiB,
    max_header_bytes=4 * KiB,
    max_blob_bytes=64 * KiB,
    max_decoded_bytes=256 * KiB,
    max_tensors=8,
    max_elements_per_tensor=32 * KiB,
    max_rank=4,
    max_name_length=32,
    max_chunks=64,
    max_control_bytes=8 * KiB,
)
TYPED = (DecodeError, IntegrityError, SignatureError)
# Python objects a decoder builds besides what the limits bound (header maps, views).
SLACK = 64 * KiB
# Parsed JSON is bigger than its text (an empty dict is 64 bytes for 3 characters).
JSON_EXPANSION = 64
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = SigningKey(bytes(range(32)))
OTHER_KEY = SigningKey(bytes(range(1, 33)))
TRUSTED = TrustedKeys([KEY.public])


def check(decode: Callable[[], object], bound: int) -> None:
    """Run ``decode``: it returns or raises a typed error, and allocates at most ``bound``."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        try:
            result = decode()
        except TYPED:
            result = None
        _, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    assert peak - before <= bound, f"allocated {peak - before} bytes, bound {bound}"


TENSORS_BOUND = LIMITS.max_decoded_bytes + SLACK
BLOB_BOUND = LIMITS.max_blob_bytes + SLACK
CONTROL_BOUND = JSON_EXPANSION * LIMITS.max_control_bytes + SLACK

# ---------------------------------------------------------------------- mutations


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid message with 1-4 random edits."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete", "splice"]))
        at = draw(st.integers(0, len(data))) if data else 0
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0xC1, 0xDC, 0xDD]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "splice" and data:
            start = draw(st.integers(0, len(data) - 1))
            data[at:at] = data[start : start + draw(st.integers(1, 64))]
    return bytes(data)


def fuzzed(valid: st.SearchStrategy[bytes], max_size: int = 2048) -> st.SearchStrategy[bytes]:
    """Random bytes, the valid messages themselves, and mutations of them."""
    return st.one_of(st.binary(max_size=max_size), valid, mutated(valid))


# ---------------------------------------------------------------------- valid messages

ids = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,11}", fullmatch=True)
small_shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3)
dtypes = st.sampled_from(["float16", "float32", "float64", "int8", "int32", "uint8", "bool"])
codecs = st.sampled_from(["raw", "fp16", "int8", "int8:3", "topk:0.3", "topk:1"])
compressions = st.sampled_from([Compression(), Compression(shuffle=False), NO_COMPRESSION])


@st.composite
def tensor_sets(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True))
    tensors = {}
    for name in names:
        shape = tuple(draw(small_shapes))
        dtype = np.dtype(draw(dtypes))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        tensors[name] = (rng.standard_normal(shape) * 10).astype(dtype)
    codec = CodecSpec.parse(draw(codecs))
    return encode_tensors(tensors, codec, compression=draw(compressions)).data


@st.composite
def update_envelopes(draw: st.DrawFn) -> bytes:
    round_id = draw(st.integers(0, 50))
    meta = UpdateMeta(
        federation=draw(ids),
        client=draw(ids),
        round=round_id,
        base_round=draw(st.integers(0, round_id)),
        update_id=draw(ids),
        num_examples=draw(st.integers(1, 10**9)),
        metrics=draw(st.dictionaries(ids, st.floats(-1e3, 1e3), max_size=3)),
        created_at=draw(st.floats(0, 4e9)),
    )
    return encode_update(meta, draw(tensor_sets()))


@st.composite
def chunk_messages(draw: st.DrawFn) -> bytes:
    data = draw(st.binary(max_size=4096))
    ref = blob_ref(data, draw(st.sampled_from([1024, 2048])))
    kind = draw(st.sampled_from(["blob", "update"]))
    index = draw(st.integers(0, ref.count - 1))
    payload = list(split_blob(data, ref))[index]
    header = ChunkHeader(
        kind,
        draw(ids),
        draw(ids),
        draw(st.integers(0, 100)),
        ref,
        index,
        draw(ids) if kind == "update" else None,
        KEY.sign(b"statement") if kind == "update" and draw(st.booleans()) else None,
    )
    return encode_chunk(header, payload)


archives = st.dictionaries(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", fullmatch=True),
    st.binary(max_size=200),
    max_size=5,
).map(pack_files)


# ---------------------------------------------------------------------- structured frames

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
msgpack_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _packable(value: Any) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _frame_with(header: dict[str, Any], body: bytes) -> bytes:
    """A frame whose header is ``header`` as given (its own kind and body_len included)."""
    packed = msgpack.packb(header, use_bin_type=True)
    return b"FMQ\x01" + len(packed).to_bytes(4, "big") + packed + body


@st.composite
def tensor_entries(draw: st.DrawFn) -> dict[str, Any]:
    """Header entries that are mostly plausible, with any field possibly off."""
    count_dims = draw(st.lists(st.integers(-2, 2**20), max_size=3))
    entry: dict[str, Any] = {
        "name": draw(st.text(max_size=6)),
        "dtype": draw(dtypes | st.sampled_from(["complex64", "object", ">f4", "V8"])),
        "shape": count_dims,
        "codec": draw(st.sampled_from(["raw", "fp16", "int8", "topk", "lz4"])),
        "len": draw(st.integers(0, 2**40) | st.integers(0, 512)),
        "shuffle": draw(st.booleans()),
        "block": draw(st.integers(0, 2**25) | st.integers(1, 64)),
        "k": draw(st.integers(0, 2**20) | st.integers(0, 16)),
    }
    for field in draw(st.lists(st.sampled_from(sorted(entry)), max_size=2)):
        if draw(st.booleans()):
            entry.pop(field, None)
        else:
            entry[field] = draw(msgpack_values)
    return entry


@st.composite
def structured_tensor_sets(draw: st.DrawFn) -> bytes:
    entries = draw(st.lists(tensor_entries(), max_size=4))
    compression = draw(st.sampled_from(["zstd", "none", "gzip"]))
    content = draw(
        st.binary(max_size=1024)
        | st.integers(0, 64 * KiB).map(bytes)
        | st.builds(lambda n: np.arange(n, dtype="<u4").tobytes(), st.integers(0, 2048))
    )
    if compression == "zstd" and draw(st.booleans()):
        size = draw(st.booleans())
        body = zstandard.ZstdCompressor(write_content_size=size).compress(content)
    else:
        body = content
    raw_len = draw(st.sampled_from([len(content), len(body)]) | st.integers(0, 2**40))
    header = {"tensors": entries, "compression": compression, "raw_len": raw_len}
    header.update({"kind": "tensors", "body_len": len(body)})
    if not _packable(header):
        header = {"kind": "tensors", "body_len": len(body)}
    return _frame_with(header, body)


def _segment_length(codec: str, dtype: np.dtype[Any], count: int, block: int, k: int) -> int:
    if codec == "raw":
        return count * dtype.itemsize
    if codec == "fp16":
        return 2 * count
    if codec == "int8":
        return -(-count // block) * 4 + count
    return k * (4 + dtype.itemsize)


@st.composite
def consistent_tensor_sets(draw: st.DrawFn) -> bytes:
    """Entries whose lengths add up, over random body bytes: the codecs' own checks."""
    entries = []
    raw_len = 0
    for index in range(draw(st.integers(0, 4))):
        dtype = np.dtype(draw(st.sampled_from(["float16", "float32", "float64", "int16"])))
        codec = (
            "raw" if dtype.kind != "f" else draw(st.sampled_from(["raw", "fp16", "int8", "topk"]))
        )
        shape = draw(st.lists(st.integers(0, 40), max_size=2))
        count = int(np.prod(shape, dtype=np.int64))
        block = draw(st.integers(1, 64) | st.just(1 << 24))
        k = draw(st.integers(1, max(count, 1))) if count else 0
        length = _segment_length(codec, dtype, count, block, k)
        entry = {"name": f"t{index}", "dtype": dtype.name, "shape": shape, "codec": codec}
        entry.update({"len": length, "shuffle": draw(st.booleans()), "block": block, "k": k})
        entries.append(entry)
        raw_len += length + (-length % 8)
    content = draw(st.binary(min_size=raw_len, max_size=raw_len))
    if draw(st.booleans()):
        content = draw(st.sampled_from([bytes(raw_len), content]))
        compressor = zstandard.ZstdCompressor(write_content_size=draw(st.booleans()))
        body, compression = compressor.compress(content), "zstd"
        if draw(st.booleans()):
            body += draw(st.binary(min_size=1, max_size=8))  # a trailing frame or junk
    else:
        body, compression = content, "none"
    header = {"tensors": entries, "compression": compression, "raw_len": raw_len}
    header.update({"kind": "tensors", "body_len": len(body)})
    return _frame_with(header, body)


@st.composite
def structured_chunks(draw: st.DrawFn) -> bytes:
    payload = draw(st.binary(max_size=2048))
    header: dict[str, Any] = {
        "kind": draw(st.sampled_from(["blob_chunk", "update_chunk", "tensors"])),
        "fed": draw(ids | st.text(max_size=5)),
        "sender": draw(ids),
        "round": draw(st.integers(-1, 2**60)),
        "sha": draw(st.binary(min_size=32, max_size=32) | st.binary(max_size=40)),
        "size": draw(st.integers(0, 2**40) | st.just(len(payload))),
        "csz": draw(st.integers(0, 2**20) | st.just(1024)),
        "idx": draw(st.integers(-1, 70)),
        "n": draw(st.integers(0, 2**20) | st.integers(1, 3)),
        "crc": draw(st.just(zlib.crc32(payload)) | st.integers(0, 2**32)),
        "uid": draw(ids),
        "sig": draw(st.binary(min_size=64, max_size=64) | st.binary(max_size=70)),
        "body_len": len(payload),
    }
    for field in draw(st.lists(st.sampled_from(sorted(header)), max_size=2)):
        header[field] = draw(msgpack_values)
    if not _packable(header):
        header = {"kind": "blob_chunk", "body_len": len(payload)}
    return _frame_with(header, payload)


@st.composite
def structured_updates(draw: st.DrawFn) -> bytes:
    body = draw(tensor_sets())
    header: dict[str, Any] = {
        "kind": "update",
        "fed": draw(ids),
        "client": draw(ids),
        "round": draw(st.integers(-1, 2**54)),
        "base_round": draw(st.integers(-1, 2**54)),
        "uid": draw(ids),
        "examples": draw(st.integers(-1, 2**60)),
        "metrics": draw(st.dictionaries(st.text(max_size=70), msgpack_values, max_size=70)),
        "created": draw(st.floats()),
        "body_len": len(body),
    }
    for field in draw(st.lists(st.sampled_from(sorted(header)), max_size=2)):
        header[field] = draw(msgpack_values)
    if not _packable(header):
        header = {"kind": "update", "body_len": len(body)}
    return _frame_with(header, body)


@st.composite
def structured_archives(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=512))
    files = draw(st.lists(st.lists(msgpack_values, max_size=3) | msgpack_values, max_size=70))
    header = {"kind": "archive", "files": files, "body_len": len(body)}
    if not _packable(header):
        header = {"kind": "archive", "body_len": len(body)}
    return _frame_with(header, body)


# ---------------------------------------------------------------------- binary decoders


@FUZZ
@given(fuzzed(st.one_of(tensor_sets(), chunk_messages(), archives, update_envelopes())))
def test_decode_frame(data: bytes) -> None:
    check(lambda: decode_frame(data, LIMITS), SLACK)


@FUZZ
@given(
    st.one_of(
        fuzzed(tensor_sets()),
        structured_tensor_sets(),
        consistent_tensor_sets(),
        mutated(consistent_tensor_sets()),
    )
)
def test_decode_tensors(data: bytes) -> None:
    check(lambda: decode_tensors(data, LIMITS), TENSORS_BOUND)


@FUZZ
@given(st.one_of(fuzzed(chunk_messages()), structured_chunks()))
def test_decode_chunk(data: bytes) -> None:
    check(lambda: decode_chunk(data, LIMITS), SLACK)


@FUZZ
@given(st.one_of(fuzzed(update_envelopes()), structured_updates()))
def test_decode_update(data: bytes) -> None:
    check(lambda: decode_update_meta(data, LIMITS), SLACK)
    check(lambda: decode_update(data, LIMITS), TENSORS_BOUND)


@FEW
@given(st.one_of(fuzzed(archives), structured_archives()))
def test_unpack_files(data: bytes) -> None:
    check(lambda: unpack_files(data, LIMITS), SLACK)


@FEW
@given(st.binary(max_size=3000), st.lists(st.tuples(st.integers(-1, 5), st.binary(max_size=1100))))
def test_blob_assembler(blob: bytes, extra: list[tuple[int, bytes]]) -> None:
    # Real chunks (some corrupted), out-of-range indices and wrong lengths, in any order;
    # finishing checks completeness and the sha256.
    ref = blob_ref(blob, 1024)
    parts = [bytes(part) for part in split_blob(blob, ref)]

    def feed() -> None:
        assembler = BlobAssembler(ref, LIMITS)
        for index, payload in [*extra, *enumerate(parts)]:
            with contextlib.suppress(TYPED):
                assembler.add(index, payload)
        assembler.finish()

    check(feed, BLOB_BOUND)


@FEW
@given(fuzzed(chunk_messages()))
def test_chunks_into_an_assembler(data: bytes) -> None:
    # What the agents and the aggregator do with a chunk: decode, then reassemble.
    def feed() -> None:
        chunk = decode_chunk(data, LIMITS)
        assembler = BlobAssembler(chunk.header.blob, LIMITS)
        assembler.add(chunk.header.index, chunk.payload)
        if assembler.complete:
            assembler.finish()

    check(feed, BLOB_BOUND)


def test_every_chunk_of_a_valid_blob_survives_the_fuzz_harness() -> None:
    # The harness itself: valid input decodes without any error.
    data = bytes(range(256)) * 10
    ref = blob_ref(data, 1024)
    assembler = BlobAssembler(ref, LIMITS)
    for _, message in encode_blob_chunks(
        data, ref, kind="blob", federation="f", sender="agg", round_id=1
    ):
        chunk = decode_chunk(message, LIMITS)
        assembler.add(chunk.header.index, chunk.payload)
    assert bytes(assembler.finish()) == data


@FEW
@given(st.text(max_size=80) | st.lists(ids | st.text(max_size=6), max_size=6).map("/".join))
def test_topics_parse(topic: str) -> None:
    topics = Topics("plant7")
    for candidate in (topic, f"fedmq/plant7/{topic}"):
        with contextlib.suppress(InvalidTopicError):
            topics.parse(candidate)


# ---------------------------------------------------------------------- control messages

times = st.floats(0, 4e9)
refs = st.builds(lambda data: blob_ref(data, 1024), st.binary(max_size=64))
control_messages = st.one_of(
    st.builds(
        RoundAnnouncement,
        federation=ids,
        aggregator=ids,
        round=st.integers(0, 1000),
        issued_at=times,
        deadline=times,
        bundle=refs,
        params=refs,
        selected=st.none() | st.lists(ids, max_size=3),
    ),
    st.builds(
        Ack,
        federation=ids,
        client=ids,
        round=st.integers(0, 1000),
        update_id=ids,
        accepted=st.booleans(),
        reason=st.sampled_from(["accepted", "outlier", "non_finite"]),
        ts=times,
    ),
    st.builds(AgentStatus, client=ids, state=st.sampled_from(["idle", "training"]), ts=times),
    st.builds(AggregatorStatus, aggregator=ids, state=st.just("collecting"), ts=times),
)
KINDS: list[type[ControlMessage]] = [RoundAnnouncement, Ack, AgentStatus, AggregatorStatus]


@st.composite
def encoded_controls(draw: st.DrawFn) -> bytes:
    message = draw(control_messages)
    signer = draw(st.sampled_from([None, KEY, OTHER_KEY]))
    return encode_control(message, signer)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)


@st.composite
def control_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object with the control fields, some of them replaced by random values."""
    document = json.loads(draw(encoded_controls()))
    for field in draw(st.lists(st.sampled_from(sorted(document)), max_size=3)):
        document[field] = draw(json_values)
    for _ in range(draw(st.integers(0, 2))):
        document[draw(st.text(max_size=8))] = draw(json_values)
    return document


signatures = st.one_of(
    st.text(max_size=120),
    st.builds(
        lambda kid, b64: f"ed25519:{kid}:{b64}",
        st.sampled_from([KEY.id, "0" * 16]),
        st.text(max_size=90),
    ),
    st.builds(
        lambda raw: f"ed25519:{KEY.id}:" + base64.b64encode(raw).decode(),
        st.binary(min_size=60, max_size=68),
    ),
    json_values,
)


@FUZZ
@given(
    st.one_of(
        fuzzed(encoded_controls(), max_size=512),
        control_documents().map(lambda d: json.dumps(d).encode()),
    ),
    st.sampled_from(KINDS),
    st.booleans(),
)
def test_decode_control(data: bytes, kind: type[ControlMessage], signed: bool) -> None:
    trusted = TRUSTED if signed else None
    check(lambda: decode_control(data, kind, LIMITS, trusted), CONTROL_BOUND)


@FUZZ
@given(control_documents(), signatures | st.none(), st.booleans())
def test_verify_control(document: dict[str, Any], signature: Any, resign: bool) -> None:
    # Random documents under random signatures (and genuine ones, then altered).
    if resign:
        document = json.loads(encode_control_document(document))
    elif signature is not None:
        document["signature"] = signature
    else:
        document.pop("signature", None)

    def verify() -> object:
        return verify_control(document, TRUSTED)

    check(verify, CONTROL_BOUND)


def encode_control_document(document: dict[str, Any]) -> bytes:
    """``document`` signed by the trusted key, then one field altered half the time."""
    signed = dict(document)
    signed["signature"] = control_signature(signed, KEY)
    if len(signed) > 1 and zlib.crc32(json.dumps(signed, sort_keys=True).encode()) % 2:
        first = sorted(k for k in signed if k != "signature")[0]
        signed[first] = [signed[first]]
    return json.dumps(signed).encode()


def test_a_genuine_signature_verifies_in_the_harness() -> None:
    message = encode_control(
        Ack(
            federation="f",
            client="c",
            round=1,
            update_id="u",
            accepted=False,
            reason="outlier",
            ts=1.0,
        ),
        KEY,
    )
    assert decode_control(message, Ack, LIMITS, TRUSTED).reason == "outlier"
    with pytest.raises(SignatureError):
        decode_control(
            encode_control(Ack.model_validate_json(message), OTHER_KEY), Ack, LIMITS, TRUSTED
        )


def test_a_non_ascii_signature_is_a_signature_error() -> None:
    document = {"v": 1, "type": "ack", "signature": f"ed25519:{KEY.id}:\u00e9"}
    with pytest.raises(SignatureError):
        decode_control(json.dumps(document).encode(), Ack, LIMITS, TRUSTED)
