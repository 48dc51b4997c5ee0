"""Attack family: the workflow policy. Bob (a plain user) tries to run what his role's policy
forbids by writing it the ways ComfyUI reads but a naive checker would not: ``__value__``
literal wrappers, chains of primitive nodes, numbers as text, huge integers, NaN, duplicate
keys, malformed nodes. Every case asserts Bob's answer (status, ``error.type``, the nodes in
``node_errors``) and what the fake ComfyUI received: nothing, or the proxy's canonical
serialisation, which it then runs with values inside the policy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ProxyFactory
from tests.fakes.comfyui import FakeComfyUI
from tests.security.prompt_support import (
    ADMIN,
    B,
    Client,
    chain,
    image,
    node,
    policy_sections,
    prompt_posts,
    ran,
    refusal,
    saved,
    shown,
    submit,
    submit_raw,
)


@pytest.fixture
async def client(make_proxy: ProxyFactory, fake_comfy: FakeComfyUI, tmp_path: Path) -> Client:
    return await make_proxy(fake_comfy.url, token=None, **policy_sections(tmp_path))


async def refused(
    client: Client, fake: FakeComfyUI, graph: object, error_type: str, nodes: set[str]
) -> dict[str, Any]:
    status, answer = await submit(client, B, {"prompt": graph})
    assert status == 400, answer
    assert refusal(answer) == (error_type, nodes)
    assert prompt_posts(fake) == []  # nothing reached ComfyUI
    return dict(answer)


# -- literal wrappers --------------------------------------------------------------------------

WRAPPED_PAST_BOUNDS = [
    ("batch", saved(image(batch={"__value__": 3}))),
    ("batch as text", saved(image(batch={"__value__": "3"}))),
    ("width", saved(image(width={"__value__": 4096}))),
    ("both sides", saved(image(width={"__value__": 512}, height={"__value__": 512}))),
    ("steps", {"5": node("KSampler", steps={"__value__": 500}, denoise=1.0)}),
    ("denoise", {"5": node("KSampler", steps=20, denoise={"__value__": 7.5})}),
]


@pytest.mark.parametrize(
    "graph", [g for _, g in WRAPPED_PAST_BOUNDS], ids=[n for n, _ in WRAPPED_PAST_BOUNDS]
)
async def test_a_wrapped_literal_is_bounded(
    client: Client, fake_comfy: FakeComfyUI, graph: dict[str, Any]
) -> None:
    node_id = next(iter(graph))
    await refused(client, fake_comfy, graph, "input_out_of_bounds", {node_id})


async def test_a_wrapped_model_name_is_judged_by_the_allowlist(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    private = {"__value__": "private/x.safetensors"}
    graph = {"4": node("CheckpointLoaderSimple", ckpt_name=private)}
    await refused(client, fake_comfy, graph, "model_not_allowed", {"4"})
    listed = {"4": node("CheckpointLoaderSimple", ckpt_name={"__value__": ["private/x.ckpt"]})}
    await refused(client, fake_comfy, listed, "model_not_allowed", {"4"})


async def test_wrapped_text_is_bounded_by_its_length(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    for text in ({"__value__": "x" * 101}, {"__value__": ["x" * 100]}):
        graph = {"6": node("CLIPTextEncode", text=text, clip=["4", 0]), "4": CKPT}
        await refused(client, fake_comfy, graph, "string_too_long", {"6"})


CKPT = node("CheckpointLoaderSimple", ckpt_name="sd15/ok.safetensors")

UNREADABLE_LITERALS = [
    ("wrapper with another key", {"__value__": 1, "also": 9}),
    ("wrapper in a wrapper", {"__value__": {"__value__": 9}}),
    ("object", {"batch_size": 9}),
    ("object in a wrapped list", {"__value__": [{"__value__": 9}]}),
]


@pytest.mark.parametrize(
    "literal", [v for _, v in UNREADABLE_LITERALS], ids=[n for n, _ in UNREADABLE_LITERALS]
)
async def test_an_object_literal_is_refused(
    client: Client, fake_comfy: FakeComfyUI, literal: object
) -> None:
    """ComfyUI would hand it to the node unread (or unwrap only once): nothing to judge."""
    await refused(client, fake_comfy, saved(image(batch=literal)), "unsupported_literal", {"1"})


async def test_an_admins_object_literal_reaches_comfyui_as_sent(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """Nobody judges an admin's prompt: object-valued widgets (node packs use them) are kept
    for ComfyUI, which unwraps ``__value__`` once itself."""
    loras = {"on": True, "lora": "x.safetensors", "strength": 1}
    for literal, runs_with in ((loras, loras), ({"__value__": {"__value__": 1}}, {"__value__": 1})):
        fake_comfy.reset()
        status, answer = await submit(client, ADMIN, {"prompt": shown(literal)})
        assert status == 200, answer
        [sent] = prompt_posts(fake_comfy)
        assert sent["prompt"]["9"]["inputs"]["source"] == literal
        await fake_comfy.wait_idle()
        assert ran(fake_comfy, answer["prompt_id"])["9"]["source"] == runs_with


async def test_a_literal_for_a_hidden_input_is_refused(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    graph = saved(image())
    graph["9"]["inputs"]["prompt"] = {"__value__": "forged"}  # SaveImage's hidden PROMPT
    await refused(client, fake_comfy, graph, "hidden_input", {"9"})


# -- primitive chains ----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3, 8, 30])
async def test_a_primitive_chain_is_followed_to_its_source(
    client: Client, fake_comfy: FakeComfyUI, depth: int
) -> None:
    graph = saved(image(batch=["100", 0]), **chain("Int", depth, 9999))
    await refused(client, fake_comfy, graph, "input_out_of_bounds", {"1"})


async def test_a_wrapped_source_at_the_end_of_a_chain(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    graph = saved(image(width=["100", 0]), **chain("Int", 3, {"__value__": "4096"}))
    await refused(client, fake_comfy, graph, "input_out_of_bounds", {"1"})
    text = {"6": node("CLIPTextEncode", text=["100", 0], clip=["4", 0]), "4": CKPT}
    graph = {**text, **chain("String", 2, {"__value__": "y" * 150})}
    await refused(client, fake_comfy, graph, "string_too_long", {"6"})


async def test_a_model_named_through_primitives(client: Client, fake_comfy: FakeComfyUI) -> None:
    graph = {
        "4": node("CheckpointLoaderSimple", ckpt_name=["100", 0]),
        **chain("String", 2, "private/x.safetensors"),
    }
    await refused(client, fake_comfy, graph, "model_not_allowed", {"4"})


async def test_a_primitive_cycle_is_refused(client: Client, fake_comfy: FakeComfyUI) -> None:
    loop = {
        "100": node("PrimitiveInt", value=["101", 0]),
        "101": node("PrimitiveInt", value=["100", 0]),
    }
    answer = await refused(client, fake_comfy, saved(image(batch=["100", 0]), **loop), "cycle",
                           {"100", "101"})  # fmt: skip
    assert "100 -> 101 -> 100" in answer["error"]["details"]


async def test_an_allowed_chain_runs_with_the_value_the_proxy_judged(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    graph = shown(["100", 0], **chain("Int", 4, {"__value__": " 2 "}))
    graph["1"] = image(batch=["100", 0])
    graph["8"] = node("SaveImage", images=["1", 0], filename_prefix="chain")
    status, answer = await submit(client, B, {"prompt": graph})
    assert status == 200, answer
    await fake_comfy.wait_idle()
    [sent] = prompt_posts(fake_comfy)
    assert sent["prompt"]["103"]["inputs"]["value"] == 2  # unwrapped, typed as ComfyUI types it
    assert ran(fake_comfy, answer["prompt_id"])["1"]["batch_size"] == 2
    assert ran(fake_comfy, answer["prompt_id"])["9"]["source"] == 2


# -- numbers ComfyUI converts ------------------------------------------------------------------

CONVERTED = [
    ("text", "3"),
    ("spaces", " 3 "),
    ("underscores", "1_0"),
    ("float truncated to 3", 3.9),
    ("u64", 2**63),
]


@pytest.mark.parametrize("value", [v for _, v in CONVERTED], ids=[n for n, _ in CONVERTED])
async def test_numbers_are_bounded_as_comfyui_converts_them(
    client: Client, fake_comfy: FakeComfyUI, value: object
) -> None:
    await refused(client, fake_comfy, saved(image(batch=value)), "input_out_of_bounds", {"1"})


async def test_true_is_one(client: Client, fake_comfy: FakeComfyUI) -> None:
    status, answer = await submit(client, B, {"prompt": saved(image(batch=True))})
    assert status == 200, answer
    [sent] = prompt_posts(fake_comfy)
    assert sent["prompt"]["1"]["inputs"]["batch_size"] == 1  # int(True), forwarded as such
    await fake_comfy.wait_idle()
    assert ran(fake_comfy, answer["prompt_id"])["1"]["batch_size"] == 1


async def test_a_number_beyond_64_bits_in_text_is_refused(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    graph = saved(image(batch="9" * 30))
    await refused(client, fake_comfy, graph, "input_not_finite", {"1"})


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity", "1e999"])
async def test_a_non_finite_float_in_text_is_refused(
    client: Client, fake_comfy: FakeComfyUI, text: str
) -> None:
    graph = {"5": node("KSampler", steps=20, denoise=text)}
    await refused(client, fake_comfy, graph, "input_not_finite", {"5"})


# -- the JSON itself -----------------------------------------------------------------------------

UNREADABLE_BODIES = [
    ("NaN", b'{"prompt": {"1": {"class_type": "KSampler", "inputs": {"denoise": NaN}}}}'),
    ("Infinity", b'{"prompt": {"1": {"class_type": "KSampler", "inputs": {"steps": Infinity}}}}'),
    ("overflowing float", b'{"prompt": {"1": {"class_type": "KSampler", "inputs": '
     b'{"steps": 1e400}}}}'),
    ("big int", b'{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"batch_size": '
     + str(2**64).encode() + b"}}}}"),
    ("duplicate input", b'{"prompt": {"1": {"class_type": "EmptyImage", "inputs": '
     b'{"batch_size": 1, "batch_size": 9}}}}'),
    ("duplicate node", b'{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {}}, '
     b'"1": {"class_type": "WriteAnywhere", "inputs": {}}}}'),
    ("duplicate prompt", b'{"prompt": {}, "prompt": {"1": {"class_type": "X", "inputs": {}}}}'),
    ("lone surrogate", b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": '
     b'{"filename_prefix": "\\ud800"}}}}'),
    ("not an object", b"[1, 2]"),
    ("not JSON", b"{nope"),
    ("BOM", b'\xef\xbb\xbf{"prompt": {}}'),
]  # fmt: skip


@pytest.mark.parametrize(
    "raw", [v for _, v in UNREADABLE_BODIES], ids=[n for n, _ in UNREADABLE_BODIES]
)
async def test_json_read_two_ways_is_refused(
    client: Client, fake_comfy: FakeComfyUI, raw: bytes
) -> None:
    status, answer = await submit_raw(client, B, raw)
    assert status == 400, answer
    assert refusal(answer) == ("invalid_prompt", set())
    assert prompt_posts(fake_comfy) == []


async def test_an_admin_is_held_to_the_same_reading(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """The policy does not judge admins, but their bodies are read (and forwarded) the same
    way: ambiguous JSON is refused for everybody."""
    raw = b'{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"a": 1, "a": 2}}}}'
    status, answer = await submit_raw(client, ADMIN, raw)
    assert (status, refusal(answer)) == (400, ("invalid_prompt", set()))
    assert prompt_posts(fake_comfy) == []


# -- malformed nodes: ComfyUI's 400 shape, never a 500 --------------------------------------------

MALFORMED = [
    ("class_type []", {"1": {"class_type": [], "inputs": {}}}, "invalid_node"),
    ("class_type number", {"1": {"class_type": 5, "inputs": {}}}, "invalid_node"),
    ("class_type object", {"1": {"class_type": {"a": 1}, "inputs": {}}}, "invalid_node"),
    ("class_type empty", {"1": {"class_type": "", "inputs": {}}}, "invalid_node"),
    ("no class_type", {"1": {"inputs": {}}}, "invalid_node"),
    ("inputs list", {"1": {"class_type": "EmptyImage", "inputs": []}}, "invalid_node"),
    ("node list", {"1": ["EmptyImage"]}, "invalid_node"),
    ("link of one", {"1": image(batch=["2"])}, "bad_link"),
    ("link of three", {"1": image(batch=["2", 0, 0])}, "bad_link"),
    ("int node id", {"1": image(batch=[2, 0]), "2": image()}, "bad_link"),
    ("text index", {"1": image(batch=["2", "0"]), "2": image()}, "bad_link"),
    ("float index", {"1": image(batch=["2", 0.0]), "2": image()}, "bad_link"),
    ("negative index", {"1": image(batch=["2", -1]), "2": image()}, "bad_link"),
    ("past the outputs", {"1": image(batch=["2", 5]), "2": image()}, "bad_link"),
    ("missing node", {"1": image(batch=["7", 0])}, "bad_link"),
    ("unknown node type", {"1": node("NoSuchNode")}, "node_not_allowed"),
]


@pytest.mark.parametrize(
    ("graph", "error_type"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_a_malformed_node_is_refused_in_comfyuis_shape(
    client: Client, fake_comfy: FakeComfyUI, graph: dict[str, Any], error_type: str
) -> None:
    await refused(client, fake_comfy, graph, error_type, {"1"})


@pytest.mark.parametrize("graph", [[], "x", 5, None])
async def test_a_prompt_that_is_not_an_object_is_refused(
    client: Client, fake_comfy: FakeComfyUI, graph: object
) -> None:
    for who in (B, ADMIN):
        status, answer = await submit(client, who, {"prompt": graph})
        assert (status, refusal(answer)) == (400, ("invalid_prompt", set()))
    assert prompt_posts(fake_comfy) == []


async def test_an_admins_class_type_list_is_a_400_not_a_500(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    status, answer = await submit(
        client, ADMIN, {"prompt": {"1": {"class_type": [], "inputs": {}}}}
    )
    assert (status, refusal(answer)) == (400, ("invalid_node", {"1"}))
    assert prompt_posts(fake_comfy) == []


async def test_what_arrives_is_the_proxys_serialisation(
    client: Client, fake_comfy: FakeComfyUI
) -> None:
    """Wrappers unwrapped, values typed, lists re-wrapped (a bare list is a link), node key
    order and every other key kept: the body ComfyUI gets is the one the policy judged."""
    graph = saved(image(batch={"__value__": "2"}, width={"__value__": 8.0}))
    graph["1"]["_meta"] = {"title": "img"}
    graph["9"]["inputs"]["filename_prefix"] = {"__value__": "run"}
    body = {"prompt": graph, "client_id": "tab", "extra_data": {"note": [1, "é"]}}
    status, answer = await submit(client, B, body)
    assert status == 200, answer
    [sent] = prompt_posts(fake_comfy)
    assert sent["prompt"]["1"] == {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 2, "color": 0x335577},
        "_meta": {"title": "img"},
    }
    assert sent["prompt"]["9"]["inputs"]["filename_prefix"].endswith("/run")
    assert sent["extra_data"] == {"note": [1, "é"]}
    raw = next(r.body for r in fake_comfy.received if r.path.endswith("/prompt"))
    assert raw == orjson.dumps(sent)  # compact UTF-8, the proxy's own writing
