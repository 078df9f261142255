"""``fedmq-agent``: the device command (argparse only: the agent install stays lean).

Exit codes follow sysexits(3) so a systemd unit can tell them apart
(``RestartPreventExitStatus=78``: restarting cannot fix a bad configuration):

====  ===================================================================
0     clean shutdown (SIGTERM/SIGINT)
2     bad command line (argparse)
70    runtime failure (a bug or an unexpected error; systemd restarts it)
78    configuration error: bad file or value, unusable or locked state dir
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
from edge_agent.config import AgentSettings, load_settings
from edge_agent.daemon import Agent
from edge_agent.data import resolve_entry_point
from edge_agent.rounds import TRAIN_THREAD_PREFIX
from fedmq import exit_codes
from fedmq.errors import ConfigError

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
    check = commands.add_parser("check", help="validate the configuration and print it")
    for sub in (run, check):
        sub.add_argument(
            "-c", "--config", type=Path, required=True, help="agent TOML configuration file"
        )
        sub.add_argument(
            "--log-level",
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="override log_level from the configuration",
        )
    return parser


def _setup_logging(level: str) -> None:
    # journald stamps every line itself; a terminal run wants a timestamp.
    under_journald = "JOURNAL_STREAM" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_journald:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)


def _load(config: Path) -> AgentSettings:
    settings = load_settings(config)
    if settings.data.entry_point is not None:
        resolve_entry_point(settings.data)  # fail now, not at the first round
    return settings


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
    _setup_logging(args.log_level or "INFO")
    try:
        settings = _load(args.config)
    except ConfigError as exc:
        print(f"fedmq-agent: configuration error: {exc}", file=sys.stderr)
        sys.exit(exit_codes.CONFIG_ERROR)
    _setup_logging(args.log_level or settings.log_level)
    if args.command == "check":
        print(settings.model_dump_json(indent=2))
        sys.exit(exit_codes.OK)
    code = run_agent(settings)
    if _abandoned_training():
        # A worker thread stuck inside onnxruntime would make interpreter shutdown wait
        # or crash; everything durable is already on disk, so leave at once.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
