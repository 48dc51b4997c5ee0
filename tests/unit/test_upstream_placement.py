"""Placement as a pure function: capability filter, then load, weight, affinity, order."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.comfy.capabilities import Capabilities
from proxy.multi.placement import (
    CandidateState,
    Missing,
    decide,
    node_errors,
    place,
    requirements,
)

SD15 = "sd15.safetensors"
SDXL = "sdxl.safetensors"


def caps(nodes: set[str], checkpoints: set[str] | None = None) -> Capabilities:
    models = {}
    if checkpoints is not None:
        models[("CheckpointLoaderSimple", "ckpt_name")] = frozenset(checkpoints)
    return Capabilities(nodes=frozenset(nodes), models=models)


BASIC = {"CheckpointLoaderSimple", "KSampler", "SaveImage"}


def workflow(ckpt: str = SD15, extra: str | None = None) -> dict[str, Any]:
    graph: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 1}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
    }
    if extra is not None:
        graph["10"] = {"class_type": extra, "inputs": {}}
    return graph


def c(name: str, **kwargs: Any) -> CandidateState:
    kwargs.setdefault("capabilities", caps(BASIC, {SD15, SDXL}))
    return CandidateState(name=name, **kwargs)


@pytest.mark.parametrize(
    ("graph", "candidates", "expected"),
    [
        pytest.param(workflow(), [c("a"), c("b")], ["a", "b"], id="all-equal-registry-order"),
        pytest.param(
            workflow(),
            [c("a", order=1), c("b", order=0)],
            ["b", "a"],
            id="order-is-the-last-tie-break",
        ),
        pytest.param(
            workflow(),
            [c("a", outstanding=2), c("b", outstanding=0), c("c", outstanding=1)],
            ["b", "c", "a"],
            id="least-outstanding-first",
        ),
        pytest.param(
            workflow(),
            [c("a", weight=1.0), c("b", weight=2.0)],
            ["b", "a"],
            id="ties-go-to-the-heavier",
        ),
        pytest.param(
            workflow(),
            [c("a", weight=2.0, outstanding=1), c("b", weight=1.0)],
            ["b", "a"],
            id="load-beats-weight",
        ),
        pytest.param(
            workflow(SDXL),
            [
                c("a", last_checkpoints=frozenset({SD15})),
                c("b", last_checkpoints=frozenset({SDXL})),
            ],
            ["b", "a"],
            id="affinity-breaks-equal-load-and-weight",
        ),
        pytest.param(
            workflow(SDXL),
            [c("a", outstanding=0), c("b", outstanding=1, last_checkpoints=frozenset({SDXL}))],
            ["a", "b"],
            id="load-beats-affinity",
        ),
        pytest.param(
            workflow(SDXL),
            [c("a", weight=2.0), c("b", last_checkpoints=frozenset({SDXL}))],
            ["a", "b"],
            id="weight-beats-affinity",
        ),
        pytest.param(
            workflow(extra="Upscaler"),
            [c("a"), c("b", capabilities=caps(BASIC | {"Upscaler"}, {SD15}))],
            ["b"],
            id="only-instances-with-every-node",
        ),
        pytest.param(
            workflow(SDXL),
            [c("a", capabilities=caps(BASIC, {SD15})), c("b")],
            ["b"],
            id="only-instances-with-the-model",
        ),
        pytest.param(
            workflow(),
            [c("a", routable=False), c("b")],
            ["b"],
            id="unroutable-excluded",
        ),
        pytest.param(
            workflow(),
            [c("a", capabilities=None), c("b", outstanding=5)],
            ["b", "a"],
            id="unknown-capabilities-ranked-last",
        ),
        pytest.param(
            workflow(extra="Upscaler"),
            [c("a", capabilities=None), c("b")],
            ["a"],
            id="unknown-capabilities-assumed-able",
        ),
        pytest.param(
            {"1": {"class_type": "Custom", "inputs": {"model_name": "x.pth"}}},
            [c("a", capabilities=caps({"Custom"}))],
            ["a"],
            id="model-input-without-a-known-list-passes",
        ),
    ],
)
def test_place(graph: object, candidates: list[CandidateState], expected: list[str]) -> None:
    assert [x.name for x in place(graph, candidates)] == expected


def test_requirements_names_nodes_models_and_checkpoints() -> None:
    graph = workflow(SDXL)
    graph["5"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "style.safetensors"}}
    graph["6"] = "not a node"
    req = requirements(graph)
    assert ("4", "CheckpointLoaderSimple") in req.nodes
    assert {(m.node_id, m.input_name, m.value) for m in req.models} == {
        ("4", "ckpt_name", SDXL),
        ("5", "lora_name", "style.safetensors"),
    }
    assert req.checkpoints == {SDXL}


@pytest.mark.parametrize(
    ("candidates", "outcome"),
    [
        pytest.param([], "no_healthy_instance", id="no-instances"),
        pytest.param([c("a", routable=False)], "no_healthy_instance", id="able-but-down"),
        pytest.param(
            [c("a", capabilities=caps({"KSampler"}))], "no_capable_instance", id="none-able"
        ),
        pytest.param(
            [c("a", capabilities=caps({"KSampler"})), c("b", routable=False)],
            "no_healthy_instance",
            id="the-able-one-is-down",
        ),
        pytest.param([c("a")], "placed", id="placed"),
    ],
)
def test_decide_outcomes(candidates: list[CandidateState], outcome: str) -> None:
    assert decide(workflow(), candidates).outcome == outcome


def test_node_errors_name_what_no_instance_has() -> None:
    decision = decide(
        workflow("missing.safetensors", extra="Upscaler"),
        [c("a"), c("b", capabilities=caps(BASIC, {SD15}))],
    )
    assert decision.outcome == "no_capable_instance"
    errors = node_errors(decision.missing)
    assert set(errors) == {"4", "10"}
    assert errors["10"]["class_type"] == "Upscaler"
    error: Any = errors["10"]["errors"]
    assert [e["type"] for e in error] == ["node_not_available"]
    model: Any = errors["4"]["errors"][0]  # type: ignore[index]
    assert model["type"] == "model_not_available"
    assert model["extra_info"]["received_value"] == "missing.safetensors"
    assert model["extra_info"]["missing_on"] == ["a", "b"]


def test_node_errors_when_no_single_instance_has_everything() -> None:
    candidates = [
        c("a", capabilities=caps(BASIC | {"Upscaler"}, {SD15})),
        c("b", capabilities=caps(BASIC, {SDXL})),
    ]
    decision = decide(workflow(SDXL, extra="Upscaler"), candidates)
    assert decision.outcome == "no_capable_instance"
    errors = node_errors(decision.missing)
    assert decision.missing["a"] == (Missing("4", "CheckpointLoaderSimple", "ckpt_name", SDXL),)
    assert "missing on a" in str(errors["4"])
    assert "missing on b" in str(errors["10"])
