"""A real webhook receiver for the jobs API tests: an aiohttp server on a loopback port that
records every request and answers with programmed statuses; tests wait on its condition."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook

from proxy.jobs.webhooks.signing import generate_secret

SECRET = generate_secret()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def verified(self, secret: str = SECRET) -> Any:
        """The payload, checked by the reference Standard Webhooks library (raises if not)."""
        return Webhook(secret).verify(self.body, self.headers)


@dataclass
class Receiver:
    answers: list[int] = field(default_factory=list)
    """Statuses for the next requests to /hook, in order; then ``default``."""
    default: int = 200
    received: list[Received] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    port: int = 0
    _runner: web.AppRunner | None = None

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(predicate), 30)

    async def _record(self, request: web.Request) -> None:
        body = await request.read()
        async with self.changed:
            self.received.append(Received(request.path, dict(request.headers), body))
            self.changed.notify_all()

    async def _hook(self, request: web.Request) -> web.Response:
        await self._record(request)
        status = self.answers.pop(0) if self.answers else self.default
        return web.Response(status=status, text="ok" if status < 300 else "no")

    async def _redirect(self, request: web.Request) -> web.Response:
        await self._record(request)
        raise web.HTTPFound(self.url("/hook"))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_post("/redirect", self._redirect)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def webhook_settings(**overrides: Any) -> dict[str, Any]:
    """``[jobs.webhooks]`` for a receiver on loopback, with fast, jitter-free retries."""
    return {
        "secret": SECRET,
        "allowed_urls": ["127.0.0.1", "localhost"],
        "allow_networks": ["127.0.0.0/8"],
        "allow_http": True,
        "first_retry_seconds": 0.01,
        "max_retry_seconds": 0.05,
        "jitter": 0,
        "poll_seconds": 0.05,
        "timeout_seconds": 1,
        "lease_seconds": 2,
        **overrides,
    }
