"""The node schemas prompts are read with (``proxy.request.prompt.SchemaSource``): the policy
store's copy, learnt from the instances' ``/object_info`` through the catalog's cache."""

from __future__ import annotations

from aiohttp import web

from proxy.comfy.schemas import NodeSchemas
from proxy.policy.catalog.upstream import CATALOG
from proxy.policy.store import POLICY
from proxy.principal import Principal
from proxy.upstream.pool import POOL


class PolicySchemas:
    """:class:`proxy.request.prompt.SchemaSource` over the app's policy store and catalog
    (looked up per call: the catalog exists once the app's resources do)."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def restricts(self, principal: Principal) -> bool:
        store = self._app[POLICY]
        return store.enabled and not store.for_principal(principal).unrestricted

    def known(self) -> NodeSchemas | None:
        return self._app[POLICY].schemas

    async def refresh(self, *, fetch: bool) -> None:
        app = self._app
        pool = app[POOL]
        routable = pool.routable()
        upstream = routable[0] if routable else pool.home()
        cache = app[CATALOG].cache(upstream)
        if fetch or cache.snapshot is not None:
            await cache.current(app[POLICY].version)
