"""Installing the global model for local inference: ``[install]`` of agent.toml.

The aggregator releases a standalone ONNX inference model per checkpoint (what ``fedmq
export`` writes) and names two of them in every announcement, ``models.latest`` and
``models.best`` (:class:`~fedmq.wire.control.ModelReleases`).  A device cannot build such
a model itself (that needs the server's ``onnx`` package), so it installs the announced
blob as it is:

1. **Select** (:func:`select_release`): ``latest``, ``best``, or ``pinned`` (the release,
   latest or best, whose checkpoint is ``install.checkpoint``).  Only announcements the
   agent believes are offered: with ``[security]`` they are signed by a pinned key and
   fresh (:mod:`edge_agent.trust`), so a forged announcement installs nothing, and the
   blob it names is verified by its sha256 after download.
2. **Download** through the blob cache and receiver the rounds use (resumable, sha256
   verified), in the ``install`` task: training and uploads go on meanwhile.
3. **Install** in a worker thread (:func:`install_model`, then :func:`write_metadata`):
   the model is written to a temporary file in the target's directory, fsync'd, renamed
   over ``install.path`` and the directory fsync'd; then the metadata
   (``<path>.json``: federation, checkpoint, release, sha256, size, metrics,
   installed_at) the same way.  The model goes first, so the metadata never names a
   model that is not in place yet; for the moment between the two renames it still
   describes the previous model.  A reader that must pair them exactly compares the
   sha256 of the bytes it loaded with the metadata's ``sha256`` and reads again on a
   mismatch; one that acts on the hook (step 4) finds both in place.
4. **Hooks**: ``hook_command`` (an argv, run with ``FEDMQ_MODEL_*`` variables, killed
   after ``hook_timeout_s``) and ``hook_topic`` (the metadata as a retained message on a
   *local* broker, ``hook_broker``), after every install.  A failing hook is logged;
   the model stays installed.

The same sha256 is never installed twice: the installed file's sha256 (hashed at start,
so it survives restarts) is compared with the release's; a release of the same model
with other metadata (a later checkpoint number, new metrics) rewrites the metadata only.
A write that fails (a full disk, a quota, a file size limit) leaves the old model and
its metadata as they were, is logged and shown in the status's ``last_error``, and is
retried with a back-off; the agent goes on training.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent.config import InstallConfig
from fedmq.backoff import Backoff
from fedmq.buffers import Buffer
from fedmq.durable_files import temp_path, write_file
from fedmq.errors import DecodeError, IntegrityError, TransportError
from fedmq.timeouts import within
from fedmq.transport.message import Message
from fedmq.transport.mqtt import MqttSession
from fedmq.wire.blobs import BlobRef
from fedmq.wire.control import ModelRelease, ModelReleases, RoundAnnouncement

log = logging.getLogger(__name__)

Release = Literal["latest", "best"]
Fetch = Callable[[BlobRef], Awaitable[Buffer]]
"""Downloads a blob (verified by its sha256); raises on failure."""

METADATA_SUFFIX = ".json"
INSTALL_RETRY = 30.0  # seconds: first wait after a failed install (jittered, doubling)
INSTALL_RETRY_MAX = 600.0  # seconds: the longest wait between attempts
HOOK_OUTPUT_CHARS = 500  # of a failed hook command's output, in the log
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class InstallError(Exception):
    """A model could not be installed; the installed one (if any) is unchanged."""


class InstalledModel(BaseModel):
    """The metadata beside the installed model, ``<path>.json``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    federation: str
    aggregator: str
    checkpoint: int = Field(ge=0, description="the round after which the model was saved")
    release: Release = Field(description="the announcement's release it was installed from")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)
    installed_at: float = Field(description="unix time the model file was put in place")

    def describes_same(self, other: InstalledModel) -> bool:
        """Equal but for ``installed_at``."""
        return self.model_dump(exclude={"installed_at"}) == other.model_dump(
            exclude={"installed_at"}
        )


def metadata_path(path: Path) -> Path:
    """Where the metadata of the model installed at ``path`` lives: ``<path>.json``."""
    return path.with_name(path.name + METADATA_SUFFIX)


def select_release(
    models: ModelReleases | None, config: InstallConfig
) -> tuple[Release, ModelRelease] | None:
    """The release ``config`` asks for among an announcement's ``models`` (None: none fits)."""
    if models is None:
        return None
    releases: list[tuple[Release, ModelRelease | None]] = [
        ("latest", models.latest),
        ("best", models.best),
    ]
    for name, release in releases:
        if release is None:
            continue
        if config.select == name or (
            config.select == "pinned" and release.checkpoint == config.checkpoint
        ):
            return name, release
    return None


# ---------------------------------------------------------------------------- files


def _replace(path: Path, data: Buffer, what: str) -> None:
    """Atomically replace ``path`` by ``data`` (temporary, fsync, rename, directory fsync)."""
    try:
        write_file(path, data)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp_path(path).unlink(missing_ok=True)  # the partial temporary, e.g. on ENOSPC
        directory = path.parent
        if exc.errno in _DISK_FULL:
            try:
                free = f"{shutil.disk_usage(directory).free / 2**20:.1f} MB free"
            except OSError:
                free = "free space unknown"
            problem = (
                f"disk full in {directory}: the {what} needs {len(memoryview(data)) / 2**20:.1f}"
                f" MB, {free}"
            )
        elif not directory.is_dir():
            problem = f"the install directory {directory} does not exist"
        else:
            problem = f"cannot write {path}: {exc.strerror or exc}"
        raise InstallError(problem) from exc


def install_model(path: Path, data: Buffer) -> None:
    """Put ``data`` in place at ``path`` atomically (a reader sees the old or the new file).

    Raises:
        InstallError: it could not be written; ``path`` is unchanged.
    """
    _replace(path, data, "model")


def write_metadata(path: Path, metadata: InstalledModel) -> None:
    """Atomically replace ``<path>.json`` (write it after the model it describes).

    Raises:
        InstallError: it could not be written; the old metadata is unchanged.
    """
    text = json.dumps(metadata.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    _replace(metadata_path(path), text.encode(), "metadata")


def read_installed(path: Path) -> tuple[str | None, InstalledModel | None]:
    """The sha256 of the file at ``path`` and its metadata (None where missing or unreadable).

    Also deletes the temporaries an interrupted install left beside them.
    """
    for leftover in (temp_path(path), temp_path(metadata_path(path))):
        with contextlib.suppress(OSError):
            leftover.unlink(missing_ok=True)
    digest: str | None = None
    try:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot read the installed model %s: %s", path, exc)
    metadata: InstalledModel | None = None
    try:
        metadata = InstalledModel.model_validate_json(metadata_path(path).read_bytes())
    except FileNotFoundError:
        pass
    except (OSError, ValidationError) as exc:
        log.warning("ignoring unreadable model metadata %s: %s", metadata_path(path), exc)
    return digest, metadata


# ---------------------------------------------------------------------------- hooks


def hook_environment(path: Path, metadata: InstalledModel) -> dict[str, str]:
    """The hook command's environment: the agent's, minus its settings, plus the model's.

    ``FEDMQ_AGENT_*`` variables are left out: they may hold the broker password.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_AGENT_")}
    env.update(
        FEDMQ_MODEL_PATH=str(path),
        FEDMQ_MODEL_METADATA=str(metadata_path(path)),
        FEDMQ_MODEL_SHA256=metadata.sha256,
        FEDMQ_MODEL_CHECKPOINT=str(metadata.checkpoint),
        FEDMQ_MODEL_RELEASE=metadata.release,
        FEDMQ_FEDERATION=metadata.federation,
    )
    return env


async def run_hook_command(argv: list[str], env: Mapping[str, str], timeout: float) -> bool:
    """Run the hook command; False (logged) when it cannot start, fails or times out."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
        )
    except OSError as exc:
        log.error("install hook %s cannot start: %s", argv[0], exc)
        return False
    try:
        output, _ = await within(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        log.error("install hook %s did not finish within %g s; killed it", argv[0], timeout)
        return False
    except asyncio.CancelledError:
        process.kill()  # the agent is stopping
        raise
    if process.returncode != 0:
        tail = output.decode(errors="replace")[-HOOK_OUTPUT_CHARS:].strip()
        log.error("install hook %s exited with %s: %s", argv[0], process.returncode, tail)
        return False
    return True


async def _ignore(_message: Message) -> None:
    return None


async def publish_hook_message(
    config: InstallConfig, client_id: str, payload: bytes, timeout: float
) -> bool:
    """Publish ``payload`` retained on ``hook_topic`` of the local ``hook_broker``.

    One short connection per install, as ``<client id>.install``: the federation's
    broker and its ACL are not involved.  False (logged) when it is not delivered.
    """
    assert config.hook_topic is not None
    settings = config.hook_broker.session_settings(f"{client_id[:55]}.install")
    # A clean session: nothing is subscribed, and the broker keeps nothing for us.
    session = MqttSession(dataclasses.replace(settings, persistent_session=False))
    task = asyncio.create_task(session.run(_ignore), name=f"fedmq[{client_id}].install-hook")
    try:
        await session.publish(config.hook_topic, payload, qos=1, retain=True, timeout=timeout)
        return True
    except TransportError as exc:
        log.error(
            "install hook: no message on %s at %s: %s",
            config.hook_topic,
            config.hook_broker.url,
            exc,
        )
        return False
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class _Wanted:
    aggregator: str
    release: Release
    model: ModelRelease


class ModelInstaller:
    """The ``install`` job: keeps ``install.path`` holding the selected released model.

    Args:
        config: the ``[install]`` table.
        federation: this agent's federation (announcements of others are ignored).
        client_id: this agent's id (the hook broker connection's name).
        fetch: downloads a blob, verified by its sha256.
        on_error: shows a problem in the status (``last_error``).
        clock: unix time.
        keep: blobs being downloaded here are added to this set while they are (the
            round runner keeps their partial downloads when it cleans the cache).
    """

    def __init__(
        self,
        config: InstallConfig,
        federation: str,
        client_id: str,
        fetch: Fetch,
        *,
        on_error: Callable[[str], None] = lambda message: None,
        clock: Callable[[], float],
        keep: set[str] | None = None,
    ) -> None:
        self.config = config
        self.path = config.path
        self._federation = federation
        self._client = client_id
        self._fetch = fetch
        self._on_error = on_error
        self._clock = clock
        self._keep = keep if keep is not None else set()
        self._wanted: _Wanted | None = None
        self._wakeup = asyncio.Event()
        self._loaded = asyncio.Event()
        self._backoff = Backoff(INSTALL_RETRY, INSTALL_RETRY_MAX)
        self._retry: asyncio.TimerHandle | None = None
        self.file_sha256: str | None = None  # what the file at path holds
        self.metadata: InstalledModel | None = None  # what <path>.json says
        self.installs = 0  # models put in place by this process
        self.failures = 0  # failed attempts

    @property
    def installed(self) -> InstalledModel | None:
        """The installed model's metadata, when file and metadata agree."""
        meta = self.metadata
        return meta if meta is not None and meta.sha256 == self.file_sha256 else None

    def offer(self, announcement: RoundAnnouncement) -> None:
        """Note a (verified) announcement; install what it names if it is wanted."""
        if announcement.federation != self._federation:
            return
        choice = select_release(announcement.models, self.config)
        if choice is None:
            if self.config.select != "latest" or announcement.models is not None:
                log.debug(
                    "round %d announcement names no %s model to install",
                    announcement.round,
                    self.config.select,
                )
            return
        release, model = choice
        self._wanted = _Wanted(announcement.aggregator, release, model)
        self._wakeup.set()

    async def wait_loaded(self) -> None:
        """Wait until the installed model's state was read at start."""
        await self._loaded.wait()

    async def run(self) -> None:
        """The ``install`` task: read what is installed, then follow the announcements."""
        self.file_sha256, self.metadata = await asyncio.to_thread(read_installed, self.path)
        if self.installed is not None:
            log.info(
                "installed model: checkpoint %d (%s, sha256 %s…) at %s",
                self.installed.checkpoint,
                self.installed.release,
                self.installed.sha256[:12],
                self.path,
            )
        self._loaded.set()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                wanted = self._wanted
                if wanted is None:
                    continue
                try:
                    await self._satisfy(wanted)
                except InstallError as exc:
                    self._failed(wanted, str(exc))
                else:
                    self._backoff.reset()
        finally:
            if self._retry is not None:
                self._retry.cancel()

    # -- one install ------------------------------------------------------------------

    def _metadata(self, wanted: _Wanted, installed_at: float) -> InstalledModel:
        model = wanted.model
        return InstalledModel(
            federation=self._federation,
            aggregator=wanted.aggregator,
            checkpoint=model.checkpoint,
            release=wanted.release,
            sha256=model.model.sha256,
            size=model.model.size,
            metrics=dict(model.metrics),
            installed_at=installed_at,
        )

    async def _satisfy(self, wanted: _Wanted) -> None:
        ref = wanted.model.model
        current = self.metadata
        if ref.sha256 == self.file_sha256:
            # The model is in place already: at most its metadata is behind.
            since = current.installed_at if current and current.sha256 == ref.sha256 else None
            metadata = self._metadata(wanted, since if since is not None else self._clock())
            if current is not None and current.describes_same(metadata):
                return
            await asyncio.to_thread(write_metadata, self.path, metadata)
            self.metadata = metadata
            if since is None:  # an install interrupted before its metadata: finish it
                log.info("completed the install of checkpoint %d", metadata.checkpoint)
                self.installs += 1
                await self._hooks(metadata)
            else:
                log.info("model metadata updated: checkpoint %d", metadata.checkpoint)
            return
        data = await self._download(ref)
        await asyncio.to_thread(install_model, self.path, data)
        self.file_sha256 = ref.sha256
        metadata = self._metadata(wanted, self._clock())
        await asyncio.to_thread(write_metadata, self.path, metadata)
        self.metadata = metadata
        self.installs += 1
        log.info(
            "installed the %s model, checkpoint %d (sha256 %s…, %d bytes) at %s",
            wanted.release,
            metadata.checkpoint,
            ref.sha256[:12],
            ref.size,
            self.path,
        )
        await self._hooks(metadata)

    async def _download(self, ref: BlobRef) -> Buffer:
        self._keep.add(ref.sha256)
        try:
            return await self._fetch(ref)
        except (TransportError, IntegrityError, DecodeError, OSError) as exc:
            raise InstallError(f"cannot download model {ref.sha256[:12]}…: {exc}") from exc
        finally:
            self._keep.discard(ref.sha256)

    async def _hooks(self, metadata: InstalledModel) -> None:
        config = self.config
        if config.hook_command is not None:
            env = hook_environment(self.path, metadata)
            await run_hook_command(config.hook_command, env, config.hook_timeout_s)
        if config.hook_topic is not None:
            payload = json.dumps(metadata.model_dump(mode="json"), sort_keys=True).encode()
            await publish_hook_message(config, self._client, payload, config.hook_timeout_s)

    def _failed(self, wanted: _Wanted, problem: str) -> None:
        self.failures += 1
        delay = self._backoff.next_delay()
        message = (
            f"install of checkpoint {wanted.model.checkpoint} failed: {problem}; the "
            f"installed model is unchanged; retrying in {delay:.3g} s"
        )
        log.error("%s", message)
        self._on_error(f"install: {problem}")
        if self._retry is not None:
            self._retry.cancel()
        self._retry = asyncio.get_running_loop().call_later(delay, self._wakeup.set)
