"""Configuration: one TOML file, every key overridable by ``COMFYGATE_<SECTION>__<KEY>``.

Precedence (highest first): explicit overrides (CLI flags) > environment > TOML file > defaults.
A secret may also be given as ``<key>_file``: a path whose stripped contents become the value,
so that secrets never have to sit in the TOML file or the process list.

Settings are parsed and validated once, at startup; the request path only reads the frozen
objects built here. ``load_settings`` raises :class:`SettingsError` listing every problem,
each as ``<dotted.key>: <rule it breaks>``.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from yarl import URL

from proxy.errors import SettingsError
from proxy.settings.auth import (
    DEFAULT_ROLES,
    AuthSettings,
    RoleSettings,
    check_role_references,
    effective_roles,
)
from proxy.settings.jobs import JobsSettings
from proxy.settings.limits import RateLimitSettings
from proxy.settings.metrics import MetricsSettings
from proxy.settings.policy import PolicySettings
from proxy.settings.scheduler import SchedulerSettings
from proxy.settings.upstreams import (
    DiscoverySettings,
    HealthSettings,
    InstanceSettings,
    PlacementSettings,
    instance_name,
)

ENV_PREFIX = "COMFYGATE_"
CONFIG_ENV = "COMFYGATE_CONFIG"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_DEFAULT_UPSTREAM_URLS = ("http://127.0.0.1:8188",)
_BOOL = TypeAdapter(bool)


FOLDER_SECRET_MIN_LENGTH = 32
"""Shortest ``isolation.folder_secret`` accepted (``proxy.tenancy.namespaces`` keys the
folder tags with it)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """The listening side."""

    host: str = "127.0.0.1"
    """Listen address; ``"0.0.0.0"`` for all IPv4 interfaces."""
    port: int = Field(default=8190, ge=1, le=65535)
    """Listen port (ComfyUI's own default is 8188)."""
    base_path: str = ""
    """Serve under a sub-path such as ``/comfy``; ``/comfy`` redirects to ``/comfy/``."""
    public_url: str = ""
    """How browsers reach the proxy (scheme://host[:port]); derived from requests when empty."""
    allowed_origins: tuple[str, ...] = ()
    """Other web origins (scheme://host[:port]) allowed to call ComfyUI through the proxy."""
    cors_origins: tuple[str, ...] = ()
    """Web origins whose pages may read the proxy's answers (CORS) when they authenticate with a
    bearer token: preflights are answered, no ``Access-Control-Allow-Credentials`` is ever sent
    (cookies and Basic from these origins stay refused unless also in ``allowed_origins``)."""
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Peers whose ``X-Forwarded-For/-Proto/-Host`` are believed (CIDRs)."""
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    """On SIGTERM: how long in-flight HTTP may finish before WebSockets are closed with 1001."""
    drain_seconds: float = Field(default=0.0, ge=0)
    """On SIGTERM: how long ``/readyz`` answers 503, still serving, before the listener closes."""
    max_inspected_body_mb: float = Field(default=32.0, gt=0)
    """Largest body the proxy reads itself (JSON it inspects); uploads stream past it."""
    max_inspected_bytes_in_flight_mb: float = Field(default=256.0, gt=0)
    """All inspected bodies this process (each worker) holds at once; a request that would go
    past it is refused with 503 + Retry-After before more of its body is read."""
    max_inspected_bytes_per_principal_mb: float = Field(default=64.0, gt=0)
    """Inspected bodies one user (one client address if anonymous) has in flight in this
    process; beyond it: 429 + Retry-After. At least ``max_inspected_body_mb``."""
    workers: int = Field(default=1, ge=1, le=256)
    """Processes serving the port (SO_REUSEPORT) under one supervisor; state they share
    (limits, ownership, revocations) needs ``[redis]`` when more than one."""

    @model_validator(mode="after")
    def _body_bounds(self) -> ServerSettings:
        # A bound below one allowed body would refuse that body forever (with a Retry-After).
        if self.max_inspected_bytes_per_principal_mb < self.max_inspected_body_mb:
            raise ValueError(
                "max_inspected_bytes_per_principal_mb must be at least max_inspected_body_mb"
            )
        if self.max_inspected_bytes_in_flight_mb < self.max_inspected_bytes_per_principal_mb:
            raise ValueError(
                "max_inspected_bytes_in_flight_mb must be at least "
                "max_inspected_bytes_per_principal_mb"
            )
        return self

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError("must start with '/' (e.g. /comfy) or be empty")
        if any(c in value for c in "?#%") or "//" in value:
            raise ValueError("must be a plain path without '?', '#', '%' or '//'")
        return value

    @field_validator("allowed_origins", "cors_origins")
    @classmethod
    def _allowed_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, origin in enumerate(value):
            url = URL(origin)
            if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
                raise ValueError(f"[{i}] {origin!r}: must be an origin such as https://host[:port]")
        return tuple(o.rstrip("/") for o in value)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if value:
            url = URL(value)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError("must be an http(s) URL such as https://comfy.example.com")
        return value.rstrip("/")


class UpstreamSettings(_Section):
    """The ComfyUI instances behind the proxy."""

    # instances and discovery come before urls: urls may be empty when one of them is set.
    instances: tuple[InstanceSettings, ...] = ()
    """``[[upstream.instances]]``: url, name, weight, tags. When set (or with discovery),
    ``urls`` left at its default is ignored."""
    discovery: DiscoverySettings = DiscoverySettings()
    urls: tuple[str, ...] = _DEFAULT_UPSTREAM_URLS
    """ComfyUI instances, the simple form (one instance per URL, named ``host:port``); see
    ``[[upstream.instances]]`` for names, weights and tags."""
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    """Longest wait for a connection to an instance."""
    read_timeout_seconds: float = Field(default=300.0, gt=0)
    """Longest silence while reading an upstream response (not the total duration)."""
    pool_limit_per_host: int = Field(default=0, ge=0)
    """Open connections per upstream; 0 = unlimited (each WebSocket holds one)."""
    keepalive_seconds: float = Field(default=30.0, ge=0)
    """How long an idle pooled connection is kept open."""
    preserve_host: bool = False
    """Send the client's Host upstream instead of the upstream's own (Origin is kept consistent)."""
    merge_timeout_seconds: float = Field(default=2.0, gt=0)
    """Several instances: how long a merged view (``GET /history``, ``/queue``, ``/api/jobs``,
    ``/prompt``) waits for each one; a slower instance is left out of that answer."""
    ws_reconnect_max_seconds: float = Field(default=10.0, gt=0)
    """Several instances: longest pause between reconnects of a client's socket to an instance
    that went away (the client's own socket stays open)."""
    lost_watch_seconds: float = Field(default=2.0, ge=0)
    """Several instances: how often each instance's queue is read to know which prompts it
    holds, so that they are reported as failed if it dies (0 = not watched)."""

    health: HealthSettings = HealthSettings()
    placement: PlacementSettings = PlacementSettings()
    home: str = ""
    """Name of the instance that keeps settings and user data (default: the first one)."""
    check_multi_user_at_startup: bool = True
    """Ask each ComfyUI at startup whether it runs with ``--multi-user`` and log a warning if
    not (it is asked again before user data requests either way: ``proxy.userdata``)."""

    @field_validator("urls")
    @classmethod
    def _urls(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        discovery = info.data.get("discovery")
        discovered = isinstance(discovery, DiscoverySettings) and bool(discovery.hostname)
        if not value and not info.data.get("instances") and not discovered:
            raise ValueError(
                "at least one upstream URL is required (or upstream.instances, "
                "upstream.discovery.hostname)"
            )
        problems = []
        for i, raw in enumerate(value):
            url = URL(raw)
            if url.scheme not in ("http", "https") or not url.host:
                problems.append(f"[{i}] {raw!r}: scheme must be http or https, with a host")
            elif url.query_string or url.fragment:
                problems.append(f"[{i}] {raw!r}: must not carry a query or fragment")
        if problems:
            raise ValueError("; ".join(problems))
        return tuple(u.rstrip("/") for u in value)

    @property
    def static_instances(self) -> tuple[InstanceSettings, ...]:
        """The configured list: ``urls`` as plain instances, then ``instances``. The default
        ``urls`` is a placeholder dropped when ``instances`` or discovery is configured."""
        urls = self.urls
        if (self.instances or self.discovery.hostname) and urls == _DEFAULT_UPSTREAM_URLS:
            urls = ()
        return (*(InstanceSettings(url=u) for u in urls), *self.instances)

    @model_validator(mode="after")
    def _instance_names(self) -> UpstreamSettings:
        names = [i.name or instance_name(i.url) for i in self.static_instances]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"instance names must be unique (duplicated: {duplicates})")
        if self.home and self.home not in names and not self.discovery.hostname:
            raise ValueError(f"home: {self.home!r} is not the name of a configured instance")
        return self


class WebSocketSettings(_Section):
    """The ``/ws`` relay."""

    max_message_mb: float = Field(default=64.0, gt=0)
    """Largest single frame accepted from either side (ComfyUI previews are 512 px; PNGs from
    SaveImageWebsocket can be several MB)."""
    send_queue_mb: float = Field(default=16.0, gt=0)
    """Bytes queued toward one slow client before stale previews are dropped."""
    heartbeat_seconds: float = Field(default=30.0, ge=0)
    """Ping interval toward the client (0 = none); a client that misses a pong is closed."""
    drop_stale_previews: bool = True
    """A slow client loses superseded binary previews; false: it is closed (1013) instead."""
    raw_relay: bool = True
    """Relay ``/ws`` frame by frame on the raw sockets (``proxy.relay.raw_ws``: less CPU per
    frame, a few KB per idle socket); false: through aiohttp's WebSocket objects on both
    sides, as before (also what TLS served by the proxy itself and several instances use)."""


class LoggingSettings(_Section):
    """What is logged, and how."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged."""
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: console renderer on a TTY, JSON lines otherwise."""
    access_log: bool = True
    """One canonical ``request_finished`` line per request."""


class IsolationSettings(_Section):
    """Each user's private view of a shared ComfyUI (admins see everything)."""

    enabled: bool = True
    """Every user sees only their own prompts, files and events (admins: everything)."""
    retention_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    """How long the proxy remembers who owns a prompt or a file (ComfyUI keeps history in
    memory until it restarts, the newest 10,000 entries)."""
    shared_input_folders: tuple[str, ...] = ("shared",)
    """Subfolders of ComfyUI's input/ every user may read (LoadImage), never write."""
    passed_event_types: tuple[str, ...] = ("status", "feature_flags")
    """WebSocket JSON events without a prompt id that every user still receives; other events
    the proxy cannot attribute to the user (custom-node broadcasts) are dropped."""
    folder_secret: str = ""
    """Keys users' folder names (``users/<comfy_user>-<hmac>``), so that nobody can derive
    another user's folder from a user name. Must be the same on every replica and kept across
    restarts (changing it moves everyone to new, empty folders). ``folder_secret_file`` / env.
    Empty: a random per-process key (a warning says so)."""
    preview_nodes: tuple[str, ...] = ("PreviewImage", "MaskPreview", "PreviewAudio")
    """Node classes whose ``temp/`` files (named by ComfyUI, not by an input) become the
    submitter's when their UI output names them. Only list nodes that never echo a file name
    taken from an input."""
    view_lookups: int = Field(default=256, ge=1)
    """Most prompts one tenant ``/history`` or ``/api/jobs`` request looks up one by one
    (``GET /history/{id}``, ``/api/jobs/{id}``); a request that needs more is answered from one
    full read of ComfyUI's history, filtered (``proxy.isolation.own_views``)."""

    @field_validator("shared_input_folders")
    @classmethod
    def _folders(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, folder in enumerate(value):
            parts = folder.strip("/").split("/")
            if not folder or folder.startswith("/") or ".." in parts or "\\" in folder:
                raise ValueError(f"[{i}] {folder!r}: must be a relative folder without '..'")
        return tuple(f.strip("/") for f in value)

    @field_validator("folder_secret")
    @classmethod
    def _folder_secret(cls, value: str) -> str:
        if value and len(value) < FOLDER_SECRET_MIN_LENGTH:
            raise ValueError(f"must be at least {FOLDER_SECRET_MIN_LENGTH} characters")
        return value


class RedisSettings(_Section):
    """Where shared state lives: one of ``url`` (a single server), ``sentinels`` +
    ``sentinel_master`` (a Sentinel-managed master, followed across failovers) or
    ``cluster_nodes`` (a Redis Cluster). None of them: no Redis, state in process memory."""

    url: str = ""
    """``redis://``, ``rediss://`` (TLS) or ``unix://``; credentials and db in the URL."""
    sentinels: tuple[str, ...] = ()
    """``host:port`` of the Sentinels that monitor ``sentinel_master``."""
    sentinel_master: str = ""
    """The master's name in the Sentinels' configuration (``sentinel monitor <name> ...``)."""
    sentinel_password: str = ""
    """Password of the Sentinels themselves (their ``requirepass``), when they have one."""
    cluster_nodes: tuple[str, ...] = ()
    """``host:port`` startup nodes of a Redis Cluster (the rest is discovered)."""
    username: str = ""
    """ACL user for the Sentinel-managed master or the cluster nodes (``url`` carries its own)."""
    password: str = ""
    """Password for the Sentinel-managed master or the cluster nodes (``url`` carries its own)."""
    db: int = Field(default=0, ge=0)
    """Database of a Sentinel-managed master (a cluster only has 0; ``url``: in its path)."""
    tls: bool = False
    """TLS to the Sentinels, the master and the cluster nodes (``url``: use ``rediss://``)."""
    tls_ca_certs: str = ""
    """PEM bundle of the CAs that sign the servers' certificates (empty: the system's)."""
    tls_certfile: str = ""
    """Client certificate (PEM) for servers that require mutual TLS."""
    tls_keyfile: str = ""
    """Private key of ``tls_certfile`` (empty: the key is in the certificate file)."""
    tls_verify: Literal["required", "optional", "none"] = "required"
    """Server certificate check. SECURITY: ``none`` accepts any server (lab use only)."""
    tls_check_hostname: bool = True
    """Whether the certificate must name the host connected to."""
    socket_timeout_seconds: float = Field(default=1.0, gt=0)
    """Longest wait for one command's reply (rate limit checks have their own, tighter
    ``rate_limits.redis_budget_ms``). Measured on the event loop: a busy process needs slack
    beyond the network round trip, or a load spike reads as a Redis outage."""
    connect_timeout_seconds: float = Field(default=1.0, gt=0)
    """Longest wait for a connection to a Redis server."""
    max_connections: int = Field(default=1024, ge=1)
    """Cap on pooled connections per Redis server (per node in a cluster). Idle ones are
    reused; a command that finds none free at the cap fails like a connection error, so keep
    it above the requests one proxy process serves at once (each holds one while it waits)."""
    retries: int = Field(default=1, ge=0)
    """Immediate retries of a command after a connection error (a restarted server leaves
    dead pooled connections behind); more would multiply the wait while Redis is down."""
    health_check_interval_seconds: float = Field(default=30.0, ge=0)
    """A pooled connection idle this long is PINGed before use (0: never)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and URL(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("scheme must be redis://, rediss:// or unix://")
        return value

    @field_validator("sentinels", "cluster_nodes")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        problems = [
            f"[{i}] {raw!r}: must be host:port (IPv6 as [addr]:port)"
            for i, raw in enumerate(value)
            if parse_host_port(raw) is None
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("tls_ca_certs", "tls_certfile", "tls_keyfile")
    @classmethod
    def _readable(cls, value: str) -> str:
        if value and not Path(value).is_file():
            raise ValueError(f"{value!r}: no such file")
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> RedisSettings:
        problems = []
        chosen = [k for k in ("url", "sentinels", "cluster_nodes") if getattr(self, k)]
        if len(chosen) > 1:
            problems.append(f"set only one of url, sentinels, cluster_nodes (got {chosen})")
        if bool(self.sentinels) != bool(self.sentinel_master):
            problems.append("sentinels and sentinel_master go together")
        if self.cluster_nodes and self.db:
            problems.append("db: a Redis Cluster only has database 0")
        tls_files = self.tls_ca_certs or self.tls_certfile or self.tls_keyfile
        plain_url = self.url and URL(self.url).scheme != "rediss"
        if (tls_files or self.tls_verify != "required") and (plain_url or not self.uses_tls):
            problems.append("tls_* settings need a rediss:// url or tls = true")
        if self.tls and self.url:
            problems.append("tls: with url, use a rediss:// url instead")
        if self.tls_keyfile and not self.tls_certfile:
            problems.append("tls_keyfile needs tls_certfile")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def mode(self) -> Literal["none", "standalone", "sentinel", "cluster"]:
        if self.sentinels:
            return "sentinel"
        if self.cluster_nodes:
            return "cluster"
        return "standalone" if self.url else "none"

    @property
    def uses_tls(self) -> bool:
        if self.url:
            return URL(self.url).scheme == "rediss"
        return self.tls


def parse_host_port(raw: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` as a pair; None when malformed."""
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            return None
        host = host[1:-1]
    elif ":" in host:
        return None  # a bare IPv6 address is ambiguous: brackets required
    return host, int(port)


class Settings(BaseSettings):
    """Everything comfygate reads at startup."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    websocket: WebSocketSettings = WebSocketSettings()
    logging: LoggingSettings = LoggingSettings()
    redis: RedisSettings = RedisSettings()
    auth: AuthSettings = AuthSettings()
    isolation: IsolationSettings = IsolationSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    policy: PolicySettings = PolicySettings()
    metrics: MetricsSettings = MetricsSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    jobs: JobsSettings = JobsSettings()  # the jobs API (proxy.jobs)
    roles: dict[str, RoleSettings] = dict(DEFAULT_ROLES)
    """``[roles.<name>]``: the built-in roles, plus or overridden by the configured ones."""

    @model_validator(mode="after")
    def _roles_referenced_exist(self) -> Settings:
        problems = check_role_references(self.auth, self.roles)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="before")
    @classmethod
    def _builtin_roles(cls, data: Any) -> Any:
        """``[roles.x]`` adds to or overrides the built-in roles unless ``auth.builtin_roles``
        is false (a configuration naming one role used to lose admin without a word)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("roles"), Mapping):
            return data
        auth = data.get("auth")
        raw = auth.get("builtin_roles", True) if isinstance(auth, Mapping) else True
        if isinstance(auth, AuthSettings):
            raw = auth.builtin_roles
        try:
            builtin = _BOOL.validate_python(raw)  # env values arrive as strings ("false")
        except ValidationError:
            builtin = True  # the [auth] section's own validation reports the bad value
        return {**data, "roles": effective_roles(data["roles"], builtin=builtin)}

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        """Resolve ``<key>_file`` entries of any section into ``<key>``."""
        if isinstance(data, Mapping):
            return {k: _resolve_files(k, v) for k, v in data.items()}
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _TOML_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


# pydantic-settings reads the TOML path from class configuration; load_settings sets it for
# the duration of one construction (startup is single-threaded).
_TOML_FILE: dict[str, Path | None] = {"path": None}


# Keys whose values are secrets: never printed by check-config, never logged.
SECRET_KEYS = frozenset(
    {
        "secret",
        "client_secret",
        "private_key",
        "url",
        "password",
        "sentinel_password",
        "bearer_token",
        "folder_secret",
    }
)


def _resolve_files(section: str, value: Any) -> Any:
    if not isinstance(value, Mapping):
        return value
    out = {k: _resolve_files(f"{section}.{k}", v) for k, v in value.items()}
    for key in [k for k in out if isinstance(k, str) and k.endswith("_file") and k != "users_file"]:
        path = out.pop(key)
        target = key.removesuffix("_file")
        if path in (None, ""):
            continue
        try:
            out[target] = Path(str(path)).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(
                f"{section}.{key}: cannot read {path!r}: {exc.strerror or exc}"
            ) from None
    return out


def _format_error(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-"))
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown key (check the spelling against config/comfygate.example.toml)"
    return f"{loc}: {msg}" if loc else msg


def redacted(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret replaced, for printing."""

    def scrub(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: ("<redacted>" if k in SECRET_KEYS and v and _is_secret(k, v) else scrub(v))
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return dict(scrub(settings.model_dump(mode="json")))


def _is_secret(key: str, value: Any) -> bool:
    # A URL is only secret when it carries a password (redis://:pw@host).
    return key != "url" or bool(URL(str(value)).password)


def load_settings(
    path: Path | str | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read, merge and validate the configuration.

    Raises:
        SettingsError: listing every problem, one ``key: rule`` line each.
    """
    if path is None:
        env_path = (environ if environ is not None else os.environ).get(CONFIG_ENV)
        path = env_path or None
    problems: list[str] = []
    toml_path = Path(path) if path is not None else None
    if toml_path is not None and not toml_path.is_file():
        raise SettingsError([f"config file {str(toml_path)!r}: not found"])
    saved_env = None
    if environ is not None:
        saved_env = dict(os.environ)
        os.environ.clear()
        os.environ.update(environ)
    _TOML_FILE["path"] = toml_path
    try:
        init: dict[str, Any] = {k: dict(v) for k, v in (overrides or {}).items()}
        return Settings(**init)
    except ValidationError as exc:
        problems.extend(_format_error(e) for e in exc.errors())
    except ValueError as exc:  # tomllib.TOMLDecodeError, unreadable *_file
        problems.append(f"config file {str(toml_path)!r}: {exc}")
    finally:
        _TOML_FILE["path"] = None
        if saved_env is not None:
            os.environ.clear()
            os.environ.update(saved_env)
    raise SettingsError(problems)


SETTINGS = web.AppKey("comfygate.settings", Settings)
"""The settings the application was built with (``proxy.app.create_app``)."""
