"""POST /prompt rewrite and checks: exact violation types and node ids, envelope, JSON bytes."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.comfy.graph import BAD_LINK, INVALID_NODE, UNSUPPORTED_LITERAL, read_graph
from proxy.comfy.json_body import parse_json
from proxy.isolation.prompt import (
    FILENAME_PREFIX_INVALID,
    INPUT_FILE_FORBIDDEN,
    INPUT_NOT_LITERAL,
    INPUT_PATH_INVALID,
    PromptRejected,
    Violation,
    check_graph,
    client_id_of,
    is_canonical_uuid,
    requested_prompt_id,
    rewrite_submission,
    scoped_prefix,
)
from proxy.tenancy.files import FileScope, PathRefused

SCOPE = FileScope("alice-1", "users/alice-1", ("shared",))
OWN = "users/alice-1"


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": class_type}}


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("ComfyUI", f"{OWN}/ComfyUI"),
        ("sub/dir/img", f"{OWN}/sub/dir/img"),
        ("%year%-%month%/x", f"{OWN}/%year%-%month%/x"),
        ("%date:yyyy-MM-dd%/x", f"{OWN}/%date:yyyy-MM-dd%/x"),
        ("", f"{OWN}/ComfyUI"),
        (".", f"{OWN}/ComfyUI"),
        ("./", f"{OWN}/ComfyUI"),
        ("a..b", f"{OWN}/a..b"),
        # Idempotent: already in the user's own folder (read back from /history): kept.
        (f"{OWN}/ComfyUI", f"{OWN}/ComfyUI"),
        (f"{OWN}/sub/img", f"{OWN}/sub/img"),
        (f"./{OWN}/x", f"./{OWN}/x"),
        # Not inside it: the folder itself, a look-alike, another user's folder.
        (OWN, f"{OWN}/{OWN}"),
        ("users/alice-12/x", f"{OWN}/users/alice-12/x"),
        ("users/bob-1/x", f"{OWN}/users/bob-1/x"),
    ],
)
def test_scoped_prefix(prefix: str, expected: str) -> None:
    assert scoped_prefix(prefix, SCOPE) == expected


@pytest.mark.parametrize(
    "prefix",
    [
        "../x",
        "a/../../x",
        "...",
        "/tmp/x",
        "C:/x",
        "c:x",
        "a\\..\\x",
        "x\0",
        "%CLIPTextEncode.text%",
        "out/%My Node.widget%",
    ],
)
def test_scoped_prefix_refuses(prefix: str) -> None:
    with pytest.raises(PathRefused):
        scoped_prefix(prefix, SCOPE)


SAVE = node("SaveImage", images=["1", 0], filename_prefix="ComfyUI")


def violations_of(graph: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The graph reader's problems, then isolation's findings (read without schemas: file
    inputs are known by name, whatever the value's extension)."""
    prompt = read_graph({"1": node("EmptyImage"), **graph})  # what SaveImage nodes link to
    found = [*prompt.problems, *check_graph(prompt, SCOPE)]
    return [(v.node_id, v.input_name, v.error_type) for v in found]


LINKED = node("StringConcatenate", string_a="a", string_b="b")


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"9": SAVE}, []),
        ({"9": node("SaveImage", images=["1", 0], filename_prefix="../x")},
         [("9", "filename_prefix", FILENAME_PREFIX_INVALID)]),
        ({"9": node("SaveImage", images=["1", 0], filename_prefix="/abs/x")},
         [("9", "filename_prefix", FILENAME_PREFIX_INVALID)]),
        ({"5": LINKED, "9": node("SaveImage", images=["5", 0], filename_prefix=["5", 0])},
         [("9", "filename_prefix", INPUT_NOT_LITERAL)]),
        ({"9": node("SaveImage", filename_prefix={"/../users/bob/x": 1})},
         [("9", "filename_prefix", UNSUPPORTED_LITERAL)]),
        ({"9": node("SaveImage", filename_prefix={"__value__": ["/../users/bob/x"]})},
         [("9", "filename_prefix", INPUT_NOT_LITERAL)]),
        ({"9": node("SaveImage", filename_prefix={"__value__": "../x"})},
         [("9", "filename_prefix", FILENAME_PREFIX_INVALID)]),
        ({"3": node("Custom", filename_prefix="C:\\x")},
         [("3", "filename_prefix", FILENAME_PREFIX_INVALID)]),
        ({"2": node("LoadImage", image=f"{OWN}/x.png")}, []),
        ({"2": node("LoadImage", image=f"{OWN}/sub/x.png [input]")}, []),
        ({"2": node("LoadImage", image=f"{OWN}/x.png [output]")}, []),
        ({"2": node("LoadImage", image="shared/x.png")}, []),
        ({"2": node("LoadImage", image="shared/x.png [output]")},
         [("2", "image", INPUT_FILE_FORBIDDEN)]),
        ({"2": node("LoadImage", image="example.png")}, [("2", "image", INPUT_FILE_FORBIDDEN)]),
        ({"2": node("LoadImage", image="users/bob-2/x.png")},
         [("2", "image", INPUT_FILE_FORBIDDEN)]),
        ({"2": node("LoadImage", image=f"{OWN}/../bob-2/x.png")},
         [("2", "image", INPUT_PATH_INVALID)]),
        ({"2": node("LoadImage", image="/etc/passwd")}, [("2", "image", INPUT_PATH_INVALID)]),
        ({"2": node("LoadImage", image="x\0.png")}, [("2", "image", INPUT_PATH_INVALID)]),
        ({"7": LINKED, "2": node("LoadImage", image=["7", 0])},
         [("2", "image", INPUT_NOT_LITERAL)]),
        ({"2": node("LoadImage", image={"__value__": "users/bob-2/x.png"})},
         [("2", "image", INPUT_FILE_FORBIDDEN)]),
        ({"2": node("LoadImage", image={"__value__": [f"{OWN}/x.png", "users/bob-2/x.png"]})},
         [("2", "image", INPUT_FILE_FORBIDDEN)]),
        ({"2": node("LoadImage", image=f"{OWN}/x.png[output]")},
         [("2", "image", INPUT_PATH_INVALID)]),
        ({"2": node("LoadImageMask", image="users/bob-2/m.png", channel="alpha")},
         [("2", "image", INPUT_FILE_FORBIDDEN)]),
        ({"2": node("LoadImageOutput", image="users/bob-2/o.png [output]")},
         [("2", "image", INPUT_FILE_FORBIDDEN)]),
        # Without schemas, inputs named like files are checked whatever the extension ...
        ({"4": node("VHS_LoadVideo", video="users/bob-2/v.mp4")},
         [("4", "video", INPUT_FILE_FORBIDDEN)]),
        ({"4": node("LoadAudio", audio="a.WAV [input]")}, [("4", "audio", INPUT_FILE_FORBIDDEN)]),
        ({"4": node("LoadAudio", audio="users/bob-2/x.aiff")},
         [("4", "audio", INPUT_FILE_FORBIDDEN)]),
        ({"4": node("LoadVideo", file="users/bob-2/clip.3gp")},
         [("4", "file", INPUT_FILE_FORBIDDEN)]),
        ({"4": node("Loader3D", file="../m.glb")}, [("4", "file", INPUT_PATH_INVALID)]),
        ({"4": node("LoadAudio", audio=f"{OWN}/a.flac")}, []),
        ({"5": node("Custom", image="a red fox")}, [("5", "image", INPUT_FILE_FORBIDDEN)]),
        # ... and left alone when linked (tensors) or not names.
        ({"2": LINKED, "5": node("ImageScale", image=["2", 0], upscale_method="nearest-exact")},
         []),
        ({"5": node("Custom", video=3)}, []),
        ({"5": node("Custom", picture="users/bob-2/x.png")}, []),
        # Malformed nodes are the graph reader's (ComfyUI's 400 shape, never forwarded).
        ({"6": "not a node", "7": {"class_type": "X"}, "8": {"inputs": []}},
         [("6", "", INVALID_NODE), ("8", "", INVALID_NODE)]),
        ({"5": node("ImageScale", image=["2", 0])}, [("5", "image", BAD_LINK)]),
        # Several violations, in graph order.
        ({"2": node("LoadImage", image="users/bob-2/x.png"),
          "9": node("SaveImage", images=["2", 0], filename_prefix="../x")},
         [("2", "image", INPUT_FILE_FORBIDDEN), ("9", "filename_prefix", FILENAME_PREFIX_INVALID)]),
    ],
)  # fmt: skip
def test_check_graph_violations(
    graph: dict[str, Any], expected: list[tuple[str, str, str]]
) -> None:
    assert violations_of(graph) == expected


def test_check_graph_rewrites_prefixes_only() -> None:
    graph = {
        "1": node("EmptyImage", width=64, height=64, batch_size=1, color=0),
        "9": node("SaveImage", images=["1", 0], filename_prefix="run/x"),
        "10": node("SaveAnimatedWEBP", images=["1", 0], filename_prefix="anim", fps=6.0),
    }
    prompt = read_graph(graph)
    assert check_graph(prompt, SCOPE) == []
    rewritten = prompt.to_json()
    assert rewritten["9"]["inputs"]["filename_prefix"] == f"{OWN}/run/x"
    assert rewritten["10"]["inputs"]["filename_prefix"] == f"{OWN}/anim"
    assert rewritten["9"]["inputs"]["images"] == ["1", 0]
    assert rewritten["1"] == graph["1"]
    assert rewritten["9"]["_meta"] == graph["9"]["_meta"]
    assert graph["9"]["inputs"]["filename_prefix"] == "run/x"  # the input is not mutated


def test_forbidden_file_carries_its_ref() -> None:
    found = check_graph(read_graph({"2": node("LoadImage", image="x.png [temp]")}), SCOPE)
    assert found[0].ref == ("temp", "", "x.png")
    found = check_graph(read_graph({"2": node("LoadImage", image="../x.png")}), SCOPE)
    assert found[0].ref is None  # traversal: no store record can allow it


def test_non_dict_prompt_is_an_invalid_prompt() -> None:
    for graph in (["x"], None):
        prompt = read_graph(graph)
        assert [v.error_type for v in prompt.problems] == ["invalid_prompt"]
        assert check_graph(prompt, SCOPE) == []


def test_prompt_rejected_shape() -> None:
    violations = [
        Violation("2", "LoadImage", "image", INPUT_FILE_FORBIDDEN, "not yours", "u/x.png"),
        Violation("9", "SaveImage", "filename_prefix", FILENAME_PREFIX_INVALID, "leaves", "../x"),
    ]
    exc = PromptRejected(violations)
    assert exc.status == 400
    assert exc.error_type == INPUT_FILE_FORBIDDEN
    assert exc.message == "Prompt refused: node 2 (LoadImage) input image: not yours (and 1 more)"
    assert exc.extra == {"node_id": "2", "class_type": "LoadImage", "input_name": "image"}
    assert exc.details.splitlines() == [
        "node 2 (LoadImage) image: not yours",
        "node 9 (SaveImage) filename_prefix: leaves",
    ]
    assert exc.node_errors == {
        "2": {
            "errors": [
                {
                    "type": INPUT_FILE_FORBIDDEN,
                    "message": "not yours",
                    "details": "image",
                    "extra_info": {"input_name": "image", "received_value": "u/x.png"},
                }
            ],
            "dependent_outputs": [],
            "class_type": "LoadImage",
        },
        "9": {
            "errors": [
                {
                    "type": FILENAME_PREFIX_INVALID,
                    "message": "leaves",
                    "details": "filename_prefix",
                    "extra_info": {"input_name": "filename_prefix", "received_value": "../x"},
                }
            ],
            "dependent_outputs": [],
            "class_type": "SaveImage",
        },
    }


# -- envelope ----------------------------------------------------------------------------------

UUID = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        (UUID, True),
        (UUID.upper(), False),
        ("{" + UUID + "}", False),
        (UUID.replace("-", ""), False),
        ("my-prompt", False),
        (None, False),
        (12, False),
    ],
)
def test_is_canonical_uuid(value: object, canonical: bool) -> None:
    assert is_canonical_uuid(value) is canonical
    assert requested_prompt_id({"prompt_id": value}) == (value if canonical else None)


@pytest.mark.parametrize(
    ("body", "expected"), [({"client_id": "tab"}, "tab"), ({}, ""), ({"client_id": 5}, "")]
)
def test_client_id_of(body: dict[str, Any], expected: str) -> None:
    assert client_id_of(body) == expected


@pytest.mark.parametrize("may_prioritise", [False, True])
def test_rewrite_submission(may_prioritise: bool) -> None:
    body = {
        "prompt": {"old": 1},
        "client_id": "tab",
        "prompt_id": "mine",
        "front": True,
        "number": -5,
        "extra_data": {"extra_pnginfo": {"workflow": {}}, "api_key_comfy_org": "secret"},
        "partial_execution_targets": ["9"],
    }
    out = rewrite_submission(body, prompt_id=UUID, client_id="ns", may_prioritise=may_prioritise)
    expected = {
        **body,
        "prompt_id": UUID,
        "client_id": "ns",
    }
    if not may_prioritise:
        del expected["front"], expected["number"]
    assert out == expected
    assert body["prompt"] == {"old": 1}


def test_rewrite_submission_always_sets_client_id() -> None:
    out = rewrite_submission({"prompt": {}}, prompt_id=UUID, client_id="ns", may_prioritise=False)
    assert out["client_id"] == "ns"


# -- body bytes --------------------------------------------------------------------------------


def test_the_body_is_read_as_comfyui_reads_it_under_another_charset() -> None:
    # UTF-7: harmless-looking bytes that ComfyUI decodes to "../../x".
    raw = (
        b'{"prompt": {"9": {"class_type": "SaveImage",'
        b' "inputs": {"filename_prefix": "+AC4ALg-/+AC4ALg-/x"}}}}'
    )
    body = parse_json(raw, "utf-7")
    assert body["prompt"]["9"]["inputs"]["filename_prefix"] == "../../x"
    found = check_graph(read_graph(body["prompt"]), SCOPE)
    assert [v.error_type for v in found] == [FILENAME_PREFIX_INVALID]


def test_without_client_id_neither_key_reaches_comfyui() -> None:
    """ComfyUI reads extra_data.client_id when the top-level key is absent: with no client id
    both are gone (the prompt is broadcast, and kept in the tenant by the socket filter)."""
    body = {"prompt": {}, "extra_data": {"client_id": "someone-elses", "create_time": 1}}
    out = rewrite_submission(body, prompt_id="p", client_id=None, may_prioritise=False)
    assert "client_id" not in out
    assert out["extra_data"] == {"create_time": 1}
    assert body["extra_data"]["client_id"] == "someone-elses"  # the parsed body is not changed
    assert client_id_of(body) == "someone-elses"  # read as the client's own (then namespaced)
    assert client_id_of({"client_id": 5, "extra_data": {"client_id": "x"}}) == ""
