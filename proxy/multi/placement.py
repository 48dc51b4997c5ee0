"""Which instance runs a new prompt: pure functions over the registry's state, no I/O.

1. **Able**: every ``class_type`` of the workflow is a node type the instance has, and every
   model file a loader input names is in that instance's list for that input. An instance
   whose capabilities are not known yet (just joined, ``/object_info`` unreadable) is assumed
   able but ranked after the known ones.
2. **Candidates**: able instances that are routable (breaker closed, not drained).
3. **Ranked** by least outstanding work (its reported queue plus what the proxy sent since),
   then the heavier weight, then model affinity (its last prompt loaded the same checkpoint, so
   no reload), then registry order.

No candidate: ``no_capable_instance`` when no instance at all (healthy or not) could run the
workflow (a 400 naming what is missing), else ``no_healthy_instance`` (a 503: an instance that
could is down or drained).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from proxy.comfy.capabilities import Capabilities
from proxy.comfy.graph import Prompt, read_graph
from proxy.comfy.names import is_model_input

CHECKPOINT_INPUTS = frozenset({"ckpt_name", "unet_name"})
"""Inputs naming the base model a workflow loads: what model affinity compares."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A loader input that names a model file."""

    node_id: str
    class_type: str
    input_name: str
    value: str


@dataclass(frozen=True, slots=True)
class Requirements:
    """What an instance must offer to run a workflow."""

    nodes: tuple[tuple[str, str], ...] = ()
    """``(node_id, class_type)`` of every node."""
    models: tuple[ModelRef, ...] = ()
    checkpoints: frozenset[str] = frozenset()


def requirements(graph: Prompt | object) -> Requirements:
    """The node types and model files a prompt graph needs: the canonical :class:`Prompt` (a
    model named through primitive nodes counts), or a parsed graph read here without schemas
    (malformed nodes are skipped: ComfyUI refuses them itself)."""
    if not isinstance(graph, Prompt):
        if not isinstance(graph, dict):
            return Requirements()
        graph = read_graph(graph)
    nodes: list[tuple[str, str]] = []
    models: list[ModelRef] = []
    checkpoints: set[str] = set()
    for node in graph.nodes.values():
        nodes.append((node.id, node.class_type))
        for name, value in graph.resolved_inputs(node).items():
            if isinstance(value, str) and is_model_input(name, value):
                models.append(ModelRef(node.id, node.class_type, name, value))
                if name in CHECKPOINT_INPUTS:
                    checkpoints.add(value)
    return Requirements(tuple(nodes), tuple(models), frozenset(checkpoints))


@dataclass(frozen=True, slots=True)
class Missing:
    """One thing a workflow needs that an instance lacks."""

    node_id: str
    class_type: str
    input_name: str = ""
    """Empty: the node type itself is missing; else the model input."""
    value: str = ""


def missing_on(req: Requirements, capabilities: Capabilities | None) -> tuple[Missing, ...]:
    """What ``req`` needs that an instance with ``capabilities`` lacks (nothing when unknown)."""
    if capabilities is None:
        return ()
    out: list[Missing] = []
    absent: set[str] = set()
    for node_id, class_type in req.nodes:
        if not capabilities.has_node(class_type):
            out.append(Missing(node_id, class_type))
            absent.add(node_id)
    for ref in req.models:
        if ref.node_id in absent:
            continue  # the node is missing: its inputs' lists are unknown there
        if not capabilities.has_model(ref.class_type, ref.input_name, ref.value):
            out.append(Missing(ref.node_id, ref.class_type, ref.input_name, ref.value))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class CandidateState:
    """One instance as placement sees it (a snapshot of the registry)."""

    name: str
    routable: bool = True
    capabilities: Capabilities | None = None
    outstanding: int = 0
    weight: float = 1.0
    last_checkpoints: frozenset[str] = frozenset()
    order: int = 0


Outcome = Literal["placed", "no_capable_instance", "no_healthy_instance"]


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    ranked: tuple[CandidateState, ...] = ()
    """Best first; empty unless placed."""
    missing: Mapping[str, tuple[Missing, ...]] = field(default_factory=dict)
    """For ``no_capable_instance``: what each instance lacks, by instance name."""


def _rank_key(req: Requirements, c: CandidateState) -> tuple[int, int, float, int, int]:
    affinity = bool(req.checkpoints & c.last_checkpoints)
    return (
        0 if c.capabilities is not None else 1,
        c.outstanding,
        -c.weight,
        0 if affinity else 1,
        c.order,
    )


def place(workflow: object, candidates: Sequence[CandidateState]) -> list[CandidateState]:
    """The routable instances able to run ``workflow`` (a prompt graph or its
    :class:`Requirements`), best first."""
    req = workflow if isinstance(workflow, Requirements) else requirements(workflow)
    able = [c for c in candidates if c.routable and not missing_on(req, c.capabilities)]
    return sorted(able, key=lambda c: _rank_key(req, c))


def decide(workflow: object, candidates: Sequence[CandidateState]) -> Decision:
    """:func:`place`, and why nothing was placed when so."""
    req = workflow if isinstance(workflow, Requirements) else requirements(workflow)
    missing = {c.name: missing_on(req, c.capabilities) for c in candidates}
    ranked = sorted(
        (c for c in candidates if c.routable and not missing[c.name]),
        key=lambda c: _rank_key(req, c),
    )
    if ranked:
        return Decision("placed", tuple(ranked))
    if not candidates or any(not m for m in missing.values()):
        return Decision("no_healthy_instance")
    return Decision("no_capable_instance", missing=missing)


def describe(missing: Missing) -> str:
    if not missing.input_name:
        return f"node type {missing.class_type}"
    return f"{missing.input_name} {missing.value!r}"


def node_errors(missing: Mapping[str, tuple[Missing, ...]]) -> dict[str, dict[str, object]]:
    """ComfyUI's ``node_errors`` for a workflow no instance can run.

    Items no instance has are reported as such; when every item exists somewhere but no single
    instance has them all, each item names the instances that lack it.
    """
    instances = sorted(missing)
    lacking: dict[Missing, list[str]] = {}
    for name in instances:
        for item in missing[name]:
            lacking.setdefault(item, []).append(name)
    everywhere = [m for m, names in lacking.items() if len(names) == len(instances)]
    reported = everywhere or list(lacking)
    out: dict[str, dict[str, object]] = {}
    for item in reported:
        names = lacking[item]
        if item in everywhere:
            message = f"{describe(item)} is not available on any instance"
            error_type = "model_not_available" if item.input_name else "node_not_available"
        else:
            message = (
                f"{describe(item)} is missing on {', '.join(names)} "
                "(no single instance has everything this workflow needs)"
            )
            error_type = "no_capable_instance"
        entry = out.setdefault(
            item.node_id, {"errors": [], "dependent_outputs": [], "class_type": item.class_type}
        )
        errors = entry["errors"]
        assert isinstance(errors, list)
        errors.append(
            {
                "type": error_type,
                "message": message,
                "details": item.input_name or item.class_type,
                "extra_info": {
                    "input_name": item.input_name or None,
                    "received_value": item.value or None,
                    "missing_on": names,
                },
            }
        )
    return out
