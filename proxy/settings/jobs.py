"""Configuration of the jobs API (``/comfygate/v1/``): the ``[jobs]`` section."""

from __future__ import annotations

import base64
import binascii
import ipaddress

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class WebhookSettings(BaseModel):
    """``[jobs.webhooks]``: completion notifications (Standard Webhooks), default deny.

    A job (``webhook = {url}``) or a template may ask for one; its URL must match
    ``allowed_urls`` and resolve to global addresses only (``allow_networks`` excepted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Send webhooks at all. False: a job asking for one is refused (422)."""
    secret: SecretStr = SecretStr("")
    """The signing secret, ``whsec_`` + base64 of 24..64 random bytes (``secret_file`` /
    ``COMFYGATE_JOBS__WEBHOOKS__SECRET``). Empty: webhooks are refused (422)."""
    allowed_urls: tuple[str, ...] = ()
    """Where notifications may go: URL prefixes (``https://hooks.example.com/comfy/``) or
    host patterns (``hooks.example.com``, ``*.example.com``). Empty: nowhere."""
    allow_networks: tuple[str, ...] = ()
    """Non-global networks (CIDR) a destination may resolve to anyway, e.g. ``10.1.2.0/24``
    for an internal receiver. Loopback, private, link-local (cloud metadata), multicast and
    reserved addresses are refused unless listed here."""
    allow_http: bool = False
    """Accept ``http://`` destinations (the notification is signed, but readable on the way)."""
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    """One attempt's whole budget (connect, send, answer)."""
    max_response_bytes: int = Field(default=65_536, ge=0)
    """At most this much of a receiver's answer is read (then the connection is closed)."""
    retry_period_seconds: float = Field(default=24 * 3600.0, ge=0)
    """Failed attempts are retried until this long after the first one; then dropped."""
    first_retry_seconds: float = Field(default=5.0, gt=0)
    """Delay after the first failure; doubled after each further one (with jitter)."""
    max_retry_seconds: float = Field(default=3600.0, gt=0)
    """Longest delay between two attempts."""
    jitter: float = Field(default=0.2, ge=0, le=1)
    """Each delay is drawn from ``[d * (1 - jitter), d]``: replicas' retries spread out."""
    lease_seconds: float = Field(default=60.0, gt=0)
    """A replica's claim on an attempt; another takes the message over once it expired (the
    claimer died). Keep it above ``timeout_seconds``."""
    poll_seconds: float = Field(default=1.0, gt=0)
    """How often a replica looks for due messages (its own enqueues wake it at once)."""
    concurrency: int = Field(default=8, ge=1, le=256)
    """Attempts in flight per replica."""

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw:
            try:
                key = base64.b64decode(raw.removeprefix("whsec_"), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("must be whsec_ followed by base64") from None
            if not raw.startswith("whsec_") or not 24 <= len(key) <= 64:
                raise ValueError("must be whsec_ + base64 of 24..64 bytes")
        return value

    @model_validator(mode="after")
    def _lease_above_timeout(self) -> WebhookSettings:
        if self.lease_seconds <= self.timeout_seconds:
            # A lease that ends mid-attempt lets a second replica send the same attempt.
            raise ValueError("lease_seconds must be above timeout_seconds")
        return self

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not a network (CIDR)") from None
        return value

    @field_validator("allowed_urls")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if "://" in item:
                if not item.startswith(("https://", "http://")) or "@" in item:
                    raise ValueError(f"{item!r}: a prefix is an http(s) URL without userinfo")
                if item.count("/") < 3:
                    raise ValueError(f"{item!r}: a prefix ends its host with '/'")
            elif not item or "/" in item or "*" in item.removeprefix("*."):
                raise ValueError(f"{item!r}: a host pattern is host or *.domain")
        return value


class JobsSettings(BaseModel):
    """``[jobs]``: the jobs API for programs (templates, jobs, progress, result cache)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Serve the jobs API under ``{base}/comfygate/v1/``. False: those paths go to ComfyUI
    like any other (and are refused there)."""
    templates_dir: str = ""
    """A directory whose ``*.toml`` files are job templates (name = file stem); reloaded with
    the policy (``POST /admin/reload``, SIGHUP). Empty: no templates (raw workflows only)."""
    raw_workflows: bool = True
    """Accept ``{"workflow": ...}`` jobs (still judged by the workflow policy). False: only
    templates may be run through the jobs API."""
    max_wait_seconds: float = Field(default=300.0, ge=0)
    """Longest ``?wait=`` honoured (a larger one is cut to this)."""
    poll_seconds: float = Field(default=0.5, gt=0)
    """How often a waiting request or event stream re-reads ComfyUI's queue and history."""
    retention_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    """How long a job's record is kept (listing, status, events)."""
    page_size: int = Field(default=50, ge=1, le=500)
    """Largest page of ``GET /jobs``."""
    watch_seconds: float = Field(default=2.0, gt=0)
    """How often the background watcher reads the state of unfinished jobs (so a job's end
    is recorded, its webhook sent and its result cached with no client waiting); the live
    event stream ends a job sooner."""
    preview_max_bytes: int = Field(default=2 * 1024 * 1024, ge=0)
    """Largest live preview kept for a job (``GET /jobs/{id}/preview``); 0: none kept."""
    webhooks: WebhookSettings = WebhookSettings()
    """``[jobs.webhooks]``: signed completion notifications."""
