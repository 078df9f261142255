"""Which MQTT broker a simulation starts, and why.

``auto`` prefers Mosquitto (the broker fedmq is tested against, and ~15x faster here)
and falls back to the embedded amqtt broker, which needs nothing but Python and speaks
MQTT 3.1.1 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedmq.broker.embedded import EmbeddedBroker, amqtt_available
from fedmq.broker.mosquitto import MosquittoBroker, MosquittoConfig, find_mosquitto
from fedmq.broker.process import BrokerProcess, die_with_parent
from fedmq.errors import ConfigError
from fedmq.simulate.options import BrokerChoice


@dataclass(frozen=True)
class BrokerPlan:
    """The broker to start and the sentence explaining the choice."""

    kind: str
    reason: str


def plan_broker(choice: BrokerChoice) -> BrokerPlan:
    """Decide which broker ``choice`` means on this machine.

    Raises:
        ConfigError: the requested broker is not installed.
    """
    mosquitto = find_mosquitto()
    if choice == "mosquitto":
        if mosquitto is None:
            raise ConfigError(
                "--broker mosquitto: mosquitto is not installed "
                "(Debian/Ubuntu: apt-get install mosquitto), or use --broker embedded"
            )
        return BrokerPlan("mosquitto", f"requested with --broker mosquitto ({mosquitto})")
    if choice == "embedded":
        if not amqtt_available():
            raise ConfigError("--broker embedded needs amqtt: pip install 'fedmq[server]'")
        return BrokerPlan("embedded", "requested with --broker embedded")
    if mosquitto is not None:
        return BrokerPlan("mosquitto", f"found {mosquitto}")
    if amqtt_available():
        return BrokerPlan(
            "embedded",
            "mosquitto is not installed, so the embedded amqtt broker runs instead "
            "(MQTT 3.1.1, much slower: fine for small demos; apt-get install mosquitto)",
        )
    raise ConfigError(
        "no MQTT broker available: install mosquitto (apt-get install mosquitto) "
        "or amqtt (pip install 'fedmq[server]')"
    )


def make_broker(plan: BrokerPlan, state_dir: Path) -> BrokerProcess:
    """The (not yet started) broker process for ``plan``, keeping its files in ``state_dir``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    broker: BrokerProcess
    if plan.kind == "mosquitto":
        broker = MosquittoBroker(MosquittoConfig(), state_dir)
    else:
        broker = EmbeddedBroker(log_dir=state_dir)
    broker.preexec = die_with_parent()  # a simulator killed with -9 takes its broker along
    return broker
