"""Helpers to replay the recordings of real ComfyUI 0.3.64 (``tests/data/comfyui_captures``, a
minified copy of ``/work/shared/captures``) against the fake or through the proxy.

``shape()`` reduces a JSON value to its structure (dict keys, list element shapes, scalar types)
so answers can be compared without volatile values (ids, timestamps, sizes).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import aiohttp

CAPTURES = Path(__file__).resolve().parents[2] / "data" / "comfyui_captures"


def load(name: str) -> dict[str, Any]:
    """One capture file by name (with or without ``.json``)."""
    path = CAPTURES / (name if name.endswith(".json") else name + ".json")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def shape(value: Any) -> Any:
    """Structure of a JSON value: ``{"k": shape}``, ``[shape of first item]``, type names."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return None
    return type(value).__name__


def message_type(message: aiohttp.WSMessage) -> str:
    """The capture's ``message_types_in_order`` name of a received frame."""
    if message.type == aiohttp.WSMsgType.TEXT:
        return str(json.loads(message.data)["type"])
    if message.type == aiohttp.WSMsgType.BINARY:
        (event,) = struct.unpack(">I", message.data[:4])
        return {
            1: "binary:PREVIEW_IMAGE",
            3: "binary:TEXT",
            4: "binary:PREVIEW_IMAGE_WITH_METADATA",
        }[event]
    return "closed"


def expected_types(ws_capture: dict[str, Any]) -> list[str]:
    """A capture socket's message types without the final ``closed``."""
    return [t for t in ws_capture["message_types_in_order"] if t != "closed"]


async def receive(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[aiohttp.WSMessage]:
    """Exactly ``count`` frames (the fake has already sent them when ``wait_idle`` returned)."""
    return [await ws.receive(timeout=10) for _ in range(count)]


def texts(messages: list[aiohttp.WSMessage]) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in messages if m.type == aiohttp.WSMsgType.TEXT]
