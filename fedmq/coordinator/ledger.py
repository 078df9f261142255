"""Which blobs are retained on the broker, which the announcement needs, and their bytes.

A blob is recorded here (and so in the snapshot) *before* it is published, and forgotten
only when its chunks are cleared, so a crash between the two never orphans retained
chunks: the next start clears whatever the ledger lists but no longer references.

Once the federation has finished, the ledger is retired (:meth:`~BlobLedger.retire`): the final
announcement (``finished``) still names the last bundle and parameters, but no agent
will download them again, so they are no longer referenced and are cleared, the bundle
included.  The released inference models (:mod:`~fedmq.coordinator.releases`) stay
referenced and retained: devices keep installing them after the federation is over.
The small retained announcement stays too, so a late agent still learns that the
federation is over and which models it released.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from fedmq.coordinator.actions import BuildInferenceModel, ClearBlob, PublishBlob
from fedmq.coordinator.releases import ModelShelf
from fedmq.errors import StateError
from fedmq.wire.blobs import BlobRef, blob_ref


def ref_json(ref: BlobRef) -> dict[str, Any]:
    """A blob reference as a JSON object."""
    return asdict(ref)


def ref_from(data: Mapping[str, Any]) -> BlobRef:
    """Parse :func:`ref_json` output."""
    return BlobRef(str(data["sha256"]), int(data["size"]), int(data["chunk_size"]))


class BlobLedger:
    """The bundle archive, the current parameter blob, and every blob still retained.

    Args:
        bundle: the bundle archive (published once, cleared when the federation finished).
        params: the current global parameters as a tensor-set blob.
        chunk_size: bytes per chunk of both.
    """

    def __init__(self, bundle: bytes, params: bytes, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._bundle = bundle
        self.bundle_ref = blob_ref(bundle, chunk_size)
        self._params = params
        self.params_ref = blob_ref(params, chunk_size)
        self._retained: dict[str, BlobRef] = {self.bundle_ref.sha256: self.bundle_ref}
        self._published: set[str] = set()
        self.retired = False  # the federation finished: no blob is needed any more
        self.models = ModelShelf(chunk_size)  # released inference models (kept when retired)

    def retire(self) -> None:
        """The federation finished: reference only the released models from now on."""
        self.retired = True

    @property
    def params_blob(self) -> bytes:
        """The current parameter blob."""
        return self._params

    def set_params(self, params: bytes) -> BlobRef:
        """Make ``params`` the current parameter blob (not published yet)."""
        self._params = params
        self.params_ref = blob_ref(params, self.chunk_size)
        return self.params_ref

    def rechunk(self, chunk_size: int) -> None:
        """Chunk the bundle and parameters anew (to fit the broker's packet cap).

        The next :meth:`publish` clears the chunks of the old layout first.
        """
        self.chunk_size = chunk_size
        self.bundle_ref = BlobRef(self.bundle_ref.sha256, self.bundle_ref.size, chunk_size)
        self.params_ref = BlobRef(self.params_ref.sha256, self.params_ref.size, chunk_size)
        self.models.rechunk(chunk_size)
        self._published.clear()

    def referenced(self) -> list[BlobRef]:
        """Blobs agents may still download (once retired: the released models only)."""
        if self.retired:
            return self.models.refs()
        return [self.bundle_ref, self.params_ref, *self.models.refs()]

    def data(self, ref: BlobRef) -> bytes:
        """Bytes of the bundle or the current parameters (held even once retired).

        Raises:
            StateError: ``ref`` is not a blob this ledger holds.
        """
        if ref.sha256 == self.bundle_ref.sha256:
            return self._bundle
        if ref.sha256 == self.params_ref.sha256:
            return self._params
        model = self.models.data(ref.sha256)
        if model is not None:
            return model
        raise StateError(f"blob {ref.sha256[:12]} is not held")

    def request_model(self, checkpoint: int) -> list[BuildInferenceModel]:
        """The build the current parameters, saved as ``checkpoint``, need for release."""
        if not self.models.request(checkpoint, self.params_ref.sha256):
            return []
        return [BuildInferenceModel(checkpoint, self._bundle, self._params)]

    def record_referenced(self) -> None:
        """Note that the referenced blobs are (about to be) retained on the broker."""
        for ref in self.referenced():
            self._retained.setdefault(ref.sha256, ref)

    def publish(self, round_id: int, *, again: bool = False) -> list[PublishBlob | ClearBlob]:
        """Publish the referenced blobs not yet published (every one when ``again``).

        A blob retained under another chunk size (a restart with a new ``chunk_size``, or
        :meth:`rechunk`) has the old chunks beyond the new count cleared, so none is
        left behind.
        """
        actions: list[PublishBlob | ClearBlob] = []
        for ref in self.referenced():
            if again or ref.sha256 not in self._published:
                old = self._retained.get(ref.sha256)
                if old is not None and old != ref and old.count > ref.count:
                    # The new chunks overwrite the old ones' topics; clear the rest.
                    actions.append(ClearBlob(old, first=ref.count))
                self._retained[ref.sha256] = ref
                self._published.add(ref.sha256)
                actions.append(PublishBlob(ref, self.data(ref), round_id))
        return actions

    def clear_stale(self) -> list[ClearBlob]:
        """Clear every retained blob the announcement no longer references."""
        referenced = {ref.sha256 for ref in self.referenced()}
        stale = [ref for sha, ref in self._retained.items() if sha not in referenced]
        for ref in stale:
            del self._retained[ref.sha256]
            self._published.discard(ref.sha256)
        return [ClearBlob(ref) for ref in stale]

    def retained(self) -> list[BlobRef]:
        """The retained blobs, for the snapshot."""
        return list(self._retained.values())

    def load_retained(self, refs: Iterable[BlobRef]) -> None:
        """Restore :meth:`retained` (call :meth:`retire` first for a finished federation)."""
        self._retained = {ref.sha256: ref for ref in refs}
        if not self.retired:
            self._retained.setdefault(self.bundle_ref.sha256, self.bundle_ref)
