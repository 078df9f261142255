"""``fedmq serve`` speaks sd_notify as the Type=notify unit expects: a real process and
a real datagram socket standing in for systemd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aggregator.scripted import wait_exit, write_toml

from fedmq.broker.mosquitto import MosquittoBroker
from fedmq.testing.scripted_clients import WAIT

pytestmark = [pytest.mark.broker, pytest.mark.slow]

SERVE = "from fedmq.cli.app import main; main()"
WATCHDOG_USEC = 400_000  # WatchdogSec=0.4 s: a ping every 0.2 s


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(WAIT)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def wait_for_field(sock: socket.socket, field: str) -> list[str]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        message = receive(sock)
        if field in message:
            return message
    raise AssertionError(f"no {field} within {WAIT} s")


def test_serve_sends_ready_watchdog_and_stopping(
    broker: MosquittoBroker,
    federation: str,
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    config = write_toml(tmp_path / "federation.toml", broker, federation, tmp_path / "state")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDMQ_", "WATCHDOG_"))}
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        ready = wait_for_field(sock, "READY=1")
        assert f"STATUS={federation}: round 1 waiting, 0 updates accepted" in ready
        for _ in range(3):  # pinged again and again from the event loop
            ping = wait_for_field(sock, "WATCHDOG=1")
            assert any(line.startswith(f"STATUS={federation}: round 1") for line in ping)
        process.send_signal(signal.SIGTERM)
        wait_for_field(sock, "STOPPING=1")
        assert wait_exit(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
