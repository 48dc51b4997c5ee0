"""The gateway queue's app key (its own module: the guards and the lifetime both need it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.scheduler.gate import Gate

GATE: web.AppKey[Gate] = web.AppKey("comfygate.scheduler")
"""Only set with ``scheduler.enabled``: everything else checks ``app.get(GATE)``."""

__all__ = ["GATE"]
