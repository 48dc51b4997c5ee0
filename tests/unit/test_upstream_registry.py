"""The instance registry: breaker states, the pool interface, events, drains, DNS discovery,
capabilities parsing (no network: the pool's HTTP clients are never started here)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.comfy.capabilities import combo_options, parse_object_info
from proxy.errors import ServiceUnavailable
from proxy.multi.discovery import DnsDiscovery, NoSuchName, instance_url
from proxy.redis.breaker import BreakerState
from proxy.settings import Settings, load_settings
from proxy.settings.upstreams import HealthSettings
from proxy.upstream.health_checks import Breaker, queue_remaining
from proxy.upstream.pool import Upstream, UpstreamPool


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(**upstream: Any) -> Settings:
    return load_settings(None, overrides={"upstream": upstream}, environ={})


def pool_of(*urls: str, clock: Clock | None = None, **upstream: Any) -> UpstreamPool:
    if urls:
        upstream["urls"] = list(urls)
    return UpstreamPool(settings(**upstream).upstream, clock=clock or Clock())


# -- breaker ---------------------------------------------------------------------------------


def test_breaker_opens_after_threshold_and_recovers_through_a_probe() -> None:
    clock = Clock()
    breaker = Breaker(HealthSettings(failure_threshold=3, open_seconds=10), clock)
    assert not breaker.failure()
    assert not breaker.failure()
    assert breaker.failure()  # the third consecutive one opens it
    assert breaker.state is BreakerState.OPEN
    assert not breaker.probe_due()
    assert breaker.retry_in() == 10
    clock.now += 10
    assert breaker.probe_due()
    assert breaker.state is not BreakerState.OPEN  # half-open
    assert breaker.success()
    assert breaker.closed


def test_breaker_success_resets_the_count() -> None:
    breaker = Breaker(HealthSettings(failure_threshold=2), Clock())
    breaker.failure()
    breaker.success()
    assert not breaker.failure()
    assert breaker.closed


def test_breaker_refused_opens_at_once_and_failed_probes_double_the_wait() -> None:
    clock = Clock()
    breaker = Breaker(HealthSettings(open_seconds=10, max_open_seconds=25), clock)
    assert breaker.failure(immediate=True)
    for expected in (20, 25, 25):
        clock.now += breaker.open_for
        assert breaker.probe_due()
        assert not breaker.failure()  # half-open -> open: no second "down"
        assert breaker.open_for == expected
    clock.now += 25
    assert breaker.probe_due()
    assert breaker.success()
    assert breaker.open_for == 10


def test_breaker_ignores_a_late_success_while_open() -> None:
    clock = Clock()
    breaker = Breaker(HealthSettings(), clock)
    breaker.failure(immediate=True)
    assert not breaker.success()
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"exec_info": {"queue_remaining": 3}}', 3),
        (b'{"exec_info": {}}', None),
        (b"not json", None),
        (b'{"exec_info": {"queue_remaining": -1}}', None),
    ],
)
def test_queue_remaining(body: bytes, expected: int | None) -> None:
    assert queue_remaining(body) == expected


# -- the pool interface ----------------------------------------------------------------------


def test_single_instance_is_unmanaged_and_home() -> None:
    pool = pool_of("http://gpu1:8188")
    assert not pool.managed
    assert pool.home() == pool.pick() == pool.upstreams[0]
    pool.report_failure(pool.upstreams[0], "refused")  # no breaker: 502s as before
    assert pool.routable() == list(pool.upstreams)


def test_static_instances_names_weights_tags_and_home() -> None:
    pool = pool_of(
        instances=[
            {"url": "http://10.0.0.1:8188", "name": "gpu-a", "weight": 2, "tags": ["4090"]},
            {"url": "http://10.0.0.2:8188"},
        ],
        home="10.0.0.2:8188",
    )
    assert pool.managed
    assert [u.name for u in pool.upstreams] == ["gpu-a", "10.0.0.2:8188"]  # default urls dropped
    a = pool.get("gpu-a")
    assert a is not None
    assert a.weight == 2
    assert a.tags == ("4090",)
    assert a.host_header == "10.0.0.1:8188"
    assert pool.home().name == "10.0.0.2:8188"
    assert pool.get("nope") is None


async def test_failures_drains_and_events() -> None:
    clock = Clock()
    pool = pool_of("http://a:1", "http://b:2", clock=clock)
    events: list[tuple[str, str]] = []

    async def listener(event: str, upstream: Upstream) -> None:
        events.append((event, upstream.name))

    pool.subscribe(listener)
    pool.subscribe(lambda event, upstream: None)  # sync listeners too
    a = pool.instance("a:1")
    assert a is not None
    await pool.record_failure(a, "refused")
    assert not pool.is_healthy("a:1")
    assert [u.name for u in pool.routable()] == ["b:2"]
    assert [u.name for u in pool.reachable()] == ["b:2"]
    await pool.set_drained("b:2", True)
    assert pool.routable() == []
    assert [u.name for u in pool.reachable()] == ["b:2"]  # drained: still read from
    assert pool.retry_after() == 10
    clock.now += 10
    assert a.breaker.probe_due()
    await pool.record_success(a)
    assert pool.is_healthy("a:1")
    await pool.set_drained("b:2", False)
    assert events == [("down", "a:1"), ("up", "a:1")]
    assert pool.readiness({"a:1": True, "b:2": False}) == {"a:1": "up", "b:2": "down"}


async def test_report_failure_threshold_for_5xx() -> None:
    pool = pool_of("http://a:1", "http://b:2")
    a = pool.upstreams[0]
    for _ in range(2):
        pool.report_response(a, 503)
    pool.report_response(a, 500)  # ComfyUI's answer to a malformed request: not counted
    pool.report_response(a, 200)  # and a success resets
    for _ in range(2):
        pool.report_response(a, 502)
    assert pool.is_healthy("a:1")
    pool.report_response(a, 504)
    assert not pool.is_healthy("a:1")


def test_load_bookkeeping() -> None:
    pool = pool_of("http://a:1", "http://b:2")
    pool.note_submitted("a:1", frozenset({"x.safetensors"}))
    a = pool.instance("a:1")
    assert a is not None
    assert a.outstanding == 1
    assert a.last_checkpoints == {"x.safetensors"}
    a.observe_queue(4)  # the instance's own count includes what we sent
    assert a.outstanding == 4


def test_home_without_instances_is_a_503() -> None:
    pool = pool_of(urls=[], discovery={"hostname": "comfy.svc"})
    with pytest.raises(ServiceUnavailable) as info:
        pool.home()
    assert info.value.headers["Retry-After"]


# -- discovery -------------------------------------------------------------------------------


async def test_discovery_joins_and_leaves_and_survives_dns_failures() -> None:
    pool = pool_of(urls=[], discovery={"hostname": "comfy.svc", "port": 8188})
    answers: list[list[str] | Exception] = [
        ["10.0.0.2", "10.0.0.1", "10.0.0.1"],
        OSError("SERVFAIL"),
        ["10.0.0.2", "fd00::3"],
        NoSuchName("comfy.svc"),
    ]

    async def resolver(hostname: str, port: int) -> list[str]:
        assert (hostname, port) == ("comfy.svc", 8188)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    events: list[tuple[str, str]] = []
    pool.subscribe(lambda event, upstream: events.append((event, upstream.name)))
    discovery = DnsDiscovery(pool, pool.settings.discovery, resolver)
    await discovery.resolve_once()
    assert [u.name for u in pool.upstreams] == ["10.0.0.1:8188", "10.0.0.2:8188"]
    assert all(u.discovered for u in pool.upstreams)
    await discovery.resolve_once()  # a failed resolution changes nothing
    assert len(pool.upstreams) == 2
    await discovery.resolve_once()
    assert [u.name for u in pool.upstreams] == ["10.0.0.2:8188", "[fd00::3]:8188"]
    assert pool.upstreams[1].base == "http://[fd00::3]:8188"
    await discovery.resolve_once()  # the name is gone: so are its instances
    assert len(pool.upstreams) == 0
    assert events == [
        ("joined", "10.0.0.1:8188"),
        ("joined", "10.0.0.2:8188"),
        ("joined", "[fd00::3]:8188"),
        ("left", "10.0.0.1:8188"),
        ("left", "10.0.0.2:8188"),
        ("left", "[fd00::3]:8188"),
    ]


def test_instance_url() -> None:
    assert instance_url("http", "10.0.0.1", 8188) == "http://10.0.0.1:8188"
    assert instance_url("https", "::1", 443) == "https://[::1]:443"
    assert instance_url("http", "gpu-1.local", 80) == "http://gpu-1.local:80"


# -- capabilities ----------------------------------------------------------------------------


def test_parse_object_info_reads_nodes_and_model_lists() -> None:
    info = {
        "CheckpointLoaderSimple": {
            "input": {"required": {"ckpt_name": [["a.safetensors", "b.ckpt"], {}]}}
        },
        "LoraLoader": {
            "input": {
                "required": {
                    "lora_name": ["COMBO", {"options": ["l.safetensors"]}],
                    "strength_model": ["FLOAT", {"default": 1.0}],
                }
            }
        },
        "UpscaleModelLoader": {"input": {"required": {"model_name": [["4x.pth"]]}}},
        "KSampler": {"input": {"required": {"sampler_name": [["euler", "ddim"]]}}},
        "Broken": "not a definition",
    }
    caps = parse_object_info(info, version=7)
    assert caps.nodes == set(info)
    assert caps.models == {
        ("CheckpointLoaderSimple", "ckpt_name"): {"a.safetensors", "b.ckpt"},
        ("LoraLoader", "lora_name"): {"l.safetensors"},
        ("UpscaleModelLoader", "model_name"): {"4x.pth"},
    }
    assert caps.version == 7
    assert caps.has_model("CheckpointLoaderSimple", "ckpt_name", "a.safetensors")
    assert not caps.has_model("CheckpointLoaderSimple", "ckpt_name", "c.safetensors")
    assert caps.has_model("Unknown", "ckpt_name", "anything")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ([["a", "b"], {}], ["a", "b"]),
        (["COMBO", {"options": ["a"]}], ["a"]),
        (["INT", {}], None),
        ("x", None),
        ([], None),
    ],
)
def test_combo_options(spec: object, expected: list[str] | None) -> None:
    assert combo_options(spec) == expected
