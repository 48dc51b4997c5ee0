"""Fidelity to a real ComfyUI: the answers ComfyUI 0.3.64 gave to the validation corpus
(tests/data/comfyui_validation_answers.json, recorded with
tests/support/record_validation_answers.py, which says how) are what
``proxy.comfy.validation`` predicts from that ComfyUI's own ``/object_info``, and what the fake
ComfyUI answers.

ComfyUI iterates sets (output node ids, a node's input names), so the order of the outputs in
``dependent_outputs``, of a node's errors and of the lines of ``details`` varies between its
runs: they are compared as sorted. Which outputs a failed node's ``dependent_outputs`` lists
depends on the order the outputs were validated in (every failed node seen so far gets each
later failed output), so a prediction matches when it does for some order of the outputs (the
validator and the fake take the prompt's: :func:`orders`).
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.comfy.validation import Rules, validate_prompt
from tests.fakes.comfyui.nodes import NodeRegistry
from tests.fakes.comfyui.paths import Paths
from tests.fakes.comfyui.validation import validate_prompt as fake_validate
from tests.support import validation_corpus as corpus

RECORDED = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "comfyui_validation_answers.json").read_text(
        encoding="utf-8"
    )
)
PROMPTS = dict(corpus.ALL)
NAMES = sorted(RECORDED["answers"])


def normal(body: Any) -> Any:
    """``body`` with ComfyUI's set orders sorted (module doc)."""
    body = json.loads(json.dumps(body))
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("details"), str):
        error["details"] = sorted(error["details"].split("\n"))
    for entry in body.get("node_errors", {}).values():
        entry["dependent_outputs"] = sorted(entry["dependent_outputs"])
        for item in entry["errors"]:
            if "traceback" in item["extra_info"]:  # ComfyUI's own frames: not comparable
                item["extra_info"]["traceback"] = bool(item["extra_info"]["traceback"])
        entry["errors"] = sorted(entry["errors"], key=lambda e: json.dumps(e, sort_keys=True))
    return body


def orders(prompt: dict[str, Any], info: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``prompt`` with its output nodes in every order (moved to the end of the object)."""
    outputs = [k for k, n in prompt.items() if info.get(n["class_type"], {}).get("output_node")]
    others = {k: n for k, n in prompt.items() if k not in outputs}
    for order in itertools.permutations(outputs):
        yield {**others, **{k: prompt[k] for k in order}}


def test_the_recording_covers_the_corpus() -> None:
    assert RECORDED["comfyui_version"] == "0.3.64"
    assert set(NAMES) == set(PROMPTS)


@pytest.mark.parametrize("name", NAMES)
def test_the_validator_predicts_real_comfyui(name: str) -> None:
    real = RECORDED["answers"][name]
    info = RECORDED["object_info"]
    answers = []
    for prompt in orders(PROMPTS[name], info):
        verdict = validate_prompt(prompt, Rules(info))
        if verdict.unsure:
            assert not verdict.refuses
            assert name in dict(corpus.DEFERRED + corpus.RAISING)
            return
        if real["status"] == 400:
            assert verdict.refuses
            answers.append(normal(verdict.answer()))
        else:
            assert verdict.error is None
            answers.append(normal({"node_errors": verdict.node_errors}))
    assert normal(real["body"]) in answers


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> NodeRegistry:
    paths = Paths.create(tmp_path_factory.mktemp("real"))
    checkpoint = Path(paths.model_dirs("checkpoints")[0]) / corpus.CHECKPOINT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"x")
    Path(paths.input, corpus.INPUT_IMAGE).write_bytes(b"png")
    return NodeRegistry(paths)


@pytest.mark.parametrize("name", NAMES)
def test_the_fake_answers_as_real_comfyui(registry: NodeRegistry, name: str) -> None:
    real = RECORDED["answers"][name]
    answers = []
    for prompt in orders(PROMPTS[name], RECORDED["object_info"]):
        ok, error, _, node_errors = fake_validate(registry, copy.deepcopy(prompt), None)
        assert ok is (real["status"] == 200)
        body = {"node_errors": node_errors} if ok else {"error": error, "node_errors": node_errors}
        answers.append(normal(body))
    assert normal(real["body"]) in answers
