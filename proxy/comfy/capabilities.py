"""What one ComfyUI instance can run, read from its ``/object_info``: node types and model
lists (the pure model; ``proxy.multi.capabilities`` keeps every instance's copy current).

ComfyUI's ``/object_info`` describes every node class; loaders declare their model inputs as
combos whose options are the files in the model folders (``ckpt_name`` lists ``checkpoints/``).
:class:`Capabilities` keeps the class names and, for each (class, model input), the options.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.comfy.names import is_model_input

ModelKey = tuple[str, str]
"""``(class_type, input_name)`` of a model input."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Node types and model files one instance offers."""

    nodes: frozenset[str]
    models: Mapping[ModelKey, frozenset[str]]
    """For each loader input that names a model file: the files the instance has."""
    version: object = None
    """Which ``/object_info`` copy this was parsed from (parse once per copy)."""

    def has_node(self, class_type: str) -> bool:
        return class_type in self.nodes

    def has_model(self, class_type: str, input_name: str, value: str) -> bool:
        """Whether the instance lists ``value`` for that input; True when the input is not a
        known model list there (nothing to judge by: ComfyUI will validate it)."""
        options = self.models.get((class_type, input_name))
        return options is None or value in options


def combo_options(spec: object) -> list[str] | None:
    """The options of a combo input spec, old (``[[...], {...}]``) or new (``["COMBO",
    {"options": [...]}]``) form; None for any other input type."""
    if not isinstance(spec, list) or not spec:
        return None
    head = spec[0]
    if isinstance(head, list):
        return [o for o in head if isinstance(o, str)]
    if head == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        options = spec[1].get("options")
        if isinstance(options, list):
            return [o for o in options if isinstance(o, str)]
    return None


def parse_object_info(info: Mapping[str, Any], version: object = None) -> Capabilities:
    """Capabilities from an ``/object_info`` document (unknown shapes are skipped)."""
    models: dict[ModelKey, frozenset[str]] = {}
    for class_type, definition in info.items():
        inputs = definition.get("input") if isinstance(definition, dict) else None
        if not isinstance(inputs, dict):
            continue
        for section in ("required", "optional"):
            specs = inputs.get(section)
            if not isinstance(specs, dict):
                continue
            for input_name, spec in specs.items():
                options = combo_options(spec)
                if options is None:
                    continue
                if is_model_input(input_name, options[0] if options else None):
                    models[(class_type, input_name)] = frozenset(options)
    return Capabilities(nodes=frozenset(info), models=models, version=version)
