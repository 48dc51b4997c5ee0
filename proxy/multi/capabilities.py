"""What each instance can run, read from its ``/object_info``: node types and model lists.

ComfyUI's ``/object_info`` describes every node class; loaders declare their model inputs as
combos whose options are the files in the model folders (``ckpt_name`` lists ``checkpoints/``).
:class:`Capabilities` keeps the class names and, for each (class, model input), the options.

The document is large (MBs on a real install) and ComfyUI rebuilds it on every call, so it is
fetched through the workflow-policy catalog's per-instance cache (``app[CATALOG]``), which also
answers clients' ``/object_info``: one fetch per instance serves both. It is parsed again only
when the catalog holds a new copy. Refreshed every ``upstream.placement.
capabilities_refresh_seconds``, when an instance joins and when it comes back up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from proxy.comfy.capabilities import parse_object_info
from proxy.periodic import Periodic

if TYPE_CHECKING:
    from prometheus_client import Counter

log = structlog.get_logger("comfygate.upstream.capabilities")

ObjectInfoSource = Callable[[str], Awaitable[tuple[object, Mapping[str, Any]] | None]]
"""Given an instance name: ``(version, document)`` of its current ``/object_info``, or None
when it could not be read."""


OBJECT_INFO: web.AppKey[ObjectInfoSource] = web.AppKey("comfygate.object_info_source")
"""Optional: how capabilities read an instance's ``/object_info`` when something shares the
fetch (set by ``proxy.policy.catalog.upstream.catalog_context``: its per-instance cache also
answers clients); without it, the registry fetches directly."""


class CapabilityRefresher:
    """Keeps ``Instance.capabilities`` of every instance current."""

    def __init__(
        self,
        instances: Callable[[], list[Any]],
        source: ObjectInfoSource,
        *,
        interval: float,
        failures: Counter | None = None,
    ) -> None:
        """``instances``: the registry's ``pool.instances`` (objects with ``upstream`` and a
        settable ``capabilities``); ``failures``: ``Metrics.task_failures``."""
        self._instances = instances
        self._source = source
        self._loop = Periodic(
            self.refresh_all,
            interval,
            name="comfygate-capabilities",
            log=log,
            event="capabilities_refresh_failed",
            failures=failures,
        )

    async def refresh(self, name: str) -> None:
        """Read one instance's capabilities again (on join, on up, on schedule)."""
        instance = next((i for i in self._instances() if i.upstream.name == name), None)
        if instance is None:
            return
        try:
            fetched = await self._source(name)
        except Exception as exc:  # noqa: BLE001 - an unreadable instance keeps what we knew
            log.warning("capabilities_unavailable", upstream=name, error=type(exc).__name__)
            return
        if fetched is None:
            return
        version, info = fetched
        current = instance.capabilities
        if current is not None and version is not None and current.version == version:
            return
        instance.capabilities = parse_object_info(info, version)
        log.info(
            "capabilities_read",
            upstream=name,
            nodes=len(instance.capabilities.nodes),
            model_lists=len(instance.capabilities.models),
        )

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(i.upstream.name) for i in self._instances()))

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
