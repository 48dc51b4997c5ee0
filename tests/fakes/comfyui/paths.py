"""Directory layout and path checks of the fake, imitating ComfyUI's ``folder_paths.py``.

ComfyUI keeps ``input/``, ``output/``, ``temp/``, ``user/<user_id>/`` and ``models/<folder>/``
under its
base directory; the fake puts them under ``root``. The model-folder table is the one ComfyUI 0.3.64
reports in ``/internal/folder_paths`` (captures/http-basic.json), with paths re-rooted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: folder name -> directories relative to root, in ComfyUI's order (captures/http-basic.json).
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("models/checkpoints", "output/checkpoints"),
    "configs": ("models/configs",),
    "loras": ("models/loras", "output/loras"),
    "vae": ("models/vae", "output/vae"),
    "text_encoders": ("models/text_encoders", "models/clip", "output/clip"),
    "diffusion_models": ("models/unet", "models/diffusion_models", "output/diffusion_models"),
    "clip_vision": ("models/clip_vision",),
    "style_models": ("models/style_models",),
    "embeddings": ("models/embeddings",),
    "diffusers": ("models/diffusers",),
    "vae_approx": ("models/vae_approx",),
    "controlnet": ("models/controlnet", "models/t2i_adapter"),
    "gligen": ("models/gligen",),
    "upscale_models": ("models/upscale_models",),
    "custom_nodes": ("custom_nodes",),
    "hypernetworks": ("models/hypernetworks",),
    "photomaker": ("models/photomaker",),
    "classifiers": ("models/classifiers",),
    "model_patches": ("models/model_patches",),
    "audio_encoders": ("models/audio_encoders",),
}

#: ``/experiment/models`` leaves these out (ComfyUI's model_manager skips them).
EXPERIMENT_HIDDEN = frozenset({"configs", "custom_nodes"})

MODEL_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft")


@dataclass(frozen=True)
class Paths:
    """Absolute directories of one fake (``abspath``, never ``realpath``, like ComfyUI)."""

    root: str

    @classmethod
    def create(cls, root: Path) -> Paths:
        """Make the layout under ``root`` and return it."""
        paths = cls(os.path.abspath(root))
        for sub in ("input", "output", "temp", "user/default", *_model_dirs()):
            os.makedirs(os.path.join(paths.root, sub), exist_ok=True)
        return paths

    @property
    def input(self) -> str:
        return os.path.join(self.root, "input")

    @property
    def output(self) -> str:
        return os.path.join(self.root, "output")

    @property
    def temp(self) -> str:
        return os.path.join(self.root, "temp")

    @property
    def user(self) -> str:
        return os.path.join(self.root, "user")

    def by_type(self, kind: str | None) -> str | None:
        """``folder_paths.get_directory_by_type``: output/input/temp, else None."""
        return {"output": self.output, "input": self.input, "temp": self.temp}.get(kind or "")

    def model_dirs(self, folder: str) -> list[str]:
        """Absolute directories of a model folder (empty for unknown folders)."""
        return [os.path.join(self.root, rel) for rel in MODEL_FOLDERS.get(folder, ())]

    def model_files(self, folder: str) -> list[str]:
        """``folder_paths.get_filename_list``: relative names of model files, sorted."""
        found: set[str] = set()
        exts = None if folder == "custom_nodes" else MODEL_EXTENSIONS
        for base in self.model_dirs(folder):
            for dirpath, _dirs, files in os.walk(base, followlinks=True):
                for name in files:
                    if exts is None or name.lower().endswith(exts):
                        rel = os.path.relpath(os.path.join(dirpath, name), base)
                        found.add(rel.replace(os.sep, "/"))
        return sorted(found)

    def annotated(self, name: str) -> tuple[str, str | None]:
        """``folder_paths.annotated_filepath``: ``"x.png [output]"`` -> ("x.png", output dir).

        As in ComfyUI, the tag is matched without its space but cut with it (``name[:-9]``
        for ``[output]``): ``"x.png[output]"`` names ``x.pn`` in output/."""
        for suffix, directory in (
            ("[output]", self.output),
            ("[input]", self.input),
            ("[temp]", self.temp),
        ):
            if name.endswith(suffix):
                return name[: -(len(suffix) + 1)], directory
        return name, None

    def annotated_input_path(self, name: str) -> str:
        """``folder_paths.get_annotated_filepath`` with the input dir as default."""
        name, base = self.annotated(name)
        return os.path.join(base or self.input, name)


def _model_dirs() -> list[str]:
    return [rel for rels in MODEL_FOLDERS.values() for rel in rels]


def inside(base: str, path: str) -> bool:
    """ComfyUI's ``os.path.commonpath((base, abspath(path))) == base`` check."""
    try:
        return os.path.commonpath((base, os.path.abspath(path))) == base
    except ValueError:
        return False
