"""The access line's direct path (``log_info``) writes the bytes structlog writes, and steps
aside when structlog is configured otherwise; the timestamp is ``TimeStamper``'s format."""

from __future__ import annotations

import datetime
import io
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from proxy.observability import logging as proxy_logging
from proxy.observability.logging import configure_logging, log_info
from proxy.settings import LoggingSettings

FIELDS: dict[str, Any] = {
    "request_id": "0123456789abcdef0123456789abcdef",
    "client": "10.0.0.7",
    "method": "GET",
    "path": "/history/x",
    "rule": "history",
    "status": 200,
    "upstream": None,
    "bytes_in": 0,
    "bytes_out": 2048,
    "duration_ms": 0.512,
    "upstream_ms": 0.2,
    "proxy_ms": 0.312,
    "rejected_by": None,
    "error": None,
}
ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


class _Stream:
    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def isatty(self) -> bool:
        return False


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    config = structlog.get_config()
    lines = proxy_logging._json_lines
    yield
    structlog.configure(**config)
    proxy_logging._json_lines = lines


def _without_time(line: bytes) -> dict[str, Any]:
    record: dict[str, Any] = orjson.loads(line)
    assert ISO_Z.fullmatch(record.pop("timestamp"))
    return record


@pytest.mark.usefixtures("restore_structlog")
def test_the_direct_line_is_structlogs_line() -> None:
    stream = _Stream()
    configure_logging(LoggingSettings(format="json", level="info"), stream=stream)
    structlog.get_logger("comfygate").info("request_finished", **FIELDS)
    log_info("request_finished", dict(FIELDS))
    structlog_line, direct_line = stream.buffer.getvalue().splitlines()
    # Same keys in the same order, same values (the timestamps differ by the time between).
    assert list(orjson.loads(direct_line)) == list(orjson.loads(structlog_line))
    assert _without_time(direct_line) == _without_time(structlog_line)
    assert _without_time(direct_line)["event"] == "request_finished"


@pytest.mark.usefixtures("restore_structlog")
def test_bound_context_variables_are_on_the_direct_line_too() -> None:
    stream = _Stream()
    configure_logging(LoggingSettings(format="json", level="info"), stream=stream)
    structlog.contextvars.bind_contextvars(worker=3)  # what a worker process binds
    try:
        log_info("request_finished", dict(FIELDS))
    finally:
        structlog.contextvars.unbind_contextvars("worker")
    assert orjson.loads(stream.buffer.getvalue())["worker"] == 3


@pytest.mark.usefixtures("restore_structlog")
def test_below_info_and_captured_logs_go_through_structlog() -> None:
    stream = _Stream()
    configure_logging(LoggingSettings(format="json", level="warning"), stream=stream)
    log_info("request_finished", dict(FIELDS))
    assert stream.buffer.getvalue() == b""  # filtered by level, as structlog would
    configure_logging(LoggingSettings(format="json", level="info"), stream=stream)
    with capture_logs() as logs:
        log_info("request_finished", dict(FIELDS))
    assert logs == [{**FIELDS, "event": "request_finished", "log_level": "info"}]
    assert stream.buffer.getvalue() == b""


def test_the_timestamp_is_timestampers_format() -> None:
    stamper = proxy_logging._IsoUtcStamper()
    before = datetime.datetime.now(tz=datetime.UTC)
    stamp = stamper(None, "info", {})["timestamp"]
    after = datetime.datetime.now(tz=datetime.UTC)
    assert ISO_Z.fullmatch(stamp)
    parsed = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before - datetime.timedelta(microseconds=1) <= parsed <= after


def test_a_whole_second_has_no_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    """``datetime.isoformat`` drops a zero fraction; so does the stamper."""
    stamper = proxy_logging._IsoUtcStamper()
    monkeypatch.setattr("proxy.observability.logging.time.time_ns", lambda: 1_700_000_000 * 10**9)
    assert stamper(None, "info", {})["timestamp"] == "2023-11-14T22:13:20Z"
    monkeypatch.setattr(
        "proxy.observability.logging.time.time_ns", lambda: 1_700_000_000 * 10**9 + 5_000
    )
    assert stamper(None, "info", {})["timestamp"] == "2023-11-14T22:13:20.000005Z"
    expected = datetime.datetime.fromtimestamp(1_700_000_000.000005, tz=datetime.UTC)
    assert expected.isoformat().replace("+00:00", "Z") == "2023-11-14T22:13:20.000005Z"
