"""Local training data: a directory of ``.npz``/``.csv`` files or a Python entry point.

Layout of a data directory (docs/agent.md has the long form)::

    <path>/*.npz | *.csv     training examples, files read in name order and concatenated
    <path>/eval/*.npz|*.csv  optional evaluation split; without it ``eval_fraction`` of the
                             examples is held out with a seeded shuffle

* ``.npz``: arrays ``x`` (inputs, first axis = examples) and ``y`` (labels), names set by
  ``data.x_key`` / ``data.y_key``; ``y`` is not needed when ``data.target = "input"``.
* ``.csv``: UTF-8, one header row, comma-separated numbers (a quoted field may not span
  lines); ``data.label_column`` holds the label, every other column is an input feature
  in order (flattened row-major, then reshaped to the model's input shape).

Arrays are shaped and typed for the model by :func:`fit_to_model` using the bundle's
manifest, so a CSV of 64 pixel columns feeds both the digits MLP ``(64,)`` and the CNN
``(1, 8, 8)``.  Problems raise :class:`DataError` (a ``TrainingError``): the round fails
with a status message; the agent keeps running.
"""

from __future__ import annotations

import csv
import importlib
import io
import math
import re
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.config import DataConfig
from fedmq.bundle.manifest import Manifest
from fedmq.bundle.parameters import NPY_HEADER_LOCK
from fedmq.errors import ConfigError, DataError

EVAL_DIR = "eval"
MAX_CSV_COLUMNS = 1_000_000  # fields per row: far above any sensor record, bounds memory

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class RawData:
    """Examples as loaded, before fitting to a model (``y`` None: autoencoder target)."""

    x: Array
    y: Array | None


@dataclass(frozen=True)
class Dataset:
    """Training and evaluation arrays shaped and typed for one model."""

    x_train: Array
    y_train: Array
    x_eval: Array
    y_eval: Array

    @property
    def num_train(self) -> int:
        """Training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_eval(self) -> int:
        """Evaluation examples (0: no evaluation metrics are reported)."""
        return int(self.x_eval.shape[0])


def parse_csv(text: str, *, label_column: str | None, source: str = "<csv>") -> RawData:
    """Parse the CSV layout: a header row, then rows of finite numbers.

    The header is read with :mod:`csv` (names may be quoted), the body with
    :func:`numpy.loadtxt` (fast, and the numbers are numpy's to parse).  When loadtxt
    refuses the body, the lines are tried one at a time to name the first bad one.

    Args:
        text: the file's content.
        label_column: name of the label column, or None when there is none (autoencoder).
        source: name used in error messages.

    Returns:
        ``x`` as float64 ``(rows, features)`` and ``y`` as float64 ``(rows,)`` (or None).

    Raises:
        DataError: naming the line and column of the first problem.
    """
    # Universal newlines, as the csv module reads them: "\r\n" and "\r" end lines too.
    lines = io.StringIO(text, newline=None).read().split("\n")
    if lines[-1] == "":
        lines.pop()  # the final line end
    if not lines:
        raise DataError(f"{source}: empty file (a header row is required)")
    names = _header(lines[0], source)
    label_index: int | None = None
    if label_column is not None:
        if label_column not in names:
            raise DataError(f"{source}: no label column {label_column!r} in header {names!r}")
        label_index = names.index(label_column)
    if len(names) - (label_index is not None) == 0:
        raise DataError(f"{source}: no feature columns besides the label")
    rows, bad_quoting = _rows(lines, source)
    table = _csv_body(rows, names, source)
    if bad_quoting is not None:
        raise bad_quoting  # after the rows above it: the first problem in the file wins
    if label_index is None:
        return RawData(table, None)
    features = np.delete(table, label_index, axis=1)
    return RawData(features, table[:, label_index])


def _header(line: str, source: str) -> list[str]:
    try:
        header = next(csv.reader([line], strict=True), [])
    except csv.Error as exc:
        raise DataError(f"{source}: not valid CSV: {exc}") from exc
    names = [name.strip() for name in header]
    if len(names) > MAX_CSV_COLUMNS:
        raise DataError(f"{source}: {len(names)} columns, over the limit of {MAX_CSV_COLUMNS}")
    if any(not name for name in names) or len(set(names)) != len(names):
        raise DataError(f"{source}: header names must be non-empty and unique, got {header!r}")
    return names


def _rows(lines: list[str], source: str) -> tuple[list[tuple[int, str]], DataError | None]:
    """(line number, text) of the rows with values, up to the first badly quoted one.

    Quoted fields are rare in numeric files, so only lines with a quote go through the
    csv module's strict reading; loadtxt alone would take ``""2`` for 2.
    """
    rows: list[tuple[int, str]] = []
    for number, line in enumerate(lines[1:], start=2):
        if '"' in line:
            try:
                fields = next(csv.reader([line], strict=True), [])
            except csv.Error as exc:
                return rows, DataError(f"{source}, line {number}: not valid CSV: {exc}")
            blank = all(not field.strip() for field in fields)
        else:
            blank = not line.replace(",", " ").strip()
        if not blank:
            rows.append((number, line))
    return rows, None


def _loadtxt(lines: list[str]) -> Array:
    # comments=None: "#" is not special in this layout; quotes are (csv's quoting).
    return np.loadtxt(lines, dtype=np.float64, delimiter=",", comments=None, quotechar='"', ndmin=2)


def _csv_body(rows: list[tuple[int, str]], names: list[str], source: str) -> Array:
    width = len(names)
    if not rows:  # loadtxt warns about empty input; there is nothing to parse anyway
        return np.empty((0, width), dtype=np.float64)
    try:
        table: Array | None = _loadtxt([line for _, line in rows])
    except ValueError:
        table = None
    if table is not None and table.shape[1] == width and np.isfinite(table).all():
        return table
    # Something is wrong: name the first row that is, trying each alone (tens of µs each).
    for number, line in rows:
        _check_row(number, line, names, source)
    raise DataError(f"{source}: not valid CSV")  # each row alone was fine, all together not


_BAD_NUMBER = re.compile(r"could not convert string .* at row \d+, column (\d+)", re.S)


def _check_row(number: int, line: str, names: list[str], source: str) -> None:
    """Raise the DataError that row ``number`` (``line``) deserves, if any.

    In the order a reader meets the problems: the number of fields, then each field from
    the left (a number, and finite).  Quoting was checked by :func:`_rows`.
    """
    where = f"{source}, line {number}"
    try:
        fields = next(csv.reader([line]), [])
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
        raise DataError(f"{where}: not valid CSV: {exc}") from exc
    if len(fields) != len(names):
        raise DataError(f"{where}: {len(fields)} fields, the header has {len(names)}")
    try:
        values = _loadtxt([line])[0]
    except ValueError as exc:
        found = _BAD_NUMBER.search(str(exc))
        column = int(found.group(1)) - 1 if found else len(fields)
        if column >= len(fields):
            raise DataError(f"{where}: not valid CSV: {exc}") from None
        raise DataError(
            f"{where}, column {names[column]!r}: {fields[column][:40]!r} is not a number"
        ) from None
    for column, value in enumerate(values):
        if not math.isfinite(value):
            raise DataError(
                f"{where}, column {names[column]!r}: {fields[column].strip()!r} is not finite"
            )


def _load_npz(path: Path, config: DataConfig) -> RawData:
    try:
        # Our own handle: np.load leaks the file it opened when the zip is corrupt.
        # NPY_HEADER_LOCK: np.load parses .npy headers, not thread-safe on 3.11.
        with open(path, "rb") as handle, NPY_HEADER_LOCK:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: a single .npy array, not an .npz archive of x and y")
            with loaded as archive:
                keys = list(archive.keys())
                if config.x_key not in keys:
                    raise DataError(f"{path}: no array {config.x_key!r} (has {keys})")
                x = archive[config.x_key]
                y = None
                if config.target == "label":
                    if config.y_key not in keys:
                        raise DataError(f"{path}: no array {config.y_key!r} (has {keys})")
                    y = archive[config.y_key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz archive: {exc}") from exc
    return _checked(RawData(x, y), str(path))


def _checked(data: RawData, source: str) -> RawData:
    if data.x.ndim < 1:
        raise DataError(f"{source}: inputs must have an examples axis, got a scalar")
    if data.y is not None and (data.y.ndim < 1 or data.y.shape[0] != data.x.shape[0]):
        raise DataError(
            f"{source}: {data.x.shape[0]} inputs but labels of shape {list(data.y.shape)}"
        )
    for name, array in (("inputs", data.x), ("labels", data.y)):
        if array is None:
            continue
        if array.dtype.kind not in "biuf":
            raise DataError(f"{source}: {name} have dtype {array.dtype}, not numeric")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise DataError(f"{source}: {name} contain NaN or infinity")
    return data


def _concat(parts: Sequence[RawData], source: str) -> RawData:
    if not parts:
        raise DataError(f"{source}: no examples")
    shapes = {part.x.shape[1:] for part in parts}
    if len(shapes) > 1:
        raise DataError(f"{source}: files disagree on the input shape: {sorted(shapes)}")
    x = np.concatenate([part.x for part in parts])
    ys = [part.y for part in parts]
    if any(y is None for y in ys):
        return RawData(x, None)
    label_shapes = {y.shape[1:] for y in ys if y is not None}
    if len(label_shapes) > 1:
        raise DataError(f"{source}: files disagree on the label shape: {sorted(label_shapes)}")
    return RawData(x, np.concatenate([y for y in ys if y is not None]))


def _directory_files(directory: Path, data_format: str) -> tuple[list[Path], str]:
    npz = sorted(p for p in directory.glob("*.npz") if p.is_file())
    csvs = sorted(p for p in directory.glob("*.csv") if p.is_file())
    if data_format == "auto":
        if npz and csvs:
            raise DataError(f"{directory} holds both .npz and .csv files; set data.format")
        data_format = "npz" if npz else "csv"
    return (npz if data_format == "npz" else csvs), data_format


def _load_directory(directory: Path, config: DataConfig) -> RawData | None:
    files, data_format = _directory_files(directory, config.format)
    if not files:
        return None
    label = config.label_column if config.target == "label" else None
    parts: list[RawData] = []
    for path in files:
        if data_format == "npz":
            parts.append(_load_npz(path, config))
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read: {exc}") from exc
        parts.append(parse_csv(text, label_column=label, source=str(path)))
    return _concat(parts, str(directory))


def resolve_entry_point(config: DataConfig) -> Callable[..., Any]:
    """Import the ``module:function`` named by ``data.entry_point``.

    Raises:
        ConfigError: the module cannot be imported or has no such callable.
    """
    if config.entry_point is None:
        raise ConfigError("data.entry_point is not set")
    module_name, _, function_path = config.entry_point.partition(":")
    if config.module_path is not None and str(config.module_path) not in sys.path:
        sys.path.insert(0, str(config.module_path))
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # an entry point may fail to import in any way
        raise ConfigError(f"cannot import data entry point module {module_name!r}: {exc}") from exc
    for attribute in function_path.split("."):
        target = getattr(target, attribute, None)
    if not callable(target):
        raise ConfigError(f"data entry point {config.entry_point!r} is not a callable")
    function: Callable[..., Any] = target
    return function


def _from_entry_point(result: Any, target: str, source: str) -> tuple[RawData, RawData | None]:
    def arrays(x: Any, y: Any) -> RawData:
        return _checked(
            RawData(np.asarray(x), None if target == "input" else np.asarray(y)), source
        )

    if isinstance(result, Mapping):
        if "x" not in result or (target == "label" and "y" not in result):
            raise DataError(f"{source} returned a mapping without 'x'/'y': {sorted(result)}")
        train = arrays(result["x"], result.get("y"))
        if "x_eval" in result:
            return train, arrays(result["x_eval"], result.get("y_eval"))
        return train, None
    if isinstance(result, tuple | list) and len(result) in (2, 4):
        train = arrays(result[0], result[1])
        if len(result) == 4:
            return train, arrays(result[2], result[3])
        return train, None
    raise DataError(
        f"{source} must return (x, y), (x, y, x_eval, y_eval) or a mapping with x, y, "
        f"x_eval, y_eval; got {type(result).__name__}"
    )


def split(data: RawData, fraction: float, seed: int) -> tuple[RawData, RawData | None]:
    """Hold out ``fraction`` of the examples (seeded shuffle); keep at least one to train."""
    count = int(data.x.shape[0])
    held = min(int(count * fraction), count - 1) if count else 0
    if held <= 0:
        return data, None
    order = np.random.default_rng(seed).permutation(count)
    train_idx, eval_idx = np.sort(order[held:]), np.sort(order[:held])
    y = data.y
    return (
        RawData(data.x[train_idx], None if y is None else y[train_idx]),
        RawData(data.x[eval_idx], None if y is None else y[eval_idx]),
    )


def load_raw(config: DataConfig) -> tuple[RawData, RawData | None]:
    """Load the training examples and the evaluation split, as configured.

    Raises:
        DataError: the data is missing or malformed.
        ConfigError: the entry point cannot be imported.
    """
    if config.entry_point is not None:
        function = resolve_entry_point(config)
        try:
            result = function(**config.options)
        except Exception as exc:  # user code: any failure is a data failure this round
            raise DataError(f"data entry point {config.entry_point} failed: {exc!r}") from exc
        train, evaluation = _from_entry_point(result, config.target, config.entry_point)
    else:
        assert config.path is not None  # guaranteed by DataConfig's validator
        loaded = _load_directory(config.path, config)
        if loaded is None:
            raise DataError(f"no .npz or .csv files in {config.path}")
        train = loaded
        eval_dir = config.path / EVAL_DIR
        evaluation = _load_directory(eval_dir, config) if eval_dir.is_dir() else None
    if config.max_examples is not None and train.x.shape[0] > config.max_examples:
        cap = config.max_examples
        train = RawData(train.x[:cap], None if train.y is None else train.y[:cap])
    if evaluation is None:
        train, evaluation = split(train, config.eval_fraction, config.seed)
    return train, evaluation


def _fit_inputs(x: Array, manifest: Manifest, source: str) -> Array:
    shape = manifest.input.example_shape
    count = int(x.shape[0])
    per_example = math.prod(x.shape[1:])
    if per_example != math.prod(shape):
        raise DataError(
            f"{source}: each example has {per_example} input values "
            f"({list(x.shape[1:])}); the model takes {list(shape)}"
        )
    dtype = np.float32 if manifest.input.dtype == "float32" else np.int64
    return np.ascontiguousarray(x.reshape(count, *shape), dtype=dtype)


def _fit_labels(y: Array, manifest: Manifest, source: str) -> Array:
    shape = manifest.label.example_shape
    count = int(y.shape[0])
    if math.prod(y.shape[1:]) != math.prod(shape):
        raise DataError(
            f"{source}: labels have shape {list(y.shape[1:])} per example; "
            f"the model expects {list(shape)}"
        )
    y = y.reshape(count, *shape)
    if manifest.label.dtype == "int64":
        if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
            raise DataError(f"{source}: class labels must be whole numbers")
        labels = y.astype(np.int64)
        classes = manifest.output.shape[1] if manifest.task == "classification" else None
        if isinstance(classes, int) and labels.size:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= classes:
                raise DataError(
                    f"{source}: class labels span [{low}, {high}], the model has {classes} classes"
                )
        return np.ascontiguousarray(labels)
    return np.ascontiguousarray(y, dtype=np.float32)


def fit_to_model(
    train: RawData, evaluation: RawData | None, manifest: Manifest, target: str = "label"
) -> Dataset:
    """Shape and type the examples for ``manifest``'s input and label specs.

    Raises:
        DataError: the examples do not fit the model.
    """

    def fit(data: RawData, source: str) -> tuple[Array, Array]:
        x = _fit_inputs(data.x, manifest, source)
        if target == "input":
            return x, _fit_labels(x, manifest, source)
        if data.y is None:
            raise DataError(f"{source}: no labels (set data.target = 'input' for autoencoders)")
        return x, _fit_labels(data.y, manifest, source)

    if train.x.shape[0] == 0:
        raise DataError("no training examples")
    x_train, y_train = fit(train, "training data")
    if evaluation is None or evaluation.x.shape[0] == 0:
        return Dataset(x_train, y_train, x_train[:0], y_train[:0])
    x_eval, y_eval = fit(evaluation, "evaluation data")
    return Dataset(x_train, y_train, x_eval, y_eval)
