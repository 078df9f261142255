"""Rebuild the coordinator from the state directory, at every start of ``fedmq serve``.

A new directory gives a fresh coordinator.  Otherwise the last snapshot and the
checkpoint it names restore the coordinator as it was, and the updates stored for the
open round are verified again and replayed in acceptance order, so a round interrupted
by ``kill -9`` resumes with every accepted update counted once (their acks are sent
again: the crash may have come between storing and acking).

The configuration may have changed in between.  More ``rounds`` than a finished
federation ran continue it (logged, and committed to ``state.json`` before anything is
published); fewer than it ran, or than the round under way, and another bundle, are
configuration errors whose messages say what to do instead.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy.typing as npt

from fedmq.aggregator.store import StateStore
from fedmq.coordinator.actions import Action, SaveState
from fedmq.coordinator.coordinator import Coordinator
from fedmq.coordinator.policy import CoordinatorConfig
from fedmq.coordinator.snapshot import Snapshot
from fedmq.coordinator.validation import UpdateKey, UpdateRejection, UpdateSchema, verify_update
from fedmq.errors import ConfigError, DecodeError, StateError
from fedmq.strategies.strategy import Strategy
from fedmq.wire.update import decode_update_meta

log = logging.getLogger(__name__)


def load_coordinator(
    store: StateStore,
    config: CoordinatorConfig,
    strategy: Strategy,
    schema: UpdateSchema,
    archive: bytes,
    initial: Callable[[], Mapping[str, npt.NDArray[Any]]],
    now: float,
) -> tuple[Coordinator, list[Action]]:
    """The coordinator the state directory holds, and the actions its replay returned.

    Args:
        store: the opened (locked) state directory.
        config: the coordinator configuration.
        strategy: a fresh strategy object.
        schema: what a valid update looks like.
        archive: the bundle archive blob.
        initial: the round-0 model, the bundle's or ``initial``'s (called only for a
            new directory; :class:`~fedmq.aggregator.warm_start.InitialModel`).
        now: current unix time.

    Raises:
        ConfigError: the directory belongs to another federation, bundle or mode;
            ``rounds`` is below what it ran; ``initial`` does not fit the bundle.
        StateError: the snapshot, a checkpoint or a stored update is unusable.
    """
    snapshot = store.load_snapshot()
    if snapshot is None:
        log.info("new state directory %s", store.root)
        return Coordinator(config, strategy, schema, archive, initial(), now=now), []
    checkpoint = snapshot.get("checkpoint")
    if not isinstance(checkpoint, int):
        raise StateError(f"{store.root}/state.json names no checkpoint")
    _check_bundle(store, Snapshot.from_json(snapshot), config.federation, archive)
    params, optimizer = store.load_checkpoint(checkpoint)
    coordinator = Coordinator.restore(
        config, strategy, schema, archive, snapshot, params, optimizer, now=now
    )
    finished = coordinator.phase == "finished"
    replayed: list[Action] = []
    if snapshot.get("phase") == "finished" and not finished:
        log.info(
            "rounds raised to %d: federation %r continues from round %d to %d",
            config.rounds,
            config.federation,
            coordinator.round - 1,
            config.rounds,
        )
        replayed.append(SaveState(coordinator.snapshot()))  # the continue is committed
    elif finished and config.rounds > coordinator.round:
        log.info(
            "federation %r stays finished at round %d although rounds = %d: its last closed "
            "round's metrics reach [target_metric]; change or remove it to continue",
            config.federation,
            coordinator.round,
            config.rounds,
        )
    # Rounds before the open one live in checkpoints; a crash may have left their files.
    store.prune_updates(coordinator.round + 1 if finished else coordinator.round)
    stored = [] if finished else store.stored_updates(coordinator.round)
    for item in stored:
        data = item.path.read_bytes()
        try:
            meta, _ = decode_update_meta(data, schema.limits)
        except DecodeError as exc:
            raise StateError(f"stored update {item.path} is corrupt: {exc}") from exc
        result = verify_update(UpdateKey(meta.client, meta.round, meta.update_id), data, schema)
        if isinstance(result, UpdateRejection):
            raise StateError(f"stored update {item.path} no longer verifies: {result.detail}")
        replayed.extend(coordinator.replay(result, item.seq, now))
    log.info(
        "resumed round %d (%s) with %d stored updates",
        coordinator.round,
        coordinator.phase,
        len(stored),
    )
    return coordinator, replayed


def _check_bundle(store: StateStore, snap: Snapshot, federation: str, archive: bytes) -> None:
    """Refuse another bundle for an existing federation, saying how to start a new one.

    (A directory of another federation is refused by the restore, naming that first.)
    """
    digest = hashlib.sha256(archive).hexdigest()
    if snap.federation != federation or snap.bundle.sha256 == digest:
        return
    raise ConfigError(
        f"state directory {store.root} holds federation {federation!r} of another model "
        f"bundle (archive sha256 {snap.bundle.sha256[:12]}…, the configured bundle's "
        f"{digest[:12]}…): the bundle of a federation cannot change. To go on with this "
        "federation, configure its original bundle again. To train the new bundle from "
        "this federation's weights, start a new federation: a new federation id and a new "
        "state_dir, with\n"
        f'    initial = "{store.root}"\n'
        "in its federation.toml (the weights are checked against the new bundle's manifest)"
    )
