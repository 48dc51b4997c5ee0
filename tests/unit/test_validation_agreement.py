"""``proxy.comfy.validation`` agrees with the fake ComfyUI's own, independent port of ComfyUI's
validation (tests/fakes/comfyui/validation.py), on the corpus and on generated graphs:

- whenever the proxy would refuse, the fake refuses with the very same body;
- whenever the proxy is sure a prompt is accepted, the fake accepts it with the same
  ``node_errors`` (a partly valid prompt);
- when the proxy is unsure it holds the prompt (nothing to compare: ComfyUI decides later).

Never a refusal of a prompt the fake accepts: that is the property that matters most.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.comfy.validation import Rules, Verdict, validate_prompt
from tests.fakes.comfyui.nodes import NodeRegistry
from tests.fakes.comfyui.paths import Paths
from tests.fakes.comfyui.validation import validate_prompt as fake_validate
from tests.support import validation_corpus as corpus
from tests.support.validation_graphs import graphs


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> NodeRegistry:
    paths = Paths.create(tmp_path_factory.mktemp("agreement"))
    checkpoint = Path(paths.model_dirs("checkpoints")[0]) / corpus.CHECKPOINT
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"x")
    Path(paths.input, corpus.INPUT_IMAGE).write_bytes(b"png")
    return NodeRegistry(paths)


def compare(registry: NodeRegistry, prompt: dict[str, Any], partial: object = None) -> Verdict:
    """Assert the agreement (module doc); the proxy's verdict."""
    info = json.loads(json.dumps(registry.object_info()))  # as the proxy reads it
    mine = validate_prompt(prompt, Rules(info), partial)
    ok, error, _, node_errors = fake_validate(registry, copy.deepcopy(prompt), partial)  # type: ignore[arg-type]
    theirs = json.loads(json.dumps({"error": error, "node_errors": node_errors}))
    if mine.refuses:
        assert not ok
        assert json.loads(json.dumps(mine.answer())) == theirs
    elif mine.error is None and not mine.unsure:
        assert ok, theirs
        assert json.loads(json.dumps(mine.node_errors)) == theirs["node_errors"]
    return mine


@pytest.mark.parametrize(("name", "prompt"), corpus.INVALID, ids=[n for n, _ in corpus.INVALID])
def test_invalid_corpus_is_refused_as_the_fake_refuses(
    registry: NodeRegistry, name: str, prompt: dict[str, Any]
) -> None:
    assert compare(registry, prompt).refuses


@pytest.mark.parametrize(("name", "prompt"), corpus.PARTIAL, ids=[n for n, _ in corpus.PARTIAL])
def test_partly_valid_corpus_is_accepted_with_the_same_node_errors(
    registry: NodeRegistry, name: str, prompt: dict[str, Any]
) -> None:
    verdict = compare(registry, prompt)
    assert verdict.error is None
    assert verdict.held_node_errors()


@pytest.mark.parametrize(("name", "prompt"), corpus.VALID, ids=[n for n, _ in corpus.VALID])
def test_valid_corpus_is_accepted(
    registry: NodeRegistry, name: str, prompt: dict[str, Any]
) -> None:
    assert compare(registry, prompt) == Verdict(None)


@pytest.mark.parametrize(("name", "prompt"), corpus.DEFERRED, ids=[n for n, _ in corpus.DEFERRED])
def test_deferred_corpus_is_held_though_the_fake_refuses(
    registry: NodeRegistry, name: str, prompt: dict[str, Any]
) -> None:
    verdict = compare(registry, prompt)
    assert verdict.unsure
    assert not verdict.refuses
    ok, *_ = fake_validate(registry, copy.deepcopy(prompt), None)
    assert not ok


@pytest.mark.parametrize(("name", "prompt"), corpus.RAISING, ids=[n for n, _ in corpus.RAISING])
def test_what_comfyui_raises_on_is_not_predicted(
    registry: NodeRegistry, name: str, prompt: dict[str, Any]
) -> None:
    verdict = compare(registry, prompt)
    assert verdict.unsure
    assert not verdict.refuses


# -- generated graphs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_info(registry: NodeRegistry) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(json.dumps(registry.object_info()))
    return info


@settings(
    max_examples=int(os.environ.get("VALIDATION_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_generated_graphs_agree(
    registry: NodeRegistry, registry_info: dict[str, Any], data: st.DataObject
) -> None:
    prompt = data.draw(graphs(registry_info))
    partial = data.draw(st.one_of(st.none(), st.lists(st.sampled_from(sorted(prompt)))))
    verdict = compare(registry, prompt, partial)
    event("refused" if verdict.refuses else "unsure" if verdict.unsure else "accepted")
