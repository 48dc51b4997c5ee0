"""How a refused prompt reads: :class:`Violation` per node input, rendered in ComfyUI's own 400
shape (``{"error": {...}, "node_errors": {node_id: {"errors": [...], ...}}}``), which the stock
frontend shows and outlines node by node. Shared by the prompt model, the workflow policy and
isolation, so every refusal of ``POST /prompt`` looks the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from proxy.errors import Rejection

FileRef = tuple[str, str, str]
"""``(type, subfolder, filename)``, as ``proxy.comfy.records.FileRef``."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One node input the proxy refuses, in the terms of ComfyUI's ``node_errors``."""

    node_id: str
    class_type: str
    input_name: str
    error_type: str
    message: str
    received_value: Any = None
    ref: FileRef | None = None
    """Set when the only problem is the folder: a store record of the user's may still allow
    the file (e.g. a preview in temp/ with an empty subfolder)."""
    details: str = ""
    """ComfyUI's per-error ``details`` (e.g. the policy rule broken); the input name if empty."""


class PromptRejected(Rejection):
    """A refused prompt, with ComfyUI's ``node_errors`` for each violation.

    ``error_type`` is the first violation's type; ``extra`` names its node. ``chain`` renders
    :attr:`node_errors` as the body's ``node_errors`` (ComfyUI shape,
    docs/comfyui-protocol.md#submitting-a-prompt).
    """

    status = 400

    def __init__(self, violations: Sequence[Violation]) -> None:
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(
            f"Prompt refused: {describe_violation(first, input_word='input ')}{more}",
            error_type=first.error_type,
            details="\n".join(describe_violation(v) for v in violations),
            extra={
                "node_id": first.node_id,
                "class_type": first.class_type,
                "input_name": first.input_name,
            },
        )
        self.violations = tuple(violations)
        self.node_errors = node_errors(violations)


def node_errors(violations: Sequence[Violation]) -> dict[str, Any]:
    """``{node_id: {"errors": [...], "dependent_outputs": [], "class_type": ...}}``."""
    out: dict[str, Any] = {}
    for v in violations:
        if not v.node_id:
            continue  # about the whole prompt (e.g. its size): only in the top-level error
        entry = out.setdefault(
            v.node_id, {"errors": [], "dependent_outputs": [], "class_type": v.class_type}
        )
        extra_info: dict[str, Any] = {}
        if v.input_name:
            extra_info = {"input_name": v.input_name, "received_value": v.received_value}
        entry["errors"].append(
            {
                "type": v.error_type,
                "message": v.message,
                "details": v.details or v.input_name,
                "extra_info": extra_info,
            }
        )
    return out


def describe_violation(v: Violation, *, input_word: str = "") -> str:
    """One line about a violation: the prompt's, a node's, or one of its inputs'."""
    if not v.node_id:
        return v.message
    if not v.input_name:
        return f"node {v.node_id} ({v.class_type}): {v.message}"
    return f"node {v.node_id} ({v.class_type}) {input_word}{v.input_name}: {v.message}"


__all__ = ["FileRef", "PromptRejected", "Violation", "describe_violation", "node_errors"]
