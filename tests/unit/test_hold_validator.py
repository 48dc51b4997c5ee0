"""``proxy.scheduler.validate.HoldValidator``: the prediction over the candidate instances'
``/object_info`` copies (the real per-instance caches, fed by a fetch function standing in for
ComfyUI): refuse only when every candidate refuses alike, hold when they disagree, when a copy
cannot be had or refreshed, and when the prediction itself fails."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import pytest

from proxy.errors import UpstreamError
from proxy.policy.catalog.cache import Answer, Miss, ObjectInfoCache
from proxy.policy.catalog.upstream import Catalog
from proxy.scheduler import validate
from proxy.scheduler.validate import HoldValidator
from proxy.upstream.pool import Upstream

SAVE = {"input": {"required": {"images": ["IMAGE"]}}, "output": [], "output_node": True}
EMPTY = {
    "input": {"required": {"width": ["INT", {"min": 1, "max": 64}]}},
    "output": ["IMAGE"],
    "output_node": False,
}


def loader(models: list[str]) -> dict[str, Any]:
    return {
        "input": {"required": {"ckpt_name": [models, {}]}},
        "output": ["IMAGE"],
        "output_node": False,
    }


def info(*models: str) -> dict[str, Any]:
    common = {"python_module": "nodes"}
    return {
        "SaveImage": {**SAVE, **common},
        "EmptyImage": {**EMPTY, **common},
        "Loader": {**loader(list(models)), **common},
    }


class Instance:
    """One fake instance: what its ``/object_info`` says now, and whether it answers."""

    def __init__(self, name: str, object_info: dict[str, Any]) -> None:
        self.upstream = Upstream.from_url(f"http://{name}:8188", name=name)
        self.info = object_info
        self.down = False
        self.now = 0.0
        self.cache = ObjectInfoCache(name, self.fetch, ttl=3600.0, clock=lambda: self.now)

    async def fetch(self, miss: Miss | None) -> Answer:
        if self.down:
            raise UpstreamError("unreachable")
        return Answer(200, "OK", {}, json.dumps(self.info).encode(), compressed=False)


class Instances:
    """What :class:`HoldValidator` reads of the catalog: one cache per instance."""

    def __init__(self, *instances: Instance) -> None:
        self.by_name = {i.upstream.name: i for i in instances}

    def cache(self, upstream: Upstream) -> ObjectInfoCache:
        return self.by_name[upstream.name].cache


def body(prompt: dict[str, Any]) -> bytes:
    return json.dumps({"prompt": prompt}).encode()


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


BELOW_MIN = {"1": node("EmptyImage", width=0), "9": node("SaveImage", images=["1", 0])}
NAMED_MODEL = {"1": node("Loader", ckpt_name="new.ckpt"), "9": node("SaveImage", images=["1", 0])}


async def verdict_on(*instances: Instance, prompt: dict[str, Any]) -> Any:
    catalog = cast(Catalog, Instances(*instances))
    return await HoldValidator().verdict(catalog, [i.upstream for i in instances], body(prompt))


async def test_refused_when_every_candidate_refuses_alike() -> None:
    one, two = Instance("one", info()), Instance("two", info())
    verdict = await verdict_on(one, two, prompt=BELOW_MIN)
    assert verdict.refuses
    assert verdict.answer()["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"


async def test_held_when_candidates_disagree() -> None:
    has, lacks = Instance("has", info("new.ckpt")), Instance("lacks", info())
    verdict = await verdict_on(has, lacks, prompt=NAMED_MODEL)
    assert not verdict.refuses
    assert verdict.unsure == "the candidate instances disagree"
    assert (await verdict_on(lacks, prompt=NAMED_MODEL)).refuses


async def test_a_stale_copy_is_refetched_once_before_refusing_on_a_list() -> None:
    instance = Instance("one", info())
    validator = HoldValidator()
    catalog = cast(Catalog, Instances(instance))
    first = await validator.verdict(catalog, [instance.upstream], body(NAMED_MODEL))
    assert first.refuses  # the copy was just fetched: fresh
    instance.info = info("new.ckpt")  # installed since
    instance.now += validate.FRESH_SECONDS + 1
    again = await validator.verdict(catalog, [instance.upstream], body(NAMED_MODEL))
    assert again.error is None
    assert instance.cache.fetches == 2


async def test_held_when_a_stale_copy_cannot_be_refreshed() -> None:
    instance = Instance("one", info())
    validator = HoldValidator()
    catalog = cast(Catalog, Instances(instance))
    assert (await validator.verdict(catalog, [instance.upstream], body(NAMED_MODEL))).refuses
    instance.down = True
    instance.now += validate.FRESH_SECONDS + 1
    verdict = await validator.verdict(catalog, [instance.upstream], body(NAMED_MODEL))
    assert not verdict.refuses
    assert "could not be refreshed" in verdict.unsure
    # A refusal that rests on no list needs no fresh copy.
    assert (await validator.verdict(catalog, [instance.upstream], body(BELOW_MIN))).refuses


async def test_held_without_a_copy_or_an_instance() -> None:
    instance = Instance("one", info())
    instance.down = True
    verdict = await verdict_on(instance, prompt=BELOW_MIN)
    assert verdict.unsure == "no /object_info of the instance"
    catalog = cast(Catalog, Instances())
    empty = await HoldValidator().verdict(catalog, [], body(BELOW_MIN))
    assert empty.unsure == "no instance to validate on"


async def test_a_crash_in_the_prediction_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(validate, "validate_prompt", cast(Callable[..., Any], broken))
    verdict = await verdict_on(Instance("one", info()), prompt=BELOW_MIN)
    assert not verdict.refuses
    assert verdict.unsure == "the prediction failed"
