"""Log lines for people and for journald: plain text, or one JSON object per line.

Both services (``fedmq serve``, ``fedmq-agent run``) log through the standard
:mod:`logging` module and set it up with :func:`configure_logging`.  With
``log_format = "json"`` every line is one JSON object (``journalctl -o cat | jq``,
Loki, Elasticsearch) carrying the ids a plant filters by::

    {"ts": "2025-03-01T10:04:05.123+00:00", "level": "INFO", "logger": "fedmq.aggregator.reporting",
     "message": "round 3 open: 5 agents selected ...", "federation": "line-3", "round": 3}

``federation`` (and, on a device, ``client``) are the service's own ids, added to every
line; a line about one round or one agent carries ``round`` and ``client`` as well,
either from the ``extra=`` of its logging call or from :func:`log_context` around the
code that logs it (an asyncio task inherits the context it was created in).  No
dependency beyond the standard library: the device install stays lean.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import IO, Any, Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
FIELDS = ("federation", "round", "client", "update_id", "reason")
"""Structured fields a JSON line carries when the record has them (in this order)."""
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "fedmq_log_context", default=None
)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (e.g. ``round=3``) to every line logged in this context.

    Tasks created inside the ``with`` block keep the fields for their whole life.
    """
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Adds the service's ids and the :func:`log_context` fields to every record.

    A field the logging call passed itself (``extra=``) wins.

    Args:
        **fields: constant fields, e.g. ``federation="line-3"``.
    """

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.fields = {name: value for name, value in fields.items() if value is not None}

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the fields (never drops a record)."""
        for source in (_context.get() or {}, self.fields):
            for name, value in source.items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``message``, the ids."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (no newline inside)."""
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        document: dict[str, Any] = {
            "ts": stamp.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=False, default=str)


def make_handler(
    log_format: LogFormat = "text",
    *,
    stream: IO[str] | None = None,
    text_format: str = TEXT_FORMAT,
    **fields: Any,
) -> logging.Handler:
    """A stream handler writing ``log_format`` lines with ``fields`` on every record."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(text_format))
    handler.addFilter(ContextFilter(**fields))
    return handler


def configure_logging(
    level: str | int,
    log_format: LogFormat = "text",
    *,
    stream: IO[str] | None = None,
    text_format: str = TEXT_FORMAT,
    **fields: Any,
) -> None:
    """Send every log line to ``stream`` (stderr) as ``log_format``; replaces the root's handlers.

    Args:
        level: the root logger's level.
        log_format: ``text`` (``text_format``) or ``json`` (:class:`JsonFormatter`).
        stream: where lines go (default: stderr, which systemd hands to journald).
        text_format: the :class:`logging.Formatter` format of text lines.
        **fields: ids added to every line (``federation=…``, ``client=…``).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.addHandler(make_handler(log_format, stream=stream, text_format=text_format, **fields))
    root.setLevel(level)
