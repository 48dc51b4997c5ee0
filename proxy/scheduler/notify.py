"""What the gateway queue tells owners' sockets on its own (``docs/scheduler.md``).

ComfyUI broadcasts ``status`` at every change of *its* queue, and the view guard adds the
caller's held prompts to it. A change only the gateway queue sees (a prompt held, cancelled
while held, or refused by ComfyUI at release time) makes no ComfyUI event, so the replica that
made it sends the owner's sockets on this replica a ``status`` of their own: ComfyUI's last
known ``queue_remaining`` plus what that socket's user has held. A refusal also sends the owner
an ``execution_error`` (what ComfyUI sends for a prompt that failed) and leaves a failed
history entry (:func:`failed_entry`), so the prompt does not silently vanish.

Sockets held by other replicas learn it from ComfyUI's next ``status`` (every release is
one): pushing across replicas would need a channel the relays do not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from proxy.scheduler.fair import Held
from proxy.settings import SETTINGS
from proxy.state import LIFECYCLE, RelaySocket

SEND_TIMEOUT_SECONDS = 1.0
"""A socket that cannot take a small frame this fast gets none (ComfyUI's next one will do)."""


class Notifier:
    """Sends the frames of the module doc to this process's relays."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.comfy_remaining = 0
        """ComfyUI's ``queue_remaining`` as last seen (a status frame relayed, a queue read)."""

    def _sockets(self, owner: str | None) -> list[tuple[RelaySocket, str | None]]:
        """Open relays that see ``owner``'s held prompts, each with whose held it counts
        (``None``: everyone's: admins, or no isolation)."""
        settings = self.app[SETTINGS]
        out: list[tuple[RelaySocket, str | None]] = []
        for ws, principal in list(self.app[LIFECYCLE].relay_principals.items()):
            sees: str | None = principal.comfy_user
            if not settings.isolation.enabled or principal.is_admin(settings.roles):
                sees = None
            if sees is None or owner is None or sees == owner:
                out.append((ws, sees))
        return out

    async def status(self, owner: str | None, count: Any) -> None:
        """``status`` to the relays that see ``owner``'s prompts; ``count(sees)`` is the held
        count a socket shows."""
        for ws, sees in self._sockets(owner):
            held = int(await count(sees))
            frame = status_frame(self.comfy_remaining + held)
            await _send(ws, frame)

    async def refused(self, held: Held, error: Mapping[str, Any]) -> None:
        """``execution_error`` of ``held`` to its owner's relays."""
        frame = orjson.dumps({"type": "execution_error", "data": error}).decode()
        for ws, sees in self._sockets(held.owner):
            if sees is None and self.app[SETTINGS].isolation.enabled:
                continue  # an admin's socket: another user's failure is not its event
            await _send(ws, frame)


async def _send(ws: RelaySocket, frame: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
        async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
            await ws.send_str(frame)


def status_frame(remaining: int) -> str:
    return orjson.dumps(
        {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": remaining}}}}
    ).decode()


def execution_error(held: Held, answer: bytes, status: int) -> dict[str, Any]:
    """ComfyUI's ``execution_error`` for a prompt it refused at release time: its answer's
    error message and node errors (the node of the first one named), no traceback."""
    try:
        parsed = orjson.loads(answer)
    except orjson.JSONDecodeError:
        parsed = {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    error = error if isinstance(error, dict) else {}
    node_errors = parsed.get("node_errors") if isinstance(parsed, dict) else None
    node_errors = node_errors if isinstance(node_errors, dict) else {}
    node_id = next(iter(node_errors), None)
    first = node_errors.get(node_id) if node_id is not None else None
    node_type = first.get("class_type") if isinstance(first, dict) else None
    message = str(error.get("message") or f"ComfyUI refused the prompt ({status})")
    details = error.get("details")
    if details:
        message = f"{message}: {details}"
    return {
        "prompt_id": held.prompt_id,
        "node_id": node_id,
        "node_type": node_type,
        "executed": [],
        "exception_message": message,
        "exception_type": str(error.get("type") or "prompt_refused"),
        "traceback": [],
        "current_inputs": {},
        "current_outputs": {},
        "node_errors": node_errors,
        "timestamp": int(time.time() * 1000),
    }


def failed_entry(
    held: Held, number: int, body: Mapping[str, Any], error: Mapping[str, Any]
) -> dict[str, Any]:
    """The history entry ComfyUI keeps for a prompt that failed: status ``error``, not
    completed, its ``execution_start`` and ``execution_error`` messages, no outputs."""
    stamp = {"prompt_id": held.prompt_id, "timestamp": error["timestamp"]}
    extra = body.get("extra_data")
    extra = dict(extra) if isinstance(extra, dict) else {}
    if held.client_id:
        extra["client_id"] = held.client_id
    else:
        extra.pop("client_id", None)
    return {
        "prompt": [number, held.prompt_id, body.get("prompt", {}), extra, []],
        "outputs": {},
        "status": {
            "status_str": "error",
            "completed": False,
            "messages": [["execution_start", stamp], ["execution_error", dict(error)]],
        },
        "meta": {},
    }


def failed_job(prompt_id: str, entry: Mapping[str, Any], *, detail: bool) -> dict[str, Any]:
    """``/api/jobs`` shape of a :func:`failed_entry` (as ComfyUI derives it from history)."""
    number, _, prompt, extra, _ = entry["prompt"]
    error = entry["status"]["messages"][-1][1]
    job: dict[str, Any] = {
        "id": prompt_id,
        "status": "failed",
        "priority": number,
        "execution_start_time": error["timestamp"],
        "execution_end_time": error["timestamp"],
        "execution_error": error,
        "outputs_count": 0,
        "previewable_outputs_count": 0,
    }
    if detail:
        job["workflow"] = {"prompt": prompt, "extra_data": extra}
        job["outputs"] = {}
    return job


__all__ = [
    "Notifier",
    "execution_error",
    "failed_entry",
    "failed_job",
    "status_frame",
]
