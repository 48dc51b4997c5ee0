"""Headless Chromium (Debian's package) driving the stock frontend through a real proxy port.

Every test gets: a fake ComfyUI serving the frontend's static files on a loopback port, the
proxy app on another loopback port (``start_proxy``), and a fresh browser context whose page
records what the browser saw (:class:`PageRecorder`).

Authentication is on, as in production: the proxy has a users file with one user
(:data:`USERNAME` / :data:`PASSWORD`). A test signs in either through the real login page in the
browser (``tests/browser/test_login_browser.py``), or - when it is about the relay, not about
login - by putting a session cookie the app itself minted into the context
(:meth:`ProxyServer.sign_in`). Requests to any host other than 127.0.0.1
are aborted before they leave the browser (the frontend asks api.comfy.org for release notes),
as in the recorded captures; they are kept apart and never counted as failures.

Playwright never downloads a browser here: Chromium is always launched by path, Debian's
``/usr/bin/chromium`` (``COMFYGATE_CHROMIUM`` may name another build). Missing, the tests skip,
or fail when ``CI`` is set. Screenshots go to ``tests/artifacts/`` (git-ignored), including
``FAILED-<test>.png`` for a failed test.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    Response,
    Route,
    WebSocket,
    async_playwright,
)
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.auth.authenticator import AUTH
from proxy.settings import SETTINGS
from tests.conftest import IN_CI, make_settings
from tests.fakes.comfyui import FakeComfyUI
from tests.support.users import write_users

CHROMIUM = Path(os.environ.get("COMFYGATE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
LOCAL_HOST = "127.0.0.1"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
DEFAULT_TIMEOUT_MS = 20_000
EVENT_TIMEOUT_S = 20.0

USERNAME = "alice"
PASSWORD = "correct horse battery staple"
ROLES = ("user",)
"""The one user of the proxy's users file (an ordinary user, not an admin)."""

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# What the page saw
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    """One HTTP response the browser received (or one request that failed without one)."""

    method: str
    url: str
    resource_type: str
    status: int | None
    failure: str | None = None

    @property
    def target(self) -> str:
        """Path and query, as sent on the request line."""
        parts = urlsplit(self.url)
        return parts.path + (f"?{parts.query}" if parts.query else "")


def is_foreign(url: str) -> bool:
    """A network URL whose host is not 127.0.0.1 (data:/blob: URLs never reach the network)."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https", "ws", "wss") and parts.hostname != LOCAL_HOST


class SocketRecorder:
    """Frames of one WebSocket the page opened, with a way to wait for a given frame."""

    def __init__(self, ws: WebSocket) -> None:
        self.url = ws.url
        self.received: list[str | bytes] = []
        self.sent: list[str | bytes] = []
        self.closed = False
        self.error: str | None = None
        self._changed = asyncio.Event()
        ws.on("framereceived", self._on_received)
        ws.on("framesent", self._on_sent)
        ws.on("close", self._on_close)
        ws.on("socketerror", self._on_error)

    @property
    def path(self) -> str:
        return urlsplit(self.url).path

    def _on_sent(self, payload: str | bytes) -> None:
        self.sent.append(payload)

    def _on_received(self, payload: str | bytes) -> None:
        self.received.append(payload)
        self._changed.set()

    def _on_close(self, _ws: WebSocket) -> None:
        self.closed = True
        self._changed.set()

    def _on_error(self, error: str) -> None:
        self.error = error
        self._changed.set()

    def messages(self) -> list[dict[str, Any]]:
        """The JSON text frames received so far (``{"type", "data"}``)."""
        out: list[dict[str, Any]] = []
        for frame in self.received:
            if isinstance(frame, str):
                try:
                    message = json.loads(frame)
                except json.JSONDecodeError:
                    continue
                if isinstance(message, dict):
                    out.append(message)
        return out

    def types(self) -> list[str]:
        return [str(m.get("type")) for m in self.messages()]

    async def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        within: float = EVENT_TIMEOUT_S,
    ) -> dict[str, Any]:
        """The first received JSON message matching ``predicate``; waits for it if needed."""
        try:
            async with asyncio.timeout(within):
                while True:
                    for message in self.messages():
                        if predicate(message):
                            return message
                    if self.closed or self.error:
                        break
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pass
        pytest.fail(
            f"no matching frame on {self.url} within {within}s "
            f"(closed={self.closed}, error={self.error}); received types: {self.types()}"
        )

    async def wait_for_type(self, kind: str, **data: Any) -> dict[str, Any]:
        """The first message of type ``kind`` whose ``data`` has the given items."""

        def matches(message: dict[str, Any]) -> bool:
            payload = message.get("data")
            return (
                message.get("type") == kind
                and isinstance(payload, dict)
                and all(payload.get(k) == v for k, v in data.items())
            )

        return await self.wait_for(matches)


@dataclass
class PageRecorder:
    """A page plus everything it did on the network, collected from Playwright's events."""

    page: Page
    responses: list[Exchange] = field(default_factory=list)
    failures: list[Exchange] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    sockets: list[SocketRecorder] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    _answered: dict[Request, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def install(self) -> None:
        self.page.set_default_timeout(DEFAULT_TIMEOUT_MS)
        await self.page.route(is_foreign, self._abort_foreign)
        self.page.on("response", self._on_response)
        self.page.on("requestfailed", self._on_request_failed)
        self.page.on("websocket", self._on_websocket)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))

    async def _abort_foreign(self, route: Route) -> None:
        self.blocked.append(f"{route.request.method} {route.request.url}")
        await route.abort("blockedbyclient")

    def _on_response(self, response: Response) -> None:
        request = response.request
        self._answered[request] = response.status
        self.responses.append(
            Exchange(request.method, request.url, request.resource_type, response.status)
        )
        self._changed.set()

    def _on_request_failed(self, request: Request) -> None:
        if is_foreign(request.url):
            return  # aborted by _abort_foreign, on purpose
        self.failures.append(
            Exchange(
                request.method,
                request.url,
                request.resource_type,
                self._answered.get(request),
                request.failure,
            )
        )

    def _on_websocket(self, ws: WebSocket) -> None:
        self.sockets.append(SocketRecorder(ws))
        self._changed.set()

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def network_failures(self) -> list[Exchange]:
        """Requests that got no HTTP answer at all (refused, reset, truncated...).

        Chromium reports ``net::ERR_ABORTED`` for requests whose response headers did arrive
        but whose body the page no longer wanted (a 404 stylesheet, a fetch whose body is never
        read): the captures of real ComfyUI show those too. They are judged by their status.
        """
        return [
            f
            for f in self.failures
            if not (f.failure == "net::ERR_ABORTED" and f.status is not None)
        ]

    def trouble(self) -> str:
        """What went wrong on the network so far, for failure messages."""
        bad = [r for r in self.responses if r.status is not None and r.status >= 400]
        return (
            f"answers >= 400: {bad}; network failures: {self.network_failures()}; "
            f"console errors: {self.console_errors[-10:]}"
        )

    async def _wait(
        self, find: Callable[[], T | None], within: float, what: Callable[[], str]
    ) -> T:
        try:
            async with asyncio.timeout(within):
                while (found := find()) is None:
                    self._changed.clear()
                    await self._changed.wait()
                return found
        except TimeoutError:
            pytest.fail(f"{what()} within {within}s")

    async def wait_for_socket(
        self, path: str, *, within: float = EVENT_TIMEOUT_S
    ) -> SocketRecorder:
        """The first WebSocket the page opened at ``path`` (waits for it)."""
        return await self._wait(
            lambda: next((s for s in self.sockets if s.path == path), None),
            within,
            lambda: (
                f"no WebSocket at {path} (opened: {[s.url for s in self.sockets]}); "
                f"{self.trouble()}"
            ),
        )

    async def wait_for_response(
        self,
        predicate: Callable[[Exchange], bool],
        *,
        within: float = EVENT_TIMEOUT_S,
        what: str = "matching response",
    ) -> Exchange:
        """The first response the page received that matches ``predicate`` (waits for it)."""
        return await self._wait(
            lambda: next((r for r in self.responses if predicate(r)), None),
            within,
            lambda: f"no {what}; {self.trouble()}",
        )

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        await self.page.screenshot(path=str(path))
        return path


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium_executable() -> Path:
    """Debian's Chromium; a missing browser skips locally and fails in CI."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        reason = (
            f"Chromium not found at {CHROMIUM}: install Debian's chromium package "
            "(`make browser-deps`) to run the browser tests"
        )
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


@dataclass(frozen=True)
class Answered:
    """One request the fake answered, with the status it answered (WS handshakes: 101)."""

    method: str
    raw_path: str  # path + query exactly as on the wire
    headers: CIMultiDictProxy[str]
    status: int


class AnswerLog:
    """What the fake answered. ``FakeComfyUI.received`` has the requests but not the statuses,
    so an ``on_response_prepare`` hook is attached to the fake's app (before it starts): it sees
    the status that goes on the wire, even where aiohttp decides it late (a static file that
    does not exist is a 200 ``FileResponse`` until it is prepared as a 404).
    """

    def __init__(self) -> None:
        self.answered: list[Answered] = []

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        self.answered.append(
            Answered(request.method, request.raw_path, request.headers, response.status)
        )

    def statuses(self) -> dict[tuple[str, str], set[int]]:
        """(method, path?query) -> the statuses the fake answered with."""
        out: dict[tuple[str, str], set[int]] = {}
        for a in self.answered:
            out.setdefault((a.method, a.raw_path), set()).add(a.status)
        return out


@dataclass
class FakeUpstream:
    """The fake ComfyUI and the log of its answers."""

    fake: FakeComfyUI
    log: AnswerLog

    @property
    def url(self) -> str:
        return self.fake.url


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[FakeUpstream]:
    """A fake ComfyUI that also serves the stock frontend, on a real loopback port."""
    fake = FakeComfyUI(root=tmp_path / "comfyui", frontend=True)
    log = AnswerLog()
    fake.app.on_response_prepare.append(log.on_response_prepare)
    await fake.start()
    yield FakeUpstream(fake, log)
    await fake.stop()


@dataclass(frozen=True)
class ProxyServer:
    """The proxy app listening on a real loopback port."""

    url: str
    """``http://127.0.0.1:<port>``, without the base path."""
    app: web.Application

    @property
    def base_path(self) -> str:
        return self.app[SETTINGS].server.base_path

    @property
    def home(self) -> str:
        """Where the UI lives: ``<url><base_path>/``."""
        return f"{self.url}{self.base_path}/"

    @property
    def login_url(self) -> str:
        return f"{self.url}{self.base_path}/login"

    @property
    def session_cookie(self) -> str:
        return self.app[SETTINGS].auth.session.cookie_name

    async def sign_in(
        self, context: BrowserContext, subject: str = USERNAME, roles: tuple[str, ...] = ROLES
    ) -> None:
        """Put a session the app itself issued into ``context``, as the login page would have
        (same name, path, HttpOnly, SameSite=Lax): for tests about the relay, not the login."""
        value, _session = self.app[AUTH].sessions.issue(subject, roles, source="token")
        await self.put_session_cookie(context, value)

    async def put_session_cookie(self, context: BrowserContext, value: str) -> None:
        """Set the session cookie in ``context`` to ``value`` (as the login page sets it)."""
        await context.add_cookies(
            [
                {
                    "name": self.session_cookie,
                    "value": value,
                    "domain": LOCAL_HOST,
                    "path": self.base_path or "/",
                    "httpOnly": True,
                    "sameSite": "Lax",
                }
            ]
        )


StartProxy = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    """A users file with the one user :data:`USERNAME` (password :data:`PASSWORD`)."""
    return write_users(tmp_path / "users.toml", {USERNAME: ROLES}, PASSWORD)


@pytest.fixture
async def start_proxy(upstream: FakeUpstream, users_file: Path) -> AsyncIterator[StartProxy]:
    """Start the real proxy app on a real TCP port in front of ``upstream``.

    Auth on (``tests.conftest.make_settings``) with ``users_file`` for the login page.
    ``await start_proxy(server={"base_path": "/comfy"})`` returns a :class:`ProxyServer`.
    """
    runners: list[web.AppRunner] = []

    async def start(**sections: dict[str, Any]) -> ProxyServer:
        auth = dict(sections.pop("auth", {}))
        auth["login"] = {"users_file": str(users_file), **auth.get("login", {})}
        settings = make_settings(upstream.url, auth=auth, **sections)
        app = create_app(settings, registry=CollectorRegistry())
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, LOCAL_HOST, 0)
        await site.start()
        port = runner.addresses[0][1]
        return ProxyServer(f"http://{LOCAL_HOST}:{port}", app)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def browser(chromium_executable: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(chromium_executable), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest.fixture
async def context(browser: Browser, start_proxy: StartProxy) -> AsyncIterator[BrowserContext]:
    """A fresh context per test; closed before the proxy and the fake stop."""
    ctx = await browser.new_context(viewport={"width": 1280, "height": 800})
    yield ctx
    await ctx.close()


PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell that the test failed."""
    report: pytest.TestReport = yield
    item.stash.setdefault(PHASE_REPORTS, {})[report.when] = report
    return report


@pytest.fixture
async def recorder(
    context: BrowserContext, request: pytest.FixtureRequest
) -> AsyncIterator[PageRecorder]:
    """The test's page, recording; a failed test leaves ``tests/artifacts/FAILED-<test>.png``."""
    page = await context.new_page()
    rec = PageRecorder(page)
    await rec.install()
    yield rec
    report = request.node.stash.get(PHASE_REPORTS, {}).get("call")
    if report is not None and report.failed and not page.is_closed():
        await rec.screenshot(f"FAILED-{request.node.name}.png")
