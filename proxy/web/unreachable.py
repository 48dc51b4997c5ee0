"""The page a browser gets instead of a JSON 502/503/504 while ComfyUI does not answer.

A person opening ComfyUI through the proxy while ComfyUI is down (not started yet, restarting)
used to see a raw JSON error. A navigation (``GET``/``HEAD`` asking for HTML) now gets a small
page in the login page's style that reloads itself (``Refresh``), with the same status code, so
monitoring and scripts see what they saw before; API calls keep the JSON answer.
"""

from __future__ import annotations

import aiohttp_jinja2
from aiohttp import hdrs, web

from proxy.errors import ProxyError, UpstreamError
from proxy.settings import SETTINGS
from proxy.web import PAGE_HEADERS, STATIC_PREFIX, TEMPLATES_KEY

RETRY_SECONDS = 5
TEMPLATE = "unreachable.html"
UNREACHABLE_TYPES = frozenset({"no_upstream"})
"""Errors besides :class:`UpstreamError` that mean "no ComfyUI answers" (discovery found none)."""


def is_unreachable(exc: ProxyError) -> bool:
    return isinstance(exc, UpstreamError) or exc.error_type in UNREACHABLE_TYPES


def unreachable_page(request: web.Request, exc: ProxyError, status: int) -> web.Response:
    """The retrying page, with ``status`` (the JSON answer's) and the login page's headers."""
    base = request.app[SETTINGS].server.base_path
    context = {
        "static_url": f"{base}{STATIC_PREFIX}",
        "retry_seconds": RETRY_SECONDS,
    }
    response = aiohttp_jinja2.render_template(
        TEMPLATE, request, context, status=status, app_key=TEMPLATES_KEY
    )
    response.headers.update(PAGE_HEADERS)
    response.headers.update(exc.headers)
    response.headers[hdrs.CACHE_CONTROL] = "no-store"
    response.headers[hdrs.RETRY_AFTER] = str(RETRY_SECONDS)
    response.headers["Refresh"] = str(RETRY_SECONDS)
    return response


__all__ = ["RETRY_SECONDS", "is_unreachable", "unreachable_page"]
