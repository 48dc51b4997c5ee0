# ruff: noqa: ASYNC240 - small blocking file calls on the loop, as ComfyUI does
"""``/view``, ``/view_metadata/{folder}``, ``/upload/image`` and ``/upload/mask`` as in ComfyUI
0.3.64 ``server.py`` (docs/comfyui-protocol.md#files; captures/run-empty-save.json,
run-empty-preview.json, run-upload-scale.json, execution-error.json).

``/view`` answers with aiohttp's ``FileResponse`` (so Range -> 206 and If-None-Match -> 304 with
an ETag, as recorded) plus ``Content-Disposition: filename="..."``; ``preview=`` and ``channel=``
re-encode with Pillow. Uploads hash-compare an existing file to detect duplicates and otherwise
rename to ``name (1).ext``; an unknown ``type`` raises (500), exactly like ComfyUI.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import mimetypes
import os
import struct
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_request import FileField
from PIL import Image, PngImagePlugin

from .paths import Paths, inside

if TYPE_CHECKING:
    from .server import FakeComfyUI

DANGEROUS_TYPES = frozenset(
    {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"}
)


def _reencode(file: str, preview: str | None, channel: str) -> tuple[bytes, str]:
    with Image.open(file) as opened:
        img: Image.Image = opened
        if preview is not None:
            info = preview.split(";")
            fmt = info[0]
            if fmt not in ("webp", "jpeg") or "a" in channel:
                fmt = "webp"
            quality = int(info[-1]) if info[-1].isdigit() else 90
            if fmt == "jpeg" or channel == "rgb":
                img = img.convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format=fmt, quality=quality)
            return buf.getvalue(), f"image/{fmt}"
        if channel == "rgb":
            if img.mode == "RGBA":
                r, g, b, _a = img.split()
                new_img = Image.merge("RGB", (r, g, b))
            else:
                new_img = img.convert("RGB")
            buf = io.BytesIO()
            new_img.save(buf, format="PNG")
            return buf.getvalue(), "image/png"
        alpha = img.split()[3] if img.mode == "RGBA" else Image.new("L", img.size, 255)
        alpha_img = Image.new("RGBA", img.size)
        alpha_img.putalpha(alpha)
        buf = io.BytesIO()
        alpha_img.save(buf, format="PNG")
        return buf.getvalue(), "image/png"


def _upload_dir(paths: Paths, kind: Any) -> tuple[str, str]:
    """``get_dir_by_type``: any other type raises (ComfyUI's UnboundLocalError -> 500)."""
    kind = kind if kind is not None else "input"
    directory = {"input": paths.input, "temp": paths.temp, "output": paths.output}.get(kind)
    if directory is None:
        raise ValueError(f"local variable 'type_dir' referenced before assignment ({kind!r})")
    return directory, kind


def _same_hash(filepath: str, data: bytes) -> bool:
    if not os.path.exists(filepath):
        return False
    with open(filepath, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest() == hashlib.sha256(data).hexdigest()


def _save_mask(paths: Paths, data: bytes, post: Any, filepath: str) -> None:
    """upload_mask's ``image_save_function``; its early returns are ignored by ComfyUI too."""
    original_ref = json.loads(post.get("original_ref"))
    filename, output_dir = paths.annotated(original_ref["filename"])
    if not filename or filename[0] == "/" or ".." in filename:
        return
    if output_dir is None:
        output_dir = paths.by_type(original_ref.get("type", "output"))
    if output_dir is None:
        return
    if original_ref.get("subfolder", "") != "":
        full = os.path.join(output_dir, original_ref["subfolder"])
        if not inside(output_dir, full):
            return
        output_dir = full
    file = os.path.join(output_dir, filename)
    if not os.path.isfile(file):
        return
    with Image.open(file) as original:
        metadata = PngImagePlugin.PngInfo()
        for key, value in getattr(original, "text", {}).items():
            metadata.add_text(key, value)
        rgba = original.convert("RGBA")
    mask = Image.open(io.BytesIO(data)).convert("RGBA")
    rgba.putalpha(mask.getchannel("A"))
    rgba.save(filepath, compress_level=4, pnginfo=metadata)


def _image_upload(paths: Paths, post: Any, mask: bool) -> web.Response:
    image = post.get("image")
    overwrite = post.get("overwrite")
    upload_dir, kind = _upload_dir(paths, post.get("type"))
    if not image:
        return web.Response(status=400)
    if not isinstance(image, FileField):
        raise TypeError("'str' object has no attribute 'file'")  # ComfyUI: image.file -> 500
    filename = image.filename
    if not filename:
        return web.Response(status=400)
    data = image.file.read()
    subfolder = post.get("subfolder", "")
    folder = os.path.join(upload_dir, os.path.normpath(subfolder))
    filepath = os.path.abspath(os.path.join(folder, filename))
    if not inside(upload_dir, filepath):
        return web.Response(status=400)
    os.makedirs(folder, exist_ok=True)
    duplicate = False
    if overwrite not in ("true", "1"):
        stem, ext = os.path.splitext(filename)
        i = 1
        while os.path.exists(filepath):
            if _same_hash(filepath, data):
                duplicate = True
                break
            filename = f"{stem} ({i}){ext}"
            filepath = os.path.join(folder, filename)
            i += 1
    if not duplicate:
        if mask:
            _save_mask(paths, data, post, filepath)
        else:
            with open(filepath, "wb") as fh:
                fh.write(data)
    return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})


def _safetensors_metadata(path: str) -> Any:
    with open(path, "rb") as fh:
        header = fh.read(8)
        if len(header) < 8:
            return None
        (length,) = struct.unpack("<Q", header)
        if length > 1024 * 1024:
            return None
        return json.loads(fh.read(length)).get("__metadata__")


def add_routes(fake: FakeComfyUI, routes: web.RouteTableDef) -> None:
    """Register the mirrored file routes."""
    paths = fake.paths

    @routes.get("/view")
    async def view_image(request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, output_dir = paths.annotated(query["filename"])
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        if output_dir is None:
            output_dir = paths.by_type(query.get("type", "output"))
        if output_dir is None:
            return web.Response(status=400)
        if "subfolder" in query:
            full = os.path.join(output_dir, query["subfolder"])
            if not inside(output_dir, full):
                return web.Response(status=403)
            output_dir = full
        filename = os.path.basename(filename)
        file = os.path.join(output_dir, filename)
        if not os.path.isfile(file):
            return web.Response(status=404)
        disposition = {"Content-Disposition": f'filename="{filename}"'}
        channel = query.get("channel", "rgba")
        if "preview" in query or channel in ("rgb", "a"):
            body, ctype = await asyncio.to_thread(
                _reencode,
                file,
                query.get("preview"),
                query.get("channel", "") if "preview" in query else channel,
            )
            return web.Response(body=body, content_type=ctype, headers=disposition)
        ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if ctype in DANGEROUS_TYPES:
            ctype = "application/octet-stream"
        return web.FileResponse(file, headers={**disposition, "Content-Type": ctype})

    @routes.get("/view_metadata/{folder_name}")
    async def view_metadata(request: web.Request) -> web.Response:
        folder = request.match_info["folder_name"]
        name = request.rel_url.query.get("filename")
        if not name or not name.endswith(".safetensors") or not paths.model_dirs(folder):
            return web.Response(status=404)
        for base in paths.model_dirs(folder):
            candidate = os.path.join(base, name)
            if inside(base, candidate) and os.path.isfile(candidate):
                meta = await asyncio.to_thread(_safetensors_metadata, candidate)
                if meta is None:
                    return web.Response(status=404)
                return web.json_response(meta)
        return web.Response(status=404)

    @routes.post("/upload/image")
    async def upload_image(request: web.Request) -> web.Response:
        post = await request.post()
        return await asyncio.to_thread(_image_upload, paths, post, False)

    @routes.post("/upload/mask")
    async def upload_mask(request: web.Request) -> web.Response:
        post = await request.post()
        return await asyncio.to_thread(_image_upload, paths, post, True)
