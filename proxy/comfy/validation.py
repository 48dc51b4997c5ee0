"""ComfyUI's submit-time validation of a prompt, predicted from ``/object_info`` (pure).

With the gateway queue on, comfygate answers ``POST /prompt`` itself and ComfyUI sees the prompt
only at release; :func:`validate_prompt` tells, before the prompt is held, what ComfyUI 0.3.64
would answer to it (``execution.validate_prompt`` / ``validate_inputs`` and
``comfy_execution.validation.validate_node_input``, read from ComfyUI's source; written here
from that behaviour, not copied), so a prompt ComfyUI would refuse is refused at once with the
same 400 body: ``{"error": {type, message, details, extra_info}, "node_errors": {id: {"errors":
[{type, message, details, extra_info}], "dependent_outputs": [...], "class_type": ...}}}``.

What ComfyUI checks, in its order: every node names an installed class (``invalid_prompt``);
some selected node is an output node (``prompt_no_outputs``); then, walking back from each
output node through its links (each node once): every required input is given
(``required_input_missing``), a link is ``[id, index]`` (``bad_linked_input``) whose output
type overlaps the input's (``return_type_mismatch``), a literal converts to an ``INT``/
``FLOAT``/``STRING``/``BOOLEAN`` input's type (``invalid_input_type``), lies within ``min``/
``max`` (``value_smaller_than_min``/``value_bigger_than_max``) and, for a legacy list combo,
in the list (``value_not_in_list``). An output failing (itself or through an input) is left
out; if none is left, the answer is ``prompt_outputs_failed_validation``, else the prompt runs
and the 200 answer carries the failed nodes' ``node_errors``.

**Never refuse what ComfyUI would accept.** What ``/object_info`` does not say makes the
prediction unsure (:attr:`Verdict.unsure`), and an unsure prediction never refuses (the caller
holds the prompt and ComfyUI decides at release):

- a node's own ``VALIDATE_INPUTS`` (``validate_inputs`` in the V3 API) takes over the value
  checks of the inputs it names and may fail on its own; ``/object_info`` does not say which
  nodes have one. :data:`CUSTOM_VALIDATION` lists ComfyUI 0.3.64's core nodes that do; a
  file loader among them (LoadImage...) is predicted to pass when its value is listed in the
  instance's options (the file existed when the list was read), unsure otherwise (a file just
  uploaded, a subfolder). A node outside core (``python_module`` not ``nodes``/
  ``comfy_extras``/``comfy_api_nodes``) may have one: any error while such a node is
  validated is unsure;
- ``"*"`` types outside core nodes (a custom node's "any" type matches only if its class says
  so in Python);
- anything that would raise inside ComfyUI's validation (its answer would carry a traceback):
  an output index past the outputs, a comparison of incomparable values, a graph deeper than
  :data:`MAX_DEPTH`, a ``partial_execution_targets`` that is not a list.

Answers that depend on lists the instance re-reads on every ``/object_info`` (combo options:
models, input files; the installed classes) are marked :attr:`Verdict.stale_sensitive`: the
caller refuses on them only with a fresh copy of the instance's ``/object_info``.

Order: ComfyUI iterates sets (node ids, input names), so the order of outputs and of one node's
errors varies between its runs; this module uses definition order (required, then optional
inputs; nodes as received), as the test suite's fake ComfyUI does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 200
"""Links followed from an output node before the prediction gives up (ComfyUI recurses; a
deeper graph may exhaust its stack, which the proxy cannot predict)."""
CORE_MODULES = ("nodes", "comfy_extras.", "comfy_api_nodes.")
"""``python_module`` prefixes of ComfyUI's own nodes (``nodes`` exactly)."""
CORE_EXTRA_CLASSES = frozenset({"SaveImageWebsocket"})
"""Shipped with ComfyUI as an example custom node; known to have no ``VALIDATE_INPUTS``."""
ANY_INPUTS = ("*",)
"""Marks a class whose ``VALIDATE_INPUTS`` takes every input (``**kwargs``/``input_types``)."""
CUSTOM_VALIDATION: Mapping[str, tuple[str, ...]] = {
    "LoadImage": ("image",),
    "LoadImageMask": ("image",),
    "LoadImageOutput": ("image",),
    "LoadLatent": ("latent",),
    "LoadAudio": ("audio",),
    "LoadVideo": ("file",),
    "LoadImageSetNode": ("images", "resize_method"),
    "FluxProUltraImageNode": ("aspect_ratio",),
    "KlingCameraControls": ANY_INPUTS,
    "TripoConversionNode": ANY_INPUTS,
}
"""Core classes of ComfyUI 0.3.64 with their own input validation, and the inputs it takes."""
FILE_LOADERS = frozenset(
    {"LoadImage", "LoadImageMask", "LoadImageOutput", "LoadLatent", "LoadAudio", "LoadVideo"}
)
"""Of those, the ones whose validation only checks that the named input file exists."""
_CONVERSIONS: Mapping[str, type] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
_LIST_SHOWN = 20


# -- the rules, read from /object_info ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputRule:
    """One declared input as ComfyUI's ``get_input_info`` reads it."""

    name: str
    kind: Any
    """The spec's first item: a type name, or a legacy combo's list of options."""
    required: bool
    extra: Mapping[str, Any]

    @property
    def config(self) -> list[Any]:
        """``input_config`` as ComfyUI's answers render it (``(type, extra_info)``)."""
        return [self.kind, dict(self.extra)]

    def listed(self) -> list[Any] | None:
        """The options a value is picked from (either combo form), None when not a combo."""
        if isinstance(self.kind, list):
            return self.kind
        options = self.extra.get("options")
        return options if self.kind == "COMBO" and isinstance(options, list) else None


@dataclass(frozen=True, slots=True)
class ClassRule:
    """One node class: its inputs (required, then optional), its output types, whether it is
    an output node, and what of its validation ``/object_info`` cannot tell."""

    name: str
    inputs: tuple[InputRule, ...]
    outputs: tuple[Any, ...]
    output_node: bool
    core: bool
    custom: tuple[str, ...] = ()
    """Inputs its own validation takes over (:data:`CUSTOM_VALIDATION`)."""
    malformed: bool = False
    """Its ``/object_info`` entry is not what ComfyUI's validation reads (no ``input``
    object, an input spec that is not ``[type, {extra}]``): validating it is unsure."""


class Rules:
    """The classes of one instance's ``/object_info``, each read on first use."""

    def __init__(self, object_info: Mapping[str, Any]) -> None:
        self._info = object_info
        self._read: dict[str, ClassRule | None] = {}

    def __contains__(self, class_type: object) -> bool:
        return isinstance(class_type, str) and isinstance(self._info.get(class_type), Mapping)

    def get(self, class_type: str) -> ClassRule | None:
        if class_type not in self._read:
            self._read[class_type] = _class_rule(class_type, self._info.get(class_type))
        return self._read[class_type]


def _class_rule(name: str, definition: object) -> ClassRule | None:
    if not isinstance(definition, Mapping):
        return None
    sections = definition.get("input")
    inputs: list[InputRule] = []
    seen: set[str] = set()
    malformed = not isinstance(sections, Mapping)
    if isinstance(sections, Mapping):
        for required in (True, False):
            section = sections.get("required" if required else "optional")
            if not isinstance(section, Mapping):
                continue
            for input_name, spec in section.items():
                if input_name in seen:
                    continue  # ComfyUI reads the required one (get_input_info)
                seen.add(input_name)
                if not isinstance(spec, list | tuple) or not spec:
                    malformed = True  # ComfyUI would index into it: nothing to predict
                    continue
                extra = spec[1] if len(spec) > 1 else {}
                if not isinstance(extra, Mapping):
                    malformed = True
                    continue
                inputs.append(InputRule(input_name, spec[0], required, extra))
    outputs = definition.get("output")
    module = definition.get("python_module")
    core = name in CORE_EXTRA_CLASSES or (
        isinstance(module, str)
        and (module == CORE_MODULES[0] or module.startswith(CORE_MODULES[1:]))
    )
    return ClassRule(
        name,
        tuple(inputs),
        tuple(outputs) if isinstance(outputs, list | tuple) else (),
        definition.get("output_node") is True,
        core,
        CUSTOM_VALIDATION.get(name, ()) if core else (),
        malformed,
    )


# -- the verdict ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ComfyUI would answer, as far as ``/object_info`` tells."""

    error: dict[str, Any] | None
    """ComfyUI's top-level ``error`` when it would refuse the prompt (400), else None."""
    node_errors: dict[str, Any] = field(default_factory=dict)
    """Its ``node_errors`` (in a 400, or in the 200 answer of a partly valid prompt)."""
    unsure: str = ""
    """Why the prediction cannot be trusted (empty when it can): the prompt is then held
    without refusal and ComfyUI decides at release."""
    stale_sensitive: bool = False
    """The answer rests on lists the instance re-reads (combo options, its classes): refuse on
    it only with a fresh ``/object_info``."""

    @property
    def refuses(self) -> bool:
        """ComfyUI would surely answer 400 (:meth:`answer`)."""
        return self.error is not None and not self.unsure

    def answer(self) -> dict[str, Any]:
        """The 400 body ComfyUI would send."""
        return {"error": self.error, "node_errors": self.node_errors}

    def held_node_errors(self) -> dict[str, Any]:
        """``node_errors`` for the 200 answer of a held prompt: the failed outputs' errors
        when sure, ``{}`` (ComfyUI's answer for a fully valid prompt) otherwise."""
        return {} if self.unsure or self.error is not None else self.node_errors


class _Unsure(Exception):
    """ComfyUI's outcome cannot be predicted from here (module doc)."""


def _err(kind: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _prompt_error(kind: str, message: str, details: str = "") -> Verdict:
    return Verdict(_err(kind, message, details))


def validate_prompt(
    prompt: Mapping[str, Any], rules: Rules, partial_targets: object = None
) -> Verdict:
    """ComfyUI's answer to ``prompt`` (the graph exactly as it will be sent: ids to
    ``{"class_type", "inputs"}``), with ``rules`` from the instance's ``/object_info`` and the
    body's ``partial_execution_targets`` (None: every output)."""
    if partial_targets is not None and not isinstance(partial_targets, list):
        return Verdict(None, unsure="partial_execution_targets is not a list")
    outputs: list[str] = []
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("inputs"), Mapping):
            return Verdict(None, unsure=f"node {node_id} is not what ComfyUI validates")
        if "class_type" not in node:
            return _prompt_error(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        class_type = node["class_type"]
        rule = rules.get(class_type) if isinstance(class_type, str) else None
        if rule is None:
            verdict = _prompt_error(
                "invalid_prompt",
                f"Cannot execute because node {class_type} does not exist.",
                f"Node ID '#{node_id}'",
            )
            return Verdict(verdict.error, stale_sensitive=True)  # installed since the copy?
        if rule.output_node and (partial_targets is None or node_id in partial_targets):
            outputs.append(node_id)
    if not outputs:
        return _prompt_error("prompt_no_outputs", "Prompt has no outputs")
    run = _Run(prompt, rules)
    try:
        return run.verdict(outputs)
    except _Unsure as exc:
        return Verdict(None, unsure=str(exc))


NodeResult = tuple[bool, list[dict[str, Any]]]


class _Run:
    """One validation: each node validated once (ComfyUI's ``validated`` memo), in the order
    ComfyUI reaches it."""

    def __init__(self, prompt: Mapping[str, Any], rules: Rules) -> None:
        self.prompt = prompt
        self.rules = rules
        self.done: dict[str, NodeResult] = {}
        self.unsure = ""
        """Why an error found may not be what ComfyUI reports (set, not raised: only a
        refusal or a partly valid prompt needs a sure prediction)."""
        self.stale_sensitive = False

    def rule_of(self, node_id: str) -> ClassRule:
        rule = self.rules.get(self.prompt[node_id]["class_type"])
        assert rule is not None  # every class was checked first
        return rule

    def verdict(self, outputs: Sequence[str]) -> Verdict:
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        good = 0
        for output in outputs:
            ok, errors = self.node(output, 0)
            if ok:
                good += 1
                continue
            failed.append((output, errors))
            for node_id, (node_ok, node_errs) in self.done.items():
                if node_ok or not node_errs:
                    continue  # invalid only through an input: not reported (as ComfyUI)
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": node_errs,
                        "dependent_outputs": [],
                        "class_type": self.prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(output)
        unsure = self.unsure
        if not failed:
            # Unsure: ComfyUI may find errors the prediction cannot (the prompt is held).
            return Verdict(None, unsure=unsure)
        if good:
            return Verdict(None, node_errors, unsure, self.stale_sensitive)
        lines = [f"{e['message']}: {e['details']}" for _, errs in failed for e in errs]
        error = _err("prompt_outputs_failed_validation", "Prompt outputs failed validation", "")
        error["details"] = "\n".join(lines)
        return Verdict(error, node_errors, unsure, self.stale_sensitive)

    def node(self, node_id: str, depth: int) -> NodeResult:
        known = self.done.get(node_id)
        if known is not None:
            return known
        if depth > MAX_DEPTH:
            raise _Unsure("the graph is deeper than the prediction follows")
        rule = self.rule_of(node_id)
        if rule.malformed:
            raise _Unsure(f"{rule.name}'s /object_info entry is not what ComfyUI reads")
        inputs = self.prompt[node_id]["inputs"]
        errors: list[dict[str, Any]] = []
        inputs_ok = True
        for spec in rule.inputs:
            if spec.name not in inputs:
                if spec.required:
                    errors.append(
                        _err(
                            "required_input_missing",
                            "Required input is missing",
                            spec.name,
                            input_name=spec.name,
                        )
                    )
                continue
            value = inputs[spec.name]
            if isinstance(value, list):
                outcome = self.linked(rule, spec, value, depth)
                if outcome is False:
                    inputs_ok = False
                elif outcome is not True:
                    errors.append(outcome)
            else:
                error = self.literal(rule, spec, value)
                if error is not None:
                    errors.append(error)
        self.custom(rule, inputs)
        if not rule.core:
            # Its own VALIDATE_INPUTS (if any) may skip the checks above or fail by itself.
            self.unsure = f"{rule.name} may validate its inputs itself"
        result: NodeResult = (not errors and inputs_ok, errors)
        self.done[node_id] = result
        return result

    def linked(
        self, rule: ClassRule, spec: InputRule, link: list[Any], depth: int
    ) -> bool | dict[str, Any]:
        """True (the link is fine), False (its source fails) or this input's error."""
        name = spec.name
        if len(link) != 2:
            return _err(
                "bad_linked_input",
                "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                name,
                input_name=name,
                input_config=spec.config,
                received_value=link,
            )
        source, index = link
        if not isinstance(source, str) or source not in self.prompt:
            raise _Unsure("a link to a node that is not in the prompt")
        source_rule = self.rule_of(source)
        if type(index) is not int or not 0 <= index < len(source_rule.outputs):
            raise _Unsure("a link to an output the source node does not have")
        received = source_rule.outputs[index]
        takes_types = rule.custom == ANY_INPUTS
        if not takes_types and not self.types_match(rule, source_rule, received, spec.kind):
            return _err(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}, received_type({received}) mismatch input_type({spec.kind})",
                input_name=name,
                input_config=spec.config,
                received_type=received,
                linked_node=link,
            )
        ok, _ = self.node(source, depth + 1)
        return ok

    def types_match(self, rule: ClassRule, source: ClassRule, received: Any, wanted: Any) -> bool:
        """``validate_node_input``: equal, or overlapping comma-separated type lists; a core
        ``"*"`` (``IO.ANY``) matches anything, another class's is unsure."""
        if received == wanted:
            return True
        if "*" in (received, wanted):
            core_any = (received == "*" and source.core) or (wanted == "*" and rule.core)
            if not core_any:
                self.unsure = "a custom node's '*' type"
            return True
        if not isinstance(received, str) or not isinstance(wanted, str):
            return False
        mine = {t.strip() for t in received.split(",")}
        return not mine.isdisjoint(t.strip() for t in wanted.split(","))

    def literal(self, rule: ClassRule, spec: InputRule, value: Any) -> dict[str, Any] | None:
        """This literal's error, None when it passes."""
        name = spec.name
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
        convert = _CONVERSIONS.get(spec.kind) if isinstance(spec.kind, str) else None
        if convert is not None:
            try:
                value = convert(value)
            except Exception as exc:  # noqa: BLE001 - what ComfyUI catches, reported as it does
                return _err(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {spec.kind} value",
                    f"{name}, {value}, {exc}",
                    input_name=name,
                    input_config=spec.config,
                    received_value=value,
                    exception_message=str(exc),
                )
        if name in rule.custom or rule.custom == ANY_INPUTS:
            return None  # the node's own validation decides (custom)
        extra = spec.extra
        try:
            if "min" in extra and value < extra["min"]:
                return _bound_error("value_smaller_than_min", "smaller than min", spec, value)
            if "max" in extra and value > extra["max"]:
                return _bound_error("value_bigger_than_max", "bigger than max", spec, value)
        except TypeError:
            raise _Unsure(f"{name}: ComfyUI's bound check would raise") from None
        if isinstance(spec.kind, list) and value not in spec.kind:
            self.stale_sensitive = True  # a model or file list may have grown since
            shown = str(spec.kind) if len(spec.kind) <= _LIST_SHOWN else None
            return _err(
                "value_not_in_list",
                "Value not in list",
                f"{name}: '{value}' not in {shown or f'(list of length {len(spec.kind)})'}",
                input_name=name,
                input_config=spec.config if shown is not None else None,
                received_value=value,
            )
        return None

    def custom(self, rule: ClassRule, inputs: Mapping[str, Any]) -> None:
        """A node's own validation: a file loader passes when its file was listed (it existed
        when the instance listed its inputs); anything else is unsure."""
        if not rule.custom:
            return
        if rule.name not in FILE_LOADERS:
            self.unsure = f"{rule.name} validates its inputs itself"
            return
        for spec in rule.inputs:
            if spec.name not in rule.custom:
                continue
            value = inputs.get(spec.name)
            listed = spec.listed()
            if isinstance(value, str) and listed is not None and value in listed:
                self.stale_sensitive = True  # a file listed then may have gone since
                continue
            self.unsure = f"{rule.name} checks that {spec.name} names an existing file"


def _bound_error(kind: str, words: str, spec: InputRule, value: Any) -> dict[str, Any]:
    bound = spec.extra["min" if kind == "value_smaller_than_min" else "max"]
    return _err(
        kind,
        f"Value {value} {words} of {bound}",
        spec.name,
        input_name=spec.name,
        input_config=spec.config,
        received_value=value,
    )


__all__ = [
    "CUSTOM_VALIDATION",
    "FILE_LOADERS",
    "MAX_DEPTH",
    "ClassRule",
    "InputRule",
    "Rules",
    "Verdict",
    "validate_prompt",
]
