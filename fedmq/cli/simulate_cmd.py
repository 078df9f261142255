"""``fedmq simulate``: broker, aggregator and N agents on this machine, then a report.

Exit codes: 0 done (the report path is printed on stdout), 2 bad option, 78 bad project
or environment (or an external broker's topic root in use), 70 the simulation failed (a
part crashed, rounds stalled, the broker would not start or could not be reached), 130
interrupted.  Everything started is stopped in every case, and on an external broker
what the run retained there is cleared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedmq import exit_codes
from fedmq.errors import BundleError, ConfigError, FedmqError
from fedmq.simulate.options import (
    DEFAULT_AGENTS,
    DEFAULT_MODEL,
    PASSWORD_ENV,
    SimulationOptions,
    TrainingOverrides,
    external_broker,
    is_broker_url,
    parse_fraction,
    parse_partition,
)
from fedmq.simulate.progress import ProgressView
from fedmq.simulate.report import LOG_FILE, prepare_out_dir
from fedmq.simulate.runner import Simulation, SimulationResult, default_out
from fedmq.simulate.settings import QUIET_FLEET
from fedmq.transport.broker_config import BrokerSection

log = logging.getLogger("fedmq.simulate")


BROKER_HELP = (
    "auto, mosquitto or embedded: a private broker on this machine; or mqtt(s)://HOST:PORT: "
    "rehearse on that running broker (the plant's, a restrictive test listener) under a "
    "unique --topic-root, clearing what the run retained there at the end. Every "
    "simulated agent connects with its own client id and the same credentials, so use a "
    "broker that accepts the simulator's clients (--username and "
    f"{PASSWORD_ENV}, or a test listener): one that takes identities from client "
    "certificates (fedmq's production ACL: CN = client id) needs a certificate per agent"
)
EXTERNAL_ONLY = "only with --broker mqtt(s)://HOST:PORT"


def _fail(console: Console, code: int, message: str) -> typer.Exit:
    console.print(f"fedmq simulate: {message}", style="red", highlight=False)
    return typer.Exit(code)


def _external(
    broker: str,
    *,
    username: str | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    protocol: str | None,
    max_packet_size: int | None,
) -> BrokerSection | None:
    """The external broker ``--broker`` names (None: a private broker is started).

    Raises:
        ConfigError: a broker option without a broker URL, or an invalid one.
    """
    given = {
        "--username": username,
        "--ca-file": ca_file,
        "--cert-file": cert_file,
        "--key-file": key_file,
        "--protocol": protocol,
        "--max-packet-size": max_packet_size,
    }
    if not is_broker_url(broker):
        misplaced = [option for option, value in given.items() if value is not None]
        if misplaced:
            raise ConfigError(f"{', '.join(misplaced)}: {EXTERNAL_ONLY}")
        return None
    return external_broker(
        broker,
        username=username,
        password=os.environ.get(PASSWORD_ENV) or None,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        protocol=protocol or "5",
        max_packet_size=max_packet_size,
    )


def simulate_command(
    agents: Annotated[int, typer.Option(help="simulated devices")] = DEFAULT_AGENTS,
    rounds: Annotated[
        int | None, typer.Option(help="rounds (default: the project's, or 5)")
    ] = None,
    partition: Annotated[
        str, typer.Option(help="data split: iid or dirichlet:ALPHA (label skew)")
    ] = "iid",
    codec: Annotated[
        str | None, typer.Option(help="update codec: raw, fp16, int8[:BLOCK], topk[:FRACTION]")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="fedavg, fedavgm, fedadam, fedprox, median, krum, …")
    ] = None,
    drop_rate: Annotated[
        str, typer.Option(help="fraction of each round's agents that vanish mid-round")
    ] = "0",
    processes: Annotated[
        bool, typer.Option("--processes", help="one fedmq-agent process per device")
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help=f"digits_mlp, digits_cnn or sensor_autoencoder (default {DEFAULT_MODEL})"
        ),
    ] = None,
    project: Annotated[
        Path | None, typer.Option(help="a `fedmq new` project directory instead of --model")
    ] = None,
    seed: Annotated[int, typer.Option(help="data split and dropout choice")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="report directory (default reports/…)")
    ] = None,
    broker: Annotated[str, typer.Option(help=BROKER_HELP)] = "auto",
    topic_root: Annotated[
        str | None,
        typer.Option(help="topic root (default on an external broker: fedmq-sim-<random>)"),
    ] = None,
    username: Annotated[
        str | None,
        typer.Option(help=f"external broker username; the password comes from {PASSWORD_ENV}"),
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option(help="CA bundle verifying an mqtts:// broker")
    ] = None,
    cert_file: Annotated[
        Path | None, typer.Option(help="client certificate (mTLS), shared by every client")
    ] = None,
    key_file: Annotated[Path | None, typer.Option(help="private key of --cert-file")] = None,
    protocol: Annotated[
        str | None, typer.Option(help="external broker's MQTT version: 5 (default) or 3.1.1")
    ] = None,
    max_packet_size: Annotated[
        int | None,
        typer.Option(help="external broker's packet cap in bytes (3.1.1 brokers do not say)"),
    ] = None,
    max_queued_messages: Annotated[
        int | None,
        typer.Option(
            help="external broker's max_queued_messages: the aggregator paces uploads to fit"
        ),
    ] = None,
    deadline: Annotated[
        float | None, typer.Option(help="round deadline, seconds (default 60 + 0.1/agent)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="local epochs per round")] = None,
    lr: Annotated[float | None, typer.Option(help="local learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="local batch size")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="sgd, momentum, nesterov, adam, adamw")
    ] = None,
    keep_updates: Annotated[
        bool, typer.Option("--keep-updates", help="store every update in <out>/updates")
    ] = False,
    evaluate_final: Annotated[
        bool,
        typer.Option(
            "--evaluate-final",
            help="make the last of --rounds evaluate-only: each agent's figures for the "
            "final model in the report",
        ),
    ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING, ERROR")] = "INFO",
) -> None:
    """Run a whole federation on this machine and write a report."""
    # soft_wrap: lines stay whole in logs and pipes (a terminal still wraps them).
    console = Console(stderr=True, soft_wrap=True)
    try:
        if model is not None and project is not None:
            raise ConfigError("give --model or --project, not both")
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(
                f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}"
            )
        external = _external(
            broker,
            username=username,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            protocol=protocol,
            max_packet_size=max_packet_size,
        )
        options = SimulationOptions(
            agents=agents,
            rounds=rounds,
            partition=parse_partition(partition),
            codec=codec,
            strategy=strategy,  # type: ignore[arg-type]  # checked by SimulationOptions
            drop_rate=parse_fraction(drop_rate, "--drop-rate"),
            processes=processes,
            model=model or DEFAULT_MODEL,  # type: ignore[arg-type]
            project=project,
            seed=seed,
            out=out,
            broker="auto" if external else broker,  # type: ignore[arg-type]
            external_broker=external,
            topic_root=topic_root,
            deadline_s=deadline,
            training=TrainingOverrides(epochs, lr, batch_size, optimizer),  # type: ignore[arg-type]
            keep_updates=keep_updates,
            evaluate_final=evaluate_final,
            broker_queue=max_queued_messages,
        )
        name = project.resolve().name if project is not None else options.model
        report_dir = prepare_out_dir(out or default_out(name))
    except ConfigError as exc:
        raise _fail(console, exit_codes.USAGE, str(exc)) from None
    options = dataclasses.replace(options, out=report_dir)
    handler = logging.FileHandler(report_dir / LOG_FILE, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    agent_logger = logging.getLogger("edge_agent")
    if not processes and agents > QUIET_FLEET:
        agent_logger.setLevel(max(logging.WARNING, root.level))
    view = ProgressView(console)
    simulation = Simulation(options, view=view, log_level=log_level.upper())
    try:
        result = asyncio.run(_run(simulation))
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise _fail(
            console, exit_codes.INTERRUPTED, "interrupted; everything it started is stopped"
        ) from None
    except (ConfigError, BundleError) as exc:
        raise _fail(console, exit_codes.CONFIG_ERROR, str(exc)) from None
    except FedmqError as exc:
        raise _fail(
            console, exit_codes.RUNTIME_FAILURE, f"{exc} (log: {report_dir / LOG_FILE})"
        ) from None
    except Exception as exc:
        log.exception("the simulation failed")
        raise _fail(
            console, exit_codes.RUNTIME_FAILURE, f"{exc!r} (log: {report_dir / LOG_FILE})"
        ) from None
    finally:
        root.removeHandler(handler)
        handler.close()
        agent_logger.setLevel(logging.NOTSET)
    _print_result(console, result)


async def _run(simulation: Simulation) -> SimulationResult:
    # SIGTERM ends the run like Ctrl-C does: cancel it, so everything started is stopped.
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await simulation.run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _print_result(console: Console, result: SimulationResult) -> None:
    summary = result.summary
    final = summary.get("final") or {}
    shown = ", ".join(
        f"{key.removeprefix('test_')} {value:.4f}" for key, value in sorted(final.items())
    )
    console.print(
        f"done in {summary['wall_time_s']:.1f} s: {summary['rounds_closed']} rounds closed, "
        f"{summary['rounds_failed']} failed" + (f"; final model: {shown}" if shown else ""),
        highlight=False,
    )
    devices = summary.get("final_devices")
    if devices:
        overall = devices["overall"]
        figures = ", ".join(
            f"{name.removeprefix('eval_')} {value:.4f}"
            for name, value in sorted(overall.items())
            if name not in ("examples", "devices")
        )
        console.print(
            f"final model on the agents' own data ({int(overall.get('devices', 0))} agents, "
            f"table in summary.txt): {figures}",
            highlight=False,
        )
    typer.echo(f"report: {result.out}")
