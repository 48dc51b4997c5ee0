"""Two proxy replicas sharing a real Redis in front of the three fake instances (the lost-prompt
tests): each replica is the real app, as ``multi_proxy`` builds it, with ``[redis]`` set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.multi.dispatch import MULTI
from proxy.multi.lost import LostPrompts
from proxy.observability.metrics import METRICS
from proxy.upstream.pool import POOL, Upstream
from tests.fakes.comfyui import FakeComfyUI
from tests.integration.multi_support import Client, Fakes


@dataclass
class Replica:
    client: Client

    @property
    def lost(self) -> LostPrompts:
        lost: LostPrompts = self.client.app[MULTI].lost
        return lost

    def upstream(self, name: str) -> Upstream:
        upstream: Upstream | None = self.client.app[POOL].get(name)
        assert upstream is not None
        return upstream

    def lost_count(self, upstream: str) -> float:
        registry: CollectorRegistry = self.client.app[METRICS].registry
        value = registry.get_sample_value("comfygate_prompts_lost_total", {"upstream": upstream})
        return value or 0.0


@pytest.fixture
def replicas(multi_proxy: Callable[..., Any], redis_url: str) -> Callable[..., Any]:
    """``r1, r2 = await replicas(**sections)``: two replicas on one Redis."""

    async def build(**sections: dict[str, Any]) -> tuple[Replica, Replica]:
        upstream = {"ws_reconnect_max_seconds": 0.5, **sections.pop("upstream", {})}
        made = [
            Replica(await multi_proxy(redis={"url": redis_url}, upstream=upstream, **sections))
            for _ in range(2)
        ]
        return made[0], made[1]

    return build


def holder(fakes: Fakes, prompt_id: str) -> int:
    """Which fake has ``prompt_id`` queued or running."""
    for i, fake in enumerate(fakes):
        running, pending = fake.queue.current_queue()
        if any(item[1] == prompt_id for item in (*running, *pending)):
            return i
    raise AssertionError(f"{prompt_id} is on no instance")


def victim_of(fakes: Fakes, prompt_id: str) -> tuple[int, FakeComfyUI]:
    index = holder(fakes, prompt_id)
    return index, fakes[index]


__all__ = ["Replica", "holder", "replicas", "victim_of"]
