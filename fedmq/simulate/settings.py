"""The aggregator's and the agents' settings for one simulation run.

Both are built as documents and validated by the real loaders (``AggregatorSettings``,
``edge_agent.config.parse_settings``), so a simulation runs exactly the configuration a
deployment would, with timings tuned for one machine:

- every simulated device is online before the aggregator starts, and rounds open with
  at least the fleet minus the devices ``--drop-rate`` removes per round
  (``min_agents``): round 1 gets everyone, later rounds need not wait for devices that
  are still rebooting;
- a device that vanished is not coming back this round: rounds stop waiting for it
  ``SIM_DROPOUT_GRACE`` after its last will, not the production 5 s meant to ride out
  a broker restart (a restart fires no will here: see docs/simulate.md);
- heartbeats are frequent enough to notice a silent agent within seconds, and sparse
  enough that 1000 agents do not flood the aggregator.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from edge_agent.config import AgentSettings, parse_settings
from fedmq.aggregator.config import AggregatorSettings, load_settings
from fedmq.errors import ConfigError
from fedmq.simulate.fleet import Fleet, InProcessFleet, ProcessFleet
from fedmq.simulate.options import PASSWORD_ENV, SimulationOptions
from fedmq.simulate.workloads import Workload
from fedmq.transport.broker_config import BrokerSection

SIM_DEADLINE = 60.0  # seconds per round: covers a few local epochs of the shipped models
SIM_DEADLINE_PER_AGENT = 0.1  # seconds added per agent: 1000 agents upload for a while
SIM_SETTLE = 0.5  # seconds after start for the fleet's retained statuses to arrive
# With --drop-rate, round 1 may open below the full fleet once settled: give the
# retained statuses of a large fleet time to be processed.
SIM_SETTLE_PER_AGENT = 0.002  # seconds
SIM_DROPOUT_GRACE = 0.5  # seconds after a last will before a round stops waiting
SIM_STATUS_INTERVAL = 0.25  # seconds between aggregator status publishes
SIM_SHUTDOWN_GRACE = 5.0  # seconds to finish storing in-flight updates at the end
SIM_HEARTBEAT_MIN = 2.0  # seconds between agent heartbeats in small fleets
SIM_HEARTBEATS_PER_SECOND = 50.0  # fleet-wide status messages per second, at most
SIM_HEARTBEAT_MAX = 20.0  # seconds: even huge fleets notice a silent agent within a minute
SIM_ROUND_RETRY = 1.0  # seconds before an agent retries a failed round
SIM_ACK_TIMEOUT = 15.0  # seconds before an agent re-sends an unacknowledged update
SIM_DOWNLOAD_TIMEOUT = 120.0  # seconds for one blob download (a busy 1000-agent round)
# With --evaluate-final, each agent holds this much of its data out for local evaluation.
SIM_EVAL_FRACTION = 0.2
# Larger fleets log agent messages at WARNING and up only: a thousand agents write a few
# lines each per round.
QUIET_FLEET = 20
# Where a subprocess agent reads the broker password from: its agent.toml (in the
# report directory) must not hold it.
AGENT_PASSWORD_ENV = "FEDMQ_AGENT_BROKER__PASSWORD"


def heartbeat_for(agents: int) -> float:
    """Agent heartbeat period for a fleet of ``agents``."""
    return min(SIM_HEARTBEAT_MAX, max(SIM_HEARTBEAT_MIN, agents / SIM_HEARTBEATS_PER_SECOND))


def deadline_for(options: SimulationOptions) -> float:
    """The round deadline: ``--deadline``, else one that grows with the fleet."""
    if options.deadline_s is not None:
        return options.deadline_s
    return SIM_DEADLINE + SIM_DEADLINE_PER_AGENT * options.agents


def min_agents(options: SimulationOptions) -> int:
    """Agents online before a round opens: the fleet, less those dropped per round."""
    return options.agents - options.victims(options.agents)


def settle_for(options: SimulationOptions) -> float:
    """Seconds the aggregator waits for retained statuses before opening round 1."""
    if options.drop_rate <= 0:
        return SIM_SETTLE  # min_agents is the whole fleet: round 1 waits for everyone
    return SIM_SETTLE + SIM_SETTLE_PER_AGENT * options.agents


def check_environment(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse ``FEDMQ_*`` variables: the settings sources would apply them to every part.

    ``FEDMQ_SIMULATE_PASSWORD`` (the external broker's password) is the simulator's own,
    read by no settings source.

    Raises:
        ConfigError: naming the variables.
    """
    found = sorted(name for name in environ if name.startswith("FEDMQ_") and name != PASSWORD_ENV)
    if found:
        raise ConfigError(
            f"unset {', '.join(found)}: they override the configuration of every simulated "
            "agent and the aggregator (set values in the project's files instead)"
        )


def require_packages(options: SimulationOptions) -> None:
    """Fail before starting anything when a package the run will need is missing.

    Raises:
        ConfigError: naming the package and the extra that installs it.
    """
    needed = ["matplotlib"]  # the report's plot
    if options.project is None and options.model.startswith("digits"):
        needed.append("sklearn")  # the bundled digits
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"fedmq simulate needs {', '.join(missing)}: pip install 'fedmq[simulate]'"
        )


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = _merge(dict(current), value)
        else:
            merged[key] = value
    return merged


def broker_table(section: BrokerSection, *, password: bool = True) -> dict[str, Any]:
    """``section`` as the ``[broker]`` table of the parts' settings documents.

    Only what differs from the defaults (a project's ``keepalive_s`` survives a merge).

    Args:
        section: the broker every part connects to.
        password: include the password (False: for files written to the report).
    """
    table = section.model_dump(exclude_defaults=True, exclude={"password"})
    table["url"] = section.url
    table["protocol"] = section.protocol
    for key, value in table.items():
        if isinstance(value, Path):
            table[key] = str(value)
    if password and section.password is not None:
        table["password"] = section.password.get_secret_value()
    return table


def aggregator_settings(
    workload: Workload,
    options: SimulationOptions,
    *,
    broker: BrokerSection,
    state_dir: Path,
    client_id: str | None = None,
    topic_root: str | None = None,
    log_level: str = "INFO",
) -> AggregatorSettings:
    """The in-process aggregator's settings.

    Args:
        workload: what is trained.
        options: the command line.
        broker: the broker and credentials.
        state_dir: the aggregator's state directory.
        client_id: its MQTT client id (None: ``fedmq-aggregator-<federation>``).
        topic_root: the run's topic root (None: the project's, or ``fedmq``).
        log_level: its log level.

    Raises:
        ConfigError: the combination is invalid (e.g. a project quorum above the fleet).
    """
    training = _merge(workload.training, options.training.as_dict())
    overrides: dict[str, Any] = {
        "federation": workload.federation,
        "bundle": str(workload.bundle_dir),
        "state_dir": str(state_dir),
        "rounds": options.rounds or workload.rounds,
        "broker": {**broker_table(broker), "client_id": client_id},
        "training": training,
        "round": {"deadline_s": deadline_for(options), "min_agents": min_agents(options)},
        "settle_s": settle_for(options),
        "heartbeat_s": heartbeat_for(options.agents),
        "dropout_grace_s": SIM_DROPOUT_GRACE,
        "status_interval_s": SIM_STATUS_INTERVAL,
        "shutdown_grace_s": SIM_SHUTDOWN_GRACE,
        "exit_when_finished": True,
        "log_level": log_level,
        "agents": None,  # the simulator names its own devices
        # The report evaluates every round's checkpoint, after the round: keep them all.
        "retention": {"keep_last": 0, "keep_every": 1},
    }
    if topic_root is not None:
        overrides["topic_root"] = topic_root
    if options.codec is not None:
        overrides["codec"] = options.codec
    if options.strategy is not None:
        overrides["strategy"] = {"name": options.strategy}
    if options.evaluate_final:
        overrides["round"]["evaluate_final"] = True
    if options.broker_queue is not None:
        overrides["broker"]["max_queued_messages"] = options.broker_queue
    base = workload.aggregator
    # A project's TLS and credentials are for its real broker, not the simulator's.
    kept = {k: v for k, v in base.get("broker", {}).items() if k in ("keepalive_s",)}
    document = _merge({**base, "broker": kept}, overrides)
    settings = load_settings(None, **document)
    round_policy = settings.round
    if settings.mode == "sync" and round_policy.min_updates > options.agents:
        raise ConfigError(
            f"the federation needs {round_policy.min_updates} updates per round "
            f"([round] min_updates) but the simulation has {options.agents} agents"
        )
    return settings


def agent_settings(
    workload: Workload,
    options: SimulationOptions,
    *,
    index: int,
    client: str,
    broker: Mapping[str, Any],
    topic_root: str,
    state_dir: Path,
    log_level: str = "WARNING",
) -> AgentSettings:
    """Settings of simulated agent ``index``, validated by the agent's own loader.

    Raises:
        ConfigError: the workload's data table is invalid.
    """
    document = agent_document(
        workload,
        options,
        index=index,
        client=client,
        broker=broker,
        topic_root=topic_root,
        state_dir=state_dir,
        log_level=log_level,
    )
    return parse_settings(document, f"simulated agent {client}")


def agent_document(
    workload: Workload,
    options: SimulationOptions,
    *,
    index: int,
    client: str,
    broker: Mapping[str, Any],
    topic_root: str,
    state_dir: Path,
    log_level: str = "WARNING",
) -> dict[str, Any]:
    """The ``agent.toml`` document of simulated agent ``index`` (``broker``: its table)."""
    return {
        "client_id": client,
        "federation": workload.federation,
        "topic_root": topic_root,
        "state_dir": str(state_dir),
        "threads": 1,  # like a device: one core for training, the rest for the plant
        "heartbeat_s": heartbeat_for(options.agents),
        "log_level": log_level,
        "broker": dict(broker),
        "data": _agent_data(workload.agent_data[index], options),
        "limits": {
            "round_retry_s": SIM_ROUND_RETRY,
            "download_timeout_s": SIM_DOWNLOAD_TIMEOUT,
        },
        "outbox": {"ack_timeout_s": SIM_ACK_TIMEOUT},
    }


def _agent_data(table: Mapping[str, Any], options: SimulationOptions) -> dict[str, Any]:
    """An agent's ``[data]`` table: with ``--evaluate-final``, a local evaluation split.

    The shipped workloads train on every example (a central test set measures the
    model); evaluating the final model on each agent needs data of the agent's own.
    """
    data = dict(table)
    if options.evaluate_final and data.get("eval_fraction") == 0.0:
        data["eval_fraction"] = SIM_EVAL_FRACTION
    return data


def make_fleet(
    workload: Workload,
    options: SimulationOptions,
    clients: Sequence[str],
    *,
    broker: BrokerSection,
    topic_root: str,
    work: Path,
    out: Path,
) -> Fleet:
    """The simulated devices, configured and not yet started.

    Every agent's configuration is validated by the agent's own loader first.
    Subprocess agents read an ``agent.toml`` each from ``<out>/agents``, beside their
    logs (how each was started), and the broker password, if any, from their
    environment; their state directories are under ``work``.

    Raises:
        ConfigError: an agent's configuration is invalid.
    """
    agents: list[dict[str, Any]] = [
        {
            "index": index,
            "client": client,
            "state_dir": work / "agents" / client,
            "topic_root": topic_root,
            "log_level": "INFO" if len(clients) <= QUIET_FLEET else "WARNING",
        }
        for index, client in enumerate(clients)
    ]
    table = broker_table(broker)
    settings = [agent_settings(workload, options, broker=table, **agent) for agent in agents]
    if not options.processes:
        return InProcessFleet(settings)
    config_dir = out / "agents"
    config_dir.mkdir(parents=True, exist_ok=True)
    configs: dict[str, Path] = {}
    written = broker_table(broker, password=False)
    for agent in agents:
        path = configs[agent["client"]] = config_dir / f"{agent['client']}.toml"
        document = agent_document(workload, options, broker=written, **agent)
        path.write_text(toml_text(document), encoding="utf-8")
    env = {}
    if broker.password is not None:
        env[AGENT_PASSWORD_ENV] = broker.password.get_secret_value()
    return ProcessFleet(configs, config_dir, env=env)


def toml_text(document: Mapping[str, Any]) -> str:
    """``document`` as TOML (an ``agent.toml``); None values are left out (TOML has no null).

    Raises:
        TypeError: a value TOML cannot hold (tomli-w names its type).
    """
    return tomli_w.dumps(_without_none(document))


def _without_none(table: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _without_none(value) if isinstance(value, Mapping) else value
        for key, value in table.items()
        if value is not None
    }


def client_ids(count: int, prefix: str = "") -> list[str]:
    """``<prefix>agent-001`` … ids, zero-padded so they sort in order."""
    width = max(3, math.ceil(math.log10(count + 1)))
    return [f"{prefix}agent-{index:0{width}d}" for index in range(count)]
