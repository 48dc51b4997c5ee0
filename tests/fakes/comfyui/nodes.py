"""Node definitions of the fake: the ``/object_info`` data and what validation needs to know.

The definitions are copied from real ComfyUI 0.3.64 answers (captures/http-basic.json and
run-tiny-model-ksampler.json, ``selected_entries``; ImageBlur written from
``nodes_post_processing``)
into ``tests/data/comfyui_object_info.json``. Real ComfyUI registers 478 classes; the fake only
the 16 it can execute (Preview3D and Preview3DAnimation written from ComfyUI's source) plus 9
loader stubs the 1.27 frontend's model library looks up (they pass linked inputs through); a
graph using any other class is rejected like an unknown node.
Combo lists that depend on files are filled per request, as ComfyUI does: LoadImage's ``image``
lists the input directory, CheckpointLoaderSimple's ``ckpt_name`` the checkpoints folder.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import Paths

DATA_FILE = Path(__file__).resolve().parents[2] / "data" / "comfyui_object_info.json"
#: More classes, written from ComfyUI 0.3.64's source as its ``/object_info`` renders them:
#: the core primitives (V3 schema: ``comfy_extras/nodes_primitive.py``), LoadAudio (legacy
#: list combo with ``audio_upload``), LoadVideo (V3 ``["COMBO", {"options", "video_upload"}]``)
#: and PreviewAny (an output node showing whatever value it is given).
MORE_FILE = DATA_FILE.with_name("comfyui_object_info_more.json")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".aiff", ".aif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".3gp")
#: combo inputs listing a model folder (the loaders the 1.27 frontend's model library expects).
MODEL_COMBOS: dict[str, dict[str, str]] = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "ImageOnlyCheckpointLoader": {"ckpt_name": "checkpoints"},
    "LoraLoader": {"lora_name": "loras"},
    "LoraLoaderModelOnly": {"lora_name": "loras"},
    "VAELoader": {"vae_name": "vae"},
    "ControlNetLoader": {"control_net_name": "controlnet"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "UpscaleModelLoader": {"model_name": "upscale_models"},
    "StyleModelLoader": {"style_model_name": "style_models"},
    "GLIGENLoader": {"gligen_name": "gligen"},
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class NodeClass:
    """What ``execution.py`` reads from a node class (INPUT_TYPES, RETURN_TYPES, OUTPUT_NODE...)."""

    name: str
    definition: dict[str, Any]
    #: input names that ``VALIDATE_INPUTS`` takes over (skips the combo check), as in LoadImage.
    validate_inputs: tuple[str, ...] = ()
    #: ``IS_CHANGED`` kind: "" (none), "file" (LoadImage hashes its file), "always" (time.time()).
    is_changed: str = ""

    @property
    def output_node(self) -> bool:
        return bool(self.definition.get("output_node"))

    @property
    def return_types(self) -> tuple[Any, ...]:
        """A tuple, as ``RETURN_TYPES`` (an index past it: "tuple index out of range")."""
        return tuple(self.definition.get("output", []))

    @property
    def has_unique_id(self) -> bool:
        hidden = self.definition["input"].get("hidden", {})
        return "UNIQUE_ID" in hidden.values()

    def inputs(self) -> dict[str, dict[str, Any]]:
        """``INPUT_TYPES()`` sections: required / optional / hidden."""
        return dict(self.definition["input"])


def _load() -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = {}
    for path in (DATA_FILE, MORE_FILE):
        with open(path, encoding="utf-8") as fh:
            data.update(json.load(fh))
    return data


def _preview_3d(name: str, display_name: str) -> dict[str, Any]:
    """``Preview3D`` / ``Preview3DAnimation`` of ComfyUI 0.3.64, written from
    ``comfy_extras/nodes_load_3d.py`` (legacy nodes: ``model_file`` STRING, optional
    ``camera_info`` LOAD3D_CAMERA, OUTPUT_NODE, EXPERIMENTAL) as ``/object_info`` renders them.
    In the builtin policy's base allow list; their UI output echoes ``camera_info`` verbatim."""
    return {
        "input": {
            "required": {"model_file": ["STRING", {"default": "", "multiline": False}]},
            "optional": {"camera_info": ["LOAD3D_CAMERA", {}]},
        },
        "input_order": {"required": ["model_file"], "optional": ["camera_info"]},
        "output": [],
        "output_is_list": [],
        "output_name": [],
        "name": name,
        "display_name": display_name,
        "description": "",
        "python_module": "comfy_extras.nodes_load_3d",
        "category": "3d",
        "output_node": True,
        "experimental": True,
    }


_DEFINITIONS = {
    **_load(),
    "Preview3D": _preview_3d("Preview3D", "Preview 3D"),
    "Preview3DAnimation": _preview_3d("Preview3DAnimation", "Preview 3D - Animation"),
}
_SPECIAL: dict[str, dict[str, Any]] = {
    "LoadImage": {"validate_inputs": ("image",), "is_changed": "file"},
    "LoadAudio": {"validate_inputs": ("audio",), "is_changed": "file"},
    "SaveImageWebsocket": {"is_changed": "always"},
}


class NodeRegistry:
    """``nodes.NODE_CLASS_MAPPINGS`` of the fake, bound to one directory layout."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.classes: dict[str, NodeClass] = {
            name: NodeClass(name, definition, **_SPECIAL.get(name, {}))
            for name, definition in _DEFINITIONS.items()
        }

    def get(self, class_type: Any) -> NodeClass | None:
        if not isinstance(class_type, str):
            return None
        return self.classes.get(class_type)

    def definition(self, name: str) -> dict[str, Any]:
        """One ``/object_info`` entry with the file-dependent combos filled in."""
        node = copy.deepcopy(self.classes[name].definition)
        required = node["input"]["required"]
        if name == "LoadImage":
            required["image"][0] = self.input_images()
        elif name == "LoadAudio":  # folder_paths.filter_files_content_types(..., audio, video)
            required["audio"][0] = self.input_files(AUDIO_EXTENSIONS + VIDEO_EXTENSIONS)
        elif name == "LoadVideo":
            required["file"][1]["options"] = self.input_files(VIDEO_EXTENSIONS)
        for input_name, folder in MODEL_COMBOS.get(name, {}).items():
            required[input_name][0] = self.paths.model_files(folder)
        return node

    def object_info(self) -> dict[str, Any]:
        return {name: self.definition(name) for name in self.classes}

    def input_images(self) -> list[str]:
        """LoadImage's list: image files at the top of ``input/``, sorted."""
        return self.input_files(IMAGE_EXTENSIONS)

    def input_files(self, extensions: tuple[str, ...]) -> list[str]:
        """Files at the top of ``input/`` with one of ``extensions``, sorted."""
        try:
            names = [
                entry.name
                for entry in os.scandir(self.paths.input)
                if entry.is_file() and entry.name.lower().endswith(extensions)
            ]
        except FileNotFoundError:
            return []
        return sorted(names)
