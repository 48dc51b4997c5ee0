"""The proxy's own web pages (the login page): Jinja2 templates and their static files.

Shipped as package data (``pyproject.toml`` lists ``web/templates/*.html`` and ``web/static/*``).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = "proxy"
TEMPLATES = "web/templates"
"""For ``jinja2.PackageLoader(PACKAGE, TEMPLATES)``."""
STATIC_DIR = Path(__file__).resolve().parent / "static"
"""Served at ``<base path>/comfygate/static/``."""

__all__ = ["PACKAGE", "STATIC_DIR", "TEMPLATES"]
