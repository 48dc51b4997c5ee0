"""Configuration of the gateway queue: the ``[scheduler]`` section (``docs/scheduler.md``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SchedulerSettings(BaseModel):
    """The gateway queue: hold prompts in comfygate and release them fairly
    (docs/scheduler.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    """Hold every accepted ``POST /prompt`` in the gateway queue and release it to ComfyUI by
    weighted fair queueing across users (on by default: nothing changes for clients beyond
    ``X-Comfygate-Estimated-Wait`` and fair order, see docs/scheduler.md). False: plain
    pass-through, each prompt forwarded to ComfyUI at once."""
    max_running: int = Field(default=1, ge=1)
    """Prompts an instance runs at once (ComfyUI runs one)."""
    max_pending: int = Field(default=1, ge=0)
    """Prompts released to an instance beyond the running ones, so that the GPU never idles
    between two prompts (0: release only when the instance is idle)."""
    pull_back: bool = True
    """Take a released-but-pending prompt back from ComfyUI (``POST /queue`` delete) when a
    prompt that fair order puts first arrives, so it starts as soon as the running one ends."""
    weights: dict[str, float] = {}
    """Share of GPU time per role (``{ power = 2.0 }``); a principal gets the largest of its
    roles' weights, 1.0 for roles not named."""
    default_cost_seconds: float = Field(default=10.0, gt=0)
    """Execution time assumed for a workflow shape never seen run (until one is measured)."""
    poll_interval_ms: int = Field(default=50, ge=5, le=5000)
    """How often the feeding replica reads each instance's queue while prompts are held or
    released (and how soon a submission made on another replica is seen)."""
    lease_seconds: float = Field(default=10.0, gt=0)
    """A replica's claim on one release (and on feeding one instance); after it lapses without
    an answer (the replica died) another replica finds out whether ComfyUI got the prompt and
    releases it again only if it did not."""
    fairness_window_seconds: float = Field(default=600.0, gt=0)
    """Span of GPU time per user over which the fairness index metric is computed."""
    redis_fail_mode: Literal["closed", "pass_through"] = "closed"
    """When Redis cannot be reached on submission: ``closed`` answers 503
    ``scheduler_unavailable`` (nothing is forwarded unscheduled); ``pass_through`` forwards the
    prompt directly to ComfyUI, unscheduled (availability over fairness)."""


__all__ = ["SchedulerSettings"]
