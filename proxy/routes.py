"""The ComfyUI surface as data: which rule a request falls under, decided on the normalised path.

ComfyUI registers every API route twice (``/x`` and ``/api/x``) and aiohttp routes on the
percent-decoded path, so ``/history``, ``/api/history`` and ``/api/%68istory`` are one
resource. Every decision the proxy makes (guards, logs, metrics) is made on the path of
:func:`proxy.target.canonical_target`, and that canonical form is what ComfyUI is sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from yarl import URL

from proxy.errors import BadRequest, NotFound
from proxy.settings.limits import RouteClass

API_PREFIX = "/api"

ComfyRule = Literal[
    "ws",
    "prompt",
    "queue",
    "interrupt",
    "history",
    "jobs",
    "view",
    "upload",
    "object_info",
    "models",
    "system_stats",
    "free",
    "users",
    "settings",
    "userdata",
    "internal",
    "assets_admin",
    "assets",
    "manager",
    "static",
    "other",
]
"""The families of ComfyUI's surface (:data:`RULES`, then :data:`OTHER`)."""
OwnRoute = Literal[
    "healthz",
    "readyz",
    "metrics",
    "base_redirect",
    "login",
    "logout",
    "login_static",
    "oidc_start",
    "oidc_callback",
    "frontend_extension",
    "whoami",
    "admin_reload",
    "admin_upstreams",
    "admin_upstreams_drain",
    "admin_upstreams_undrain",
    "admin_scheduler",
    "jobs_api_openapi",
    "jobs_api_templates",
    "jobs_api_template",
    "jobs_api_jobs",
    "jobs_api_job",
    "jobs_api_events",
    "jobs_api_preview",
]
"""The proxy's own routes (their aiohttp route names, ``app.create_app``)."""
RuleName = ComfyRule | OwnRoute
"""Every rule a request can fall under: the label of its logs and metrics, the key of its
entry in the route table (``app.build_routes``). mypy checks every comparison against it."""
COMFY_RULES: Final[tuple[ComfyRule, ...]] = get_args(ComfyRule)
OWN_ROUTES: Final[tuple[OwnRoute, ...]] = get_args(OwnRoute)


@dataclass(frozen=True, slots=True)
class RouteRule:
    """One family of ComfyUI routes. ``name`` is a bounded label for logs and metrics."""

    name: RuleName
    patterns: tuple[str, ...]
    methods: frozenset[str] | None = None
    """None: any method."""
    websocket: bool = False
    api_only: bool = False
    """Exists upstream only under ``/api`` (assets); the bare path is a static file there."""
    limit: RouteClass | None = "read"
    """The rate-limit class its requests spend (``proxy.limits.classes``); None: not limited."""
    limit_post: RouteClass | None = None
    """The class a ``POST`` spends instead (``submit`` on ``/prompt``); None: ``limit``."""
    limit_upgrade: RouteClass | None = None
    """The class a WebSocket upgrade spends instead (``ws_connect``); None: ``limit``."""
    _regexes: tuple[re.Pattern[str], ...] = field(default=(), compare=False, repr=False)

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return any(r.fullmatch(path) for r in self._regexes)


def _compile(pattern: str) -> re.Pattern[str]:
    """``{x}`` matches one segment; a trailing ``/*`` matches the prefix and everything below it."""
    prefix_match = pattern.endswith("/*")
    body = pattern[:-2] if prefix_match else pattern
    regex = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(body))
    if prefix_match:
        regex += "(?:/.*)?"
    return re.compile(regex)


def rule(
    name: RuleName,
    *patterns: str,
    methods: str | None = None,
    websocket: bool = False,
    api_only: bool = False,
    limit: RouteClass | None = "read",
    limit_post: RouteClass | None = None,
    limit_upgrade: RouteClass | None = None,
) -> RouteRule:
    """Build a rule; ``methods`` is a space-separated list (GET implies HEAD, as in aiohttp);
    ``limit*``: its rate-limit classes (:class:`RouteRule`)."""
    method_set = None
    if methods is not None:
        method_set = frozenset(methods.split())
        if "GET" in method_set:
            method_set |= {"HEAD"}
    return RouteRule(
        name=name,
        patterns=patterns,
        methods=method_set,
        websocket=websocket,
        api_only=api_only,
        limit=limit,
        limit_post=limit_post,
        limit_upgrade=limit_upgrade,
        _regexes=tuple(_compile(p) for p in patterns),
    )


# First match wins; patterns are normalised paths (percent-decoded, every /api prefix removed).
# Rate-limit classes (proxy.limits.classes): "read" unless a rule says otherwise.
RULES: tuple[RouteRule, ...] = (
    rule("ws", "/ws", methods="GET", websocket=True, limit_upgrade="ws_connect"),
    rule("prompt", "/prompt", limit_post="submit"),  # queues GPU work: the scarcest thing
    rule("queue", "/queue"),
    rule("interrupt", "/interrupt"),
    rule("history", "/history", "/history/{id}"),
    rule("jobs", "/jobs", "/jobs/*"),
    rule("view", "/view", "/view_metadata/*", limit="view"),
    rule("upload", "/upload/image", "/upload/mask", limit="upload"),
    rule("object_info", "/object_info", "/object_info/*"),
    rule("models", "/models", "/models/*", "/embeddings", "/experiment/models/*"),
    rule("system_stats", "/system_stats", "/features"),
    rule("free", "/free"),
    rule("users", "/users", "/users/*"),
    rule("settings", "/settings", "/settings/*"),
    rule("userdata", "/userdata", "/userdata/*", "/v2/userdata", "/v2/userdata/*"),
    rule("internal", "/internal/*"),
    # Server-side model downloads from arbitrary URLs and asset-database maintenance.
    rule(
        "assets_admin",
        "/assets/download",
        "/assets/seed",
        "/assets/seed/*",
        "/assets/prune",
        "/tasks/*",
        api_only=True,
    ),
    rule("assets", "/assets", "/assets/*", "/tags", "/tags/*", api_only=True),
    rule(
        "manager",
        "/manager/*",
        "/customnode/*",
        "/snapshot/*",
        "/externalmodel/*",
        "/comfyui_manager/*",
        # ComfyUI-Manager v4 (frontend 1.27 calls these): the same powers under /v2.
        "/v2/manager/*",
        "/v2/customnode/*",
        "/v2/snapshot/*",
        "/v2/externalmodel/*",
        "/v2/comfyui_manager/*",
    ),
    rule(
        "static",
        *("/", "/extensions/*", "/templates/*", "/scripts/*", "/assets/*", "/docs/*"),
        limit="static",  # the stock UI loads hundreds of files at start
    ),
)
OTHER = rule("other", "/*")
_UNLIMITED_OWN: Final[frozenset[OwnRoute]] = frozenset(
    {"healthz", "readyz", "logout", "login_static", "base_redirect", "metrics"}
)
"""The proxy's own routes no request of which is limited: nothing of them reaches ComfyUI."""
OWN_RULES: Final[dict[str, RouteRule]] = {
    name: rule(
        name,
        # The login form is limited per client address (nobody is known yet), only its POST.
        limit=None if name in _UNLIMITED_OWN or name == "login" else "read",
        limit_post="login" if name == "login" else None,
    )
    for name in OWN_ROUTES
}
"""The rule of each of the proxy's own routes, by aiohttp route name."""
RULES_BY_NAME: Final[dict[str, RouteRule]] = {r.name: r for r in (*RULES, OTHER)} | OWN_RULES
"""Every rule by its name."""

# Lookup tables, so classifying costs a dict lookup and at most a few regex matches:
# exact paths, and the rules whose patterns start with a given first segment (in RULES order).
_EXACT: dict[str, tuple[RouteRule, ...]] = {}
_BY_SEGMENT: dict[str, tuple[RouteRule, ...]] = {}
for _r in RULES:
    for _p in _r.patterns:
        if "{" not in _p and not _p.endswith("/*"):
            _EXACT[_p] = (*_EXACT.get(_p, ()), _r)
        _segment = _p.split("/")[1]
        if _r not in _BY_SEGMENT.get(_segment, ()):
            _BY_SEGMENT[_segment] = (*_BY_SEGMENT.get(_segment, ()), _r)


def classify(method: str, path: str, *, prefixed: bool = True) -> RouteRule:
    """The rule for a normalised path; :data:`OTHER` when none matches.

    ``prefixed`` says whether the request carried the ``/api`` prefix (see ``api_only``).
    """
    for candidate in _EXACT.get(path, ()):
        if (candidate.methods is None or method in candidate.methods) and (
            prefixed or not candidate.api_only
        ):
            return candidate
    for candidate in _BY_SEGMENT.get(path.split("/", 2)[1], ()):
        if (prefixed or not candidate.api_only) and candidate.matches(method, path):
            return candidate
    return OTHER


_UNREADABLE = re.compile(r"%(?!2F|25)|[\x00-\x1f\x7f]|[\ud800-\udfff]")
"""In a ``path_safe`` string: an escape aiohttp could not decode (malformed, or not UTF-8),
a control character, or a byte that was not UTF-8 on the wire."""


def normalise_path(raw_path: str, *, base_path: str = "") -> tuple[str, bool]:
    """The path every decision is made on (the path part of :func:`proxy.target.canonical_target`).

    Decoded like aiohttp's router (everything but ``%2F`` and ``%25``), repeated slashes merged,
    ``base_path`` and then every leading ``/api`` removed, so ``/api/api/jobs`` (where ComfyUI
    mirrors its ``/api/jobs`` routes) and ``/jobs`` get the same decision. Returns the path and
    whether an ``/api`` prefix was removed.

    Raises:
        BadRequest: ``bad_path``: ``.``/``..`` segments (browsers never send them; a crafted one
            could make a decision and the upstream's routing disagree), or an escape, control
            character or byte that the proxy cannot decode exactly as ComfyUI would.
        NotFound: the path is not below ``base_path``.
    """
    path = URL.build(path=raw_path.partition("?")[0], encoded=True).path_safe
    if _UNREADABLE.search(path):
        raise BadRequest(
            "path has a malformed or non-UTF-8 escape or a control character",
            error_type="bad_path",
        )
    if "//" in path:
        path = re.sub("/{2,}", "/", path)
    segments = path.split("/")
    if "." in segments or ".." in segments:
        raise BadRequest("path must not contain '.' or '..' segments", error_type="bad_path")
    if base_path:
        # Only the base path and what is below it belongs to ComfyUI; "/comfy" itself is
        # redirected by its own route, so here a prefix match must end at a '/'.
        if not path.startswith(base_path + "/"):
            raise NotFound(f"not under the base path {base_path}/", error_type="not_found")
        path = path[len(base_path) :]
    prefixed = False
    while path == API_PREFIX or path.startswith(API_PREFIX + "/"):
        path = path[len(API_PREFIX) :] or "/"
        prefixed = True
    return path, prefixed
