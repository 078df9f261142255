"""Every exception fedmq raises on purpose.

The tree separates "we asked for something impossible" (``LocalProtocolError``)
from "a peer sent us something bad" (``RemoteProtocolError``).  Services log and
drop remote errors and keep running; local errors are bugs or bad configuration.

::

    FedmqError
    ├── ConfigError                    bad configuration file or option
    ├── LocalProtocolError             we tried to build an invalid message/topic
    │   └── InvalidIdentifierError     a federation/client id is not usable in a topic
    ├── RemoteProtocolError            a peer's bytes or topic broke the protocol
    │   ├── InvalidTopicError          topic does not parse under the scheme
    │   ├── DecodeError                a payload could not be decoded
    │   │   ├── TruncatedMessageError  fewer bytes than the message declares
    │   │   ├── MalformedMessageError  not the expected structure (not msgpack, bad field)
    │   │   ├── UnsupportedVersionError  unknown format version or magic
    │   │   ├── UnsupportedDtypeError  a tensor dtype outside the allowed set
    │   │   ├── UnsupportedCodecError  a tensor codec or compression we do not know
    │   │   ├── LimitExceededError     a declared size is over the configured limits
    │   │   └── DecompressionError     the compressed stream is corrupt or lies
    │   └── IntegrityError             a checksum or sha256 does not match
    ├── BundleError                    a model bundle is missing files or inconsistent
    ├── StateError                     the aggregator's state directory is unreadable
    ├── TrainingError                  local training could not run or diverged
    │   ├── DataError                  the device's local data is missing, malformed or misfit
    │   └── TrainingCancelled          the caller asked training to stop between batches
    ├── CompileError                   a PyTorch/ONNX model could not be compiled
    │   └── UnsupportedOperatorError   an operator has no train-step translation
    ├── TransportError                 the broker is unreachable or the session broke
    └── SimulationError                ``fedmq simulate``: a part failed or rounds stalled

``LimitExceededError`` is also a ``LocalProtocolError`` when raised while
*encoding*; it carries ``what``, ``declared`` and ``limit`` either way.
"""

from __future__ import annotations


class FedmqError(Exception):
    """Base class of every fedmq error."""


class ConfigError(FedmqError):
    """A configuration file, option or environment variable is invalid."""


class LocalProtocolError(FedmqError):
    """We attempted to build a message or topic that the protocol forbids."""


class InvalidIdentifierError(LocalProtocolError, ValueError):
    """A federation or client identifier cannot be used as a topic level."""


class RemoteProtocolError(FedmqError):
    """A peer sent bytes or used a topic that breaks the protocol."""


class InvalidTopicError(RemoteProtocolError, ValueError):
    """A topic does not parse under the fedmq topic scheme."""


class DecodeError(RemoteProtocolError, ValueError):
    """A payload could not be decoded; the message names what was wrong."""


class TruncatedMessageError(DecodeError):
    """The payload holds fewer bytes than its header declares."""


class MalformedMessageError(DecodeError):
    """The payload does not have the expected structure."""


class UnsupportedVersionError(DecodeError):
    """The payload carries an unknown magic number or format version."""


class UnsupportedDtypeError(DecodeError):
    """A tensor's dtype is not in the allowed set."""


class UnsupportedCodecError(DecodeError):
    """A tensor codec or compression scheme is unknown."""


class LimitExceededError(DecodeError):
    """A declared size exceeds the configured limits.

    Raised before anything of the declared size is allocated.
    """

    def __init__(self, what: str, declared: int, limit: int) -> None:
        super().__init__(f"{what} is {declared}, over the limit of {limit}")
        self.what = what
        self.declared = declared
        self.limit = limit


class DecompressionError(DecodeError):
    """A compressed stream is corrupt or decompresses to a size other than declared."""


class IntegrityError(RemoteProtocolError):
    """A checksum or sha256 digest does not match the data."""


class BundleError(FedmqError):
    """A model bundle is missing files or its parts disagree."""


class StateError(FedmqError):
    """The aggregator's state directory is unreadable or inconsistent (not a peer's fault)."""


class TrainingError(FedmqError):
    """Local training could not run (bad data, diverged loss, runtime failure)."""


class CompileError(FedmqError):
    """A model could not be compiled into a train-step bundle."""


class UnsupportedOperatorError(CompileError):
    """An operator in the model has no train-step translation."""

    def __init__(self, operator: str, hint: str = "") -> None:
        message = f"operator {operator!r} is not supported by fedmq compile"
        if hint:
            message = f"{message}: {hint}"
        super().__init__(message)
        self.operator = operator


class TransportError(FedmqError):
    """The broker is unreachable or the MQTT session failed."""


class DataError(TrainingError):
    """Local data is missing, malformed, or does not fit the model."""


class SimulationError(FedmqError):
    """The simulation could not complete: a part failed or the rounds stalled."""


class TrainingCancelled(TrainingError):  # noqa: N818 - the agent interface's name
    """Training stopped early because the caller's ``should_stop()`` returned true.

    Raised between batches; no partial update is returned.
    """
