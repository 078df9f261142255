"""A full disk fails the round at once with a clear message; the agent lives on.

No tmpfs can be mounted unprivileged, so the failure is injected where the blob cache
meets the file system (:class:`edge_agent.blob_cache.CacheDisk`): everything above it
(the chunk store, the blob receiver, the round runner, the status) is the real code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.helpers import AGENT_READY_TIMEOUT, AGENT_STOP_TIMEOUT, eventually
from agent.scripted import ScriptedAggregator
from edge_agent.blob_cache import BlobCache, CacheDisk, DiskFullError
from edge_agent.config import AgentSettings
from edge_agent.daemon import Agent
from edge_agent.systemd import Notifier
from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.buffers import Buffer
from fedmq.timeouts import within
from fedmq.wire.blobs import blob_ref, split_blob
from fedmq.wire.limits import DEFAULT_LIMITS

DOWNLOAD_TIMEOUT = 600.0  # seconds: the failure must come long before this
FAST = 30.0  # seconds: "at once", with room for a busy CI machine


class FillingDisk(CacheDisk):
    """A disk that fills up after ``room`` writes (``ENOSPC``), or reports ``free`` bytes."""

    def __init__(self, room: int | None = None, free: int | None = None) -> None:
        self.room = room
        self.free = free
        self.refused = 0

    def write(self, path: Path, data: Buffer) -> None:
        if self.room is not None:
            if self.room <= 0:
                self.refused += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            self.room -= 1
        super().write(path, data)

    def free_bytes(self, directory: Path) -> int:
        return super().free_bytes(directory) if self.free is None else self.free

    def empty(self) -> None:
        """Someone freed the disk."""
        self.room = None
        self.free = None


@contextlib.asynccontextmanager
async def agent_on(settings: AgentSettings, disk: CacheDisk) -> AsyncIterator[Agent]:
    agent = Agent(settings, notifier=Notifier({}), cache_disk=disk)
    task = asyncio.create_task(agent.run())
    try:
        await within(agent.wait_ready(), AGENT_READY_TIMEOUT)
        yield agent
    finally:
        agent.request_stop()
        await within(task, AGENT_STOP_TIMEOUT)


# ---------------------------------------------------------------- the cache alone


def test_a_download_that_cannot_fit_is_refused_before_writing(tmp_path: Path) -> None:
    data = bytes(range(256)) * 64
    ref = blob_ref(data, 1024)
    cache = BlobCache(tmp_path / "cache", 1 << 30, reserve_bytes=1 << 60)  # real statvfs
    with pytest.raises(DiskFullError) as raised:
        cache.store_factory(ref, DEFAULT_LIMITS)
    message = str(raised.value)
    assert message.startswith(f"disk full in {tmp_path / 'cache'}: need 0.0 MB")
    assert "limits.min_free_mb), " in message
    assert message.endswith(" MB free")
    assert raised.value.errno == errno.ENOSPC
    assert list(cache.partial_dir(ref.sha256).iterdir()) == []


def test_enospc_while_writing_a_chunk_becomes_disk_full(tmp_path: Path) -> None:
    data = bytes(range(256)) * 16
    ref = blob_ref(data, 1024)
    disk = FillingDisk(room=1)
    cache = BlobCache(tmp_path / "cache", 1 << 30, disk=disk)
    store = cache.store_factory(ref, DEFAULT_LIMITS)
    chunks = list(split_blob(data, ref))
    assert store.add(0, chunks[0])
    with pytest.raises(DiskFullError, match=r"disk full in .*cache: need 0\.0 MB, .* MB free"):
        store.add(1, chunks[1])
    assert disk.refused == 1
    # No half-written temporary is left; the chunk already on disk stays for the retry.
    assert sorted(p.name for p in cache.partial_dir(ref.sha256).iterdir()) == ["0"]
    disk.empty()
    resumed = cache.store_factory(ref, DEFAULT_LIMITS)
    for index in resumed.missing():
        resumed.add(index, chunks[index])
    assert resumed.finish() == data


def test_other_write_errors_are_not_called_disk_full(tmp_path: Path) -> None:
    class BrokenDisk(CacheDisk):
        def write(self, path: Path, data: Buffer) -> None:
            raise OSError(errno.EIO, "Input/output error", str(path))

    ref = blob_ref(bytes(2048), 1024)
    store = BlobCache(tmp_path, 1 << 30, disk=BrokenDisk()).store_factory(ref, DEFAULT_LIMITS)
    with pytest.raises(OSError, match="Input/output error") as raised:
        store.add(0, bytes(1024))
    assert not isinstance(raised.value, DiskFullError)


# ---------------------------------------------------------------- the agent


async def _wait_disk_full(aggregator: ScriptedAggregator, round_id: int) -> str:
    status = await aggregator.wait_status(
        lambda s: s.last_error is not None and s.last_error.startswith(f"round {round_id}: disk"),
        timeout=FAST,
    )
    assert status.last_error is not None
    return status.last_error


@pytest.mark.broker
@pytest.mark.slow
async def test_disk_full_mid_download_fails_the_round_at_once_and_the_agent_goes_on(
    broker: MosquittoBroker, federation: str, make_settings: Callable[..., AgentSettings]
) -> None:
    settings = make_settings(broker.url, limits={"download_timeout_s": DOWNLOAD_TIMEOUT})
    disk = FillingDisk(room=3)  # three chunks of the bundle fit, then ENOSPC
    aggregator = ScriptedAggregator(broker.url, federation)
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model(chunk_size=4096)
        assert bundle.count > 3
        async with agent_on(settings, disk) as agent:
            started = time.monotonic()
            await aggregator.announce(1, bundle, params)
            error = await _wait_disk_full(aggregator, 1)
            assert time.monotonic() - started < FAST < DOWNLOAD_TIMEOUT
            cache = Path(settings.state_dir, "cache")
            assert error.startswith(f"round 1: disk full in {cache}: need ")
            assert error.endswith(" MB free")
            assert agent.statistics().rounds_failed >= 1
            # Running on; the round it could not download is declined: the aggregator
            # does not wait for it.
            assert agent.statistics().state in ("declined", "idle", "downloading")
            assert agent.status.declined in ("disk_full", None)

            disk.empty()  # the operator made room: the next round trains
            await aggregator.announce(2, bundle, params)
            await eventually(
                lambda: any(u.meta.round == 2 for u in aggregator.updates.values()),
                timeout=60,
                what="the update of round 2",
            )
        assert disk.refused >= 1


@pytest.mark.broker
@pytest.mark.slow
async def test_too_little_free_space_fails_before_any_chunk_is_written(
    broker: MosquittoBroker, federation: str, make_settings: Callable[..., AgentSettings]
) -> None:
    settings = make_settings(broker.url, limits={"download_timeout_s": DOWNLOAD_TIMEOUT})
    disk = FillingDisk(free=1 << 20)  # 1 MiB free, below the 32 MiB reserve alone
    aggregator = ScriptedAggregator(broker.url, federation)
    async with aggregator.running():
        bundle, params, _ = await aggregator.publish_model(chunk_size=4096)
        async with agent_on(settings, disk):
            await aggregator.announce(1, bundle, params)
            error = await _wait_disk_full(aggregator, 1)
            assert "(+32.0 MB reserve, limits.min_free_mb), 1.0 MB free" in error
            partial = Path(settings.state_dir, "cache", "partial")
            assert [p for p in partial.rglob("*") if p.is_file()] == []
