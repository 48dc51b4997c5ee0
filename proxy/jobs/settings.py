"""Configuration of the jobs API (``/comfygate/v1/``): the ``[jobs]`` section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class JobsSettings(BaseModel):
    """``[jobs]``: the jobs API for programs (templates, jobs, progress, result cache)."""

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
