"""``fedmq-agent``: the device command (argparse only: the agent install stays lean).

Exit codes follow sysexits(3) so a systemd unit can tell them apart
(``RestartPreventExitStatus=78``: restarting cannot fix a bad configuration):

====  ===================================================================
0     clean shutdown (SIGTERM/SIGINT)
2     bad command line (argparse)
70    runtime failure (a bug or an unexpected error; systemd restarts it)
78    configuration error: bad file or value, unusable or locked state dir;
      for ``check`` also data that does not load or fit the bundle, a bad bundle
====  ===================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import fedmq
from edge_agent.check import run_check
from edge_agent.config import AgentSettings, load_settings
from edge_agent.daemon import Agent
from edge_agent.data import resolve_entry_point
from edge_agent.rounds import TRAIN_THREAD_PREFIX
from fedmq import exit_codes
from fedmq.errors import BundleError, ConfigError, TrainingError
from fedmq.log_format import LOG_FORMATS, LogFormat, configure_logging

log = logging.getLogger("edge_agent")


def _version() -> str:
    return fedmq.__version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmq-agent",
        description="fedmq edge agent: trains a federated model on this device's data.",
    )
    parser.add_argument("--version", action="version", version=f"fedmq-agent {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the agent daemon until SIGTERM")
    check = commands.add_parser(
        "check",
        help="validate the configuration, then fit the local data to a bundle (no broker)",
        description=(
            "Validate the configuration and print it; then load the local data, fit it to "
            "a model bundle and run the model once on it with onnxruntime, so data that "
            "would fail a round shows up now. The bundle is --bundle DIR, else the newest "
            f"one in the agent's blob cache. Exit {exit_codes.CONFIG_ERROR} on a "
            "configuration, data or bundle error."
        ),
    )
    target = check.add_mutually_exclusive_group()
    target.add_argument(
        "--bundle",
        type=Path,
        metavar="DIR",
        help="a `fedmq compile` output directory to fit the data to "
        "(default: the bundle the agent last downloaded, if any)",
    )
    target.add_argument(
        "--config-only",
        action="store_true",
        help="only validate and print the configuration (e.g. before any data exists)",
    )
    for sub in (run, check):
        sub.add_argument(
            "-c", "--config", type=Path, required=True, help="agent TOML configuration file"
        )
        sub.add_argument(
            "--log-level",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="override log_level from the configuration",
        )
        sub.add_argument(
            "--log-format",
            choices=list(LOG_FORMATS),
            help="text, or json: one object per line (overrides log_format)",
        )
    return parser


def _setup_logging(
    level: str, log_format: LogFormat = "text", settings: AgentSettings | None = None
) -> None:
    # journald stamps every line itself; a terminal run wants a timestamp.
    under_journald = "JOURNAL_STREAM" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_journald:
        fmt = "%(asctime)s " + fmt
    ids = {"client": settings.client_id, "federation": settings.federation} if settings else {}
    configure_logging(level, log_format, stream=sys.stderr, text_format=fmt, **ids)


def _load(config: Path) -> AgentSettings:
    settings = load_settings(config)
    if settings.data.entry_point is not None:
        resolve_entry_point(settings.data)  # fail now, not at the first round
    return settings


def _check(settings: AgentSettings, bundle: Path | None) -> int:
    """The data half of ``check``: print what was found; the exit code."""
    sys.stdout.flush()  # the configuration first, even when stderr is the same terminal
    try:
        run_check(settings, bundle, print)
    except BundleError as exc:
        print(f"fedmq-agent: bundle error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    except ConfigError as exc:  # a data entry point that does not import
        print(f"fedmq-agent: configuration error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    except TrainingError as exc:  # DataError, or onnxruntime refusing the fitted data
        print(f"fedmq-agent: data error: {exc}", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    return exit_codes.OK


async def _serve(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, agent.request_stop)
    await agent.run()


def run_agent(settings: AgentSettings) -> int:
    """Run the daemon until SIGTERM/SIGINT; return the process exit code."""
    agent = Agent(settings)
    try:
        asyncio.run(_serve(agent))
    except ConfigError as exc:
        log.error("%s", exc)
        return exit_codes.CONFIG_ERROR
    except ExceptionGroup as group:  # raised by the agent's TaskGroup
        config_errors, _ = group.split(ConfigError)
        if config_errors is not None:
            log.error("%s", config_errors.exceptions[0])
            return exit_codes.CONFIG_ERROR
        log.exception("fedmq-agent failed")
        return exit_codes.RUNTIME_FAILURE
    except Exception:
        log.exception("fedmq-agent failed")
        return exit_codes.RUNTIME_FAILURE
    return exit_codes.OK


def _abandoned_training() -> bool:
    return any(
        thread.name.startswith(TRAIN_THREAD_PREFIX) and thread.is_alive()
        for thread in threading.enumerate()
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``fedmq-agent``; exits with one of the codes above."""
    args = _parser().parse_args(argv)
    _setup_logging(args.log_level or "INFO", args.log_format or "text")
    try:
        settings = _load(args.config)
    except ConfigError as exc:
        print(f"fedmq-agent: configuration error: {exc}", file=sys.stderr)
        sys.exit(exit_codes.CONFIG_ERROR)
    _setup_logging(
        args.log_level or settings.log_level, args.log_format or settings.log_format, settings
    )
    if args.command == "check":
        print(settings.model_dump_json(indent=2))
        if not args.config_only:
            sys.exit(_check(settings, args.bundle))
        sys.exit(exit_codes.OK)
    code = run_agent(settings)
    if _abandoned_training():
        # A worker thread stuck inside onnxruntime would make interpreter shutdown wait
        # or crash; everything durable is already on disk, so leave at once.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
