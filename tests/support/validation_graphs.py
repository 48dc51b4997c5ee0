"""Generated API-format graphs over the fake ComfyUI's classes, for the hold-time validation
tests (tests/unit/test_validation_agreement.py and
tests/integration/test_hold_validation_generated.py): valid, boundary and wrong literals,
wrapped lists, links (short ones too) to earlier nodes (acyclic) at any output index, omitted
and stray inputs."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tests.support import validation_corpus as corpus

CLASSES = (
    "EmptyImage", "ImageScale", "ImageBlur", "ImageAddNoise", "GetImageSize", "SaveImage",
    "PreviewImage", "PreviewAny", "PrimitiveInt", "PrimitiveFloat", "PrimitiveBoolean",
    "PrimitiveString", "LoadImage", "CheckpointLoaderSimple", "CLIPTextEncode",
    "EmptyLatentImage", "KSampler", "VAEDecode",
)  # fmt: skip
LITERALS = st.one_of(
    st.integers(-3, 70_000),
    st.sampled_from([0, 1, 8, 16, 31, 32, 16384, 16385, 0.05, 1.5, 100.5, -1.0]),
    st.floats(-10, 200, allow_nan=False),
    st.sampled_from(["8", "1e3", "x", "", "euler", "nearest-exact", "disabled", "normal"]),
    st.sampled_from([corpus.INPUT_IMAGE, "missing.png", corpus.CHECKPOINT, "other.ckpt"]),
    st.booleans(),
    st.none(),
    st.builds(lambda v: {"__value__": v}, st.one_of(st.integers(0, 40), st.lists(st.integers()))),
)


@st.composite
def graphs(draw: st.DrawFn, registry_info: dict[str, Any]) -> dict[str, Any]:
    count = draw(st.integers(1, 6))
    prompt: dict[str, Any] = {}
    for i in range(count):
        class_type = draw(st.sampled_from(CLASSES))
        sections = registry_info[class_type]["input"]
        names = [*sections.get("required", {}), *sections.get("optional", {}), "stray"]
        inputs: dict[str, Any] = {}
        for name in names:
            action = draw(st.sampled_from(["literal", "link", "omit", "keep"]))
            if action == "omit" or (name == "stray" and action != "literal"):
                continue
            if action == "link" and i > 0:
                source = str(draw(st.integers(0, i - 1)))
                # mostly well-formed links to the first output: the interesting errors are
                # further on (a short link or a missing output is refused early)
                index = draw(st.sampled_from([0, 0, 0, 0, 1, 2, 3]))
                short = draw(st.integers(0, 7)) == 0
                inputs[name] = [source] if short else [source, index]
            elif action == "keep":
                spec = sections.get("required", {}).get(name) or sections.get("optional", {}).get(
                    name
                )
                default = spec[1].get("default") if spec and len(spec) > 1 else None
                head = spec[0] if spec else None
                inputs[name] = head[0] if isinstance(head, list) and head else default
            else:
                inputs[name] = draw(LITERALS)
        prompt[str(i)] = {"class_type": class_type, "inputs": inputs}
    ending = draw(st.sampled_from(["none", "SaveImage", "PreviewAny", "PreviewImage"]))
    last = [str(count - 1), 0]
    if ending == "SaveImage":
        prompt["out"] = {"class_type": ending, "inputs": {"images": last, "filename_prefix": "g"}}
    elif ending != "none":
        name = "source" if ending == "PreviewAny" else "images"
        prompt["out"] = {"class_type": ending, "inputs": {name: last}}
    return prompt
