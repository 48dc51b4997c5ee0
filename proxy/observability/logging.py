"""structlog setup: JSON lines when stdout is not a TTY, a console renderer otherwise.

Nothing the proxy logs may contain a body, a token, a cookie or a query string; the fields of
the canonical ``request_finished`` line are chosen in ``chain.observe`` with that in mind.
"""

from __future__ import annotations

import logging
import operator
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from proxy.settings import LoggingSettings

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _orjson_dumps(obj: Any, default: Any = None) -> bytes:
    return orjson.dumps(obj, default=default)


class _IsoUtcStamper:
    """``timestamp``: what ``TimeStamper(fmt="iso", utc=True)`` writes (``datetime``'s
    ``isoformat`` with ``Z``: ``2026-01-02T03:04:05.678901Z``, no fraction on a whole second),
    without building a ``datetime`` per line: the date and time part is kept per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> Any:
        micros = time.time_ns() // 1000
        second, fraction = divmod(micros, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = (
            f"{self._prefix}.{fraction:06d}Z" if fraction else f"{self._prefix}Z"
        )
        return event_dict


@dataclass(frozen=True, slots=True)
class _JsonLines:
    """The JSON pipeline :func:`configure_logging` installed, for :func:`log_info`."""

    processors: tuple[Any, ...]
    """As installed (structlog's own list may be changed in place, as ``capture_logs`` does)."""
    out: structlog.BytesLogger

    def current(self) -> bool:
        """structlog still runs exactly these processors."""
        now = structlog.get_config()["processors"]
        mine = self.processors
        return len(now) == len(mine) and all(map(operator.is_, now, mine))


_json_lines: _JsonLines | None = None
"""Set while info lines are JSON lines on a binary stream (None: console, or below info)."""


def log_info(event: str, fields: dict[str, Any]) -> None:
    """One info line, the same bytes ``structlog.get_logger().info(event, **fields)`` writes,
    without the bound logger's per-call machinery (the per-request access line: a third of its
    cost). ``fields`` is consumed. Falls back to structlog when its configuration is not the
    one installed here (``structlog.testing.capture_logs``, another ``configure``)."""
    lines = _json_lines
    if lines is None or not lines.current():
        structlog.get_logger("comfygate").info(event, **fields)
        return
    fields["event"] = event
    processors = lines.processors
    for processor in processors[:-1]:
        fields = processor(None, "info", fields)
    lines.out.msg(processors[-1](None, "info", fields))


def configure_logging(settings: LoggingSettings, *, stream: Any = None) -> None:
    """Configure structlog (and the stdlib loggers aiohttp uses) once, at startup."""
    global _json_lines  # noqa: PLW0603 - the one configuration of the process
    out = stream if stream is not None else sys.stdout
    use_json = settings.format == "json" or (settings.format == "auto" and not out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _IsoUtcStamper(),
    ]
    if use_json:
        processors = [
            *shared,
            # SECURITY: no local variables in tracebacks: they would carry requests, cookies,
            # tokens and settings into the logs.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        binary: Any = getattr(out, "buffer", None) or out
        factory: Any = structlog.BytesLoggerFactory(binary)
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=out.isatty())]
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    _json_lines = None
    if use_json and _LEVELS[settings.level] <= logging.INFO:
        _json_lines = _JsonLines(tuple(processors), structlog.BytesLogger(binary))
    # aiohttp's own loggers: keep warnings (protocol errors) but never its access log.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL)
