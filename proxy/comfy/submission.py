"""A ``POST /prompt`` body as the proxy read it: the envelope and the canonical graph (pure).

ComfyUI's ``post_prompt`` reads ``prompt``, ``prompt_id``, ``client_id``, ``extra_data``,
``number``, ``front`` and ``partial_execution_targets``; the proxy keeps every key it was sent
(parsed, re-serialised), replaces ``prompt`` with :meth:`Prompt.to_json` and lets guards change
the envelope (isolation sets ``prompt_id`` and ``client_id``). :meth:`Submission.dump` is the
only body ComfyUI receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.comfy.graph import Prompt, read_graph, ui_node_types
from proxy.comfy.json_body import JsonRefused, dump_json, parse_json
from proxy.comfy.schemas import NodeSchemas


@dataclass(slots=True)
class Submission:
    """One submission (module doc)."""

    body: dict[str, Any]
    """Every key of the body as parsed; its ``prompt`` is replaced by :attr:`prompt` on dump."""
    prompt: Prompt | None
    """The graph; None when the body has no ``prompt`` (ComfyUI answers ``no_prompt``)."""

    @property
    def value(self) -> dict[str, Any]:
        """The body as forwarded, as a JSON object."""
        if self.prompt is None:
            return self.body
        return {**self.body, "prompt": self.prompt.to_json()}

    def dump(self) -> bytes:
        """The body ComfyUI receives (UTF-8 JSON).

        Raises:
            JsonRefused: an envelope value a guard set that JSON cannot carry (a bug).
        """
        return dump_json(self.value)


def read_submission(
    raw: bytes,
    charset: str | None = None,
    schemas: NodeSchemas | None = None,
    *,
    judged: bool = True,
) -> Submission:
    """Parse a ``POST /prompt`` body once (:func:`proxy.comfy.json_body.parse_json`) and read
    its graph (:func:`proxy.comfy.graph.read_graph`, ``judged`` as there). Problems in the
    graph are collected in ``prompt.problems``, not raised.

    Raises:
        JsonRefused: the body is not JSON the proxy reads unambiguously, or not an object.
    """
    body = parse_json(raw, charset)
    if not isinstance(body, dict):
        raise JsonRefused("the body must be a JSON object with a prompt")
    return submission_of(body, schemas, judged=judged)


def submission_of(
    body: dict[str, Any], schemas: NodeSchemas | None = None, *, judged: bool = True
) -> Submission:
    """The submission of a body already parsed by :func:`parse_json` (the proxy's bounded
    body reader, ``proxy.request.bodies.read_json_body``), its graph read as in
    :func:`read_submission`."""
    if "prompt" not in body:
        return Submission(body, None)
    graph = body["prompt"]
    ui_types = ui_node_types(body) if _has_untyped(graph) else {}
    return Submission(body, read_graph(graph, schemas, ui_types=ui_types, judged=judged))


def _has_untyped(graph: object) -> bool:
    """A node sent without ``class_type`` (the frontend's for a type missing from its library):
    only then is the attached UI workflow read, to name it."""
    return isinstance(graph, dict) and any(
        isinstance(n, dict) and "class_type" not in n for n in graph.values()
    )


__all__ = ["Submission", "read_submission", "submission_of"]
