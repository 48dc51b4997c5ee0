"""``proxy.comfy.validation``: ComfyUI's submit-time validation predicted from ``/object_info``
(each error type in ComfyUI's shape, the order and ``dependent_outputs`` quirks, and every case
where the prediction must not refuse)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.comfy.validation import Rules, Verdict, validate_prompt

INFO: dict[str, Any] = {
    "Source": {
        "input": {
            "required": {
                "width": ["INT", {"default": 8, "min": 1, "max": 64}],
                "strength": ["FLOAT", {"min": 0.0, "max": 1.0}],
                "mode": [["a", "b"], {}],
            },
            "optional": {"flag": ["BOOLEAN", {}], "label": ["STRING", {}]},
            "hidden": {"unique_id": "UNIQUE_ID"},
        },
        "output": ["IMAGE", "INT"],
        "output_node": False,
        "python_module": "nodes",
    },
    "Many": {
        "input": {"required": {"pick": [[f"m{i}" for i in range(25)], {}]}},
        "output": ["MODEL"],
        "output_node": False,
        "python_module": "nodes",
    },
    "Save": {
        "input": {"required": {"images": ["IMAGE"]}, "optional": {"count": ["INT,FLOAT", {}]}},
        "output": [],
        "output_node": True,
        "python_module": "nodes",
    },
    "ShowAny": {
        "input": {"required": {"source": ["*", {}]}},
        "output": [],
        "output_node": True,
        "python_module": "comfy_extras.nodes_preview_any",
    },
    "CustomShow": {
        "input": {"required": {"source": ["*", {}], "size": ["INT", {"min": 0, "max": 4}]}},
        "output": [],
        "output_node": True,
        "python_module": "custom_nodes.pack",
    },
    "LoadImage": {
        "input": {"required": {"image": [["here.png"], {"image_upload": True}]}},
        "output": ["IMAGE", "MASK"],
        "output_node": False,
        "python_module": "nodes",
    },
}


def run(prompt: dict[str, Any], partial: object = None) -> Verdict:
    return validate_prompt(prompt, Rules(INFO), partial)


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def source(**inputs: Any) -> dict[str, Any]:
    return node("Source", **{"width": 8, "strength": 0.5, "mode": "a", **inputs})


def errors_of(verdict: Verdict, node_id: str) -> list[dict[str, Any]]:
    return list(verdict.node_errors[node_id]["errors"])


def test_a_valid_prompt_is_accepted_with_no_node_errors() -> None:
    verdict = run({"1": source(), "2": node("Save", images=["1", 0])})
    assert verdict == Verdict(None)
    assert not verdict.refuses
    assert verdict.held_node_errors() == {}


def test_prompt_level_errors_in_comfyui_order() -> None:
    missing = run({"1": {"inputs": {}}, "2": node("Nope")})
    assert missing.answer() == {
        "error": {
            "type": "invalid_prompt",
            "message": "Cannot execute because a node is missing the class_type property.",
            "details": "Node ID '#1'",
            "extra_info": {},
        },
        "node_errors": {},
    }
    unknown = run({"1": source(), "2": node("Nope")})
    assert unknown.error is not None
    assert unknown.error["message"] == "Cannot execute because node Nope does not exist."
    assert unknown.refuses
    assert unknown.stale_sensitive  # installed since the copy was read?
    no_outputs = run({"1": source()})
    assert no_outputs.answer()["error"] == {
        "type": "prompt_no_outputs",
        "message": "Prompt has no outputs",
        "details": "",
        "extra_info": {},
    }


def test_required_missing_and_value_errors_in_comfyui_shape() -> None:
    verdict = run(
        {
            "1": node("Source", width=0, strength="x", mode="c", flag=[7, 8, 9]),
            "2": node("Save", images=["1", 0]),
        }
    )
    assert verdict.refuses
    errors = errors_of(verdict, "1")
    assert [e["type"] for e in errors] == [
        "value_smaller_than_min",
        "invalid_input_type",
        "value_not_in_list",
        "bad_linked_input",
    ]
    assert errors[0] == {
        "type": "value_smaller_than_min",
        "message": "Value 0 smaller than min of 1",
        "details": "width",
        "extra_info": {
            "input_name": "width",
            "input_config": ["INT", {"default": 8, "min": 1, "max": 64}],
            "received_value": 0,
        },
    }
    assert errors[1]["details"] == "strength, x, could not convert string to float: 'x'"
    assert errors[1]["extra_info"]["exception_message"] == "could not convert string to float: 'x'"
    assert errors[2]["details"] == "mode: 'c' not in ['a', 'b']"
    assert errors[2]["extra_info"]["input_config"] == [["a", "b"], {}]
    assert errors[3]["extra_info"]["received_value"] == [7, 8, 9]
    # The output failed only through its input: listed by ComfyUI without errors, so not shown.
    assert set(verdict.node_errors) == {"1"}
    assert verdict.node_errors["1"]["dependent_outputs"] == ["2"]
    assert verdict.node_errors["1"]["class_type"] == "Source"
    error = verdict.answer()["error"]
    assert error["type"] == "prompt_outputs_failed_validation"
    assert error["details"] == ""  # the output's own reasons: none


def test_converted_values_are_checked_and_reported_converted() -> None:
    verdict = run({"1": source(width="99"), "2": node("Save", images=["1", 0])})
    (error,) = errors_of(verdict, "1")
    assert error["type"] == "value_bigger_than_max"
    assert error["message"] == "Value 99 bigger than max of 64"
    assert error["extra_info"]["received_value"] == 99
    wrapped = run({"1": source(width={"__value__": "5"}), "2": node("Save", images=["1", 0])})
    assert wrapped == Verdict(None)


def test_a_long_combo_list_is_not_echoed() -> None:
    verdict = run({"1": node("Many", pick="zz"), "2": node("ShowAny", source=["1", 0])})
    (error,) = errors_of(verdict, "1")
    assert error["details"] == "pick: 'zz' not in (list of length 25)"
    assert error["extra_info"]["input_config"] is None
    assert verdict.stale_sensitive  # a model list the instance re-reads


def test_link_type_mismatch_and_multi_types() -> None:
    verdict = run({"1": source(), "2": node("Save", images=["1", 1])})
    (error,) = errors_of(verdict, "2")
    assert error == {
        "type": "return_type_mismatch",
        "message": "Return type mismatch between linked nodes",
        "details": "images, received_type(INT) mismatch input_type(IMAGE)",
        "extra_info": {
            "input_name": "images",
            "input_config": ["IMAGE", {}],
            "received_type": "INT",
            "linked_node": ["1", 1],
        },
    }
    assert error is not None
    assert verdict.answer()["error"]["details"] == (
        "Return type mismatch between linked nodes: "
        "images, received_type(INT) mismatch input_type(IMAGE)"
    )
    overlap = run({"1": source(), "2": node("Save", images=["1", 0], count=["1", 1])})
    assert overlap == Verdict(None)  # "INT" overlaps "INT,FLOAT"


def test_partly_valid_prompt_is_accepted_with_the_failed_outputs_errors() -> None:
    verdict = run(
        {
            "1": source(width=0),
            "2": node("Save", images=["1", 0]),
            "3": node("Save"),
            "4": node("ShowAny", source=5),
        }
    )
    assert not verdict.refuses
    assert verdict.error is None
    held = verdict.held_node_errors()
    assert set(held) == {"1", "3"}
    # ComfyUI's quirk: every failed node seen so far gets each later failed output.
    assert held["1"]["dependent_outputs"] == ["2", "3"]
    assert held["3"]["dependent_outputs"] == ["3"]


def test_partial_execution_targets_choose_the_outputs() -> None:
    prompt = {"1": source(width=0), "2": node("Save", images=["1", 0]), "3": node("ShowAny")}
    assert run(prompt, ["2"]).refuses
    only_3 = run(prompt, ["3"])
    assert only_3.refuses
    assert set(only_3.node_errors) == {"3"}
    assert run(prompt, ["1"]).answer()["error"]["type"] == "prompt_no_outputs"
    assert run(prompt, "2").unsure  # ComfyUI would test substrings of a string


def test_each_node_is_validated_once() -> None:
    verdict = run(
        {
            "1": source(width=0),
            "2": node("Save", images=["1", 0]),
            "3": node("Save", images=["1", 0]),
        }
    )
    assert len(errors_of(verdict, "1")) == 1
    assert verdict.node_errors["1"]["dependent_outputs"] == ["2", "3"]
    assert verdict.answer()["error"]["details"] == ""


@pytest.mark.parametrize(
    ("prompt", "why"),
    [
        # ComfyUI would raise (its answer carries a traceback): not predicted.
        ({"1": source(), "2": node("Save", images=["1", 5])}, "output"),
        ({"2": node("Save", images=["9", 0])}, "not in the prompt"),
        ({"1": source(), "2": node("Save")}, ""),
    ],
)  # fmt: skip
def test_what_comfyui_would_raise_on_is_unsure(prompt: dict[str, Any], why: str) -> None:
    verdict = run(prompt)
    if not why:  # the control: a sure refusal
        assert verdict.refuses
        return
    assert why in verdict.unsure
    assert not verdict.refuses
    assert verdict.held_node_errors() == {}


def test_bound_check_on_incomparable_values_is_unsure() -> None:
    info = {
        "Odd": {
            "input": {"required": {"v": [["x", "y"], {"min": 0}]}},
            "output": [],
            "output_node": True,
            "python_module": "nodes",
        }
    }
    verdict = validate_prompt({"1": node("Odd", v="x")}, Rules(info))
    assert "bound check" in verdict.unsure
    assert not verdict.refuses


def test_custom_nodes_never_refuse_on_what_they_may_validate_themselves() -> None:
    out_of_range = run({"1": node("CustomShow", source=1, size=9)})
    assert out_of_range.unsure
    assert not out_of_range.refuses
    # Even another node's sure error is not refused: the custom node's own validation could
    # add errors to ComfyUI's answer.
    both = run({"1": node("CustomShow", source=1, size=1), "2": node("Save")})
    assert both.unsure
    assert not both.refuses
    # Nothing found: held as ComfyUI's to judge (the same 200 as before), never refused.
    clean = run({"1": node("CustomShow", source=1, size=1)})
    assert clean.error is None
    assert clean.unsure
    assert clean.held_node_errors() == {}


def test_core_any_type_matches_a_custom_one_is_unsure() -> None:
    assert run({"1": source(), "2": node("ShowAny", source=["1", 0])}) == Verdict(None)
    # A custom "*" may not match: held (ComfyUI decides), and never refused.
    custom = run({"1": source(), "2": node("CustomShow", source=["1", 1], size=0)})
    assert custom.error is None
    assert custom.unsure
    assert not custom.refuses
    with_error = run(
        {"1": source(), "2": node("CustomShow", source=["1", 1], size=0), "3": node("Save")}
    )
    assert with_error.unsure
    assert not with_error.refuses


def test_load_image_file_check_is_left_to_comfyui_unless_listed() -> None:
    listed = {"1": node("LoadImage", image="here.png"), "2": node("Save", images=["1", 0])}
    assert run(listed) == Verdict(None)
    unlisted = {
        "1": node("LoadImage", image="just-uploaded.png"),
        "2": node("Save", images=["1", 0]),
        "3": node("Save"),
    }
    verdict = run(unlisted)  # output 2 may fail too (its own check decides, not the list)
    assert verdict.unsure
    assert verdict.held_node_errors() == {}
    listed["3"] = node("Save")
    assert set(run(listed).held_node_errors()) == {"3"}
    # Alone (no other error), an unlisted file is held as ComfyUI may accept it.
    alone = run({"1": node("LoadImage", image="sub/x.png"), "2": node("Save", images=["1", 0])})
    assert alone.error is None
    assert alone.unsure  # ComfyUI may refuse it: held, not answered as surely valid
    assert alone.held_node_errors() == {}


def test_deep_graphs_are_not_followed_past_the_limit() -> None:
    info = dict(INFO)
    info["Pass"] = {
        "input": {"required": {"image": ["IMAGE"]}},
        "output": ["IMAGE"],
        "output_node": False,
        "python_module": "nodes",
    }
    chain: dict[str, Any] = {"0": source(width=0)}
    for i in range(1, 400):
        chain[str(i)] = node("Pass", image=[str(i - 1), 0])
    chain["end"] = node("Save", images=["399", 0])
    verdict = validate_prompt(chain, Rules(info))
    assert "deeper" in verdict.unsure
    assert not verdict.refuses


def test_malformed_definitions_are_read_leniently() -> None:
    info = {
        "Weird": {"input": {"required": {"a": "INT", "b": []}}, "output": "x", "output_node": 1},
        "NoInputs": {"output": [], "output_node": True, "python_module": "nodes"},
        "NotADict": 5,
    }
    rules = Rules(info)
    assert rules.get("NotADict") is None
    weird = rules.get("Weird")
    assert weird is not None
    assert weird.outputs == ()
    assert weird.output_node is False  # ComfyUI checks OUTPUT_NODE is True
    assert weird.core is False
    assert weird.malformed
    assert validate_prompt({"1": node("NotADict")}, rules).refuses
    broken = validate_prompt({"1": node("NoInputs"), "2": node("Save")}, Rules({**INFO, **info}))
    assert "not what ComfyUI reads" in broken.unsure
