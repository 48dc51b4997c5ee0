"""``POST /prompt`` validation, a port of ``execution.validate_prompt``/``validate_inputs``
(ComfyUI 0.3.64).

Error shapes and messages are those of captures/validation-errors.json: ``invalid_prompt`` for a
missing/unknown ``class_type`` (0.3.64 wording, newer servers say ``missing_node_type``),
``prompt_no_outputs``, and ``prompt_outputs_failed_validation`` whose ``details`` only lists the
errors of the output nodes themselves, with per-node ``node_errors``. Exceptions raised while
walking the graph (a link to a missing node) become ``exception_during_validation`` /
``exception_during_inner_validation`` with a real Python traceback, as in ComfyUI.
Iteration order is the definition order (ComfyUI iterates sets, so its order may differ).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from .nodes import NodeClass, NodeRegistry

Error = dict[str, Any]
Result = tuple[bool, list[Error], str]


def _full_type_name(klass: type) -> str:
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return module + "." + klass.__qualname__


def _input_info(class_inputs: dict[str, Any], name: str) -> tuple[Any, str, dict[str, Any]]:
    for category in ("required", "optional", "hidden"):
        section = class_inputs.get(category, {})
        if name in section:
            spec = section[name]
            if isinstance(spec, str):  # hidden inputs
                return spec, category, {}
            extra = spec[1] if len(spec) > 1 else {}
            return spec[0], category, extra
    raise KeyError(name)


def _types_match(received: Any, expected: Any) -> bool:
    """``validate_node_input``: equal, ``*``, or overlapping comma-separated type lists."""
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    if "*" in got or "*" in want:
        return True
    return bool(got & want)


class Validator:
    """One validation run (``validated`` memo shared by all outputs)."""

    def __init__(self, registry: NodeRegistry, prompt: dict[str, Any]) -> None:
        self.registry = registry
        self.prompt = prompt
        self.validated: dict[str, Result] = {}
        self._inputs: dict[str, dict[str, Any]] = {}

    def class_inputs(self, node: NodeClass) -> dict[str, Any]:
        """``INPUT_TYPES()`` with the file-dependent combo lists of this moment."""
        if node.name not in self._inputs:
            self._inputs[node.name] = self.registry.definition(node.name)["input"]
        return self._inputs[node.name]

    def node_class(self, node_id: Any) -> NodeClass:
        node = self.registry.get(self.prompt[node_id]["class_type"])
        if node is None:
            raise KeyError(self.prompt[node_id]["class_type"])
        return node

    def validate_inputs(self, unique_id: str) -> Result:
        if unique_id in self.validated:
            return self.validated[unique_id]
        inputs = self.prompt[unique_id]["inputs"]
        node = self.node_class(unique_id)
        class_inputs = self.class_inputs(node)
        valid_inputs = [*class_inputs.get("required", {}), *class_inputs.get("optional", {})]
        errors: list[Error] = []
        valid = True
        for x in valid_inputs:
            input_type, category, extra_info = _input_info(class_inputs, x)
            if x not in inputs:
                if category == "required":
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": f"{x}",
                            "extra_info": {"input_name": x},
                        }
                    )
                continue
            val = inputs[x]
            info = [input_type, extra_info]
            if isinstance(val, list):
                if len(val) != 2:
                    errors.append(
                        {
                            "type": "bad_linked_input",
                            "message": "Bad linked input, must be a length-2 list of "
                            "[node_id, slot_index]",
                            "details": f"{x}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                            },
                        }
                    )
                    continue
                o_id = val[0]
                o_class = self.node_class(o_id)
                received_type = o_class.return_types[val[1]]
                if not _types_match(received_type, input_type):
                    errors.append(
                        {
                            "type": "return_type_mismatch",
                            "message": "Return type mismatch between linked nodes",
                            "details": f"{x}, received_type({received_type}) mismatch "
                            f"input_type({input_type})",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_type": received_type,
                                "linked_node": val,
                            },
                        }
                    )
                    continue
                try:
                    r = self.validate_inputs(o_id)
                    if r[0] is False:
                        valid = False
                        continue
                except Exception as ex:
                    typ, _, tb = sys.exc_info()
                    valid = False
                    assert typ is not None
                    self.validated[o_id] = (
                        False,
                        [
                            {
                                "type": "exception_during_inner_validation",
                                "message": "Exception when validating inner node",
                                "details": str(ex),
                                "extra_info": {
                                    "input_name": x,
                                    "input_config": info,
                                    "exception_message": str(ex),
                                    "exception_type": _full_type_name(typ),
                                    "traceback": traceback.format_tb(tb),
                                    "linked_node": val,
                                },
                            }
                        ],
                        o_id,
                    )
                    continue
            else:
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[x] = val
                try:
                    if input_type == "INT":
                        val = int(val)
                    elif input_type == "FLOAT":
                        val = float(val)
                    elif input_type == "STRING":
                        val = str(val)
                    elif input_type == "BOOLEAN":
                        val = bool(val)
                    inputs[x] = val
                except Exception as ex:
                    errors.append(
                        {
                            "type": "invalid_input_type",
                            "message": f"Failed to convert an input value to a {input_type} value",
                            "details": f"{x}, {val}, {ex}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                                "exception_message": str(ex),
                            },
                        }
                    )
                    continue
                if x in node.validate_inputs:
                    continue
                if "min" in extra_info and val < extra_info["min"]:
                    errors.append(
                        {
                            "type": "value_smaller_than_min",
                            "message": "Value {} smaller than min of {}".format(
                                val, extra_info["min"]
                            ),
                            "details": f"{x}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                            },
                        }
                    )
                    continue
                if "max" in extra_info and val > extra_info["max"]:
                    errors.append(
                        {
                            "type": "value_bigger_than_max",
                            "message": "Value {} bigger than max of {}".format(
                                val, extra_info["max"]
                            ),
                            "details": f"{x}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                            },
                        }
                    )
                    continue
                if isinstance(input_type, list) and val not in input_type:
                    config: Any = info
                    list_info = str(input_type)
                    if len(input_type) > 20:
                        list_info = f"(list of length {len(input_type)})"
                        config = None
                    errors.append(
                        {
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": f"{x}: '{val}' not in {list_info}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": config,
                                "received_value": val,
                            },
                        }
                    )
                    continue
        for x in node.validate_inputs:
            ret = self.custom_validation(node, inputs.get(x))
            if ret is not True:
                details = x if ret is False else f"{x} - {ret}"
                errors.append(
                    {
                        "type": "custom_validation_failed",
                        "message": "Custom validation failed for node",
                        "details": details,
                        "extra_info": {"input_name": x},
                    }
                )
        result: Result = (
            (False, errors, unique_id) if errors or not valid else (True, [], unique_id)
        )
        self.validated[unique_id] = result
        return result

    def custom_validation(self, node: NodeClass, value: Any) -> bool | str:
        """LoadImage/LoadAudio.VALIDATE_INPUTS: ``exists_annotated_filepath`` or "Invalid image
        file" / "Invalid audio file"."""
        kind = {"LoadImage": "image", "LoadAudio": "audio"}.get(node.name)
        if kind is not None:
            path = self.registry.paths.annotated_input_path(str(value))
            if not os.path.exists(path):
                return f"Invalid {kind} file: {value}"
        return True


def validate_prompt(
    registry: NodeRegistry, prompt: Any, partial_execution_list: list[str] | None
) -> tuple[bool, Error | None, list[str], dict[str, Any]]:
    """``execution.validate_prompt``: (ok, error, outputs_to_execute, node_errors)."""
    outputs: list[str] = []
    for x in prompt:  # a non-dict prompt fails like in ComfyUI (list: no outputs; others raise)
        if "class_type" not in prompt[x]:
            return (
                False,
                {
                    "type": "invalid_prompt",
                    "message": "Cannot execute because a node is missing the class_type property.",
                    "details": f"Node ID '#{x}'",
                    "extra_info": {},
                },
                [],
                {},
            )
        class_type = prompt[x]["class_type"]
        node = registry.get(class_type)
        if node is None:
            return (
                False,
                {
                    "type": "invalid_prompt",
                    "message": f"Cannot execute because node {class_type} does not exist.",
                    "details": f"Node ID '#{x}'",
                    "extra_info": {},
                },
                [],
                {},
            )
        if node.output_node and (partial_execution_list is None or x in partial_execution_list):
            outputs.append(x)
    if not outputs:
        return (
            False,
            {
                "type": "prompt_no_outputs",
                "message": "Prompt has no outputs",
                "details": "",
                "extra_info": {},
            },
            [],
            {},
        )

    validator = Validator(registry, prompt)
    good_outputs: list[str] = []
    errors: list[tuple[str, list[Error]]] = []
    node_errors: dict[str, Any] = {}
    for o in outputs:
        try:
            valid, reasons, _ = validator.validate_inputs(o)
        except Exception as ex:
            typ, _, tb = sys.exc_info()
            assert typ is not None
            valid = False
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(ex),
                    "extra_info": {
                        "exception_type": _full_type_name(typ),
                        "traceback": traceback.format_tb(tb),
                    },
                }
            ]
            validator.validated[o] = (False, reasons, o)
        if valid is True:
            good_outputs.append(o)
            continue
        errors.append((o, reasons))
        for node_id, (ok, node_reasons, _) in validator.validated.items():
            if ok is not True and node_reasons:
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(o)

    if not good_outputs:
        lines = [f"{e['message']}: {e['details']}" for _, reasons in errors for e in reasons]
        return (
            False,
            {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": "\n".join(lines),
                "extra_info": {},
            },
            [],
            node_errors,
        )
    return (True, None, good_outputs, node_errors)
