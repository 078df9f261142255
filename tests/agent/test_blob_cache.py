"""The disk blob cache: resumable chunk stores, sha256 checks on write and on read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_agent.blob_cache import BlobCache, DiskChunkStore
from fedmq.errors import IntegrityError, LimitExceededError, MalformedMessageError
from fedmq.wire.blobs import BlobRef, blob_ref, split_blob
from fedmq.wire.limits import DEFAULT_LIMITS, DecodeLimits, KiB

DATA = os.urandom(10 * KiB + 123)
REF = blob_ref(DATA, 1 * KiB)


def chunks() -> list[bytes]:
    return [bytes(part) for part in split_blob(DATA, REF)]


def test_chunks_in_any_order_reassemble_and_land_in_the_cache(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 1 << 20)
    store = cache.store_factory(REF, DEFAULT_LIMITS)
    parts = chunks()
    for index in reversed(range(len(parts))):
        assert store.add(index, parts[index])
    assert not store.add(0, parts[0])  # duplicate
    assert store.complete
    assert bytes(store.finish()) == DATA
    assert not cache.partial_dir(REF.sha256).exists()
    cached = cache.get(REF)
    assert cached is not None
    assert bytes(cached) == DATA


def test_partial_download_resumes_in_a_new_process(tmp_path: Path) -> None:
    parts = chunks()
    first = BlobCache(tmp_path, 1 << 20).store_factory(REF, DEFAULT_LIMITS)
    for index in range(0, len(parts), 2):
        first.add(index, parts[index])
    # A torn chunk file and a temp file, as a power cut might leave them:
    partial = tmp_path / "partial" / REF.sha256
    (partial / "1").write_bytes(parts[1][:10])
    (partial / "3.tmp").write_bytes(parts[3])
    del first

    resumed = BlobCache(tmp_path, 1 << 20).store_factory(REF, DEFAULT_LIMITS)
    assert resumed.received == len(range(0, len(parts), 2))
    assert resumed.missing() == list(range(1, len(parts), 2))
    for index in resumed.missing():
        resumed.add(index, parts[index])
    assert bytes(resumed.finish()) == DATA


def test_wrong_content_fails_sha256_and_is_forgotten(tmp_path: Path) -> None:
    store = DiskChunkStore(BlobCache(tmp_path, 1 << 20), REF, DEFAULT_LIMITS)
    parts = chunks()
    parts[2] = bytes(len(parts[2]))  # right length, wrong bytes
    for index, part in enumerate(parts):
        store.add(index, part)
    with pytest.raises(IntegrityError):
        store.finish()
    assert store.received == 0
    assert list((tmp_path / "partial" / REF.sha256).iterdir()) == []


def test_wrong_length_and_missing_chunks_are_refused(tmp_path: Path) -> None:
    store = DiskChunkStore(BlobCache(tmp_path, 1 << 20), REF, DEFAULT_LIMITS)
    with pytest.raises(MalformedMessageError):
        store.add(0, b"short")
    with pytest.raises(MalformedMessageError):
        store.add(REF.count, b"")
    with pytest.raises(MalformedMessageError, match="missing"):
        store.finish()


def test_oversized_blob_is_refused_before_any_disk_use(tmp_path: Path) -> None:
    with pytest.raises(LimitExceededError):
        DiskChunkStore(BlobCache(tmp_path, 1 << 20), REF, DecodeLimits(max_blob_bytes=1024))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(DATA[:-1] + b"\0"), id="flipped-byte"),
        pytest.param(lambda p: p.write_bytes(DATA[:100]), id="truncated"),
    ],
)
def test_corrupted_cached_blob_is_deleted_and_reported_missing(tmp_path: Path, damage) -> None:  # type: ignore[no-untyped-def]
    cache = BlobCache(tmp_path, 1 << 20)
    cache.put_verified(REF, DATA)
    damage(cache.blob_path(REF.sha256))
    assert cache.get(REF) is None
    assert cache.corrupt_reads == 1
    assert not cache.blob_path(REF.sha256).exists()


def test_eviction_keeps_what_is_asked_for_and_removes_stale_partials(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, 3 * KiB)
    refs: list[BlobRef] = []
    for age in range(4):
        data = os.urandom(KiB)
        ref = blob_ref(data, KiB)
        cache.put_verified(ref, data)
        os.utime(cache.blob_path(ref.sha256), (1000 + age, 1000 + age))
        refs.append(ref)
    cache.store_factory(REF, DEFAULT_LIMITS).add(0, chunks()[0])
    removed = cache.evict(keep={refs[0].sha256})
    assert removed == [refs[1].sha256]  # the oldest not kept
    assert cache.get(refs[0]) is not None
    assert not cache.partial_dir(REF.sha256).exists()
