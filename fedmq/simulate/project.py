"""A ``fedmq new`` project as a simulation workload.

The project's own files drive the simulation, read by the same loaders ``fedmq serve``
and ``fedmq-agent`` use: ``federation.toml`` (bundle, rounds, training, strategy,
round policy) and ``agent.toml`` (the ``[data]`` table).  Simulated agent *i* calls the
project's data entry point with the keyword arguments of its ``[data] options`` plus,
when the function accepts them, ``device=i``, ``num_devices=N``, ``partition`` and
``seed``: that is how each simulated device gets its own share.  A ``load_test()``
function beside the entry point supplies the central test set.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.config import load_settings as load_agent_settings
from edge_agent.data import resolve_entry_point
from fedmq.aggregator.config import load_settings as load_aggregator_settings
from fedmq.bundle import Bundle
from fedmq.datasets.partition import PartitionSpec
from fedmq.errors import ConfigError
from fedmq.simulate.evaluation import CentralEvaluator, TestSet
from fedmq.simulate.workloads import Workload

FEDERATION_FILE = "federation.toml"
AGENT_FILE = "agent.toml"
TEST_FUNCTION = "load_test"  # beside the data entry point: the central test set


def accepted_keywords(function: Callable[..., Any]) -> set[str] | None:
    """Keyword arguments ``function`` takes (None: any, it has ``**kwargs``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None  # builtins without a signature: pass everything and let it complain
    names: set[str] = set()
    for parameter in parameters:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            names.add(parameter.name)
    return names


def _keep(values: Mapping[str, Any], accepted: set[str] | None) -> dict[str, Any]:
    return {k: v for k, v in values.items() if accepted is None or k in accepted}


def to_test_set(result: Any, target: str, source: str) -> TestSet:
    """Turn what ``load_test()`` returned into a :class:`TestSet`.

    Accepted: ``(x, y)``, or a mapping with ``x`` and ``y`` (classifiers) or ``x`` and
    optionally ``anomaly`` (autoencoders, ``data.target = "input"``).

    Raises:
        ConfigError: anything else.
    """
    if isinstance(result, tuple | list) and len(result) == 2:
        result = {"x": result[0], ("anomaly" if target == "input" else "y"): result[1]}
    if not isinstance(result, Mapping) or "x" not in result:
        raise ConfigError(f"{source} must return (x, y) or a mapping with 'x', got {result!r:.80}")
    x = np.asarray(result["x"])
    if target == "input":
        anomaly = result.get("anomaly")
        return TestSet(x, anomaly=None if anomaly is None else np.asarray(anomaly, dtype=bool))
    if "y" not in result:
        raise ConfigError(f"{source} returned no 'y' labels for a classifier")
    return TestSet(x, np.asarray(result["y"]))


def project_workload(
    directory: Path, clients: list[str], spec: PartitionSpec, seed: int
) -> Workload:
    """Read a project and give each of ``clients`` its data options.

    Raises:
        ConfigError: a configuration file is missing or invalid, the two disagree, or
            the data entry point or its test set does not load.
        BundleError: the project's bundle is damaged.
    """
    if not directory.is_dir():
        raise ConfigError(f"--project {directory}: no such directory (create one: fedmq new)")
    settings = load_aggregator_settings(directory / FEDERATION_FILE)
    agent = load_agent_settings(directory / AGENT_FILE)
    if (agent.federation, agent.topic_root) != (settings.federation, settings.topic_root):
        raise ConfigError(
            f"{AGENT_FILE} trains for {agent.topic_root}/{agent.federation} but "
            f"{FEDERATION_FILE} serves {settings.topic_root}/{settings.federation}"
        )
    data = agent.data
    table = data.model_dump(mode="json", exclude_none=True)
    notes: list[str] = []
    evaluator: CentralEvaluator | None = None
    if data.entry_point is None:
        tables = [dict(table) for _ in clients]
        notes.append("data.path is a directory: every simulated agent trains on the same files")
    else:
        function = resolve_entry_point(data)
        accepted = accepted_keywords(function)
        tables = []
        for index in range(len(clients)):
            given = {
                "device": index,
                "num_devices": len(clients),
                "partition": str(spec),
                "seed": seed,
            }
            tables.append({**table, "options": {**data.options, **_keep(given, accepted)}})
        if accepted is not None and "device" not in accepted:
            notes.append(
                f"{data.entry_point} takes no 'device' argument: every simulated agent loads "
                "the same data"
            )
        evaluator = _evaluator(settings.bundle, data.entry_point, data.target, seed)
        if evaluator is None:
            notes.append(f"no {TEST_FUNCTION}() beside {data.entry_point}: no central evaluation")
    return Workload(
        name=directory.resolve().name,
        federation=settings.federation,
        bundle_dir=settings.bundle,
        aggregator=settings.model_dump(),
        training=settings.training.model_dump(),
        rounds=settings.rounds,
        agent_data=tables,
        evaluator=evaluator,
        notes=notes,
    )


def _evaluator(
    bundle_dir: Path, entry_point: str, target: str, seed: int
) -> CentralEvaluator | None:
    module = importlib.import_module(entry_point.partition(":")[0])  # imported already
    load_test = getattr(module, TEST_FUNCTION, None)
    if not callable(load_test):
        return None
    source = f"{module.__name__}:{TEST_FUNCTION}"
    try:
        result = load_test(**_keep({"seed": seed}, accepted_keywords(load_test)))
    except Exception as exc:  # user code may fail in any way
        raise ConfigError(f"{source}() failed: {exc!r}") from exc
    return CentralEvaluator(Bundle.load(bundle_dir), to_test_set(result, target, source))
