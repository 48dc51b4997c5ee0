"""The canonical prompt graph: one reading of an API-format workflow, as ComfyUI will run it.

:func:`read_graph` turns the parsed ``prompt`` object into a :class:`Prompt`; every consumer
(the workflow policy, isolation, placement, the queue quota) decides on that object, and the
proxy forwards :meth:`Prompt.to_json`, never the client's bytes. It follows ComfyUI 0.3.64's
``execution.validate_inputs`` and ``get_input_data`` (and ``comfy_execution.graph_utils``):

- **Links.** Every list is a link (``[node_id, output_index]``); a link to a missing node, a
  non-string id, a non-integer or negative index (or one past the node type's outputs) is a
  ``bad_link``; dependency cycles are ``cycle``.
- **Literal wrappers.** ``{"__value__": v}`` is unwrapped once, as validation does (the
  frontend wraps list values so they are not read as links). ``v`` may be a scalar or a list
  of scalars/lists; a wrapper holding an object, a wrapper with other keys, and any other
  object literal are refused (``unsupported_literal``): ComfyUI would hand such an object to
  the node unread. The exceptions: an input whose declared type takes an object (``LOAD_3D``:
  see :mod:`proxy.comfy.schemas`), and a prompt nobody judges (an admin's), whose objects
  are kept verbatim for ComfyUI (node packs with object-valued widgets).
- **Types.** With the instance's schemas (``/object_info``), a literal of a declared
  ``INT``/``FLOAT``/``STRING``/``BOOLEAN`` input becomes ``int(v)``/``float(v)``/``str(v)``/
  ``bool(v)``, as validation converts it before the node runs (``"60"`` is 60, ``"false"`` is
  True); a result outside 64 bits or not finite is refused (``input_not_finite``). A value
  that does not convert is kept: ComfyUI refuses it. Literals for hidden inputs (``PROMPT``,
  ``UNIQUE_ID``...) are refused (``hidden_input``): ComfyUI fills them.
- **Primitive nodes.** :meth:`Prompt.resolve` follows a link through any chain of core
  ``Primitive*`` nodes (output 0 is their ``value`` input) to the literal that will run, so a
  bound or a file check applies to the value ``PrimitiveInt -> PrimitiveInt(9999) -> steps``
  actually carries. A chain that loops is a ``cycle``.
- **Malformed nodes** (not an object, ``class_type`` missing/not a non-empty string,
  ``inputs`` not an object) are ``invalid_node``; a ``prompt`` that is not an object is
  ``invalid_prompt``. All of these render in ComfyUI's own 400 shape, never as a 500.

Nothing here does I/O; problems are collected (:attr:`Prompt.problems`), not raised, so the
policy can report them with its own findings at once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.comfy.json_body import INT_MAX, INT_MIN
from proxy.comfy.schemas import SCALAR_TYPES, InputSpec, NodeSchemas
from proxy.comfy.violations import Violation

INVALID_PROMPT = "invalid_prompt"
INVALID_NODE = "invalid_node"
BAD_LINK = "bad_link"
CYCLE = "cycle"
UNSUPPORTED_LITERAL = "unsupported_literal"
INPUT_NOT_FINITE = "input_not_finite"
HIDDEN_INPUT = "hidden_input"
UNKNOWN_NODE = "missing_node_type"
"""ComfyUI's own type (newer servers) for a class the instance does not have."""
GRAPH_PROBLEM_TYPES = (
    INVALID_PROMPT, INVALID_NODE, BAD_LINK, CYCLE, UNSUPPORTED_LITERAL, INPUT_NOT_FINITE,
    HIDDEN_INPUT, UNKNOWN_NODE,
)  # fmt: skip
"""Every ``error_type`` this module produces (stable: clients and metrics rely on them)."""

WRAPPER = "__value__"
PRIMITIVE_TYPES: Mapping[str, str] = {
    "PrimitiveInt": "INT",
    "PrimitiveFloat": "FLOAT",
    "PrimitiveString": "STRING",
    "PrimitiveStringMultiline": "STRING",
    "PrimitiveBoolean": "BOOLEAN",
}
"""Core nodes (``comfy_extras/nodes_primitive.py``) whose only output is their ``value``
input, converted to this type."""
PRIMITIVE_NODES = frozenset(PRIMITIVE_TYPES)
UPLOAD_READERS = frozenset(
    {("LoadImage", "image"), ("LoadImageMask", "image"), ("LoadImageOutput", "image")}
)
"""Core inputs that read a file by name, known without ``/object_info``."""
FILE_INPUT_NAMES = frozenset({"image", "video", "audio", "file", "model_file", "latent"})
"""Input names that read a file when the schemas do not declare the input (any string value,
whatever its extension)."""
_SHOWN_CHARS = 120
_MAX_LITERAL_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Link:
    """A linked input: output ``output`` of node ``source`` (ids are JSON object keys)."""

    source: str
    output: int

    def to_json(self) -> list[object]:
        return [self.source, self.output]


Literal = str | int | float | bool | list[Any] | dict[str, Any] | None
"""A literal input value after unwrapping: a JSON scalar, a list (it arrived wrapped), or an
object (only for inputs of a structured type)."""
Value = Literal | Link


@dataclass(slots=True)
class Node:
    """One node: its type, its inputs (literals typed, links as :class:`Link`), and the other
    keys of its object (``_meta``...), forwarded as read."""

    id: str
    class_type: str
    inputs: dict[str, Value]
    extra: dict[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = ("inputs", "class_type")
    """The keys in the order received (ComfyUI embeds the prompt in saved files as sent)."""

    def to_json(self) -> dict[str, Any]:
        inputs = {name: _input_json(value) for name, value in self.inputs.items()}
        own = {"inputs": inputs, "class_type": self.class_type}
        out = {key: own[key] if key in own else self.extra[key] for key in self.order}
        for key, value in (*own.items(), *self.extra.items()):
            out.setdefault(key, value)
        return out


def _input_json(value: Value) -> object:
    if isinstance(value, Link):
        return value.to_json()
    if isinstance(value, list):
        return {WRAPPER: value}  # a bare list would be read as a link
    return value


@dataclass(slots=True)
class Prompt:
    """A workflow as the proxy read it (module doc)."""

    nodes: dict[str, Node]
    """Well-formed nodes by id, in the order received."""
    problems: list[Violation]
    """Everything malformed, in ComfyUI's terms; a prompt with problems is never forwarded."""
    schemas: NodeSchemas | None = None
    """The node types it was typed with; None when read without ``/object_info``."""
    unknown: tuple[str, ...] = ()
    """Ids of nodes whose type ``schemas`` does not list (ComfyUI refuses them)."""

    def spec(self, node: Node, name: str) -> InputSpec | None:
        """The declared spec of an input; None when unknown (no schemas, or not declared)."""
        if self.schemas is None:
            return None
        schema = self.schemas.get(node.class_type)
        return schema.inputs.get(name) if schema is not None else None

    def reads_files(self, node: Node, name: str) -> bool:
        """Whether a string in this input names a file the node reads: as the instance's
        schemas declare it (:mod:`proxy.comfy.schemas`); for an input they do not declare
        (or read without schemas), by its name alone: never by the value's extension."""
        spec = self.spec(node, name)
        if spec is not None:
            return spec.reads_files
        return (node.class_type, name) in UPLOAD_READERS or name in FILE_INPUT_NAMES

    def resolve(self, value: Value) -> Value:
        """The value an input carries: a literal, or a link followed through core primitive
        nodes to the literal at the chain's source; a link to any other node (or a chain
        that loops) is returned as the :class:`Link` it is."""
        seen: set[str] | None = None
        while isinstance(value, Link):
            node = self.nodes.get(value.source)
            if node is None or node.class_type not in PRIMITIVE_NODES or value.output != 0:
                return value
            if seen is None:
                seen = set()
            elif value.source in seen:
                return value
            seen.add(value.source)
            source = node.inputs.get("value")
            if source is None:
                return value
            if not isinstance(source, Link):
                return _convert(source, PRIMITIVE_TYPES[node.class_type])
            value = source
        return value

    def resolved_inputs(self, node: Node) -> dict[str, Value]:
        """``node.inputs`` with every link through primitive nodes resolved."""
        inputs = node.inputs
        if not any(isinstance(v, Link) for v in inputs.values()):
            return inputs
        return {name: self.resolve(v) for name, v in inputs.items()}

    def class_types(self) -> Iterator[tuple[str, str]]:
        """``(node_id, class_type)`` of every well-formed node."""
        for node in self.nodes.values():
            yield node.id, node.class_type

    def to_json(self) -> dict[str, Any]:
        """The prompt as forwarded to ComfyUI."""
        return {node_id: node.to_json() for node_id, node in self.nodes.items()}


def _convert(value: Literal, kind: str) -> Literal:
    """``int(v)``/``float(v)``/``str(v)``/``bool(v)`` as validation converts a literal; the
    value unchanged when it does not convert (ComfyUI refuses it)."""
    try:
        if kind == "INT":
            return int(value)  # type: ignore[arg-type]
        if kind == "FLOAT":
            return float(value)  # type: ignore[arg-type]
        if kind == "STRING":
            return str(value)
        if kind == "BOOLEAN":
            return bool(value)
    except (TypeError, ValueError, OverflowError):
        return value
    return value


# -- reading ------------------------------------------------------------------------------------


def read_graph(
    prompt: object,
    schemas: NodeSchemas | None = None,
    *,
    ui_types: Mapping[str, str] = {},
    judged: bool = True,
) -> Prompt:
    """The canonical :class:`Prompt` of a parsed ``prompt`` object (module doc).

    ``schemas``: the instance's node types, to type literals and find file inputs; None reads
    the graph without (structure and wrappers only). ``ui_types``: node id -> type from the
    UI workflow the frontend attaches, used to name a node sent without ``class_type``.
    ``judged``: the prompt is judged (policy, isolation), so what cannot be judged is refused
    (object literals, hidden inputs); False (an admin's) keeps those verbatim for ComfyUI to
    read, as node packs with object-valued widgets need.
    """
    if not isinstance(prompt, dict):
        message = "the prompt must be an object of nodes (the API format)"
        return Prompt({}, [Violation("", "", "", INVALID_PROMPT, message)], schemas)
    reader = _Reader(prompt, schemas, ui_types, judged=judged)
    for node_id, node in prompt.items():
        reader.node(node_id, node)
    reader.check_cycles()
    return Prompt(reader.nodes, reader.problems, schemas, tuple(reader.unknown))


class _Reader:
    def __init__(
        self,
        graph: dict[str, Any],
        schemas: NodeSchemas | None,
        ui_types: Mapping[str, str],
        *,
        judged: bool,
    ) -> None:
        self.graph = graph
        self.judged = judged
        self.schemas = schemas
        self.ui_types = ui_types
        self.nodes: dict[str, Node] = {}
        self.problems: list[Violation] = []
        self.unknown: list[str] = []

    def problem(
        self, where: tuple[str, str, str], error_type: str, message: str, shown: object = None
    ) -> None:
        node_id, class_type, name = where
        self.problems.append(
            Violation(node_id, class_type, name, error_type, message, _shown(shown))
        )

    def node(self, node_id: str, raw: object) -> None:
        if not isinstance(raw, dict):
            self.problem((node_id, "", ""), INVALID_NODE, "a node must be an object")
            return
        class_type = raw.get("class_type")
        if type(class_type) is not str or not class_type:
            ui_type = self.ui_types.get(node_id)
            if isinstance(ui_type, str) and ui_type:
                message = f"the node has no class_type: is {ui_type} installed on the server?"
                self.problem((node_id, ui_type, ""), INVALID_NODE, message)
            elif "class_type" not in raw:
                self.problem(
                    (node_id, "", ""), INVALID_NODE, "the node has no class_type (node type)"
                )
            else:
                message = "the node's class_type must be the name of a node type"
                self.problem((node_id, "", ""), INVALID_NODE, message, class_type)
            return
        raw_inputs = raw.get("inputs", {})
        if not isinstance(raw_inputs, dict):
            self.problem((node_id, class_type, ""), INVALID_NODE, "inputs must be an object")
            return
        schema = None
        if self.schemas is not None:
            schema = self.schemas.get(class_type)
            if schema is None:
                self.unknown.append(node_id)
        inputs: dict[str, Value] = {}
        for name, value in raw_inputs.items():
            spec = schema.inputs.get(name) if schema is not None else None
            read = self.input(node_id, class_type, name, value, spec)
            if read is not _REFUSED:
                inputs[name] = read  # type: ignore[assignment]
        extra = {k: v for k, v in raw.items() if k not in ("class_type", "inputs")}
        self.nodes[node_id] = Node(node_id, class_type, inputs, extra, tuple(raw))

    def input(
        self, node_id: str, class_type: str, name: str, value: object, spec: InputSpec | None
    ) -> object:
        where = (node_id, class_type, name)
        if isinstance(value, list):
            return self.link(where, value)
        if not self.judged and (
            (spec is not None and spec.category == "hidden")
            or (isinstance(value, dict) and not (len(value) == 1 and _plain(value.get(WRAPPER), 0)))
        ):
            return value  # not judged: ComfyUI reads it (unwraps once), as it would unproxied
        if spec is not None and spec.category == "hidden":
            message = f"{name} is filled in by ComfyUI; a prompt may not set it"
            self.problem(where, HIDDEN_INPUT, message, value)
            return _REFUSED
        if isinstance(value, dict):
            if WRAPPER in value:
                if len(value) != 1:
                    message = f"{name}: a {{'__value__': ...}} wrapper may hold no other key"
                    self.problem(where, UNSUPPORTED_LITERAL, message, sorted(value)[:5])
                    return _REFUSED
                value = value[WRAPPER]
                if not _plain(value, 0):
                    message = f"{name}: a {{'__value__': ...}} wrapper must hold a value or a list"
                    self.problem(where, UNSUPPORTED_LITERAL, message)
                    return _REFUSED
            elif spec is None or not spec.structured or not _plain_object(value, 0):
                # SECURITY: ComfyUI hands an object literal to the node unread; nothing the
                # proxy checks (paths, bounds, models) could be trusted inside it.
                message = f"{name} may not be an object here (only a value, a list or a link)"
                self.problem(where, UNSUPPORTED_LITERAL, message)
                return _REFUSED
        if spec is None or spec.type not in SCALAR_TYPES:
            return value
        converted = _convert(value, spec.type)  # type: ignore[arg-type]
        if (type(converted) is int and not INT_MIN <= converted <= INT_MAX) or (
            type(converted) is float and not math.isfinite(converted)
        ):
            message = f"{name} is not a finite number ComfyUI can hold"
            self.problem(where, INPUT_NOT_FINITE, message, value)
            return _REFUSED
        return converted

    def link(self, where: tuple[str, str, str], value: list[Any]) -> object:
        if len(value) != 2:
            self.bad_link(where, value, "must be [node_id, index]")
            return _REFUSED
        source, index = value
        if type(source) is not str or source not in self.graph:
            self.bad_link(where, value, f"links to node {source!r}, which is not in the workflow")
            return _REFUSED
        if type(index) is not int or index < 0:
            self.bad_link(where, value, "links to an output index that is not an integer >= 0")
            return _REFUSED
        if self.schemas is not None:
            source_node = self.graph[source]
            source_type = source_node.get("class_type") if isinstance(source_node, dict) else None
            schema = self.schemas.get(source_type) if type(source_type) is str else None
            count = schema.outputs if schema is not None else None
            if count is not None and index >= count:
                message = f"links to output {index} of {source} ({source_type}), which has {count}"
                self.bad_link(where, value, message)
                return _REFUSED
        return Link(source, index)

    def bad_link(self, where: tuple[str, str, str], value: list[Any], message: str) -> None:
        self.problem(where, BAD_LINK, f"{where[2]} {message}", value)

    # -- cycles ----------------------------------------------------------------------------------

    def check_cycles(self) -> None:
        """Kahn's algorithm: peel off nodes nothing (remaining) reads from; a node on a cycle
        cannot be peeled. Only then is the (rare) cycle walked to be named."""
        edges = {
            n.id: [v.source for v in n.inputs.values() if isinstance(v, Link)]
            for n in self.nodes.values()
        }
        readers = Counter(t for targets in edges.values() for t in targets)
        ready = [n for n in edges if n not in readers]
        peeled = 0
        while ready:
            node = ready.pop()
            peeled += 1
            for target in edges[node]:
                readers[target] -= 1
                if readers[target] == 0 and target in edges:
                    ready.append(target)
        if peeled < len(edges):
            self.report_cycles(edges)

    def report_cycles(self, edges: Mapping[str, list[str]]) -> None:
        """Every node on a dependency cycle gets a ``cycle`` problem (iterative DFS)."""
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
            self.problems.append(
                Violation(
                    node_id,
                    self.nodes[node_id].class_type,
                    "",
                    CYCLE,
                    f"the workflow has a dependency cycle ({text})",
                    details=text,
                )
            )


_REFUSED = object()
"""An input the reader refused (recorded as a problem): left out of the node."""


def _plain(value: object, depth: int) -> bool:
    """A scalar, or a list of scalars and such lists (what a ``__value__`` wrapper carries)."""
    if isinstance(value, list):
        return depth < _MAX_LITERAL_DEPTH and all(_plain(v, depth + 1) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _plain_object(value: object, depth: int) -> bool:
    """JSON without wrappers: an object literal of a structured input (``LOAD_3D``)."""
    if isinstance(value, dict):
        return (
            depth < _MAX_LITERAL_DEPTH
            and WRAPPER not in value
            and all(_plain_object(v, depth + 1) for v in value.values())
        )
    if isinstance(value, list):
        return depth < _MAX_LITERAL_DEPTH and all(_plain_object(v, depth + 1) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def strings_in(value: object) -> Iterator[str]:
    """Every string inside a literal (itself, or nested in lists and objects)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)


def _shown(value: object) -> object:
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return value[:_SHOWN_CHARS] + "..."
    return value


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


__all__ = [
    "BAD_LINK",
    "CYCLE",
    "FILE_INPUT_NAMES",
    "GRAPH_PROBLEM_TYPES",
    "HIDDEN_INPUT",
    "INPUT_NOT_FINITE",
    "INVALID_NODE",
    "INVALID_PROMPT",
    "PRIMITIVE_NODES",
    "PRIMITIVE_TYPES",
    "UNKNOWN_NODE",
    "UNSUPPORTED_LITERAL",
    "UPLOAD_READERS",
    "Link",
    "Literal",
    "Node",
    "Prompt",
    "Value",
    "is_ui_format",
    "read_graph",
    "strings_in",
    "ui_node_types",
]
