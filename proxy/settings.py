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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
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

from proxy.auth.settings import DEFAULT_ROLES, AuthSettings, RoleSettings, check_role_references
from proxy.errors import SettingsError
from proxy.limits.settings import RateLimitSettings

ENV_PREFIX = "COMFYGATE_"
CONFIG_ENV = "COMFYGATE_CONFIG"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """The listening side."""

    host: str = "127.0.0.1"
    port: int = Field(default=8190, ge=1, le=65535)
    base_path: str = ""
    """Serve under a sub-path such as ``/comfy``; ``/comfy`` redirects to ``/comfy/``."""
    public_url: str = ""
    """How browsers reach the proxy (scheme://host[:port]); derived from requests when empty."""
    allowed_origins: tuple[str, ...] = ()
    """Other web origins (scheme://host[:port]) allowed to call ComfyUI through the proxy."""
    trusted_proxies: tuple[IPNetwork, ...] = ()
    """Peers whose ``X-Forwarded-For/-Proto/-Host`` are believed (CIDRs)."""
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    """On SIGTERM: how long in-flight HTTP may finish before WebSockets are closed with 1001."""
    drain_seconds: float = Field(default=0.0, ge=0)
    """On SIGTERM: how long ``/readyz`` answers 503, still serving, before the listener closes."""
    max_inspected_body_mb: float = Field(default=32.0, gt=0)
    """Largest body the proxy reads itself (JSON it inspects); uploads stream past it."""

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError("must start with '/' (e.g. /comfy) or be empty")
        if any(c in value for c in "?#%") or "//" in value:
            raise ValueError("must be a plain path without '?', '#', '%' or '//'")
        return value

    @field_validator("allowed_origins")
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

    urls: tuple[str, ...] = ("http://127.0.0.1:8188",)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    read_timeout_seconds: float = Field(default=300.0, gt=0)
    """Longest silence while reading an upstream response (not the total duration)."""
    pool_limit_per_host: int = Field(default=0, ge=0)
    """Open connections per upstream; 0 = unlimited (each WebSocket holds one)."""
    keepalive_seconds: float = Field(default=30.0, ge=0)
    preserve_host: bool = False
    """Send the client's Host upstream instead of the upstream's own (Origin is kept consistent)."""

    @field_validator("urls")
    @classmethod
    def _urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one upstream URL is required")
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


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    """``auto``: console renderer on a TTY, JSON lines otherwise."""
    access_log: bool = True
    """One canonical ``request_finished`` line per request."""


class IsolationSettings(_Section):
    """Each user's private view of a shared ComfyUI (admins see everything)."""

    enabled: bool = True
    retention_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    """How long the proxy remembers who owns a prompt or a file (ComfyUI keeps history in
    memory until it restarts, the newest 10,000 entries)."""
    shared_input_folders: tuple[str, ...] = ("shared",)
    """Subfolders of ComfyUI's input/ every user may read (LoadImage), never write."""
    passed_event_types: tuple[str, ...] = ("status", "feature_flags")
    """WebSocket JSON events without a prompt id that every user still receives; other events
    the proxy cannot attribute to the user (custom-node broadcasts) are dropped."""

    @field_validator("shared_input_folders")
    @classmethod
    def _folders(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, folder in enumerate(value):
            parts = folder.strip("/").split("/")
            if not folder or folder.startswith("/") or ".." in parts or "\\" in folder:
                raise ValueError(f"[{i}] {folder!r}: must be a relative folder without '..'")
        return tuple(f.strip("/") for f in value)


class RedisSettings(_Section):
    url: str = ""
    """Empty: no Redis; state is kept in process memory (single process only)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and URL(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("scheme must be redis://, rediss:// or unix://")
        return value


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
    roles: dict[str, RoleSettings] = dict(DEFAULT_ROLES)

    @model_validator(mode="after")
    def _roles_referenced_exist(self) -> Settings:
        problems = check_role_references(self.auth, self.roles)
        if problems:
            raise ValueError("; ".join(problems))
        return self

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
SECRET_KEYS = frozenset({"secret", "private_key", "url"})


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
