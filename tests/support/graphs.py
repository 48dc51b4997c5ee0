"""Workflows and images the tests submit and upload."""

from __future__ import annotations

import io
import itertools
from typing import Any

from tests.fakes.comfyui.images import solid

_colors = itertools.count(0x500000, 7919)


def next_color() -> int:
    """A colour no earlier call returned in this process: a new graph every time, so nothing
    is answered from ComfyUI's cache."""
    return next(_colors) % 0xFFFFFF


def save_graph(prefix: str = "ComfyUI") -> dict[str, Any]:
    """EmptyImage -> SaveImage (a file in output/)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": next_color()},
        },
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def png() -> bytes:
    """An 8x8 PNG of a colour no earlier call used (uploads never collide by content)."""
    buf = io.BytesIO()
    solid(8, 8, next_color()).save(buf, format="PNG")
    return buf.getvalue()
