"""Template files: every problem of every file at once; the examples load."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.jobs.templates import TemplateError, TemplateStore, load_templates
from tests.jobs.support import TEMPLATES


def test_examples_load() -> None:
    assert sorted(load_templates(TEMPLATES).templates) == [
        "image-to-image",
        "text-to-image",
        "upscale",
    ]


def test_every_problem_listed(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(
        'colour = 1\n[params.x]\ntype = "integer"\ndefault = 99\nmaximum = 10\n'
        'targets = ["7.steps"]\n[workflow."1"]\nclass_type = "KSampler"\n'
    )
    (tmp_path / "b.toml").write_text("not toml [")
    with pytest.raises(TemplateError) as caught:
        load_templates(str(tmp_path))
    text = "\n".join(caught.value.problems)
    assert "a.toml: colour: unknown key" in text
    assert "no node '7'" in text
    assert "b.toml: not valid TOML" in text


def test_bad_reload_keeps_the_set_in_force(tmp_path: Path) -> None:
    good = Path(TEMPLATES, "upscale.toml").read_text()
    (tmp_path / "upscale.toml").write_text(good)
    store = TemplateStore(str(tmp_path))
    (tmp_path / "upscale.toml").write_text("broken = [")
    with pytest.raises(TemplateError):
        store.reload()
    assert store.get("upscale") is not None
