"""JSON log lines: one object per line with the service's ids and each line's round/client."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from fedmq.log_format import JsonFormatter, configure_logging, log_context, make_handler


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = make_handler("json", stream=stream, federation="line-3", client="press-7")
    log = logging.getLogger("fedmq.test.log_format")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, stream
    log.removeHandler(handler)
    log.propagate = True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_carries_the_service_ids_and_its_own_fields(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logger
    log.info("round %d open", 3, extra={"round": 3})
    log.warning("rejected %s", "u1", extra={"round": 3, "client": "press-9", "reason": "outlier"})
    first, second = lines(stream)
    assert first["message"] == "round 3 open"
    assert (first["level"], first["logger"]) == ("INFO", "fedmq.test.log_format")
    assert (first["federation"], first["client"], first["round"]) == ("line-3", "press-7", 3)
    assert str(first["ts"]).endswith("+00:00")
    # A field of the call wins over the handler's constant.
    assert (second["client"], second["reason"], second["level"]) == (
        "press-9",
        "outlier",
        "WARNING",
    )


def test_log_context_reaches_tasks_created_inside_it(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logger

    async def main() -> None:
        async def work() -> None:
            await asyncio.sleep(0)
            log.info("inside")

        with log_context(round=7):
            task = asyncio.create_task(work())
        log.info("outside")
        await task

    asyncio.run(main())
    by_message = {line["message"]: line for line in lines(stream)}
    assert by_message["inside"]["round"] == 7
    assert "round" not in by_message["outside"]


def test_exceptions_and_odd_values_stay_on_one_line(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, stream = logger
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("failed with %r", object(), extra={"update_id": b"\xff"})
    assert len(stream.getvalue().splitlines()) == 1
    [line] = lines(stream)
    assert "ValueError: bad" in str(line["exception"])
    assert line["update_id"] == "b'\\xff'"


def test_configure_logging_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        configure_logging("INFO", "json", stream=stream, federation="f")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        logging.getLogger("fedmq.x").debug("hidden")
        logging.getLogger("fedmq.x").info("shown")
        configure_logging("WARNING", "text", stream=stream, text_format="%(levelname)s %(message)s")
        logging.getLogger("fedmq.x").warning("plain")
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved:
            root.addHandler(handler)
        root.setLevel(level)
    first, second = stream.getvalue().splitlines()
    assert json.loads(first) == {**json.loads(first), "message": "shown", "federation": "f"}
    assert second == "WARNING plain"
