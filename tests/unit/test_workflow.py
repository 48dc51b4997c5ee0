"""``proxy.comfy``: the strict JSON reader, the schemas read from ``/object_info``, and the
canonical graph (wrappers, conversions, primitive chains, serialisation)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.comfy.graph import Link, read_graph
from proxy.comfy.json_body import JsonRefused, dump_json, parse_json
from proxy.comfy.schemas import input_spec, schemas_from_object_info
from proxy.comfy.submission import read_submission

# -- JSON ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1, "a": 2}',
        b'{"a": {"b": 1, "b": 1}}',
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b'{"a": 18446744073709551616}',
        b'{"a": -9223372036854775809}',
        b'{"a": "\\udc00"}',
        b"[" * 100_000,
        b"",
        b"\xff",
    ],
)
def test_ambiguous_json_is_refused(raw: bytes) -> None:
    with pytest.raises(JsonRefused):
        parse_json(raw)


def test_json_read_as_json_loads_reads_it() -> None:
    raw = b'{"a": [18446744073709551615, -9223372036854775808, 0.1, "\xc3\xa9\\u2028"]}'
    assert parse_json(raw) == json.loads(raw)
    assert json.loads(dump_json(parse_json(raw))) == json.loads(raw)


def test_charset() -> None:
    assert parse_json('{"a": "é"}'.encode("latin-1"), "latin-1") == {"a": "é"}
    with pytest.raises(JsonRefused, match="unknown charset"):
        parse_json(b"{}", "no-such-charset")


# -- schemas -------------------------------------------------------------------------------------

SPECS: list[tuple[str, object, bool]] = [
    ("image", [["a.png"], {"image_upload": True}], True),
    ("audio", [[], {"audio_upload": True}], True),
    ("file", ["COMBO", {"options": [], "video_upload": True}], True),
    ("x", ["COMBO", {"animated_image_upload": True}], True),
    ("image", ["COMBO", {"image_upload": True, "image_folder": "output"}], True),
    ("image", ["WEBCAM", {}], True),
    ("audio", ["AUDIO_RECORD", {}], True),
    ("image", ["LOAD_3D", {}], True),
    ("latent", [["a.latent", "b.latent"]], True),
    ("latent", [[]], True),  # an empty listing: default deny
    ("custom", ["COMBO", {"options": ["sub/x.bin.json"]}], True),
    ("ckpt_name", [["a.safetensors"]], False),
    ("ckpt_name", [[]], False),
    ("model", [["x.gguf", "y.gguf"]], False),
    ("sampler_name", [["euler", "dpmpp_2m"]], False),
    ("upscale", [[1, 2, 4]], False),
    ("model", ["COMBO", {"options": ["gpt-4o"], "remote": {"route": "/proxy/models"}}], False),
    ("image", ["COMBO", {"remote": {"route": "/internal/files/output"}}], True),
    ("image", ["IMAGE"], False),
    ("text", ["STRING", {"multiline": True}], False),
]


@pytest.mark.parametrize(("name", "spec", "reads"), SPECS)
def test_file_inputs_are_known_from_their_spec(name: str, spec: object, reads: bool) -> None:
    assert input_spec(name, spec, "required").reads_files is reads


def test_schemas_from_object_info() -> None:
    schemas = schemas_from_object_info(
        {
            "N": {
                "input": {
                    "required": {"a": ["INT", {}], "b": [["x", "y"]]},
                    "hidden": {"p": "PROMPT"},
                },
                "output": ["IMAGE", "MASK"],
            },
            "Broken": "not a node",
        }
    )
    schema = schemas.get("N")
    assert schema is not None
    assert schema.outputs == 2
    assert (schema.inputs["a"].type, schema.inputs["b"].type) == ("INT", "COMBO")
    assert schema.inputs["p"].category == "hidden"
    assert "Broken" not in schemas


# -- the graph -----------------------------------------------------------------------------------

SCHEMAS = schemas_from_object_info(
    {
        "Int": {"input": {"required": {"n": ["INT", {}]}}, "output": ["INT"]},
        "Flt": {"input": {"required": {"f": ["FLOAT", {}]}}, "output": []},
        "Txt": {"input": {"required": {"t": ["STRING", {}]}}, "output": ["STRING"]},
        "Flag": {"input": {"required": {"b": ["BOOLEAN", {}]}}, "output": []},
        "Any": {"input": {"required": {"x": ["*", {}]}}, "output": []},
        "PrimitiveInt": {"input": {"required": {"value": ["INT", {}]}}, "output": ["INT"]},
    }
)


def one(class_type: str, name: str, value: object) -> tuple[object, list[str]]:
    prompt = read_graph({"1": {"class_type": class_type, "inputs": {name: value}}}, SCHEMAS)
    node = prompt.nodes.get("1")
    got = node.inputs.get(name, "<refused>") if node is not None else "<refused>"
    return got, [v.error_type for v in prompt.problems]


@pytest.mark.parametrize(
    ("class_type", "name", "value", "expected"),
    [
        ("Int", "n", "60", 60),
        ("Int", "n", " 7 ", 7),
        ("Int", "n", "1_0", 10),
        ("Int", "n", 60.9, 60),
        ("Int", "n", True, 1),
        ("Int", "n", {"__value__": "3"}, 3),
        ("Int", "n", "many", "many"),  # ComfyUI refuses it; kept for its answer
        ("Flt", "f", "0.5", 0.5),
        ("Flt", "f", 2, 2.0),
        ("Txt", "t", 5, "5"),
        ("Txt", "t", {"__value__": ["a", 1]}, "['a', 1]"),
        ("Flag", "b", "false", True),  # bool("false"), as ComfyUI does
        ("Flag", "b", 0, False),
        ("Any", "x", {"__value__": ["2", 0]}, ["2", 0]),  # a list literal, not a link
    ],
)
def test_literals_are_typed_as_comfyui_types_them(
    class_type: str, name: str, value: object, expected: object
) -> None:
    got, problems = one(class_type, name, value)
    assert problems == []
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("9" * 25, "input_not_finite"),
        ("nan", "input_not_finite"),
        ({"__value__": {"__value__": 1}}, "unsupported_literal"),
        ({"__value__": 1, "x": 1}, "unsupported_literal"),
        ({"a": 1}, "unsupported_literal"),
        (["1"], "bad_link"),
        (["nope", 0], "bad_link"),
    ],
)
def test_unreadable_literals(value: object, problem: str) -> None:
    kind = "Flt" if value == "nan" else "Int"
    assert one(kind, "f" if kind == "Flt" else "n", value) == ("<refused>", [problem])


def test_primitive_chains_resolve_to_their_source_and_cycles_are_named() -> None:
    graph: dict[str, Any] = {
        str(i): {"class_type": "PrimitiveInt", "inputs": {"value": [str(i + 1), 0]}}
        for i in range(1, 10)
    }
    graph["10"] = {"class_type": "PrimitiveInt", "inputs": {"value": {"__value__": "99"}}}
    graph["0"] = {"class_type": "Int", "inputs": {"n": ["1", 0]}}
    prompt = read_graph(graph, SCHEMAS)
    assert prompt.problems == []
    assert prompt.resolve(prompt.nodes["0"].inputs["n"]) == 99
    assert prompt.resolve(Link("1", 1)) == Link("1", 1)  # not output 0: not the value
    graph["10"]["inputs"]["value"] = ["1", 0]
    looped = read_graph(graph, SCHEMAS)
    assert {v.node_id for v in looped.problems} == {str(i) for i in range(1, 11)}
    assert {v.error_type for v in looped.problems} == {"cycle"}


def test_serialisation_keeps_order_and_rewraps_lists() -> None:
    body = {
        "client_id": "c",
        "prompt": {
            "1": {
                "_meta": {"title": "t"},
                "class_type": "Int",
                "inputs": {"n": {"__value__": [1]}},
            },
            "2": {"inputs": {"n": ["1", 0]}, "class_type": "Int"},
        },
    }
    raw = json.dumps(body).encode()
    submission = read_submission(raw, None, SCHEMAS)
    out = json.loads(submission.dump())
    assert list(out["prompt"]["1"]) == ["_meta", "class_type", "inputs"]
    assert submission.prompt is not None
    assert submission.prompt.problems == []
    assert out["prompt"]["1"]["inputs"] == {"n": {"__value__": [1]}}  # int([1]) fails: ComfyUI's
    assert out["prompt"]["2"]["inputs"] == {"n": ["1", 0]}
    assert out["client_id"] == "c"


def test_unknown_types_are_listed_when_schemas_are_given() -> None:
    prompt = read_graph({"1": {"class_type": "Nope", "inputs": {}}}, SCHEMAS)
    assert prompt.unknown == ("1",)
    assert read_graph({"1": {"class_type": "Nope", "inputs": {}}}).unknown == ()
