"""Option parsing and validation of `fedmq simulate` (pure: no broker, nothing started)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.errors import ConfigError
from fedmq.simulate.options import (
    MAX_AGENTS,
    MAX_PROCESS_AGENTS,
    SimulationOptions,
    TrainingOverrides,
    parse_fraction,
    parse_partition,
)

T = TypeVar("T")


def attempt(function: Callable[[], T]) -> tuple[T | None, ConfigError | None]:
    """The result of ``function``, or the ConfigError it raised."""
    try:
        return function(), None
    except ConfigError as exc:
        return None, exc


@given(st.text(max_size=12))
def test_parse_fraction_accepts_only_numbers_and_percentages(text: str) -> None:
    value, error = attempt(lambda: parse_fraction(text, "--drop-rate"))
    if error is not None:
        assert "--drop-rate" in str(error)
        return
    assert value is not None
    stripped = text.strip()
    expected = float(stripped.rstrip("%").strip()) / (100 if stripped.endswith("%") else 1)
    assert value == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "value"), [("0.25", 0.25), (".5", 0.5), ("25%", 0.25), (" 1e-1 ", 0.1), ("0", 0.0)]
)
def test_parse_fraction_examples(text: str, value: float) -> None:
    assert parse_fraction(text, "--drop-rate") == pytest.approx(value)


@given(st.text(max_size=20))
def test_parse_partition_names_the_option_when_it_refuses(text: str) -> None:
    spec, error = attempt(lambda: parse_partition(text))
    if error is not None:
        assert str(error).startswith("--partition:")
        return
    assert spec is not None
    assert spec.kind in ("iid", "dirichlet")
    if spec.kind == "dirichlet":
        assert spec.alpha > 0
        assert math.isfinite(spec.alpha)


@settings(max_examples=200)
@given(
    agents=st.integers(-5, MAX_AGENTS + 5),
    rounds=st.one_of(st.none(), st.integers(-2, 10)),
    drop=st.floats(allow_nan=True, allow_infinity=True),
    processes=st.booleans(),
    deadline=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    codec=st.one_of(
        st.none(), st.sampled_from(["raw", "fp16", "int8:64", "topk:0.1", "zip", "topk:2"])
    ),
    strategy=st.one_of(st.none(), st.sampled_from(["fedavg", "krum", "sgd"])),
    epochs=st.one_of(st.none(), st.integers(-1, 2000)),
    lr=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_options_are_valid_or_refused_with_a_config_error(
    agents: int,
    rounds: int | None,
    drop: float,
    processes: bool,
    deadline: float | None,
    codec: str | None,
    strategy: str | None,
    epochs: int | None,
    lr: float | None,
) -> None:
    options, error = attempt(
        lambda: SimulationOptions(
            agents=agents,
            rounds=rounds,
            drop_rate=drop,
            processes=processes,
            deadline_s=deadline,
            codec=codec,
            strategy=strategy,  # type: ignore[arg-type]
            training=TrainingOverrides(epochs=epochs, lr=lr),
        )
    )
    if error is not None:
        assert str(error).startswith("--")  # names the option
        return
    assert options is not None
    assert 1 <= options.agents <= (MAX_PROCESS_AGENTS if processes else MAX_AGENTS)
    assert 0 <= options.drop_rate < 1
    assert options.rounds is None or options.rounds >= 1
    assert options.deadline_s is None or 0 < options.deadline_s < math.inf
    assert codec not in ("zip", "topk:2")
    assert strategy != "sgd"
    assert epochs is None or epochs >= 1
    assert lr is None or 0 < lr <= 10


@given(st.floats(0, 0.999), st.integers(1, 2000))
def test_victims_leave_someone_and_follow_the_rate(rate: float, selected: int) -> None:
    options = SimulationOptions(agents=2, drop_rate=rate)
    victims = options.victims(selected)
    assert 0 <= victims <= max(0, selected - 1)
    if rate > 0 and selected >= 2:
        assert victims >= 1
        assert abs(victims - rate * selected) <= max(1.0, 0.5 + 1e-9)


def test_a_third_of_six_is_two() -> None:
    assert SimulationOptions(agents=6, drop_rate=1 / 3).victims(6) == 2
    assert SimulationOptions(agents=6).victims(6) == 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"agents": 0}, "--agents"),
        ({"agents": MAX_PROCESS_AGENTS + 1, "processes": True}, "--processes"),
        ({"drop_rate": 1.0}, "--drop-rate"),
        ({"agents": 1, "drop_rate": 0.5}, "one must stay"),
        ({"model": "resnet"}, "--model"),
        ({"broker": "hivemq"}, "--broker"),
        ({"codec": "gzip"}, "--codec"),
        ({"training": TrainingOverrides(optimizer="lbfgs")}, "--optimizer"),  # type: ignore[arg-type]
        ({"training": TrainingOverrides(batch_size=0)}, "--batch-size"),
    ],
)
def test_bad_options_name_the_problem(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        SimulationOptions(**kwargs)  # type: ignore[arg-type]


def test_the_external_brokers_queue_limit_reaches_the_aggregator(tmp_path: Path) -> None:
    from fedmq.simulate.options import PartitionSpec, external_broker
    from fedmq.simulate.settings import aggregator_settings
    from fedmq.simulate.workloads import builtin_workload

    broker = external_broker("mqtt://127.0.0.1:18830")
    options = SimulationOptions(agents=2, external_broker=broker, broker_queue=60)
    workload = builtin_workload("digits_mlp", ["a", "b"], PartitionSpec("iid"), 0, tmp_path)
    settings = aggregator_settings(
        workload,
        options,
        broker=broker,
        state_dir=tmp_path / "state",
        client_id=None,
        topic_root=None,
        log_level="INFO",
    )
    assert settings.broker.max_queued_messages == 60
    with pytest.raises(ConfigError, match="--max-queued-messages"):
        SimulationOptions(agents=2, broker_queue=60)  # a private broker: unlimited
