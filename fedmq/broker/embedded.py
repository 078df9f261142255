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
import logging
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

from fedmq.broker.process import START_TIMEOUT, BrokerProcess, free_port
from fedmq.errors import TransportError

PROTOCOL: Literal["3.1.1"] = "3.1.1"


def amqtt_available() -> bool:
    """True when the amqtt package is importable (the ``simulate`` extra installs it)."""
    try:
        import amqtt  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


class EmbeddedBroker(BrokerProcess):
    """An amqtt broker process on a private loopback port (no persistence)."""

    name = "amqtt"
    protocol = PROTOCOL

    def __init__(self, port: int = 0, host: str = "127.0.0.1", log_dir: Path | None = None):
        super().__init__(host, Path(log_dir or tempfile.mkdtemp(prefix="fedmq-amqtt-")))
        self._port = port

    @property
    def port(self) -> int:
        """TCP port of the listener (valid after ``start``)."""
        return self._port

    def start(self) -> None:
        """Start the broker process and wait until it accepts TCP connections."""
        if not amqtt_available():
            raise TransportError("the embedded broker needs amqtt: pip install 'fedmq[server]'")
        if self.is_running():
            return
        if self._port == 0:
            self._port = free_port(self.host)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "fedmq.broker.embedded"]
        command += ["--host", self.host, "--port", str(self._port)]
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # One prctl call, set only by the simulator, which starts brokers first.
                preexec_fn=self.preexec,  # noqa: PLW1509
            )
        if not self._wait_ready(START_TIMEOUT * 3):  # Python start-up plus amqtt's imports
            self.stop()
            raise TransportError(
                f"embedded broker did not start on port {self._port}; see {self.log_path}"
            )


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
