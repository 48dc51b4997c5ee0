"""What the fake's nodes do: cheap Pillow stand-ins for ComfyUI's node functions.

Each function receives a :class:`NodeContext` and the node's resolved inputs and returns
``(outputs_tuple, ui_dict_or_None)``, like ComfyUI's ``get_output_data``. Deliberate differences
from real ComfyUI: there is no diffusion (KSampler/VAEDecode produce seeded noise, CLIP/model
values are opaque strings) and everything is fast; what is observable over the wire (file names,
UI dicts, progress/preview/text frames, error types) follows the captures:
run-empty-save.json (SaveImage naming), run-empty-preview.json (PreviewImage ``temp``),
run-upload-scale.json (LoadImage/ImageScale), run-ws-binary.json (SaveImageWebsocket),
run-progress-text.json (GetImageSize type-3 text), run-tiny-model-ksampler.json (KSampler previews),
execution-error.json (LoadImage of a non-image raises ``PIL.UnidentifiedImageError``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import string
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from PIL import Image, ImageOps

from . import images
from .images import ImageBatch
from .paths import Paths, inside

NodeResult = tuple[tuple[Any, ...], dict[str, Any] | None]


class NodeContext(Protocol):
    """What a running node may use (the executor implements it)."""

    paths: Paths
    node_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    preview_enabled: bool

    async def progress(
        self, value: float, total: float, preview: tuple[str, Image.Image, int | None] | None
    ) -> None:
        """``ProgressBar.update_absolute`` -> the ``progress`` hook of main.py."""

    async def progress_text(self, text: str) -> None:
        """``PromptServer.send_progress_text`` (type-3 frame, broadcast)."""


async def empty_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    width, height, batch, color = i["width"], i["height"], i["batch_size"], i["color"]
    one = images.solid(width, height, color)
    return ([one.copy() for _ in range(batch)],), None


async def image_add_noise(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    batch: ImageBatch = i["image"]
    seed, strength = int(i["seed"]), float(i["strength"])
    out = await asyncio.to_thread(
        lambda: [images.add_noise(img, seed + n, strength) for n, img in enumerate(batch)]
    )
    return (out,), None


async def image_blur(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    batch: ImageBatch = i["image"]
    out = await asyncio.to_thread(
        lambda: [images.blur(img, i["blur_radius"], i["sigma"]) for img in batch]
    )
    return (out,), None


async def image_scale(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    batch: ImageBatch = i["image"]
    out = await asyncio.to_thread(
        lambda: [
            images.scale(img, i["upscale_method"], i["width"], i["height"], i["crop"])
            for img in batch
        ]
    )
    return (out,), None


async def get_image_size(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    batch: ImageBatch = i["image"]
    width, height = batch[0].size
    await ctx.progress_text(f"width: {width}, height: {height}\n batch size: {len(batch)}")
    return (width, height, len(batch)), None


def _load_image(path: str) -> tuple[ImageBatch, ImageBatch]:
    with Image.open(path) as opened:  # raises PIL.UnidentifiedImageError for non-images
        img = ImageOps.exif_transpose(opened) or opened
        rgb = img.convert("RGB")
        if "A" in img.getbands():
            mask = Image.eval(img.getchannel("A"), lambda a: 255 - a)
        else:
            mask = Image.new("L", (64, 64), 0)
    return [rgb], [mask]


async def load_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    path = ctx.paths.annotated_input_path(i["image"])
    rgb, mask = await asyncio.to_thread(_load_image, path)
    return (rgb, mask), None


def _save_path(output_dir: str, prefix: str, width: int, height: int) -> tuple[str, str, int, str]:
    """``folder_paths.get_save_image_path``: (folder, stem, counter, subfolder)."""
    if "%" in prefix:
        now = time.localtime()
        for key, value in (
            ("%width%", str(width)),
            ("%height%", str(height)),
            ("%year%", str(now.tm_year)),
            ("%month%", f"{now.tm_mon:02}"),
            ("%day%", f"{now.tm_mday:02}"),
            ("%hour%", f"{now.tm_hour:02}"),
            ("%minute%", f"{now.tm_min:02}"),
            ("%second%", f"{now.tm_sec:02}"),
        ):
            prefix = prefix.replace(key, value)
    subfolder = os.path.dirname(os.path.normpath(prefix))
    stem = os.path.basename(os.path.normpath(prefix))
    folder = os.path.join(output_dir, subfolder)
    if not inside(output_dir, folder):
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            "\n full_output_folder: "
            + os.path.abspath(folder)
            + "\n         output_dir: "
            + output_dir
            + "\n         commonpath: "
            + os.path.commonpath((output_dir, os.path.abspath(folder)))
        )

    def number(name: str) -> tuple[int, str]:
        plen = len(stem)
        try:
            digits = int(name[plen + 1 :].split("_", maxsplit=1)[0])
        except ValueError:
            digits = 0
        return digits, name[: plen + 1]

    try:
        counter = (
            max(
                n
                for n, head in map(number, os.listdir(folder))
                if os.path.normcase(head[:-1]) == os.path.normcase(stem) and head[-1:] == "_"
            )
            + 1
        )
    except ValueError:
        counter = 1
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        counter = 1
    return folder, stem, counter, subfolder


def _save_batch(
    batch: ImageBatch,
    output_dir: str,
    prefix: str,
    kind: str,
    metadata: dict[str, Any] | None,
    compress_level: int,
) -> dict[str, Any]:
    folder, stem, counter, subfolder = _save_path(output_dir, prefix, *batch[0].size)
    results = []
    for number, img in enumerate(batch):
        name = f"{stem.replace('%batch_num%', str(number))}_{counter:05}_.png"
        images.save_png(img, os.path.join(folder, name), metadata, compress_level)
        results.append({"filename": name, "subfolder": subfolder, "type": kind})
        counter += 1
    return {"images": results}


def _png_metadata(ctx: NodeContext) -> dict[str, Any]:
    meta: dict[str, Any] = {"prompt": ctx.prompt}
    pnginfo = ctx.extra_data.get("extra_pnginfo")
    if isinstance(pnginfo, dict):
        meta.update(pnginfo)
    return meta


async def save_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    ui = await asyncio.to_thread(
        _save_batch,
        i["images"],
        ctx.paths.output,
        i["filename_prefix"],
        "output",
        _png_metadata(ctx),
        4,
    )
    return (), ui


async def preview_image(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    prefix = "ComfyUI_temp_" + "".join(random.choice(string.ascii_lowercase) for _ in range(5))
    ui = await asyncio.to_thread(
        _save_batch, i["images"], ctx.paths.temp, prefix, "temp", _png_metadata(ctx), 1
    )
    return (), ui


async def preview_3d(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    """``Preview3D.process``: the UI output is ``{"result": [model_file, camera_info]}``, both
    exactly as given. ``camera_info`` (LOAD3D_CAMERA) is not type-checked by validation, so a
    literal object in the prompt comes back verbatim in ``executed`` and in history."""
    return (), {"result": [i["model_file"], i.get("camera_info")]}


async def save_image_websocket(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    batch: ImageBatch = i["images"]
    for step, img in enumerate(batch):
        await ctx.progress(step, len(batch), ("PNG", img, None))
    return (), None


async def checkpoint_loader(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    name = i["ckpt_name"]
    return (f"MODEL({name})", f"CLIP({name})", f"VAE({name})"), None


async def clip_text_encode(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return ([("CONDITIONING", i["text"])],), None


async def empty_latent(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    latent = {"width": i["width"], "height": i["height"], "batch": i["batch_size"], "seed": 0}
    return (latent,), None


async def ksampler(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    latent = dict(i["latent_image"])
    steps = int(i["steps"])
    for step in range(steps):
        preview = None
        if ctx.preview_enabled:
            small = images.latent_preview(latent["width"], latent["height"], step + 1, steps)
            preview = ("JPEG", small, images.PREVIEW_SIZE)
        await ctx.progress(step + 1, steps, preview)
    latent["seed"] = int(i["seed"])
    return (latent,), None


async def vae_decode(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    latent = i["samples"]

    def decode() -> ImageBatch:
        base = images.solid(latent["width"], latent["height"], 0x101010)
        return [images.add_noise(base, latent["seed"] + n, 0.1) for n in range(latent["batch"])]

    return (await asyncio.to_thread(decode),), None


def loader_stub(
    outputs: list[str],
) -> Callable[[NodeContext, dict[str, Any]], Awaitable[NodeResult]]:
    """Loader nodes the fake only needs to list: outputs pass a linked input of the same type
    through, others are opaque ``TYPE(widget)`` strings."""

    async def run(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
        names = [str(v) for v in i.values() if isinstance(v, str)]
        linked = {str(v).split("(", 1)[0]: v for v in i.values() if isinstance(v, str)}
        return tuple(linked.get(t, f"{t}({','.join(names)})") for t in outputs), None

    return run


async def primitive(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    """``comfy_extras/nodes_primitive.py``: the (validated, converted) ``value``, as output 0."""
    return (i["value"],), None


def _read_input_file(ctx: NodeContext, name: str) -> str:
    """Open the file ``get_annotated_filepath`` names, as the loaders do (a missing one
    raises ``FileNotFoundError``, like ComfyUI's); an opaque handle naming it."""
    path = ctx.paths.annotated_input_path(name)
    with open(path, "rb") as fh:
        fh.read(1)
    return os.path.relpath(path, ctx.paths.root).replace(os.sep, "/")


async def load_audio(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return (f"AUDIO({await asyncio.to_thread(_read_input_file, ctx, i['audio'])})",), None


async def load_video(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    return (f"VIDEO({await asyncio.to_thread(_read_input_file, ctx, i['file'])})",), None


async def preview_any(ctx: NodeContext, i: dict[str, Any]) -> NodeResult:
    """``comfy_extras/nodes_preview_any.py``: the value as text in the UI output."""
    source = i.get("source")
    value = "None"
    if isinstance(source, str):
        value = source
    elif isinstance(source, int | float | bool):
        value = str(source)
    elif source is not None:
        try:
            value = json.dumps(source)
        except (TypeError, ValueError):
            value = str(source)
    return (), {"text": [value]}


NodeFunction = Callable[[NodeContext, dict[str, Any]], Awaitable[NodeResult]]

NODE_FUNCTIONS: dict[str, NodeFunction] = {
    "PrimitiveInt": primitive,
    "PrimitiveFloat": primitive,
    "PrimitiveString": primitive,
    "PrimitiveStringMultiline": primitive,
    "PrimitiveBoolean": primitive,
    "LoadAudio": load_audio,
    "LoadVideo": load_video,
    "PreviewAny": preview_any,
    "EmptyImage": empty_image,
    "ImageAddNoise": image_add_noise,
    "ImageBlur": image_blur,
    "ImageScale": image_scale,
    "GetImageSize": get_image_size,
    "LoadImage": load_image,
    "SaveImage": save_image,
    "PreviewImage": preview_image,
    "SaveImageWebsocket": save_image_websocket,
    "Preview3D": preview_3d,
    "Preview3DAnimation": preview_3d,
    "CheckpointLoaderSimple": checkpoint_loader,
    "CLIPTextEncode": clip_text_encode,
    "EmptyLatentImage": empty_latent,
    "KSampler": ksampler,
    "VAEDecode": vae_decode,
    "ImageOnlyCheckpointLoader": loader_stub(["MODEL", "CLIP_VISION", "VAE"]),
    "LoraLoader": loader_stub(["MODEL", "CLIP"]),
    "LoraLoaderModelOnly": loader_stub(["MODEL"]),
    "VAELoader": loader_stub(["VAE"]),
    "ControlNetLoader": loader_stub(["CONTROL_NET"]),
    "UNETLoader": loader_stub(["MODEL"]),
    "UpscaleModelLoader": loader_stub(["UPSCALE_MODEL"]),
    "StyleModelLoader": loader_stub(["STYLE_MODEL"]),
    "GLIGENLoader": loader_stub(["GLIGEN"]),
}
