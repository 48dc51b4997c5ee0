"""Configuration of the jobs API (``/comfygate/v1/``): the ``[jobs]`` section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class WebhookSettings(BaseModel):
    """``[jobs.webhooks]``: signed completion notifications (Standard Webhooks)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    secret: str = ""
    """The signing secret, ``whsec_`` + base64 (Standard Webhooks). Empty: webhooks are
    refused at submission (``webhooks_disabled``); nothing unsigned is ever sent."""
    allowed_hosts: tuple[str, ...] = ()
    """Destination host names (exact, or ``*.example.com``) a webhook may go to. Empty: none
    (default deny: comfygate never calls an address a client chose unless configured)."""
    allow_private: bool = False
    """Allow destinations that resolve to private, loopback or link-local addresses (off:
    no request through comfygate reaches the internal network, even via an allowed name)."""
    allow_http: bool = False
    """Allow ``http://`` destinations (off: ``https://`` only)."""
    retry_seconds: float = Field(default=24 * 3600.0, gt=0)
    """How long a failing delivery is retried (exponential backoff), then dropped."""
    first_retry_seconds: float = Field(default=5.0, gt=0)
    """Delay before the first retry; doubled each time, at most ``max_retry_interval``."""
    max_retry_interval_seconds: float = Field(default=3600.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)
    """One delivery attempt's total time."""
    poll_seconds: float = Field(default=1.0, gt=0)
    """How often the outbox is checked for due deliveries (also woken on every new one)."""


class JobsSettings(BaseModel):
    """``[jobs]``: the jobs API for programs (templates, jobs, progress, webhooks, cache)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
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
    webhooks: WebhookSettings = WebhookSettings()
