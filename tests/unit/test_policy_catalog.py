"""The catalog filters (``/object_info`` in both combo shapes, model lists) and the
``/object_info`` cache (shared fetches, stale-while-revalidate, errors, per-role copies)."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from proxy.errors import UpstreamUnavailable
from proxy.policy.catalog.cache import (
    RETRY_SECONDS,
    Answer,
    CatalogNotJson,
    Miss,
    ObjectInfoCache,
    Snapshot,
)
from proxy.policy.catalog.filter import (
    filter_model_entries,
    filter_model_names,
    filter_object_info,
    model_classes,
    single_class,
    union_object_info,
)
from proxy.policy.catalog.http import comfy_coding
from proxy.policy.catalog.union import (
    Part,
    UnionView,
    gather_snapshots,
    union_entries,
    union_names,
)
from proxy.policy.model import GlobSet, GraphLimits, ModelGlobs, RolePolicy, RoleRules

CAPTURE = Path(__file__).resolve().parents[1] / "data" / "comfyui_object_info.json"


def policy(
    nodes: tuple[str, ...] = ("*",),
    models: tuple[str, ...] = (),
    *,
    deny_nodes: tuple[str, ...] = (),
    deny_models: tuple[str, ...] = (),
    unrestricted: bool = False,
    version: int = 1,
) -> RolePolicy:
    rules = RoleRules(
        name="r",
        unrestricted=unrestricted,
        nodes_allow=GlobSet.of(nodes),
        nodes_deny=GlobSet.of(deny_nodes),
        models_allow=ModelGlobs.of(models),
        models_deny=ModelGlobs.of(deny_models),
        bounds=(),
        limits=GraphLimits(max_nodes=100, max_body_bytes=1 << 20, max_string_length=1000),
    )
    return RolePolicy(key="r", members=(rules,), unrestricted=unrestricted, version=version)


def capture() -> dict[str, Any]:
    """The real capture, with files in the model combos (the capture has the folders empty)."""
    info: dict[str, Any] = json.loads(CAPTURE.read_text())
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = [
        "sd15/dream.safetensors",
        "sdxl/base.safetensors",
        "secret/leak.ckpt",
    ]
    info["LoraLoader"]["input"]["required"]["lora_name"][0] = ["style.safetensors", "nsfw.pt"]
    return info


def combo_node(options: list[Any], default: str | None = None) -> dict[str, Any]:
    """A node in the newer shape: ``["COMBO", {"options": [...]}]``."""
    config: dict[str, Any] = {"options": options, "tooltip": "t"}
    if default is not None:
        config["default"] = default
    return {
        "input": {
            "required": {
                "unet_name": ["COMBO", config],
                "weight_dtype": ["COMBO", {"options": ["default", "fp8_e4m3fn"]}],
            },
            "optional": {"model_name": ["COMBO", {"options": ["x.gguf", "gpt-4o"]}]},
            "hidden": {"unique_id": "UNIQUE_ID"},
        },
        "name": "V3Loader",
        "output": ["MODEL"],
    }


# -- /object_info --------------------------------------------------------------------------------


def test_legacy_combos_keep_only_allowed_models_and_other_combos_untouched() -> None:
    info = capture()
    before = copy.deepcopy(info)
    out = filter_object_info(info, policy(models=("sd15/*", "style.*")), model_classes(info))
    ckpt = out["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"]
    tooltip = before["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][1]
    assert ckpt == [["sd15/dream.safetensors"], tooltip]
    assert out["LoraLoader"]["input"]["required"]["lora_name"][0] == ["style.safetensors"]
    # sampler names, schedulers, upscale methods, images are not model files
    assert out["KSampler"] is info["KSampler"]
    assert out["ImageScale"] is info["ImageScale"]
    assert out["LoadImage"] is info["LoadImage"]
    dtype = out["UNETLoader"]["input"]["required"]["weight_dtype"]
    assert dtype is info["UNETLoader"]["input"]["required"]["weight_dtype"]
    assert info == before, "the cached upstream answer is never modified"


def test_new_combo_shape_is_filtered_and_keeps_its_config() -> None:
    info = {"V3Loader": combo_node(["a.safetensors", "b.safetensors", "c.sft"])}
    out = filter_object_info(info, policy(models=("a.*", "c.*")), model_classes(info))
    spec = out["V3Loader"]["input"]["required"]["unet_name"]
    assert spec == ["COMBO", {"options": ["a.safetensors", "c.sft"], "tooltip": "t"}]
    assert out["V3Loader"]["input"]["required"]["weight_dtype"] == [
        "COMBO",
        {"options": ["default", "fp8_e4m3fn"]},
    ]
    # a custom input: filtered only for values with a model extension ("gpt-4o" is no file)
    assert out["V3Loader"]["input"]["optional"]["model_name"] == ["COMBO", {"options": ["gpt-4o"]}]
    assert out["V3Loader"]["input"]["hidden"] == {"unique_id": "UNIQUE_ID"}


def test_a_default_naming_a_removed_model_is_dropped() -> None:
    info = {"V3Loader": combo_node(["a.safetensors", "b.safetensors"], default="b.safetensors")}
    out = filter_object_info(info, policy(models=("a.*",)), model_classes(info))
    assert "default" not in out["V3Loader"]["input"]["required"]["unet_name"][1]
    kept = filter_object_info(info, policy(models=("*",)), model_classes(info))
    assert kept["V3Loader"]["input"]["required"]["unet_name"][1]["default"] == "b.safetensors"


def test_dynamic_combo_options_are_filtered_recursively() -> None:
    inner = {"required": {"lora_name": [["ok.safetensors", "no.safetensors"]]}}
    info = {
        "Dyn": {
            "input": {
                "required": {
                    "mode": [
                        "COMFY_DYNAMICCOMBO_V3",
                        {"options": [{"key": "lora", "inputs": inner}, {"key": "none"}]},
                    ]
                }
            }
        }
    }
    assert model_classes(info) == {"Dyn"}
    out = filter_object_info(info, policy(models=("ok.*",)), model_classes(info))
    options = out["Dyn"]["input"]["required"]["mode"][1]["options"]
    assert options[0]["inputs"]["required"]["lora_name"] == [["ok.safetensors"]]
    assert options[1] == {"key": "none"}


LOADERS_BUT_LORA = {
    "CheckpointLoaderSimple",
    "ImageOnlyCheckpointLoader",
    "VAELoader",
    "ControlNetLoader",
    "UNETLoader",
    "UpscaleModelLoader",
    "StyleModelLoader",
    "GLIGENLoader",
}


@pytest.mark.parametrize(
    ("nodes", "deny", "expected"),
    [
        (("*",), (), set(json.loads(CAPTURE.read_text()))),
        (("KSampler", "CheckpointLoaderSimple"), (), {"KSampler", "CheckpointLoaderSimple"}),
        (("*Loader*",), ("Lora*",), LOADERS_BUT_LORA),  # deny wins
        (("KSampler*",), (), {"KSampler"}),
        ((), (), set()),  # no allow list: nothing
    ],
)
def test_node_types_follow_allow_and_deny(
    nodes: tuple[str, ...], deny: tuple[str, ...], expected: set[str]
) -> None:
    info = capture()
    out = filter_object_info(info, policy(nodes, deny_nodes=deny), model_classes(info))
    assert set(out) == expected


def test_folder_patterns_apply_to_the_folder_the_input_reads() -> None:
    info = capture()
    # "checkpoints:" patterns are for ckpt_name (CheckpointLoaderSimple reads checkpoints) only
    out = filter_object_info(info, policy(models=("checkpoints:sdxl/*",)), model_classes(info))
    assert out["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [
        "sdxl/base.safetensors"
    ]
    assert out["LoraLoader"]["input"]["required"]["lora_name"][0] == []


def test_deny_wins_over_allow_for_models() -> None:
    info = capture()
    out = filter_object_info(
        info, policy(models=("*",), deny_models=("secret/*",)), model_classes(info)
    )
    ckpts = out["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert ckpts == ["sd15/dream.safetensors", "sdxl/base.safetensors"]


def test_unchanged_nodes_are_shared_not_copied() -> None:
    info = capture()
    out = filter_object_info(info, policy(models=("*",)), model_classes(info))
    assert all(out[n] is info[n] for n in out)


def test_single_class() -> None:
    info = capture()
    p = policy(("KSampler",))
    assert single_class(info, "KSampler", p) == {"KSampler": info["KSampler"]}
    assert single_class(info, "CheckpointLoaderSimple", p) == {}  # as ComfyUI: unknown class
    assert single_class(info, "NoSuchNode", p) == {}
    assert single_class(info, "CheckpointLoaderSimple", None) == {
        "CheckpointLoaderSimple": info["CheckpointLoaderSimple"]
    }


# -- model lists ---------------------------------------------------------------------------------


def test_model_names_and_entries() -> None:
    p = policy(models=("loras:style*",))
    names = ["style.safetensors", "nsfw.safetensors", "weird.pkl"]
    assert filter_model_names(names, "loras", p) == ["style.safetensors"]
    assert filter_model_names(names, "checkpoints", p) == []
    entries = [
        {"name": "style.safetensors", "pathIndex": 0},
        {"name": "nsfw.safetensors", "pathIndex": 1},
        {"pathIndex": 0},
    ]
    assert filter_model_entries(entries, "loras", p) == [entries[0]]
    # embeddings are listed without extension
    assert filter_model_names(["style", "bad"], "embeddings", policy(models=("style",))) == [
        "style"
    ]


def test_union_of_instances() -> None:
    a = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["a.ckpt"], {}]}}}}
    b = {
        "CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["b.ckpt", "a.ckpt"]]}}},
        "V3Loader": combo_node(["x.safetensors"]),
    }
    c = {"V3Loader": combo_node(["y.safetensors"])}
    merged = union_object_info([a, b, c])
    assert merged["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] == [
        ["a.ckpt", "b.ckpt"],
        {},
    ]
    assert merged["V3Loader"]["input"]["required"]["unet_name"][1]["options"] == [
        "x.safetensors",
        "y.safetensors",
    ]
    assert union_object_info([a]) == a


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("gzip, deflate", "deflate"),  # aiohttp tries deflate first
        ("gzip", "gzip"),
        ("br", None),
        ("", None),
        ("deflate", None),  # ComfyUI compresses only when "gzip" is named
        ("gzip;q=0.5, DEFLATE", "deflate"),
    ],
)
def test_comfy_coding(header: str, expected: str | None) -> None:
    request = make_mocked_request("GET", "/object_info", headers={"Accept-Encoding": header})
    assert comfy_coding(request) == expected


# -- the cache -----------------------------------------------------------------------------------


class Upstream:
    """A scripted upstream: each fetch waits for ``gate`` and answers the next item."""

    def __init__(self, *answers: Answer | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.misses: list[Miss | None] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def fetch(self, miss: Miss | None) -> Answer:
        self.calls += 1
        self.misses.append(miss)
        await self.gate.wait()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def body(info: Any, content_type: str = "application/json; charset=utf-8") -> Answer:
    raw = info if isinstance(info, bytes) else orjson.dumps(info)
    return Answer(200, "OK", {"Content-Type": content_type}, raw, compressed=False)


BOOM = Answer(500, "Internal Server Error", {"Content-Type": "text/plain"}, b"boom", False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_misses_share_one_fetch() -> None:
    upstream = Upstream(body({"A": {}}))
    upstream.gate.clear()
    cache = ObjectInfoCache("u", upstream.fetch, ttl=60)
    waiters = [asyncio.ensure_future(cache.current()) for _ in range(20)]
    await asyncio.sleep(0)  # one loop turn: every waiter has asked (the fetch is held)
    assert cache.fetches == 1
    upstream.gate.set()
    results = await asyncio.gather(*waiters)
    assert upstream.calls == 1
    assert all(r is results[0] for r in results)
    assert isinstance(results[0], Snapshot)
    assert results[0].info == {"A": {}}


async def test_stale_copy_is_served_while_one_refresh_runs() -> None:
    clock = Clock()
    upstream = Upstream(body({"A": {}}), body({"B": {}}))
    cache = ObjectInfoCache("u", upstream.fetch, ttl=60, clock=clock)
    first = await cache.current(0, ("/api/object_info", {"Comfy-User": "alice"}))
    assert await cache.current(0, ("/object_info", {"Comfy-User": "bob"})) is first  # fresh
    assert upstream.calls == 1
    clock.now += 61
    upstream.gate.clear()  # the refresh hangs: nobody may wait for it
    for _ in range(5):
        assert await asyncio.wait_for(cache.current(), 1) is first
    assert cache.fetches == 2  # one refresh for all of them
    upstream.gate.set()
    await cache.idle()
    second = await cache.current()
    assert isinstance(second, Snapshot)
    assert second.info == {"B": {}}
    assert second.generation == 2
    # the miss was alice's request; the refresh is the proxy's own, on nobody's behalf
    assert upstream.misses == [("/api/object_info", {"Comfy-User": "alice"}), None]


async def test_failed_refresh_keeps_the_stale_copy_and_retries_later() -> None:
    clock = Clock()
    upstream = Upstream(
        body({"A": {}}),
        UpstreamUnavailable("down"),
        BOOM,
        body({"C": {}}),
    )
    cache = ObjectInfoCache("u", upstream.fetch, ttl=60, clock=clock)
    first = await cache.current()
    clock.now += 61
    assert await cache.current() is first
    await cache.idle()
    assert await cache.current() is first
    assert upstream.calls == 2  # no retry storm
    clock.now += RETRY_SECONDS
    assert await cache.current() is first
    await cache.idle()  # the 500: still stale
    clock.now += RETRY_SECONDS
    await cache.current()
    await cache.idle()
    latest = await cache.current()
    assert isinstance(latest, Snapshot)
    assert latest.info == {"C": {}}


async def test_without_a_copy_errors_pass_and_nothing_is_cached() -> None:
    upstream = Upstream(BOOM, body({"A": {}}))
    cache = ObjectInfoCache("u", upstream.fetch, ttl=60)
    assert await cache.current() == BOOM
    assert cache.snapshot is None
    assert isinstance(await cache.current(), Snapshot)


async def test_transport_failure_and_garbage_raise_without_a_copy() -> None:
    cache = ObjectInfoCache("u", Upstream(UpstreamUnavailable("down")).fetch, ttl=60)
    with pytest.raises(UpstreamUnavailable):
        await cache.current()
    cache = ObjectInfoCache("u", Upstream(body(b"<html>")).fetch, ttl=60)
    with pytest.raises(CatalogNotJson):
        await cache.current()


async def test_copies_per_role_and_version_and_prebuilt_on_refresh() -> None:
    clock = Clock()
    info = capture()
    upstream = Upstream(body(info), body({**info, "Extra": {}}))
    cache = ObjectInfoCache("u", upstream.fetch, ttl=60, clock=clock)
    snap = await cache.current()
    assert isinstance(snap, Snapshot)
    narrow, wide = policy(("KSampler",)), policy()
    a = cache.copy_for(snap, narrow, 1, "narrow")
    assert cache.copy_for(snap, narrow, 1, "narrow") is a
    b = cache.copy_for(snap, wide, 1, "wide")
    assert orjson.loads(a.body) == {"KSampler": info["KSampler"]}
    assert set(orjson.loads(b.body)) == set(info)
    assert a.etag != b.etag
    # a reload: the older version's copies are gone
    reloaded = cache.copy_for(snap, policy(("EmptyImage",), version=2), 2, "narrow")
    assert orjson.loads(reloaded.body) == {"EmptyImage": info["EmptyImage"]}
    # a refresh rebuilds the copies in use before the swap
    clock.now += 61
    await cache.current()
    await cache.idle()
    new = cache.snapshot
    assert new is not None
    assert new.generation == 2
    prebuilt = cache._roles.copies
    assert set(prebuilt) == {(2, "narrow")}
    again = cache.copy_for(new, policy(("EmptyImage",), version=2), 2, "narrow")
    assert again is prebuilt[(2, "narrow")]


async def test_each_encoding_is_made_once() -> None:
    upstream = Upstream(body(capture()))
    cache = ObjectInfoCache("u", upstream.fetch, ttl=60)
    snap = await cache.current()
    assert isinstance(snap, Snapshot)
    first, second = await asyncio.gather(snap.raw.encoded("gzip"), snap.raw.encoded("gzip"))
    assert first is second
    assert gzip.decompress(first) == snap.raw.body
    assert zlib.decompress(await snap.raw.encoded("deflate")) == snap.raw.body


async def test_a_policy_reload_refetches_in_the_background() -> None:
    upstream = Upstream(body({"A": {}}), body({"B": {}}))
    cache = ObjectInfoCache("u", upstream.fetch, ttl=3600)
    first = await cache.current(1)
    assert await cache.current(1) is first
    upstream.gate.clear()
    assert await cache.current(2) is first  # the reload: served at once, refetched behind
    assert cache.fetches == 2
    assert await cache.current(2) is first
    assert cache.fetches == 2
    upstream.gate.set()
    await cache.idle()
    latest = await cache.current(2)
    assert isinstance(latest, Snapshot)
    assert latest.info == {"B": {}}


def test_an_input_reading_several_folders_is_judged_like_the_checker_judges_it() -> None:
    """unet_name reads diffusion_models and unet: a deny in either folder hides the file."""
    info = {"V3Loader": combo_node(["foo.safetensors", "bar.safetensors"])}
    p = policy(models=("*",), deny_models=("unet:foo*",))
    out = filter_object_info(info, p, model_classes(info))
    assert out["V3Loader"]["input"]["required"]["unet_name"][1]["options"] == ["bar.safetensors"]


def test_renamed_folders_are_judged_under_both_names() -> None:
    """ComfyUI lists diffusion models as diffusion_models (formerly unet)."""
    p = policy(models=("unet:flux*",), deny_models=("diffusion_models:*nsfw*",))
    names = ["flux-dev.safetensors", "flux-nsfw.safetensors", "sdxl.safetensors"]
    assert filter_model_names(names, "diffusion_models", p) == ["flux-dev.safetensors"]
    assert filter_model_names(names, "unet", p) == ["flux-dev.safetensors"]


# -- several instances (catalog_union) ---------------------------------------------------------


def test_model_lists_of_several_instances_are_united() -> None:
    assert union_names([["b.pt", "a.pt"], ["c.pt", "a.pt"], []]) == ["a.pt", "b.pt", "c.pt"]
    assert union_names([["a"], [7, "a"], [7]]) == ["a", 7]
    first = {"name": "a.pt", "pathIndex": 0}
    entries = [[first, {"name": "b.pt"}], [{"name": "a.pt", "pathIndex": 1}, {"name": "c.pt"}]]
    assert union_entries(entries) == [first, {"name": "b.pt"}, {"name": "c.pt"}]


async def snapshot_of(info: dict[str, Any]) -> tuple[ObjectInfoCache, Snapshot]:
    cache = ObjectInfoCache("u", Upstream(body(info)).fetch, ttl=60)
    snap = await cache.current()
    assert isinstance(snap, Snapshot)
    return cache, snap


async def test_union_view_is_rebuilt_only_when_an_instance_changes() -> None:
    info = capture()
    ckpt = {"CheckpointLoaderSimple": info["CheckpointLoaderSimple"]}
    a_cache, a = await snapshot_of(info)
    other = copy.deepcopy(ckpt)
    other["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = ["zz.safetensors"]
    b_cache, b = await snapshot_of({**other, "Custom": {"input": {}}})
    view = UnionView()
    parts = [Part("a", a_cache, a), Part("b", b_cache, b)]
    union, copies = view.view(parts)
    assert copies is view
    assert set(union.info) == set(info) | {"Custom"}
    options = union.info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert options[-1] == "zz.safetensors"
    # the same snapshots: the same union, the same role copies
    again, _ = view.view([Part("a", a_cache, a), Part("b", b_cache, b)])
    assert again is union
    assert view.builds == 1
    narrow = policy(("CheckpointLoaderSimple",), ("zz*",))
    copy_a = view.copy_for(union, narrow, 1, "narrow")
    assert view.copy_for(union, narrow, 1, "narrow") is copy_a
    narrowed = orjson.loads(copy_a.body)
    ckpt_options = narrowed["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert ckpt_options == ["zz.safetensors"]
    assert view.copy_for(union, policy(version=2), 2, "narrow") is not copy_a  # a reload
    # one instance refreshed (a new generation): a new union, new copies
    b_cache2, b2 = await snapshot_of({**other})
    b2 = Snapshot(b.generation + 1, b2.info, b2.raw, b2.compressed, b2.fetched_at, b2.models)
    newer, _ = view.view([Part("a", a_cache, a), Part("b", b_cache2, b2)])
    assert newer is not union
    assert "Custom" not in newer.info
    assert view.generation == 2
    # a request still holding the old union is answered, and nothing of it is kept
    late = view.copy_for(union, narrow, 1, "narrow")
    assert late is not copy_a
    assert view.copy_for(newer, narrow, 1, "narrow") is not late
    # an instance leaving changes the key too; a single one answers from its own cache
    only, copies = view.view([Part("a", a_cache, a)])
    assert only is a
    assert copies is a_cache
    assert view.builds == 2


async def test_gather_takes_copies_at_once_and_waits_for_misses_within_the_limit() -> None:
    ready_cache, ready = await snapshot_of({"A": {}})
    down = ObjectInfoCache("down", Upstream(UpstreamUnavailable("down")).fetch, ttl=60)
    slow_upstream = Upstream(body({"S": {}}))
    slow_upstream.gate.clear()
    slow = ObjectInfoCache("slow", slow_upstream.fetch, ttl=60)
    miss: Miss = ("/api/object_info", {"Comfy-User": "alice"})
    gathered = await gather_snapshots(
        [("ready", ready_cache), ("down", down), ("slow", slow)], 1, miss, within=0.05
    )
    assert [p.name for p in gathered.parts] == ["ready"]
    assert gathered.parts[0].snapshot is ready
    assert gathered.missing == ["down", "slow"]
    assert isinstance(gathered.failure, UpstreamUnavailable)
    assert gathered.outcome == "miss"
    assert slow_upstream.misses == [miss]  # the client's request, as with one instance
    # the slow fetch went on without this request, and joins the next answer
    slow_upstream.gate.set()
    await slow.idle()
    gathered = await gather_snapshots([("ready", ready_cache), ("slow", slow)], 1, miss, within=1)
    assert [p.name for p in gathered.parts] == ["ready", "slow"]
    assert gathered.outcome == "hit"
    assert gathered.failure is None
