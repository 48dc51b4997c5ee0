"""The gateway queue's collectors, on the app's registry (``docs/scheduler.md``)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.scheduler.fair import jain_index

WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
COST_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)


class SchedulerMetrics:
    """Depth, waits, releases, the scheduler's own cost and the fairness index."""

    def __init__(self, registry: CollectorRegistry, window_seconds: float) -> None:
        self.depth = Gauge(
            "comfygate_scheduler_queue_depth",
            "Prompts held in the gateway queue, per role of their owner",
            ["role"],
            registry=registry,
        )
        self.depth_total = Gauge(
            "comfygate_scheduler_queue_depth_total",
            "Prompts held in the gateway queue",
            registry=registry,
        )
        self.wait = Histogram(
            "comfygate_scheduler_wait_seconds",
            "Time a prompt was held before its release to ComfyUI, per role",
            ["role"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.releases = Counter(
            "comfygate_scheduler_releases_total",
            "Release outcomes: released, refused (ComfyUI 4xx), unreachable (requeued), "
            "recovered (a lapsed lease whose prompt ComfyUI had), resent, pulled_back",
            ["outcome"],
            registry=registry,
        )
        self.cost = Histogram(
            "comfygate_scheduler_decision_seconds",
            "The scheduler's own time per release (read the queue, choose, claim)",
            buckets=COST_BUCKETS,
            registry=registry,
        )
        self.fairness = Gauge(
            "comfygate_scheduler_fairness_index",
            "Jain's index of GPU time per user over the window (1 = equal shares)",
            registry=registry,
        )
        self.unavailable = Counter(
            "comfygate_scheduler_store_errors_total",
            "Gateway queue operations that failed because the store (Redis) did",
            ["op"],
            registry=registry,
        )
        self.window = window_seconds
        self._runs: deque[tuple[float, str, float]] = deque()
        self._roles: set[str] = set()

    def ran(self, owner: str, seconds: float, now: float | None = None) -> None:
        """A prompt of ``owner`` ran ``seconds`` of GPU time; the index is recomputed."""
        now = time.monotonic() if now is None else now
        self._runs.append((now, owner, seconds))
        while self._runs and self._runs[0][0] < now - self.window:
            self._runs.popleft()
        per_user: dict[str, float] = {}
        for _, user, spent in self._runs:
            per_user[user] = per_user.get(user, 0.0) + spent
        self.fairness.set(jain_index(per_user.values()))

    def set_depth(self, by_role: dict[str, int]) -> None:
        for role in self._roles - by_role.keys():
            self.depth.labels(role).set(0)
        for role, n in by_role.items():
            self.depth.labels(role).set(n)
        self._roles |= by_role.keys()
        self.depth_total.set(sum(by_role.values()))


__all__ = ["SchedulerMetrics"]
