"""structlog setup: JSON lines when stdout is not a TTY, a console renderer otherwise.

Nothing the proxy logs may contain a body, a token, a cookie or a query string; the fields of
the canonical ``request_finished`` line are chosen in ``chain.observe`` with that in mind.
"""

from __future__ import annotations

import logging
import sys
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


def configure_logging(settings: LoggingSettings, *, stream: Any = None) -> None:
    """Configure structlog (and the stdlib loggers aiohttp uses) once, at startup."""
    out = stream if stream is not None else sys.stdout
    use_json = settings.format == "json" or (settings.format == "auto" and not out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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
    # aiohttp's own loggers: keep warnings (protocol errors) but never its access log.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.CRITICAL)
