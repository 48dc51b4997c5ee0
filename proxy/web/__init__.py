"""The proxy's own web pages (the login page): Jinja2 templates and their static files.

Shipped as package data (``pyproject.toml`` lists ``web/templates/*.html`` and ``web/static/*``).
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from aiohttp import web

PACKAGE = "proxy"
TEMPLATES = "web/templates"
"""For ``jinja2.PackageLoader(PACKAGE, TEMPLATES)``."""
STATIC_DIR = Path(__file__).resolve().parent / "static"
"""Served at ``<base path>/comfygate/static/``."""
STATIC_PREFIX = "/comfygate/static"
TEMPLATES_KEY = web.AppKey("comfygate.login_templates", jinja2.Environment)
"""The pages' Jinja2 environment (the login page's and the unreachable page's)."""

PAGE_HEADERS = {
    # The page loads only its own stylesheet and posts only to itself; nothing may frame it.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

__all__ = ["PACKAGE", "PAGE_HEADERS", "STATIC_DIR", "STATIC_PREFIX", "TEMPLATES", "TEMPLATES_KEY"]
