"""``metrics_context``: the app's metric machinery with a lifetime, as one ``cleanup_ctx``.

* the upstream probe (up/down, latency, queue depth), after the pool whose session it uses;
* the generation tracker (shares per-prompt records through Redis when configured);
* with several workers and ``metrics.per_user_top_n``, the flusher of per-user counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp import web

from proxy.monitoring.exposition import multiprocess_dir
from proxy.monitoring.generation import generation_tracker
from proxy.monitoring.upstreams import upstream_probe
from proxy.observability.metrics import METRICS


async def metrics_context(app: web.Application) -> AsyncIterator[None]:

    async with AsyncExitStack() as stack:
        await stack.enter_async_context(asynccontextmanager(upstream_probe)(app))
        await stack.enter_async_context(asynccontextmanager(generation_tracker)(app))
        counter, directory = app[METRICS].user_counter, multiprocess_dir()
        if counter is not None and directory is not None:
            flusher = asynccontextmanager(counter.flusher)
            await stack.enter_async_context(flusher(directory, app[METRICS].task_failures))
        yield
