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

A linked input (``["node_id", index]``) is not a literal and is not bounded, with one exception:
a link from a core ``Primitive*`` node is followed to that node's literal ``value``, so
``PrimitiveInt(value=9999) -> KSampler.steps`` is bounded like ``steps = 9999``.

With several roles (``RolePolicy.members``), a node passes when any role that allows its type
accepts all of its inputs; otherwise the first such role's findings are reported.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from proxy.isolation.prompt import MEDIA_EXTENSIONS, Violation, reads_file
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
BAD_LINK = "bad_link"
CYCLE = "cycle"
UI_FORMAT_WORKFLOW = "ui_format_workflow"
INVALID_NODE = "invalid_node"
VIOLATION_TYPES = (
    NODE_NOT_ALLOWED, INPUT_OUT_OF_BOUNDS, MODEL_NOT_ALLOWED, STRING_TOO_LONG, PATH_NOT_ALLOWED,
    TOO_MANY_NODES, BODY_TOO_LARGE, BAD_LINK, CYCLE, UI_FORMAT_WORKFLOW, INVALID_NODE,
)  # fmt: skip
"""Every ``error_type`` this module produces (stable: clients and metrics rely on them)."""

PRIMITIVE_NODES = frozenset(
    {"PrimitiveInt", "PrimitiveFloat", "PrimitiveBoolean", "PrimitiveString",
     "PrimitiveStringMultiline"}
)  # fmt: skip
"""Core nodes whose only output is their literal ``value`` input."""
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

Graph = Mapping[str, Any]
Primitives = Mapping[str, object]
"""Node id -> literal value of the graph's core primitive nodes (:func:`primitive_values`)."""


def check_workflow(
    workflow: object,
    policy: RolePolicy,
    *,
    body_size: int | None = None,
    output_counts: Mapping[str, int] | None = None,
    isolation_checks_files: bool = False,
    ui_types: Mapping[str, str] | None = None,
) -> list[Violation]:
    """Every violation of ``policy`` in an API-format ``workflow`` (the body's ``prompt``).

    ``body_size``: the request body's length in bytes, when known. ``output_counts``: outputs
    per node type (from ``/object_info``), when known; links to a higher index are refused.
    ``isolation_checks_files``: tenant isolation runs next and judges ``filename_prefix`` and
    the file inputs it recognises (with its own, more precise error types), so their paths
    are not judged twice here. ``ui_types``: node id -> type from the UI workflow the frontend
    attaches (``extra_data.extra_pnginfo.workflow``): the frontend sends a node whose type is
    missing from its node library (e.g. hidden from this role) without a ``class_type``, and
    this names the type in the refusal.
    A workflow that is not an object is left to ComfyUI (it refuses it); an unrestricted
    policy finds nothing.
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
    walk = _Walk(
        workflow,
        policy,
        output_counts,
        found,
        isolation_checks_files=isolation_checks_files,
        ui_types=ui_types or {},
    )
    for node_id in workflow:  # JSON keys are strings
        walk.node(node_id if type(node_id) is str else str(node_id), workflow[node_id])
    if walk.has_cycle():
        _report_cycles(workflow, walk.adjacency(), found)
    return found


def is_ui_format(value: Mapping[str, Any]) -> bool:
    """The frontend's own (LiteGraph) format: ``nodes`` and ``links`` arrays."""
    return isinstance(value.get("nodes"), list) and isinstance(value.get("links"), list)


def ui_node_types(body: Mapping[str, Any]) -> dict[str, str]:
    """Node id -> type from the UI workflow the stock frontend attaches to a prompt
    (``extra_data.extra_pnginfo.workflow.nodes``); ``{}`` when there is none."""
    extra = body.get("extra_data")
    info = extra.get("extra_pnginfo") if isinstance(extra, dict) else None
    workflow = info.get("workflow") if isinstance(info, dict) else None
    nodes = workflow.get("nodes") if isinstance(workflow, dict) else None
    if not isinstance(nodes, list):
        return {}
    return {
        str(n["id"]): n["type"]
        for n in nodes
        if isinstance(n, dict) and isinstance(n.get("type"), str) and "id" in n
    }


def _global(error_type: str, message: str) -> Violation:
    return Violation("", "", "", error_type, message)


# -- one node ----------------------------------------------------------------------------------
#
# The walk runs for every node of every submitted workflow, right after the body was parsed
# into thousands of fresh objects. It allocates (almost) no container per node: each one would
# count toward the garbage collector's next pass, and on a busy proxy those passes, not the
# checks, would be the policy's cost. Hence flat edge lists, index loops and finding lists
# created only when there is a finding.

_NO_INPUTS: Mapping[str, Any] = MappingProxyType({})
_NO_RULES: Mapping[str, Any] = MappingProxyType({})


class _Walk:
    """One pass over the nodes of a workflow, collecting findings and the link graph."""

    def __init__(
        self,
        graph: Graph,
        policy: RolePolicy,
        output_counts: Mapping[str, int] | None,
        found: list[Violation],
        *,
        isolation_checks_files: bool,
        ui_types: Mapping[str, str],
    ) -> None:
        self.graph = graph
        self.policy = policy
        self.output_counts = output_counts
        self.found = found
        self.isolation_checks_files = isolation_checks_files
        self.ui_types = ui_types
        self.primitives = primitive_values(graph)
        self.edge_to: list[str] = []
        """The nodes valid links read from, grouped by the linking node."""
        self.starts: dict[str, int] = {}
        self.ends: dict[str, int] = {}
        """``edge_to[starts[n]:ends[n]]``: the nodes node ``n`` reads from."""

    def node(self, node_id: str, node: object) -> None:
        found = self.found
        if type(node) is not dict:
            found.append(Violation(node_id, "", "", INVALID_NODE, "a node must be an object"))
            return
        class_type = node.get("class_type")
        if type(class_type) is not str or not class_type:
            found.append(self.untyped(node_id))
            return
        inputs = node.get("inputs")
        if inputs is None:
            inputs = _NO_INPUTS
        elif type(inputs) is not dict:
            message = "inputs must be an object"
            found.append(Violation(node_id, class_type, "", INVALID_NODE, message))
            return
        members = self.policy.members
        allowing: tuple[RoleRules, ...]
        if len(members) == 1:  # the common case: one role
            node_rules = members[0].node(class_type)
            if node_rules.allowed:
                findings = self.scan(node_id, class_type, inputs, members[0], node_rules)
                if findings:
                    found.extend(findings)
                return
            allowing = ()
        else:
            allowing = tuple(m for m in members if m.node(class_type).allowed)
        if not allowing:
            found.append(self.not_allowed(node_id, class_type))
            self.scan(node_id, class_type, inputs, None, None)  # links and paths all the same
            return
        findings = self.scan(node_id, class_type, inputs, allowing[0], None)
        if findings and len(allowing) > 1:
            for member in allowing[1:]:
                if not self.scan(node_id, class_type, inputs, member, None, structure=False):
                    return  # another of the principal's roles accepts this node as it is
        if findings:
            found.extend(findings)

    def not_allowed(self, node_id: str, class_type: str) -> Violation:
        denied = any(m.nodes_deny.matches(class_type) for m in self.policy.members)
        why = "denied by the policy" if denied else "not among the node types your role may use"
        message = f"your role may not use {class_type} nodes"
        return Violation(node_id, class_type, "", NODE_NOT_ALLOWED, message, details=why)

    def untyped(self, node_id: str) -> Violation:
        """A node without ``class_type``: refused; named after its UI type when known."""
        ui_type = self.ui_types.get(node_id)
        if not isinstance(ui_type, str) or not ui_type:
            message = "the node has no class_type (node type)"
            return Violation(node_id, "", "", INVALID_NODE, message)
        if not self.policy.allows_node(ui_type):
            return self.not_allowed(node_id, ui_type)
        message = f"the node has no class_type: is {ui_type} installed on the server?"
        return Violation(node_id, ui_type, "", INVALID_NODE, message)

    def scan(
        self,
        node_id: str,
        class_type: str,
        inputs: Mapping[str, Any],
        rules: RoleRules | None,
        node_rules: NodeRules | None,
        *,
        structure: bool = True,
    ) -> list[Violation] | None:
        """One pass over a node's inputs.

        ``structure``: links and paths, whatever the role, recorded in :attr:`found` (and the
        node's edges). ``rules``: what that role finds wrong with the inputs (models, string
        lengths, bounds), returned (None: nothing); None for a node no role allows.
        """
        primitives = self.primitives
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
        edge_to = self.edge_to
        first_edge = len(edge_to)
        for name in inputs:
            value = inputs[name]
            if type(value) is list:
                if structure:
                    source = self.link(node_id, class_type, name, value)
                    if source is None:
                        continue
                    edge_to.append(source)
                if models is not None or (structure and _names_path(name)):
                    resolved = _resolve(value, primitives)  # a primitive's literal is seen
                    if structure and type(resolved) is str and _names_path(name):
                        self.path(node_id, class_type, name, resolved)
                    if models is not None and (
                        name in MODEL_INPUT_NAMES or is_model_input(name, resolved)
                    ):
                        findings = _add(
                            findings,
                            _model_violation((node_id, class_type, name), resolved, value, models),
                        )
            elif type(value) is str:
                if structure and _carries_path(name, value):
                    self.path(node_id, class_type, name, value)
                if models is not None and (
                    name in MODEL_INPUT_NAMES or is_model_input(name, value)
                ):
                    findings = _add(
                        findings,
                        _model_violation((node_id, class_type, name), value, value, models),
                    )
                own_caps = caps.get(name)
                if own_caps is not None:
                    for rule in own_caps:
                        if _holds(rule, inputs, primitives) is False:
                            too_long = _too_long((node_id, class_type, name), value, rule.text)
                            findings = _add(findings, too_long)
                elif 0 <= default_cap < len(value):
                    limit = f"len({name}) <= {default_cap}"
                    too_long = _too_long((node_id, class_type, name), value, limit, default_cap)
                    findings = _add(findings, too_long)
            if bounds:
                applicable = bounds.get(name)
                if applicable is not None:
                    for rule in applicable:
                        if _holds(rule, inputs, primitives) is False:
                            outside = _out_of_bounds(
                                where=(node_id, class_type, name),
                                rule=rule,
                                inputs=inputs,
                                primitives=primitives,
                            )
                            findings = _add(findings, outside)
        if structure and len(edge_to) > first_edge:
            self.starts[node_id] = first_edge
            self.ends[node_id] = len(edge_to)
        return findings

    def path(self, node_id: str, class_type: str, name: str, text: str) -> None:
        if self.isolation_checks_files and (
            name == "filename_prefix" or reads_file(class_type, name, text)
        ):
            return  # judged by isolation, next
        problem = path_problem(text)
        if problem is not None:
            message = f"{name} must be a relative name inside ComfyUI's folders ({problem})"
            self.found.append(
                Violation(node_id, class_type, name, PATH_NOT_ALLOWED, message, _shown(text))
            )

    def link(self, node_id: str, class_type: str, name: str, value: list[Any]) -> str | None:
        """The linked node's id when the link is valid; otherwise records a ``bad_link``."""
        if len(value) != 2:
            self.bad_link(node_id, class_type, name, value, "must be [node_id, index]")
            return None
        source = value[0]
        if type(source) is not str or source not in self.graph:
            message = f"links to node {source!r}, which is not in the workflow"
            self.bad_link(node_id, class_type, name, value, message)
            return None
        index = value[1]
        if type(index) is not int or index < 0:
            message = "links to an output index that is not an integer >= 0"
            self.bad_link(node_id, class_type, name, value, message)
            return None
        if self.output_counts is not None:
            source_node = self.graph[source]
            source_type = source_node.get("class_type") if type(source_node) is dict else None
            count = self.output_counts.get(source_type) if type(source_type) is str else None
            if count is not None and index >= count:
                message = f"links to output {index} of {source} ({source_type}), which has {count}"
                self.bad_link(node_id, class_type, name, value, message)
                return None
        return source

    def bad_link(
        self, node_id: str, class_type: str, name: str, value: list[Any], message: str
    ) -> None:
        self.found.append(
            Violation(node_id, class_type, name, BAD_LINK, f"{name} {message}", _shown(value))
        )

    # -- cycles ------------------------------------------------------------------------------

    def has_cycle(self) -> bool:
        """Kahn's algorithm over the flat edge lists: peel off nodes no (remaining) node reads
        from; a cycle is what cannot be peeled. Allocation-light: ints in dicts."""
        edge_to, starts, ends = self.edge_to, self.starts, self.ends
        readers = Counter(edge_to)
        ready = [n for n in starts if n not in readers]
        peeled = 0
        while ready:
            node = ready.pop()
            peeled += 1
            for k in range(starts[node], ends[node]):
                target = edge_to[k]
                left = readers[target] - 1
                readers[target] = left
                if left == 0 and target in starts:
                    ready.append(target)
        return peeled < len(starts)

    def adjacency(self) -> dict[str, list[str]]:
        """Node -> the nodes it reads from (built only when there is a cycle to report)."""
        return {n: self.edge_to[self.starts[n] : self.ends[n]] for n in self.starts}


def _add(findings: list[Violation] | None, found: Violation | None) -> list[Violation] | None:
    if found is None:
        return findings
    if findings is None:
        return [found]
    findings.append(found)
    return findings


def _too_long(
    where: tuple[str, str, str], value: str, rule: str, limit: int | None = None
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


def _out_of_bounds(
    *, where: tuple[str, str, str], rule: Bound, inputs: Mapping[str, Any], primitives: Primitives
) -> Violation:
    node_id, class_type, name = where
    values = {n: _number(inputs[n], primitives) for n in rule.inputs}
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


def _holds(rule: Bound, inputs: Mapping[str, Any], primitives: Primitives) -> bool | None:
    """Whether ``rule`` holds for a node's inputs; None when it does not apply (an input it
    names is missing, linked or not a number: a rule bounds only what the proxy can see).
    NaN and infinities never hold."""
    sides = rule.sides
    length = rule.length
    a = _side(sides[0], inputs, primitives, length)
    b = _side(sides[1], inputs, primitives, length)
    c = _side(sides[2], inputs, primitives, length) if len(sides) > 2 else 0
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


def _side(
    side: tuple[Factor, ...], inputs: Mapping[str, Any], primitives: Primitives, length: bool
) -> Number | None:
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
            if type(value) is not str:
                return None
            result *= len(value)
            continue
        number = _number(value, primitives)
        if number is None:
            return None
        result *= number
    return result


def _number(value: object, primitives: Primitives) -> Number | None:
    if type(value) is int or type(value) is float:
        return value
    return as_number(_resolve(value, primitives))


def _model_violation(
    where: tuple[str, str, str], value: object, raw: object, rules: RoleRules
) -> Violation | None:
    node_id, class_type, name = where
    problem = _model_problem(class_type, name, value, isinstance(raw, list), rules)
    if problem is None:
        return None
    return Violation(node_id, class_type, name, MODEL_NOT_ALLOWED, problem, _shown(raw))


def _model_problem(
    class_type: str, name: str, value: object, linked: bool, rules: RoleRules
) -> str | None:
    if rules.allows_every_model:
        return None
    if not isinstance(value, str):
        if linked:
            # SECURITY: a model chosen through a link (a switch node) cannot be checked here.
            return f"{name} must name a model file directly (a linked model cannot be checked)"
        return None  # not a name at all: ComfyUI refuses it
    if rules.allows_model(value, model_folders(class_type, name)):
        return None
    return f"your role may not use the model {value!r}"


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


def primitive_values(graph: Graph) -> dict[str, object]:
    """Node id -> literal ``value`` of the graph's core primitive nodes (usually none)."""
    out: dict[str, object] = {}
    for node_id, node in graph.items():
        if isinstance(node, dict) and node.get("class_type") in PRIMITIVE_NODES:
            inputs = node.get("inputs")
            literal = inputs.get("value") if isinstance(inputs, dict) else None
            if literal is not None and not isinstance(literal, list):
                out[str(node_id)] = literal
    return out


def _resolve(value: object, primitives: Primitives) -> object:
    """A literal, or the literal ``value`` of a core primitive node a link points at."""
    if not primitives or type(value) is not list or len(value) != 2 or value[1] != 0:
        return value
    literal = primitives.get(value[0]) if isinstance(value[0], str) else None
    return value if literal is None else literal


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


# -- the graph ---------------------------------------------------------------------------------


def _report_cycles(graph: Graph, edges: Mapping[str, list[str]], found: list[Violation]) -> None:
    """Every node on a dependency cycle gets a ``cycle`` violation (iterative DFS; run only
    when :meth:`_Walk.has_cycle` found one)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    on_cycle: dict[str, str] = {}
    for start in edges:
        if start in state:
            continue
        state[start] = 1
        path = [start]
        stack = [iter(edges[start])]
        while stack:
            for target in stack[-1]:
                mark = state.get(target)
                if mark is None:
                    state[target] = 1
                    path.append(target)
                    stack.append(iter(edges.get(target, ())))
                    break
                if mark == 1:
                    cycle = path[path.index(target) :]
                    text = " -> ".join([*cycle, target])
                    for member in cycle:
                        on_cycle.setdefault(member, text)
            else:
                state[path.pop()] = 2
                stack.pop()
    for node_id, text in on_cycle.items():
        entry = graph.get(node_id)
        class_type = entry.get("class_type") if isinstance(entry, dict) else ""
        found.append(
            Violation(
                node_id,
                class_type if isinstance(class_type, str) else "",
                "",
                CYCLE,
                f"the workflow has a dependency cycle ({text})",
                details=text,
            )
        )


__all__ = [
    "VIOLATION_TYPES",
    "as_number",
    "check_workflow",
    "is_ui_format",
    "path_problem",
    "ui_node_types",
]
