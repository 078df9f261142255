"""Blobs and chunk messages: split, reassemble out of order, verify, reject bad chunks."""

from __future__ import annotations

import random
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.errors import (
    IntegrityError,
    LimitExceededError,
    LocalProtocolError,
    MalformedMessageError,
    TruncatedMessageError,
    UnsupportedVersionError,
)
from fedmq.wire.blobs import BlobAssembler, BlobRef, blob_ref, split_blob
from fedmq.wire.chunks import ChunkHeader, decode_chunk, encode_blob_chunks, encode_chunk
from fedmq.wire.framing import PREFIX_SIZE, encode_frame
from fedmq.wire.limits import DecodeLimits


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=20_000),
    st.integers(1024, 4096),
    st.sampled_from(["blob", "update"]),
    st.randoms(use_true_random=False),
)
def test_chunks_reassemble_out_of_order_with_duplicates(
    data: bytes, chunk_size: int, kind: str, rnd: random.Random
) -> None:
    ref = blob_ref(data, chunk_size)
    messages = [
        message
        for _, message in encode_blob_chunks(
            data,
            ref,
            kind=kind,  # type: ignore[arg-type]
            federation="line-1",
            sender="dev-7",
            round_id=3,
            update_id="u1" if kind == "update" else None,
        )
    ]
    assert len(messages) == ref.count
    stream = messages + rnd.sample(messages, k=min(3, len(messages)))
    rnd.shuffle(stream)
    assembler = BlobAssembler(ref)
    fresh = 0
    for message in stream:
        chunk = decode_chunk(message)
        assert chunk.header.blob == ref
        assert chunk.header.kind == kind
        assert chunk.header.sender == "dev-7"
        assert chunk.header.round == 3
        fresh += assembler.add(chunk.header.index, chunk.payload)
    assert fresh == ref.count
    assert assembler.complete
    assert bytes(assembler.finish()) == data


def test_empty_blob_is_one_empty_chunk() -> None:
    ref = blob_ref(b"")
    assert ref.count == 1
    assert [bytes(c) for c in split_blob(b"", ref)] == [b""]
    assembler = BlobAssembler(ref)
    assembler.add(0, b"")
    assert assembler.finish() == b""


def test_sha_mismatch_is_rejected_and_chunks_can_be_refetched() -> None:
    data = bytes(range(256)) * 20
    ref = blob_ref(data, 1024)
    assembler = BlobAssembler(ref)
    chunks = list(split_blob(data, ref))
    for index, chunk in enumerate(chunks):
        payload = bytes(chunk)
        if index == 2:
            payload = b"\xff" + payload[1:]  # corrupted before its crc was computed
        assembler.add(index, payload)
    with pytest.raises(IntegrityError, match="sha256"):
        assembler.finish()
    assert assembler.missing() == list(range(ref.count))
    for index, chunk in enumerate(chunks):
        assembler.add(index, chunk)
    assert assembler.finish() == data


def test_crc_catches_a_flipped_payload_byte() -> None:
    ref = blob_ref(b"x" * 5000, 1024)
    header = ChunkHeader("blob", "fed", "agg", 0, ref, 1)
    message = bytearray(encode_chunk(header, b"x" * 1024))
    message[-10] ^= 0x01
    with pytest.raises(IntegrityError, match="crc32"):
        decode_chunk(bytes(message))


def test_every_truncated_prefix_of_a_chunk_raises_truncated() -> None:
    ref = blob_ref(b"abc" * 1000, 1024)
    header = ChunkHeader("update", "fed", "dev-1", 5, ref, 2, update_id="up-1")
    message = encode_chunk(header, (b"abc" * 1000)[2048:])
    decoded = decode_chunk(message)
    assert decoded.header == header
    for cut in range(len(message)):
        with pytest.raises(TruncatedMessageError):
            decode_chunk(message[:cut])


def test_wrong_chunk_length_and_index() -> None:
    ref = blob_ref(b"z" * 3000, 1024)
    with pytest.raises(LocalProtocolError):
        encode_chunk(ChunkHeader("blob", "fed", "agg", 0, ref, 0), b"z" * 10)
    with pytest.raises(LocalProtocolError):
        encode_chunk(ChunkHeader("blob", "fed", "agg", 0, ref, 3), b"")
    with pytest.raises(LocalProtocolError):
        encode_chunk(ChunkHeader("update", "fed", "agg", 0, ref, 0), b"z" * 1024)
    assembler = BlobAssembler(ref)
    with pytest.raises(MalformedMessageError):
        assembler.add(2, b"z" * 1024)  # the last chunk holds 952 bytes
    with pytest.raises(MalformedMessageError):
        assembler.add(7, b"")


SHA = bytes(32)


def _fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "fed": "fed",
        "sender": "dev",
        "round": 1,
        "sha": SHA,
        "size": 4,
        "csz": 1024,
        "idx": 0,
        "n": 1,
        "crc": 0xD87F7E0C,  # crc32(b"test")
        "uid": "u1",
    }
    fields.update(overrides)
    return fields


def _chunk(kind: str = "update_chunk", body: bytes = b"test", **overrides: Any) -> bytes:
    return encode_frame(kind, _fields(**overrides), body)


MALFORMED: list[tuple[str, bytes, type[Exception]]] = [
    ("valid-control", _chunk(), type(None)),
    ("not-msgpack", b"FMQ\x01\x00\x00\x00\x02\xc1\xc1", MalformedMessageError),
    ("wrong-magic", b"MQTT" + bytes(20), UnsupportedVersionError),
    ("wrong-version", b"FMQ\x02" + bytes(20), UnsupportedVersionError),
    ("wrong-kind", _chunk(kind="tensors"), MalformedMessageError),
    ("bad-federation", _chunk(fed="a/b"), MalformedMessageError),
    ("wildcard-sender", _chunk(sender="+"), MalformedMessageError),
    ("negative-round", _chunk(round=-1), MalformedMessageError),
    ("round-as-string", _chunk(round="1"), MalformedMessageError),
    ("round-as-bool", _chunk(round=True), MalformedMessageError),
    ("short-sha", _chunk(sha=b"\0" * 31), MalformedMessageError),
    ("blob-over-limits", _chunk(size=1 << 40, n=(1 << 40) // 1024), LimitExceededError),
    ("chunk-count-lies", _chunk(n=2), MalformedMessageError),
    ("index-out-of-range", _chunk(idx=1), MalformedMessageError),
    ("length-disagrees", _chunk(size=5), MalformedMessageError),
    ("bad-crc", _chunk(crc=1), IntegrityError),
    ("missing-update-id", _chunk(uid=None), MalformedMessageError),
    ("zero-chunk-size", _chunk(csz=0), MalformedMessageError),
    ("trailing-bytes", _chunk() + b"!", MalformedMessageError),
    ("header-not-map", b"FMQ\x01\x00\x00\x00\x01\x01", MalformedMessageError),
]


@pytest.mark.parametrize(
    ("data", "error"), [(d, e) for _, d, e in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_malformed_chunks_raise_specific_errors(data: bytes, error: type[Exception]) -> None:
    if error is type(None):
        assert decode_chunk(data).header.update_id == "u1"
        return
    with pytest.raises(error):
        decode_chunk(data)


def test_oversized_message_rejected_before_parsing() -> None:
    message = _chunk()
    with pytest.raises(LimitExceededError, match="message size"):
        decode_chunk(message, DecodeLimits(max_message_bytes=len(message) - 1))


def test_assembler_checks_limits_before_allocating() -> None:
    with pytest.raises(LimitExceededError):
        BlobAssembler(BlobRef("0" * 64, 10 * 1024**3, 256 * 1024))
    with pytest.raises(LimitExceededError, match="chunk count"):
        BlobAssembler(BlobRef("0" * 64, 10_000, 1), DecodeLimits(max_chunks=100))


def test_frame_prefix_size_is_stable() -> None:
    # The prefix layout is part of the wire format; changing it breaks deployed agents.
    message = encode_frame("x", {})
    assert message[:4] == b"FMQ\x01"
    (length,) = struct.unpack(">I", message[4:PREFIX_SIZE])
    assert msgpack.unpackb(message[PREFIX_SIZE : PREFIX_SIZE + length]) == {
        "kind": "x",
        "body_len": 0,
    }
