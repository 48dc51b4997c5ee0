"""Tiny real images made with Pillow, standing in for ComfyUI's torch tensors.

An ``IMAGE`` value is a list of RGB ``PIL.Image`` (one per batch item). Encoders mirror
``server.py``'s ``send_image`` (JPEG q95 / PNG compress_level 1, ``ImageOps.contain`` to the
preview size) and ``nodes.SaveImage`` (PNG compress_level 4 with ``prompt``/workflow text chunks).
"""

from __future__ import annotations

import io
import json
import random
import struct
from typing import Any

from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

ImageBatch = list[Image.Image]

PREVIEW_SIZE = 512  # ComfyUI's --preview-size default


def solid(width: int, height: int, color: int) -> Image.Image:
    """EmptyImage: ``color`` is 0xRRGGBB."""
    rgb = ((color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF)
    return Image.new("RGB", (width, height), rgb)


def add_noise(image: Image.Image, seed: int, strength: float) -> Image.Image:
    """ImageAddNoise: blend with seeded noise (cheap: noise tile generated from the seed)."""
    rng = random.Random(seed)
    noise = Image.frombytes("RGB", image.size, rng.randbytes(image.width * image.height * 3))
    return Image.blend(image, noise, max(0.0, min(1.0, strength)))


def blur(image: Image.Image, radius: int, sigma: float) -> Image.Image:
    """ImageBlur (gaussian); radius bounds the kernel like ComfyUI's."""
    return image.filter(ImageFilter.GaussianBlur(min(float(radius), sigma * 3)))


def scale(image: Image.Image, method: str, width: int, height: int, crop: str) -> Image.Image:
    """ImageScale: 0 keeps aspect ratio for that side; ``crop=center`` crops before scaling."""
    if width == 0 and height == 0:
        return image.copy()
    if width == 0:
        width = max(1, round(image.width * height / image.height))
    if height == 0:
        height = max(1, round(image.height * width / image.width))
    resample = {
        "nearest-exact": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "area": Image.Resampling.BOX,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }.get(method, Image.Resampling.BILINEAR)
    if crop == "center":
        return ImageOps.fit(image, (width, height), resample)
    return image.resize((width, height), resample)


def encode(image: Image.Image, fmt: str, *, max_size: int | None = None) -> bytes:
    """``PromptServer.send_image`` encoding: optional contain to ``max_size``, JPEG q95 / PNG."""
    if max_size is not None:
        image = ImageOps.contain(image, (max_size, max_size), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format=fmt, quality=95, compress_level=1)
    return buf.getvalue()


def save_png(
    image: Image.Image, path: str, metadata: dict[str, Any] | None, compress_level: int = 4
) -> None:
    """SaveImage/PreviewImage: PNG with ``prompt`` and each extra_pnginfo key as text chunks."""
    info = None
    if metadata:
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(key, json.dumps(value))
    image.save(path, pnginfo=info, compress_level=compress_level)


def latent_preview(width: int, height: int, step: int, steps: int) -> Image.Image:
    """A smooth latent2rgb-like picture of the latent size (width/8 x height/8)."""
    w, h = max(1, width // 8), max(1, height // 8)
    shade = int(255 * step / max(1, steps))
    return Image.new("RGB", (w, h), (shade // 3, shade // 2, shade))


def filler_jpeg(size: int) -> bytes:
    """A valid JPEG padded with a COM segment run so that the result is ``size`` bytes (>= ~130)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 80, 120)).save(buf, format="JPEG", quality=50)
    base = buf.getvalue()
    missing = size - len(base)
    if missing <= 0:
        return base
    pad = bytearray()
    while missing >= 4:
        body = min(missing, 65537) - 4
        pad += b"\xff\xfe" + struct.pack(">H", body + 2) + b"\0" * body
        missing -= body + 4
    # COM segments go right after SOI; 0-3 leftover bytes trail the EOI (decoders ignore them).
    return base[:2] + bytes(pad) + base[2:] + b"\0" * missing
