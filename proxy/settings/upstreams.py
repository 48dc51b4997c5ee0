"""Configuration of the instance registry: ``[[upstream.instances]]``, ``[upstream.discovery]``,
``[upstream.health]`` and ``[upstream.placement]`` (fields of ``proxy.settings.UpstreamSettings``).

``upstream.urls`` stays the simple form (one instance per URL, weight 1, no tags); the other
forms add names, weights and tags, or find instances in DNS. See docs/multi-gpu.md.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\[\]-]{0,99}$")
"""Instance names appear in URLs (``/admin/upstreams/{name}/drain``), logs and metric labels."""
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_url(raw: str) -> str | None:
    """Why ``raw`` cannot be an instance URL, or None when it can."""
    url = URL(raw)
    if url.scheme not in ("http", "https") or not url.host:
        return "scheme must be http or https, with a host"
    if url.query_string or url.fragment:
        return "must not carry a query or fragment"
    return None


class InstanceSettings(_Section):
    """One ComfyUI instance of the static list (``[[upstream.instances]]``)."""

    url: str
    """The instance's base URL (``http(s)://host:port``, no query)."""
    name: str = ""
    """Label in logs, metrics, ownership records and the admin API; default ``host:port``."""
    weight: float = Field(default=1.0, gt=0)
    """Breaks ties between equally loaded instances (the heavier one first)."""
    tags: tuple[str, ...] = ()
    """Free-form labels shown by ``GET /admin/upstreams`` (e.g. the GPU model)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        problem = check_url(value)
        if problem is not None:
            raise ValueError(f"{value!r}: {problem}")
        return value.rstrip("/")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if value and not _NAME.fullmatch(value):
            raise ValueError(f"{value!r}: letters, digits and . _ : - [ ] only (at most 100)")
        return value


class DiscoverySettings(_Section):
    """Instances found in DNS: every address ``hostname`` resolves to is one instance
    (a Kubernetes headless Service, a Consul name...). Empty ``hostname``: no discovery."""

    hostname: str = ""
    """The DNS name to resolve; ``""`` = no discovery."""
    port: int = Field(default=8188, ge=1, le=65535)
    """The port of every discovered instance."""
    scheme: Literal["http", "https"] = "http"
    """The scheme of every discovered instance."""
    interval_seconds: float = Field(default=10.0, gt=0)
    """How often the name is resolved again; instances join and leave between two resolutions."""
    weight: float = Field(default=1.0, gt=0)
    """The weight of every discovered instance (see ``[[upstream.instances]]``)."""
    tags: tuple[str, ...] = ()
    """The tags of every discovered instance."""

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if value and not _HOSTNAME.fullmatch(value):
            raise ValueError(f"{value!r}: must be a DNS name")
        return value


class HealthSettings(_Section):
    """Active checks and the per-instance circuit breaker (only with several instances or
    discovery: a single configured instance is proxied as before)."""

    interval_seconds: float = Field(default=5.0, gt=0)
    """How often every instance gets a ``GET /prompt`` (which also reports its queue size)."""
    timeout_seconds: float = Field(default=2.0, gt=0)
    """Longest wait for one check's answer."""
    failure_threshold: int = Field(default=3, ge=1)
    """Consecutive failures (refused connections, 5xx, failed checks) that eject an instance."""
    open_seconds: float = Field(default=10.0, gt=0)
    """How long an ejected instance waits before a check may bring it back (half-open); doubles
    after each failed try, up to ``max_open_seconds``."""
    max_open_seconds: float = Field(default=120.0, gt=0)
    """Upper bound of the doubling ``open_seconds``."""

    @model_validator(mode="after")
    def _bounds(self) -> HealthSettings:
        if self.max_open_seconds < self.open_seconds:
            raise ValueError("max_open_seconds must be >= open_seconds")
        return self


class PlacementSettings(_Section):
    """Which instance runs a new prompt, and what the proxy does to make it possible."""

    max_attempts: int = Field(default=3, ge=1)
    """Instances tried for one submission when one refuses it (same prompt_id each time)."""
    capabilities_refresh_seconds: float = Field(default=300.0, gt=0)
    """How often each instance's ``/object_info`` (nodes, model lists) is read again; also read
    when an instance joins or comes back."""
    replicate_uploads: bool = True
    """Store every upload on every healthy instance at upload time."""
    copy_inputs: bool = True
    """Copy input files a prompt names to the chosen instance when it lacks them."""
    idempotency_ttl_seconds: float = Field(default=86400.0, gt=0)
    """How long an ``Idempotency-Key`` answer is kept and replayed."""


def instance_name(raw_url: str) -> str:
    """The default name of an instance: ``host:port`` of its URL (``[v6]:port`` for IPv6)."""
    url = URL(raw_url)
    netloc = url.raw_host or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if url.explicit_port:
        netloc = f"{netloc}:{url.port}"
    return netloc
