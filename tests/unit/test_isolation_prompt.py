"""POST /prompt rewrite and checks: exact violation types and node ids, envelope, JSON bytes."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from proxy.isolation.files import FileScope, PathRefused
from proxy.isolation.prompt import (
    FILENAME_PREFIX_INVALID,
    INPUT_FILE_FORBIDDEN,
    INPUT_NOT_LITERAL,
    INPUT_PATH_INVALID,
    NOT_JSON,
    ParsedBody,
    PromptRejected,
    Violation,
    check_graph,
    client_id_of,
    dump_body,
    is_canonical_uuid,
    parse_body,
    requested_prompt_id,
    rewrite_submission,
    scoped_prefix,
)

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
    _, found = check_graph(graph, SCOPE)
    return [(v.node_id, v.input_name, v.error_type) for v in found]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"9": SAVE}, []),
        ({"9": node("SaveImage", images=["1", 0], filename_prefix="../x")},
         [("9", "filename_prefix", FILENAME_PREFIX_INVALID)]),
        ({"9": node("SaveImage", images=["1", 0], filename_prefix="/abs/x")},
         [("9", "filename_prefix", FILENAME_PREFIX_INVALID)]),
        ({"9": node("SaveImage", images=["1", 0], filename_prefix=["5", 0])},
         [("9", "filename_prefix", INPUT_NOT_LITERAL)]),
        ({"9": node("SaveImage", images=["1", 0], filename_prefix={"/../users/bob/x": 1})},
         [("9", "filename_prefix", INPUT_NOT_LITERAL)]),
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
        ({"2": node("LoadImage", image=["7", 0])}, [("2", "image", INPUT_NOT_LITERAL)]),
        ({"2": node("LoadImageMask", image="users/bob-2/m.png", channel="alpha")},
         [("2", "image", INPUT_FILE_FORBIDDEN)]),
        ({"2": node("LoadImageOutput", image="users/bob-2/o.png [output]")},
         [("2", "image", INPUT_FILE_FORBIDDEN)]),
        # Generic media inputs of other nodes: checked when they hold a media file name ...
        ({"4": node("VHS_LoadVideo", video="users/bob-2/v.mp4")},
         [("4", "video", INPUT_FILE_FORBIDDEN)]),
        ({"4": node("LoadAudio", audio="a.WAV [input]")}, [("4", "audio", INPUT_FILE_FORBIDDEN)]),
        ({"4": node("Loader3D", file="../m.glb")}, [("4", "file", INPUT_PATH_INVALID)]),
        ({"4": node("LoadAudio", audio=f"{OWN}/a.flac")}, []),
        # ... and left alone when linked (tensors) or not file names.
        ({"5": node("ImageScale", image=["2", 0], upscale_method="nearest-exact")}, []),
        ({"5": node("Custom", image="a red fox")}, []),
        ({"5": node("Custom", video=3)}, []),
        ({"5": node("Custom", picture="users/bob-2/x.png")}, []),
        # Malformed nodes are ComfyUI's to refuse.
        ({"6": "not a node", "7": {"class_type": "X"}, "8": {"inputs": []}}, []),
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
    rewritten, found = check_graph(graph, SCOPE)
    assert found == []
    assert isinstance(rewritten, dict)
    assert rewritten["9"]["inputs"]["filename_prefix"] == f"{OWN}/run/x"
    assert rewritten["10"]["inputs"]["filename_prefix"] == f"{OWN}/anim"
    assert rewritten["9"]["inputs"]["images"] == ["1", 0]
    assert rewritten["1"] == graph["1"]
    assert rewritten["9"]["_meta"] == graph["9"]["_meta"]
    assert graph["9"]["inputs"]["filename_prefix"] == "run/x"  # the input is not mutated


def test_forbidden_file_carries_its_ref() -> None:
    _, found = check_graph({"2": node("LoadImage", image="x.png [temp]")}, SCOPE)
    assert found[0].ref == ("temp", "", "x.png")
    _, found = check_graph({"2": node("LoadImage", image="../x.png")}, SCOPE)
    assert found[0].ref is None  # traversal: no store record can allow it


def test_non_dict_prompt_is_left_to_comfyui() -> None:
    assert check_graph(["x"], SCOPE) == (["x"], [])
    assert check_graph(None, SCOPE) == (None, [])


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
    out = rewrite_submission(
        body, prompt={"new": 1}, prompt_id=UUID, client_id="ns", may_prioritise=may_prioritise
    )
    expected = {
        **body,
        "prompt": {"new": 1},
        "prompt_id": UUID,
        "client_id": "ns",
    }
    if not may_prioritise:
        del expected["front"], expected["number"]
    assert out == expected
    assert body["prompt"] == {"old": 1}


def test_rewrite_submission_always_sets_client_id() -> None:
    out = rewrite_submission({"prompt": {}}, prompt={}, prompt_id=UUID, client_id="ns",
                             may_prioritise=False)  # fmt: skip
    assert out["client_id"] == "ns"


# -- body bytes --------------------------------------------------------------------------------


def test_parse_body_utf8() -> None:
    parsed = parse_body(b'{"a": [1, 2.5, "\xc3\xa9"]}', None)
    assert parsed == ParsedBody({"a": [1, 2.5, "é"]})
    assert parse_body(b'{"a": 1}', "UTF-8") == ParsedBody({"a": 1})


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe{}"])
def test_parse_body_not_json(raw: bytes) -> None:
    assert parse_body(raw, None) is NOT_JSON


def test_parse_body_unknown_charset() -> None:
    assert parse_body(b"{}", "no-such-charset") is NOT_JSON


def test_parse_body_reads_what_comfyui_reads_under_another_charset() -> None:
    # UTF-7: harmless-looking bytes that ComfyUI decodes to "../../x".
    raw = (
        b'{"prompt": {"9": {"class_type": "SaveImage",'
        b' "inputs": {"filename_prefix": "+AC4ALg-/+AC4ALg-/x"}}}}'
    )
    parsed = parse_body(raw, "utf-7")
    assert not isinstance(parsed, type(NOT_JSON))
    assert isinstance(parsed.value, dict)
    assert parsed.value["prompt"]["9"]["inputs"]["filename_prefix"] == "../../x"
    _, found = check_graph(parsed.value["prompt"], SCOPE)
    assert [v.error_type for v in found] == [FILENAME_PREFIX_INVALID]


def test_nan_and_big_integers_round_trip_exactly() -> None:
    raw = b'{"prompt": {}, "extra_data": {"x": NaN, "y": 123456789012345678901234567890}}'
    parsed = parse_body(raw, None)
    assert isinstance(parsed, ParsedBody)
    assert parsed.exact_json
    assert isinstance(parsed.value, dict)
    out = dump_body(parsed.value, exact_json=True)
    again = json.loads(out)
    assert math.isnan(again["extra_data"]["x"])
    assert again["extra_data"]["y"] == 123456789012345678901234567890


def test_dump_body_keeps_values() -> None:
    body = {"prompt": {"1": {"inputs": {"f": 0.1, "s": "é\u2028", "n": None}}}, "b": True}
    assert json.loads(dump_body(body)) == body
