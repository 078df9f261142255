"""``initial``: a new federation starts from trained weights instead of the bundle's.

``initial`` in ``federation.toml`` names where the round-0 model of a *new* state
directory comes from:

* an ONNX model written by ``fedmq export`` (``.onnx``): its initializers, read by name;
  for a bundle compiled from an ONNX file (``manifest.source``) under the file's
  original names and layouts, mapped back exactly as the export mapped them
  (:meth:`~fedmq.bundle.source.SourceInitializer.to_state`).  State tensors the
  inference graph does not read (``num_batches_tracked``), which no export holds, come
  from the bundle;
* a tensor-set file: a checkpoint of a state directory (``checkpoints/<round>.params``);
* a state directory: its latest checkpoint, or ``<dir>@<round>`` for that round's.

Whatever it holds is checked against the bundle's manifest (every parameter and buffer,
nothing else, the manifest's shapes and dtypes, finite values) before anything starts;
a mismatch is a :class:`~fedmq.errors.ConfigError` listing the first problems.  Only
the parameters and buffers are taken: round numbers, the server optimizer's state and
the norm screen's history start anew.

The source is read only when the state directory is new (:class:`InitialModel` is
called by :func:`~fedmq.aggregator.recovery.load_coordinator` for a new directory
only); the new directory records it in ``origin.json``.  On an existing directory
``initial`` is not read: a restart goes on from the directory's own checkpoint, and a
different ``initial`` than the one it started from is logged as a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedmq.aggregator.store import StateStore, checkpoint_file, checkpoint_rounds
from fedmq.bundle import Bundle, Manifest
from fedmq.errors import ConfigError, DecodeError
from fedmq.wire.tensors import decode_tensors

log = logging.getLogger(__name__)

Params = dict[str, npt.NDArray[Any]]
Kind = Literal["onnx", "tensors", "state_dir"]

MAX_PROBLEMS = 5  # problems listed in a mismatch error; the rest are counted
BUNDLE_ORIGIN = "the bundle's initial parameters"
_ROUND_SUFFIX = re.compile(r"(?P<path>.+)@(?P<round>\d+)")
_SOURCES = "an exported .onnx model, a checkpoint .params file, or a state directory[@round]"


@dataclass(frozen=True)
class InitialSource:
    """What ``initial`` names.

    Args:
        text: the configured value.
        path: the file or directory.
        kind: ``onnx`` (an export), ``tensors`` (a checkpoint file) or ``state_dir``.
        round: for a state directory, the checkpoint to take (None: the latest).
    """

    text: str
    path: Path
    kind: Kind
    round: int | None = None

    @classmethod
    def parse(cls, text: str) -> InitialSource:
        """Find what ``text`` names: an existing path, else ``<state dir>@<round>``.

        Raises:
            ConfigError: nothing exists there.
        """
        path = Path(text).expanduser()
        round_id = None
        if not path.exists():
            match = _ROUND_SUFFIX.fullmatch(text)
            if match is None or not Path(match["path"]).expanduser().is_dir():
                raise ConfigError(f"initial = {text!r} does not exist (it names {_SOURCES})")
            path, round_id = Path(match["path"]).expanduser(), int(match["round"])
        kind: Kind
        if path.is_dir():
            kind = "state_dir"
        elif path.suffix.lower() == ".onnx":
            kind = "onnx"
        else:
            kind = "tensors"
        return cls(text, path, kind, round_id)


def load_initial(text: str, bundle: Bundle) -> tuple[Params, str]:
    """The parameters and buffers ``initial = text`` names, checked against ``bundle``.

    Returns:
        Name to array in manifest order (exactly the stored values, writable copies),
        and a description of where they came from.

    Raises:
        ConfigError: the source is missing or unreadable, or does not fit the manifest
            (names, shapes, dtypes, non-finite values; the first few are listed).
    """
    source = InitialSource.parse(text)
    unexpected: list[str] = []
    if source.kind == "onnx":
        values, unexpected = _read_onnx(source, bundle)
        where = f"ONNX model {source.path}"
    elif source.kind == "tensors":
        values = _read_tensors(source, source.path)
        where = f"tensor set {source.path}"
    else:
        round_id, path = _pick_checkpoint(source)
        values = _read_tensors(source, path)
        where = f"round {round_id} of state directory {source.path}"
    params = check_initial(bundle.manifest, values, unexpected, f"initial = {text!r} ({where})")
    return params, where


def check_initial(
    manifest: Manifest,
    values: Mapping[str, npt.NDArray[Any]],
    unexpected: list[str],
    what: str,
) -> Params:
    """``values`` as the bundle's state, or a ConfigError listing why they are not.

    Args:
        manifest: the bundle's manifest.
        values: state tensor name to value.
        unexpected: names in the source that map to no state tensor (besides the
            names of ``values`` the manifest does not know).
        what: the source, for the message.

    Raises:
        ConfigError: a tensor is missing or extra, or has another shape or dtype than
            the manifest's, or holds NaN or Inf.
    """
    problems: list[str] = []
    for spec in manifest.tensors:
        value = values.get(spec.name)
        if value is None:
            problems.append(f"{spec.name}: missing")
            continue
        if tuple(value.shape) != spec.shape:
            problems.append(
                f"{spec.name}: shape {list(value.shape)}, the bundle's {list(spec.shape)}"
            )
        if value.dtype != np.dtype(spec.dtype):
            problems.append(f"{spec.name}: dtype {value.dtype}, the bundle's {spec.dtype}")
        elif value.dtype.kind == "f":
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            if bad:
                problems.append(f"{spec.name}: {bad} non-finite values (NaN or Inf)")
    known = set(manifest.tensor_names)
    extra = sorted({*unexpected, *(name for name in values if name not in known)})
    problems.extend(f"{name}: not in the bundle" for name in extra)
    if problems:
        listed = "\n".join(f"  {problem}" for problem in problems[:MAX_PROBLEMS])
        more = len(problems) - MAX_PROBLEMS
        tail = f"\n  … and {more} more" if more > 0 else ""
        raise ConfigError(
            f"{what} does not fit the bundle {manifest.name!r} "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n{listed}{tail}"
        )
    return {
        spec.name: np.array(values[spec.name], dtype=np.dtype(spec.dtype), order="C")
        for spec in manifest.tensors
    }


class InitialModel:
    """The round-0 model of a new federation: ``initial``'s, or the bundle's own.

    Called (once) by :func:`~fedmq.aggregator.recovery.load_coordinator` for a new
    state directory only; :meth:`settle` then records or explains what happened.

    Args:
        initial: the ``initial`` setting (None: the bundle's initial parameters).
        bundle: the federation's bundle.
    """

    def __init__(self, initial: str | None, bundle: Bundle) -> None:
        self.initial = initial
        self.bundle = bundle
        self.origin: str | None = None  # set once read: where the model came from

    def __call__(self) -> Params:
        """Read the model (raises ConfigError like :func:`load_initial`)."""
        if self.initial is None:
            self.origin = BUNDLE_ORIGIN
            return self.bundle.initial_parameters()
        params, self.origin = load_initial(self.initial, self.bundle)
        log.info(
            "new federation: the round-0 model is %s (initial = %r), checked against bundle %r",
            self.origin,
            self.initial,
            self.bundle.manifest.name,
        )
        return params

    def settle(self, store: StateStore, round_id: int) -> None:
        """Record where a new federation started, or say why ``initial`` was not read.

        Args:
            store: the state directory.
            round_id: the round the loaded federation is at.
        """
        if self.origin is not None:
            store.save_origin({"initial": self.initial, "from": self.origin})
            return
        if self.initial is None:
            return
        origin = store.load_origin()
        if origin is not None and origin.get("initial") == self.initial:
            log.info(
                "initial = %r is not read again: this federation started from it (%s) and "
                "goes on from its own checkpoints",
                self.initial,
                origin.get("from"),
            )
            return
        started = origin.get("from") if origin is not None else None
        log.warning(
            "initial = %r is ignored: state directory %s already holds this federation "
            "(round %d, started from %s); initial seeds a new state directory only. To start "
            "from it, use a new state_dir (and federation id)",
            self.initial,
            store.root,
            round_id,
            started or "an unrecorded model",
        )


def _read_tensors(source: InitialSource, path: Path) -> Params:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"initial = {source.text!r}: cannot read {path}: {exc}") from exc
    try:
        return dict(decode_tensors(data))
    except DecodeError as exc:
        raise ConfigError(
            f"initial = {source.text!r}: {path} is not a fedmq tensor set "
            f"(a checkpoint .params file) nor named .onnx: {exc}"
        ) from exc


def _pick_checkpoint(source: InitialSource) -> tuple[int, Path]:
    rounds = checkpoint_rounds(source.path)
    if not rounds:
        raise ConfigError(
            f"initial = {source.text!r}: {source.path} holds no checkpoint "
            "(checkpoints/<round>.params): not a state directory an aggregator has run in"
        )
    chosen = rounds[-1] if source.round is None else source.round
    if chosen not in rounds:
        raise ConfigError(
            f"initial = {source.text!r}: {source.path} holds no checkpoint of round {chosen}, "
            f"only of rounds {_listing(rounds)} ([retention] pruned the others)"
        )
    return chosen, checkpoint_file(source.path, chosen)


def _read_onnx(source: InitialSource, bundle: Bundle) -> tuple[Params, list[str]]:
    """The state tensors an export holds, by state name; and its unmapped initializers."""
    try:
        # In the server extra, like `fedmq export`: imported only when it is needed.
        import onnx  # noqa: PLC0415
        from onnx import numpy_helper  # noqa: PLC0415

        from fedmq.aggregator.standalone import exported_tensors  # noqa: PLC0415
    except ImportError as exc:
        raise ConfigError(
            f"initial = {source.text!r} is an ONNX model; reading it needs the onnx package "
            "(pip install 'fedmq[server]')"
        ) from exc
    try:
        model = onnx.load(str(source.path))
        stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    except Exception as exc:  # protobuf's DecodeError, external data gone, ...
        raise ConfigError(
            f"initial = {source.text!r}: {source.path} is not a readable ONNX model: {exc}"
        ) from exc
    manifest = bundle.manifest
    layouts = {i.tensor: i for i in manifest.source.initializers} if manifest.source else {}
    read = exported_tensors(bundle)
    values: Params = {}
    filled: list[str] = []
    defaults: Params | None = None
    for name in manifest.tensor_names:
        layout = layouts.get(name)
        original = stored.pop(layout.name if layout is not None else name, None)
        if original is not None:
            values[name] = layout.to_state(original) if layout is not None else original
        elif name not in read:
            defaults = bundle.initial_parameters() if defaults is None else defaults
            values[name] = defaults[name]
            filled.append(name)
    if filled:
        log.info(
            "initial = %r: %s not in the export (the inference graph does not read them); "
            "taken from the bundle",
            source.text,
            filled[:MAX_PROBLEMS],
        )
    return values, sorted(stored)


def _listing(rounds: list[int]) -> str:
    if len(rounds) <= 8:
        return ", ".join(map(str, rounds))
    return f"{', '.join(map(str, rounds[:3]))}, …, {', '.join(map(str, rounds[-3:]))}"


__all__ = ["InitialModel", "InitialSource", "check_initial", "load_initial"]
