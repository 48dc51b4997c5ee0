"""Model inputs, glob sets and model patterns with folders."""

from __future__ import annotations

import pytest

from proxy.policy.model import GlobSet, ModelGlobs, is_model_input, model_folders, specificity


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ckpt_name", "x.safetensors", True),
        ("ckpt_name", ["1", 0], True),  # a loader input, even linked
        ("lora_name", "styles/ink.safetensors", True),
        ("clip_name2", "t5.safetensors", True),
        ("model_name", "4x.pth", True),  # UpscaleModelLoader and custom loaders
        ("model_name", "gpt-4o", False),  # an API node's model, not a file
        ("ipadapter_file", "ip.bin", True),
        ("name", "patch.safetensors [output]", True),
        ("text", "a.safetensors", False),  # prose is never a model input
        ("seed", 5, False),
    ],
)
def test_is_model_input(name: str, value: object, expected: bool) -> None:
    assert is_model_input(name, value) is expected


def test_model_folders() -> None:
    assert model_folders("CheckpointLoaderSimple", "ckpt_name") == ("checkpoints",)
    assert model_folders("CLIPVisionLoader", "clip_name") == ("clip_vision",)
    assert model_folders("CLIPLoader", "clip_name") == ("text_encoders", "clip")
    assert model_folders("Custom", "weights") == ()


@pytest.mark.parametrize(
    ("patterns", "text", "expected"),
    [
        (["KSampler"], "KSampler", True),
        (["KSampler"], "KSamplerAdvanced", False),
        (["KSampler*"], "KSamplerAdvanced", True),
        (["*Loader*"], "CheckpointLoaderSimple", True),
        (["Save?"], "SaveX", True),
        (["[AB]x"], "Bx", True),
        (["a.b"], "axb", False),  # regex metacharacters are literal
        (["(x"], "(x", True),
        ([], "anything", False),
    ],
)
def test_glob_set(patterns: list[str], text: str, expected: bool) -> None:
    assert GlobSet.of(patterns).matches(text) is expected


def test_model_globs_with_folders() -> None:
    globs = ModelGlobs.of(["sd15/*", "loras:styles/*"])
    assert globs.matches("sd15/a.ckpt", ())
    assert globs.matches("sd15/a.ckpt", ("loras",))
    assert globs.matches("styles/a.safetensors", ("loras",))
    assert not globs.matches("styles/a.safetensors", ("checkpoints",))
    assert not globs.matches("styles/a.safetensors", ())  # folder unknown: folder patterns no
    assert globs.matches_in_any_folder("styles/a.safetensors")
    assert globs.patterns == ("sd15/*", "loras:styles/*")


def test_specificity_orders_patterns() -> None:
    ranked = sorted(["*", "K*", "KSampler*", "KSamplerAdvanced"], key=specificity)
    assert ranked == ["*", "K*", "KSampler*", "KSamplerAdvanced"]
