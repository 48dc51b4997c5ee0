"""``check_workflow``: every way an API-format workflow breaks a policy, found at once (pure).

Each finding is a :class:`~proxy.isolation.prompt.Violation` with a stable ``error_type``
(the ``*_TYPE`` constants below), so a refusal renders exactly like isolation's: ComfyUI's own
400 shape with ``node_errors`` keyed by node id, which the stock frontend highlights.

What is checked, in this order:

1. the prompt as a whole: body size, a UI-format workflow (``nodes``/``links`` arrays), node
   count (a graph over the limit is not inspected further: its size is the problem);
2. each node: an object with a ``class_type`` string and an ``inputs`` object; its type allowed;
   each link well formed and pointing at an existing node and output; every string input that
   carries a path free of ``..``, absolute paths, drive letters and NUL;
3. each *allowed* node's literal inputs: model files against the model allowlist, string
   lengths, numeric bounds;
4. the graph: no cycles.

The graph is read by :mod:`proxy.comfy.graph` (one reading for every guard): literals are
unwrapped and typed as ComfyUI types them, and a link through core ``Primitive*`` nodes is
followed, any depth, to the literal at its source, so ``PrimitiveInt(9999) -> PrimitiveInt ->
KSampler.steps`` is bounded like ``steps = 9999``. The graph's own problems (malformed nodes,
bad links, cycles, unsupported literals) are reported with the policy's findings. Any other
linked input is not a literal and is not bounded (a rule bounds only what the proxy can see).

With several roles (``RolePolicy.members``), a node passes when any role that allows its type
accepts all of its inputs; otherwise the first such role's findings are reported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from proxy.comfy.graph import (
    BAD_LINK,
    CYCLE,
    INVALID_NODE,
    Link,
    Node,
    Prompt,
    is_ui_format,
    read_graph,
    strings_in,
    ui_node_types,
)
from proxy.comfy.names import MEDIA_EXTENSIONS
from proxy.comfy.schemas import NodeSchema, NodeSchemas
from proxy.comfy.violations import Violation
from proxy.policy.bounds import COMPARISONS, Bound, Factor, Number
from proxy.policy.model import (
    MODEL_EXTENSIONS,
    MODEL_INPUT_NAMES,
    NodeRules,
    RolePolicy,
    RoleRules,
    is_model_input,
    model_folders,
)

NODE_NOT_ALLOWED = "node_not_allowed"
INPUT_OUT_OF_BOUNDS = "input_out_of_bounds"
MODEL_NOT_ALLOWED = "model_not_allowed"
STRING_TOO_LONG = "string_too_long"
PATH_NOT_ALLOWED = "path_not_allowed"
TOO_MANY_NODES = "too_many_nodes"
BODY_TOO_LARGE = "body_too_large"
UI_FORMAT_WORKFLOW = "ui_format_workflow"
VIOLATION_TYPES = (
    NODE_NOT_ALLOWED, INPUT_OUT_OF_BOUNDS, MODEL_NOT_ALLOWED, STRING_TOO_LONG, PATH_NOT_ALLOWED,
    TOO_MANY_NODES, BODY_TOO_LARGE, BAD_LINK, CYCLE, UI_FORMAT_WORKFLOW, INVALID_NODE,
)  # fmt: skip
"""Every ``error_type`` this module produces (stable: clients and metrics rely on them)."""

PATH_INPUT_NAMES = frozenset(
    {"image", "video", "audio", "file", "filename", "file_name", "filename_prefix", "path",
     "folder", "directory", "dir", "subfolder", "model_file", "mesh", "latent"}
)  # fmt: skip
"""Input names whose value is a file or folder name (besides model inputs and ``*_path`` &c.)."""
_PATH_SUFFIXES = ("_path", "_file", "_dir", "_folder", "_directory", "_filename", "_prefix")
_FILE_EXTENSIONS = tuple(dict.fromkeys((*MODEL_EXTENSIONS, *MEDIA_EXTENSIONS)))
_DRIVE = re.compile(r"[A-Za-z]:")
_SHOWN_CHARS = 120
"""Longest string echoed back in a refusal (``received_value``)."""

Inputs = Mapping[str, Any]
"""A node's inputs with links through primitive nodes resolved (``Prompt.resolved_inputs``)."""


def check_workflow(
    workflow: object,
    policy: RolePolicy,
    *,
    prompt: Prompt | None = None,
    body_size: int | None = None,
    output_counts: Mapping[str, int] | None = None,
    isolation_checks_files: bool = False,
    ui_types: Mapping[str, str] | None = None,
) -> list[Violation]:
    """Every violation of ``policy`` in an API-format ``workflow`` (the body's ``prompt``).

    ``prompt``: the workflow as :func:`proxy.comfy.graph.read_graph` read it (the guard's
    one reading, typed with the instance's schemas); read here without schemas when None.
    ``body_size``: the request body's length in bytes, when known. ``output_counts``: outputs
    per node type (from ``/object_info``), when known and ``prompt`` is None; links to a higher
    index are refused. ``isolation_checks_files``: tenant isolation runs next and judges
    ``filename_prefix`` and the file inputs (with its own, more precise error types), so their
    paths are not judged twice here. ``ui_types``: node id -> type from the UI workflow the
    frontend attaches (``extra_data.extra_pnginfo.workflow``): the frontend sends a node whose
    type is missing from its node library (e.g. hidden from this role) without a
    ``class_type``, and this names the type in the refusal.
    A workflow that is not an object is left to the graph reader (``invalid_prompt``); an
    unrestricted policy finds nothing.
    """
    if policy.unrestricted:
        return []
    found: list[Violation] = []
    if body_size is not None and body_size > policy.max_body_bytes:
        found.append(
            _global(
                BODY_TOO_LARGE,
                f"the request body is {body_size} bytes; your role's limit is "
                f"{policy.max_body_bytes} bytes",
            )
        )
    if not isinstance(workflow, dict):
        if prompt is not None:
            found.extend(prompt.problems)  # invalid_prompt
        return found
    if is_ui_format(workflow):
        found.append(
            _global(
                UI_FORMAT_WORKFLOW,
                "this is a UI-format workflow (nodes/links arrays); the API needs the API "
                "format: in ComfyUI use Workflow > Export (API), or queue it from the UI",
            )
        )
        return found
    if len(workflow) > policy.max_nodes:
        found.append(
            _global(
                TOO_MANY_NODES,
                f"the workflow has {len(workflow)} nodes; your role's limit is {policy.max_nodes}",
            )
        )
        return found
    if prompt is None:
        schemas = None
        if output_counts is not None:
            schemas = NodeSchemas({t: NodeSchema({}, n) for t, n in output_counts.items()})
        prompt = read_graph(workflow, schemas, ui_types=ui_types or {})
    walk = _Walk(prompt, policy, found, isolation_checks_files=isolation_checks_files)
    for problem in prompt.problems:
        walk.problem(problem)
    for node in prompt.nodes.values():
        walk.node(node)
    return found


def _global(error_type: str, message: str) -> Violation:
    return Violation("", "", "", error_type, message)


# -- one node ----------------------------------------------------------------------------------
#
# The walk runs for every node of every submitted workflow. It allocates (almost) no container
# per node: each one would count toward the garbage collector's next pass, and on a busy proxy
# those passes, not the checks, would be the policy's cost. Hence finding lists created only
# when there is a finding.

_NO_RULES: Mapping[str, Any] = MappingProxyType({})


class _Walk:
    """One pass over the nodes of a workflow, collecting findings."""

    def __init__(
        self,
        prompt: Prompt,
        policy: RolePolicy,
        found: list[Violation],
        *,
        isolation_checks_files: bool,
    ) -> None:
        self.prompt = prompt
        self.policy = policy
        self.found = found
        self.isolation_checks_files = isolation_checks_files

    def problem(self, problem: Violation) -> None:
        """A problem of the graph itself, reported as is; a node sent without ``class_type``
        whose UI type this role may not use is reported as not allowed."""
        if (
            problem.error_type == INVALID_NODE
            and problem.class_type
            and not self.policy.allows_node(problem.class_type)
        ):
            self.found.append(self.not_allowed(problem.node_id, problem.class_type))
            return
        self.found.append(problem)

    def node(self, node: Node) -> None:
        found = self.found
        class_type = node.class_type
        inputs = self.prompt.resolved_inputs(node)
        members = self.policy.members
        allowing: tuple[RoleRules, ...]
        if len(members) == 1:  # the common case: one role
            node_rules = members[0].node(class_type)
            if node_rules.allowed:
                findings = self.scan(node, inputs, members[0], node_rules)
                if findings:
                    found.extend(findings)
                return
            allowing = ()
        else:
            allowing = tuple(m for m in members if m.node(class_type).allowed)
        if not allowing:
            found.append(self.not_allowed(node.id, class_type))
            self.scan(node, inputs, None, None)  # paths all the same
            return
        findings = self.scan(node, inputs, allowing[0], None)
        if findings and len(allowing) > 1:
            for member in allowing[1:]:
                if not self.scan(node, inputs, member, None, structure=False):
                    return  # another of the principal's roles accepts this node as it is
        if findings:
            found.extend(findings)

    def not_allowed(self, node_id: str, class_type: str) -> Violation:
        denied = any(m.nodes_deny.matches(class_type) for m in self.policy.members)
        why = "denied by the policy" if denied else "not among the node types your role may use"
        message = f"your role may not use {class_type} nodes"
        return Violation(node_id, class_type, "", NODE_NOT_ALLOWED, message, details=why)

    def scan(
        self,
        node: Node,
        inputs: Inputs,
        rules: RoleRules | None,
        node_rules: NodeRules | None,
        *,
        structure: bool = True,
    ) -> list[Violation] | None:
        """One pass over a node's (resolved) inputs.

        ``structure``: paths, whatever the role, recorded in :attr:`found`. ``rules``: what
        that role finds wrong with the inputs (models, string lengths, bounds), returned
        (None: nothing); None for a node no role allows.
        """
        node_id, class_type = node.id, node.class_type
        findings: list[Violation] | None = None
        models: RoleRules | None = None
        bounds: Mapping[str, tuple[Bound, ...]] = _NO_RULES
        caps: Mapping[str, tuple[Bound, ...]] = _NO_RULES
        default_cap = -1
        if rules is not None:
            if node_rules is None:
                node_rules = rules.node(class_type)
            bounds = node_rules.bounds_by_input
            caps = node_rules.length_caps
            default_cap = rules.limits.max_string_length
            if not rules.allows_every_model:
                models = rules
        for name in inputs:
            value = inputs[name]
            where = (node_id, class_type, name)
            if type(value) is Link:
                if models is not None and name in MODEL_INPUT_NAMES:
                    # SECURITY: a model chosen through a link (a switch node) cannot be checked.
                    findings = _add(findings, _linked_model(where, node.inputs[name]))
            elif type(value) is str:
                if structure and _carries_path(name, value):
                    self.path(node, name, value)
                if models is not None and (
                    name in MODEL_INPUT_NAMES or is_model_input(name, value)
                ):
                    findings = _add(findings, _model_violation(where, value, models))
                findings = self.length(
                    findings, where, value, caps=caps, default_cap=default_cap, inputs=inputs
                )
            elif type(value) is list or type(value) is dict:
                # A wrapped list (or a structured object): every string in it is judged.
                for text in strings_in(value):
                    if structure and _carries_path(name, text):
                        self.path(node, name, text)
                    if models is not None and (
                        name in MODEL_INPUT_NAMES or is_model_input(name, text)
                    ):
                        findings = _add(findings, _model_violation(where, text, models))
                text = str(value)  # what a STRING input makes of it
                findings = self.length(
                    findings, where, text, caps=caps, default_cap=default_cap, inputs=inputs
                )
            if bounds:
                applicable = bounds.get(name)
                if applicable is not None:
                    for rule in applicable:
                        if _holds(rule, inputs) is False:
                            outside = _out_of_bounds(where=where, rule=rule, inputs=inputs)
                            findings = _add(findings, outside)
        return findings

    def length(
        self,
        findings: list[Violation] | None,
        where: tuple[str, str, str],
        text: str,
        *,
        caps: Mapping[str, tuple[Bound, ...]],
        default_cap: int,
        inputs: Inputs,
    ) -> list[Violation] | None:
        """String length rules (the input's own ``len(...)`` rules, else the default cap)."""
        name = where[2]
        own_caps = caps.get(name)
        if own_caps is not None:
            for rule in own_caps:
                if _holds(rule, inputs) is False:
                    findings = _add(findings, _too_long(where, text, rule.text))
        elif 0 <= default_cap < len(text):
            limit = f"len({name}) <= {default_cap}"
            findings = _add(findings, _too_long(where, text, limit, default_cap))
        return findings

    def path(self, node: Node, name: str, text: str) -> None:
        if self.isolation_checks_files and (
            name == "filename_prefix" or reads_files(self.prompt, node, name)
        ):
            return  # judged by isolation, next
        problem = path_problem(text)
        if problem is not None:
            message = f"{name} must be a relative name inside ComfyUI's folders ({problem})"
            self.found.append(
                Violation(node.id, node.class_type, name, PATH_NOT_ALLOWED, message, _shown(text))
            )


def _add(findings: list[Violation] | None, found: Violation | None) -> list[Violation] | None:
    if found is None:
        return findings
    if findings is None:
        return [found]
    findings.append(found)
    return findings


def _too_long(
    where: tuple[str, str, str],
    value: str,
    rule: str,
    limit: int | None = None,
) -> Violation:
    node_id, class_type, name = where
    allowed = rule if limit is None else str(limit)
    return Violation(
        node_id,
        class_type,
        name,
        STRING_TOO_LONG,
        f"{name} is {len(value)} characters; your role allows {allowed}",
        _shown(value),
        details=rule,
    )


def _out_of_bounds(*, where: tuple[str, str, str], rule: Bound, inputs: Inputs) -> Violation:
    node_id, class_type, name = where
    values = {n: _number(inputs[n]) for n in rule.inputs}
    shown = ", ".join(f"{n} = {values[n]!r}" for n in rule.inputs)
    return Violation(
        node_id,
        class_type,
        name,
        INPUT_OUT_OF_BOUNDS,
        f"{shown} is out of bounds for your role ({rule.text})",
        values[name] if len(rule.inputs) == 1 else [values[n] for n in rule.inputs],
        details=rule.text,
    )


def _holds(rule: Bound, inputs: Inputs) -> bool | None:
    """Whether ``rule`` holds for a node's (resolved) inputs; None when it does not apply (an
    input it names is missing, linked or not a number: a rule bounds only what the proxy can
    see). NaN and infinities never hold."""
    sides = rule.sides
    length = rule.length
    a = _side(sides[0], inputs, length)
    b = _side(sides[1], inputs, length)
    c = _side(sides[2], inputs, length) if len(sides) > 2 else 0
    if a is None or b is None or c is None:
        return None
    ops = rule.ops
    if not _compare(ops[0], a, b):
        return False
    return len(ops) == 1 or _compare(ops[1], b, c)


def _compare(op: str, left: Number, right: Number) -> bool:
    if type(left) is float and not math.isfinite(left):
        return False
    if type(right) is float and not math.isfinite(right):
        return False
    return COMPARISONS[op](left, right)


def _side(side: tuple[Factor, ...], inputs: Inputs, length: bool) -> Number | None:
    result: Number = 1
    i, n = 0, len(side)
    while i < n:  # an index loop: no iterator object per factor
        factor = side[i]
        i += 1
        if not isinstance(factor, str):
            result *= factor
            continue
        if factor not in inputs:
            return None
        value = inputs[factor]
        if length:
            if type(value) is str:
                result *= len(value)
            elif type(value) is list or type(value) is dict:
                result *= len(str(value))  # what a STRING input makes of it
            else:
                return None
            continue
        number = _number(value)
        if number is None:
            return None
        result *= number
    return result


def _number(value: object) -> Number | None:
    if type(value) is int or type(value) is float:
        return value
    return as_number(value)


def _model_violation(where: tuple[str, str, str], value: str, rules: RoleRules) -> Violation | None:
    node_id, class_type, name = where
    if rules.allows_every_model or rules.allows_model(value, model_folders(class_type, name)):
        return None
    message = f"your role may not use the model {value!r}"
    return Violation(node_id, class_type, name, MODEL_NOT_ALLOWED, message, _shown(value))


def _linked_model(where: tuple[str, str, str], raw: object) -> Violation:
    node_id, class_type, name = where
    message = f"{name} must name a model file directly (a linked model cannot be checked)"
    shown = raw.to_json() if isinstance(raw, Link) else raw
    return Violation(node_id, class_type, name, MODEL_NOT_ALLOWED, message, shown)


def reads_files(prompt: Prompt, node: Node, name: str) -> bool:
    """Whether isolation judges this input as a file name (:meth:`Prompt.reads_files`)."""
    return prompt.reads_files(node, name)


def as_number(value: object) -> Number | None:
    """A literal as ComfyUI's INT/FLOAT validation reads it (``int("60")``, ``float("0.5")``),
    so a number sent as a string is bounded too; None when it is not a number at all."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    return None


# -- paths -------------------------------------------------------------------------------------


def _names_path(name: str) -> bool:
    """An input whose name says it holds a file or folder name (remembered per name)."""
    known = _PATH_NAMES.get(name)
    if known is None:
        known = (
            name in PATH_INPUT_NAMES or name in MODEL_INPUT_NAMES or name.endswith(_PATH_SUFFIXES)
        )
        if len(_PATH_NAMES) < _PATH_NAMES_LIMIT:  # names come from clients: bounded
            _PATH_NAMES[name] = known
    return known


_PATH_NAMES: dict[str, bool] = {}
_PATH_NAMES_LIMIT = 4096


def _carries_path(name: str, value: str) -> bool:
    """Whether a string input names a file or folder (so ``..`` in it is a path, not prose)."""
    if _names_path(name):
        return True
    stem = value.rsplit(" [", 1)[0] if value.endswith("]") else value
    return stem.lower().endswith(_FILE_EXTENSIONS)


def path_problem(value: str) -> str | None:
    """Why a file name may not be used (``..``, absolute, drive letter, NUL), or None.

    A relative name with subfolders (``sdxl/model.safetensors``, ``sdxl\\model.safetensors``
    from a Windows server) is fine.
    """
    if "\x00" in value:
        return "it contains a NUL character"
    path = value.replace("\\", "/")
    if path.startswith("/"):
        return "absolute paths are not allowed"
    if _DRIVE.match(path):
        return "drive letters are not allowed"
    if ".." in path.split("/"):
        return "'..' is not allowed"
    return None


def _shown(value: object) -> object:
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return value[:_SHOWN_CHARS] + "..."
    return value


__all__ = [
    "BAD_LINK",
    "CYCLE",
    "INVALID_NODE",
    "VIOLATION_TYPES",
    "as_number",
    "check_workflow",
    "is_ui_format",
    "path_problem",
    "ui_node_types",
]
