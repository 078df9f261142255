"""A pure-Python MQTT 3.1.1 broker (amqtt) for machines without Mosquitto.

``fedmq simulate`` falls back to it so a demo runs with nothing but Python.  It runs in
its own process (``python -m fedmq.broker.embedded --port N``) with the same
start/stop/restart interface as :class:`~fedmq.broker.mosquitto.MosquittoBroker`.  It is
much slower than Mosquitto and speaks MQTT 3.1.1 only: clients must connect with
``protocol="3.1.1"``.  Never use it in production.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fedmq.broker.mosquitto import START_TIMEOUT, STOP_TIMEOUT, free_port
from fedmq.errors import TransportError

PROTOCOL = "3.1.1"


def amqtt_available() -> bool:
    """True when the amqtt package is importable (the ``server`` extra installs it)."""
    try:
        import amqtt  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


class EmbeddedBroker:
    """An amqtt broker process on a private loopback port."""

    protocol = PROTOCOL
    name = "amqtt (embedded, MQTT 3.1.1)"

    def __init__(self, port: int = 0, host: str = "127.0.0.1", log_dir: Path | None = None):
        self._host = host
        self._port = port
        self._log_dir = Path(log_dir or tempfile.mkdtemp(prefix="fedmq-amqtt-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        """Address clients connect to."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port of the listener (valid after ``start``)."""
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` URL of the broker."""
        return f"mqtt://{self._host}:{self._port}"

    @property
    def log_path(self) -> Path:
        """File the broker logs to."""
        return self._log_dir / "amqtt.log"

    def is_running(self) -> bool:
        """True while the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the broker process and wait until it accepts TCP connections."""
        if not amqtt_available():
            raise TransportError("the embedded broker needs amqtt: pip install 'fedmq[server]'")
        if self.is_running():
            return
        if self._port == 0:
            self._port = free_port(self._host)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedmq.broker.embedded",
                    "--host",
                    self._host,
                    "--port",
                    str(self._port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT * 3  # Python start-up plus imports
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self._host, self._port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise TransportError(
            f"embedded broker did not start on port {self._port}; see {self.log_path}"
        )

    def stop(self) -> None:
        """Stop the broker process."""
        process = self._process
        self._process = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Kill the broker process (a crash)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same port (retained messages are lost: no persistence)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker."""
        self.stop()

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _serve(host: str, port: int) -> None:
    from amqtt.broker import Broker  # noqa: PLC0415 - optional dependency

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    """Run the embedded broker in the foreground (used by :class:`EmbeddedBroker`)."""
    parser = argparse.ArgumentParser(description="fedmq's embedded MQTT 3.1.1 broker (amqtt)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
