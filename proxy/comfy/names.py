"""What input names and values say about files: model inputs, media extensions (pure data).

Moved here from the policy and isolation packages so the prompt model, the policy, isolation,
placement and the catalog filter share one vocabulary without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping

MODEL_EXTENSIONS = (
    ".safetensors", ".ckpt", ".pt", ".pth", ".pt2", ".bin", ".gguf", ".sft", ".onnx",
)  # fmt: skip
"""File extensions of model weights (what ComfyUI's ``supported_pt_extensions`` lists, plus
``.gguf`` and ``.onnx`` used by popular node packs)."""

MEDIA_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm",
    ".avif", ".heic", ".heif", ".exr", ".ico", ".svg", ".jfif",
    ".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
    ".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".wma",
    ".glb", ".gltf", ".obj", ".fbx", ".stl", ".ply", ".spz", ".splat",
    ".safetensors", ".latent", ".npy", ".txt", ".json",
)  # fmt: skip
"""Extensions of files users keep in input/ (used to tell a folder listing from an enum, and to
recognise paths in prose-free inputs; never to decide whether an input reads a file)."""

MODEL_INPUT_FOLDERS: Mapping[str, tuple[str, ...]] = {
    "ckpt_name": ("checkpoints",),
    "lora_name": ("loras",),
    "unet_name": ("diffusion_models", "unet"),
    "vae_name": ("vae",),
    "clip_name": ("text_encoders", "clip"),
    "clip_name1": ("text_encoders", "clip"),
    "clip_name2": ("text_encoders", "clip"),
    "clip_name3": ("text_encoders", "clip"),
    "clip_name4": ("text_encoders", "clip"),
    "control_net_name": ("controlnet",),
    "style_model_name": ("style_models",),
    "gligen_name": ("gligen",),
    "hypernetwork_name": ("hypernetworks",),
    "upscale_model_name": ("upscale_models",),
    "clip_vision_name": ("clip_vision",),
    "photomaker_model_name": ("photomaker",),
    "audio_encoder_name": ("audio_encoders",),
    "config_name": ("configs",),
}
"""Input names of ComfyUI's loaders and the model folders (``/models/{folder}``) they read."""

MODEL_INPUT_NAMES: frozenset[str] = frozenset(MODEL_INPUT_FOLDERS)
"""Inputs that always name a model file (``ckpt_name``, ``lora_name``, ``unet_name``, ...)."""


def is_model_input(input_name: str, value: object) -> bool:
    """True when an input names a model file: its name is in :data:`MODEL_INPUT_NAMES`, or it
    ends in ``_name`` (or is ``model``/``name``) and the value has a model-file extension.

    The second form catches custom loaders (``model_name``, ``ipadapter_file``...) without
    mistaking ``model_name = "gpt-4o"`` of an API node for a file.
    """
    if input_name in MODEL_INPUT_NAMES:
        return True
    if not isinstance(value, str):
        return False
    if not (input_name.endswith(("_name", "_file", "_path")) or input_name in ("model", "name")):
        return False
    return model_stem(value).lower().endswith(MODEL_EXTENSIONS)


def model_stem(value: str) -> str:
    """A combo value without newer ComfyUI's annotation (``"name.safetensors [output]"``)."""
    return value.rsplit(" [", 1)[0] if value.endswith("]") else value


__all__ = [
    "MEDIA_EXTENSIONS",
    "MODEL_EXTENSIONS",
    "MODEL_INPUT_FOLDERS",
    "MODEL_INPUT_NAMES",
    "is_model_input",
    "model_stem",
]
