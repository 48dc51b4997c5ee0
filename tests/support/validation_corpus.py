"""Prompts for the hold-time validation tests (``proxy.comfy.validation``): invalid ones with
every trap ComfyUI's validation has, and valid ones, each as ``(name, prompt)`` in the API
format. Only core classes the fake ComfyUI has (and real ComfyUI 0.3.64 has), so the same
corpus runs against both (tests/integration/test_hold_validation.py,
tests/data/comfyui_validation_answers.json)."""

from __future__ import annotations

from typing import Any

CHECKPOINT = "sd15/tiny.safetensors"
"""The one checkpoint the corpus names (the tests create it)."""
INPUT_IMAGE = "corpus.png"
"""An image at the top of input/ (the tests create it)."""


def node(class_type: str, **inputs: Any) -> dict[str, Any]:
    return {"class_type": class_type, "inputs": inputs}


def empty(**inputs: Any) -> dict[str, Any]:
    return node("EmptyImage", **{"width": 8, "height": 8, "batch_size": 1, "color": 0, **inputs})


def save(source: object = None) -> dict[str, Any]:
    inputs: dict[str, Any] = {"filename_prefix": "corpus"}
    if source is not None:
        inputs["images"] = source
    return node("SaveImage", **inputs)


def _sampler(**inputs: Any) -> dict[str, Any]:
    base = {
        "model": ["4", 0],
        "seed": 1,
        "steps": 2,
        "cfg": 1.0,
        "sampler_name": "euler",
        "scheduler": "normal",
        "positive": ["6", 0],
        "negative": ["7", 0],
        "latent_image": ["5", 0],
        "denoise": 1.0,
    }
    return node("KSampler", **{**base, **inputs})


def _txt2img(**sampler: Any) -> dict[str, Any]:
    return {
        "4": node("CheckpointLoaderSimple", ckpt_name=CHECKPOINT),
        "5": node("EmptyLatentImage", width=16, height=16, batch_size=1),
        "6": node("CLIPTextEncode", text="a cat", clip=["4", 1]),
        "7": node("CLIPTextEncode", text="", clip=["4", 1]),
        "3": _sampler(**sampler),
        "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
        "9": save(["8", 0]),
    }


INVALID: list[tuple[str, dict[str, Any]]] = [
    ("no_outputs", {"1": empty()}),
    ("below_min", {"1": empty(width=0), "9": save(["1", 0])}),
    ("above_max", {"1": empty(color=2**25), "9": save(["1", 0])}),
    ("float_below_min", {"1": node("ImageBlur", image=["2", 0], blur_radius=1, sigma=0.0),
                         "2": empty(), "9": save(["1", 0])}),
    ("int_not_a_number", {"1": empty(width="wide"), "9": save(["1", 0])}),
    ("int_from_list", {"1": empty(width={"__value__": [1, 2]}), "9": save(["1", 0])}),
    ("float_not_a_number", {"1": node("ImageBlur", image=["2", 0], blur_radius=1, sigma="x"),
                            "2": empty(), "9": save(["1", 0])}),
    ("required_missing", {"1": node("EmptyImage", width=8, height=8), "9": save(["1", 0])}),
    ("output_input_missing", {"1": empty(), "9": save()}),
    ("combo_not_in_list", {"1": node("ImageScale", image=["2", 0], upscale_method="nope",
                                     width=8, height=8, crop="disabled"),
                           "2": empty(), "9": save(["1", 0])}),
    ("model_not_in_list", _txt2img() | {"4": node("CheckpointLoaderSimple",
                                                  ckpt_name="sd15/missing.safetensors")}),
    ("sampler_not_in_list", _txt2img(sampler_name="nope", steps=0)),
    ("type_mismatch", {"1": empty(), "2": node("GetImageSize", image=["1", 0]),
                       "9": save(["2", 0])}),
    # comfygate's graph reader refuses this one itself, queue on or off
    ("bad_linked_input", {"1": empty(), "9": save(["1", 0, 1])}),
    ("error_upstream_of_two_outputs", {"1": empty(width=0), "8": node("PreviewImage",
                                       images=["1", 0]), "9": save(["1", 0])}),
    ("several_errors_several_nodes", {"1": empty(width=-1, height="h", color="c"),
                                      "2": node("ImageBlur", image=["1", 0], blur_radius=99,
                                                sigma=0.5),
                                      "9": save(["2", 0]), "10": node("PreviewImage")}),
    ("output_fails_itself_and_upstream", {"1": empty(batch_size=0),
                                          "9": node("SaveImage", images=["1", 0])}),
    ("primitive_not_a_number", {"1": node("PrimitiveInt", value="x"),
                                "9": node("PreviewAny", source=["1", 0])}),
    ("txt2img_with_errors", _txt2img(steps=0, cfg=1000, denoise="d")),
    ("optional_input_wrong_link", {"1": empty(), "9": node("Preview3D", model_file="m.glb",
                                                          camera_info=["1", 0])}),
]  # fmt: skip
"""Prompts ComfyUI refuses (400)."""

PARTIAL: list[tuple[str, dict[str, Any]]] = [
    ("one_of_two_outputs_fails", {"1": empty(), "2": empty(width=0), "8": save(["1", 0]),
                                  "9": save(["2", 0])}),
    ("one_output_missing_input", {"1": empty(), "8": save(["1", 0]), "9": node("PreviewImage")}),
]  # fmt: skip
"""Prompts ComfyUI runs in part: 200, with the failed outputs' ``node_errors``."""

VALID: list[tuple[str, dict[str, Any]]] = [
    ("simple", {"1": empty(), "9": save(["1", 0])}),
    ("converted_literals", {"1": empty(width="16", height=8.7, batch_size=True),
                            "9": save(["1", 0])}),
    ("wrapped_literal", {"1": empty(width={"__value__": 12}), "9": save(["1", 0])}),
    ("optional_and_extra_inputs", {"1": empty(unknown_input=5),
                                   "9": node("PreviewAny", source=["1", 0])}),
    ("unused_invalid_node", {"1": empty(), "2": empty(width=0), "9": save(["1", 0])}),
    ("primitive_chain", {"1": node("PrimitiveInt", value=16), "2": empty(width=["1", 0]),
                         "9": save(["2", 0])}),
    ("listed_image", {"1": node("LoadImage", image=INPUT_IMAGE), "9": save(["1", 0])}),
    ("txt2img", _txt2img()),
    ("multi_type_input", {"1": node("GetImageSize", image=["2", 0]), "2": empty(),
                          "9": node("PreviewAny", source=["1", 1])}),
    ("optional_input_omitted", {"9": node("Preview3D", model_file="m.glb")}),
    # ComfyUI checks no type of a literal given to a linked input (the node fails when run)
    ("literal_for_link_input", {"9": save(5)}),
    # hidden inputs are not validated (comfygate's isolation refuses them: the same either way)
    ("hidden_input_given", {"1": empty(), "2": node("GetImageSize", image=["1", 0],
                                                    unique_id="x"),
                            "9": node("PreviewAny", source=["2", 0])}),
]  # fmt: skip
"""Prompts ComfyUI accepts as they are."""

DEFERRED: list[tuple[str, dict[str, Any]]] = [
    # LoadImage checks the file itself (VALIDATE_INPUTS): a file the list did not show may
    # have been uploaded since, so the proxy holds it and ComfyUI decides at release.
    ("unlisted_image_and_error", {"1": node("LoadImage", image="not-uploaded.png"),
                                  "2": empty(width=0), "8": save(["1", 0]),
                                  "9": save(["2", 0])}),
]  # fmt: skip
"""Prompts ComfyUI refuses that the proxy cannot judge before holding (held, refused at
release)."""

RAISING: list[tuple[str, dict[str, Any]]] = [
    ("link_to_missing_node", {"1": empty(), "9": save(["77", 0])}),
    ("output_index_out_of_range", {"1": empty(), "9": save(["1", 5])}),
]
"""Prompts on which ComfyUI's validation raises (its 400 carries a Python traceback):
comfygate's graph reader refuses them itself when it knows the schemas, else they are held and
ComfyUI refuses them at release."""

ALL = INVALID + PARTIAL + VALID + DEFERRED + RAISING
COMFYUI_ERRORS = frozenset(
    {"prompt_outputs_failed_validation", "prompt_no_outputs", "invalid_prompt"}
)
"""ComfyUI's own top-level error types for a refused prompt (the rest are comfygate's)."""
