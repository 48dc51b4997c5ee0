"""Running one prompt: a port of ``PromptExecutor.execute`` and ``execution.execute`` (0.3.64).

Message order per prompt, as in every run-*.json capture: ``execution_start``,
``execution_cached`` (node ids of the prompt whose outputs are cached, in prompt order), then for
each node chosen by :class:`ExecutionList` (ComfyUI's ``ux_friendly_pick_node`` order):
``progress_state`` (running) -> ``executing`` -> [progress hooks] -> ``executed`` (if it has UI
output) -> ``progress_state`` (finished). A cached output node only replays ``executed`` and a
finished ``progress_state`` (integer values). Then ``execution_success`` /
``execution_error`` / ``execution_interrupted``. Targeted events go to ``client_id`` only;
``progress``, ``progress_state``, previews and ``execution_interrupted`` are broadcast when the
prompt has no ``client_id`` (docs/comfyui-protocol.md#server-to-client-json-messages,
docs/comfyui-protocol.md#binary-frames, origin-and-ws-edge-cases.json).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from . import images
from .execution import NODE_FUNCTIONS
from .nodes import NodeRegistry
from .paths import Paths
from .websocket import SocketTable, encode_preview, encode_preview_with_metadata, encode_text


class InterruptProcessingException(Exception):
    """``comfy.model_management.InterruptProcessingException``."""


def is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], (int, float))
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def _full_type_name(klass: type) -> str:
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"


def _format_value(x: Any) -> Any:
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


@dataclass
class CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


@dataclass
class OutputCache:
    """The "classic" output cache: keyed by input signature, trimmed to the current prompt."""

    entries: dict[str, CacheEntry] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # node id -> signature (current prompt)

    def set_prompt(self, registry: NodeRegistry, paths: Paths, prompt: dict[str, Any]) -> None:
        self.keys = {}
        for node_id in prompt:
            self._signature(registry, paths, prompt, node_id)
        wanted = set(self.keys.values())
        self.entries = {k: v for k, v in self.entries.items() if k in wanted}

    def _signature(
        self, registry: NodeRegistry, paths: Paths, prompt: dict[str, Any], node_id: str
    ) -> str:
        if node_id in self.keys:
            return self.keys[node_id]
        node = prompt[node_id]
        node_class = registry.get(node["class_type"])
        parts: list[Any] = [node["class_type"], self._is_changed(paths, node_class, node)]
        if node_class is not None and node_class.has_unique_id:
            parts.append(node_id)
        for name in sorted(node["inputs"]):
            value = node["inputs"][name]
            if is_link(value) and value[0] in prompt:
                parts.append([name, self._signature(registry, paths, prompt, value[0]), value[1]])
            else:
                parts.append([name, value])
        sig = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
        self.keys[node_id] = sig
        return sig

    @staticmethod
    def _is_changed(paths: Paths, node_class: Any, node: dict[str, Any]) -> Any:
        kind = getattr(node_class, "is_changed", "")
        if kind == "always":
            return time.time_ns()
        if kind == "file":
            path = paths.annotated_input_path(str(node["inputs"].get("image")))
            try:
                with open(path, "rb") as fh:
                    return hashlib.sha256(fh.read()).hexdigest()
            except OSError:
                return "missing"
        return None

    def get(self, node_id: str) -> CacheEntry | None:
        key = self.keys.get(node_id)
        return self.entries.get(key) if key is not None else None

    def set(self, node_id: str, entry: CacheEntry) -> None:
        self.entries[self.keys[node_id]] = entry


class ExecutionList:
    """``comfy_execution.graph.ExecutionList`` (topological order + UX-friendly pick)."""

    def __init__(
        self,
        prompt: dict[str, Any],
        is_output: Callable[[str], bool],
        is_cached: Callable[[str], bool],
    ) -> None:
        self.prompt = prompt
        self.is_output = is_output
        self.is_cached = is_cached
        self.pending: dict[str, bool] = {}
        self.block_count: dict[str, int] = {}
        self.blocking: dict[str, dict[str, dict[Any, bool]]] = {}

    def add_node(self, node_id: str) -> None:
        stack = [node_id]
        links: list[tuple[str, Any, str]] = []
        while stack:
            uid = stack.pop()
            if uid in self.pending:
                continue
            self.pending[uid] = True
            self.block_count[uid] = 0
            self.blocking[uid] = {}
            for value in self.prompt[uid]["inputs"].values():
                if is_link(value):
                    from_id, socket = value
                    if not self.is_cached(from_id):
                        stack.append(from_id)
                    links.append((from_id, socket, uid))
        for from_id, socket, to_id in links:
            if not self.is_cached(from_id):
                self.add_node(from_id)
                if to_id not in self.blocking[from_id]:
                    self.blocking[from_id][to_id] = {}
                    self.block_count[to_id] += 1
                self.blocking[from_id][to_id][socket] = True

    def is_empty(self) -> bool:
        return not self.pending

    def stage(self) -> str:
        ready = [n for n in self.pending if self.block_count[n] == 0]
        for n in ready:
            if self.is_output(n):
                return n
        for n in ready:
            if any(self.is_output(b) for b in self.blocking[n]):
                return n
        for n in ready:
            if any(self.is_output(b2) for b in self.blocking[n] for b2 in self.blocking[b]):
                return n
        return ready[0]

    def complete(self, node_id: str) -> None:
        del self.pending[node_id]
        for to_id in self.blocking.pop(node_id):
            self.block_count[to_id] -= 1


class ProgressRegistry:
    """``comfy_execution.progress.ProgressRegistry`` + ``WebUIProgressHandler``."""

    def __init__(self, prompt_id: str, send: Callable[[dict[str, Any]], Any]) -> None:
        self.prompt_id = prompt_id
        self.nodes: dict[str, dict[str, Any]] = {}
        self._send = send

    def _entry(self, node_id: str) -> dict[str, Any]:
        return self.nodes.setdefault(node_id, {"state": "pending", "value": 0, "max": 1})

    def message(self) -> dict[str, Any]:
        active = {
            nid: {
                "value": st["value"],
                "max": st["max"],
                "state": st["state"],
                "node_id": nid,
                "prompt_id": self.prompt_id,
                "display_node_id": nid,
                "parent_node_id": None,
                "real_node_id": nid,
            }
            for nid, st in self.nodes.items()
            if st["state"] != "pending"
        }
        return {"prompt_id": self.prompt_id, "nodes": active}

    async def start(self, node_id: str) -> None:
        self._entry(node_id).update(state="running", value=0.0, max=1.0)
        await self._send(self.message())

    async def update(self, node_id: str, value: float, total: float) -> None:
        self._entry(node_id).update(state="running", value=value, max=total)
        await self._send(self.message())

    async def finish(self, node_id: str) -> None:
        entry = self._entry(node_id)
        entry.update(state="finished", value=entry["max"])
        await self._send(self.message())


class _NodeFailure(Exception):
    def __init__(self, node_id: str, error: dict[str, Any], exc: BaseException) -> None:
        super().__init__(node_id)
        self.node_id = node_id
        self.error = error
        self.exc = exc


class Executor:
    """Executes prompts one at a time; holds ComfyUI's ``server.client_id``/``last_node_id``."""

    def __init__(
        self,
        registry: NodeRegistry,
        paths: Paths,
        sockets: SocketTable,
        *,
        preview_method: str = "latent2rgb",
    ) -> None:
        self.registry = registry
        self.paths = paths
        self.sockets = sockets
        self.preview_method = preview_method
        self.cache = OutputCache()
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.interrupted = False
        self.status_messages: list[tuple[str, dict[str, Any]]] = []
        self.history_result: dict[str, Any] = {}
        self.success = True
        self.gate: Callable[[str], Any] | None = None
        self.ran: dict[str, dict[str, dict[str, Any]]] = {}
        """Fake only: prompt id -> node id -> the inputs the node function was called with
        (validated, converted, links resolved): what ComfyUI would have run."""

    async def add_message(self, event: str, data: dict[str, Any], *, broadcast: bool) -> None:
        data = {**data, "timestamp": now_ms()}
        self.status_messages.append((event, data))
        if self.client_id is not None or broadcast:
            await self.sockets.send_json(event, data, self.client_id)

    async def execute(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        extra_data: dict[str, Any],
        execute_outputs: list[str],
    ) -> None:
        self.interrupted = False
        self.client_id = extra_data.get("client_id")
        self.status_messages = []
        self.success = True
        await self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        self.cache.set_prompt(self.registry, self.paths, prompt)
        cached = [nid for nid in prompt if self.cache.get(nid) is not None]
        current_outputs = list(prompt)
        await self.add_message(
            "execution_cached", {"nodes": cached, "prompt_id": prompt_id}, broadcast=False
        )
        if self.gate is not None:
            await self.gate(prompt_id)

        progress = ProgressRegistry(
            prompt_id, lambda msg: self.sockets.send_json("progress_state", msg, self.client_id)
        )
        ui_outputs: dict[str, dict[str, Any]] = {}
        executed: list[str] = []
        results: dict[str, tuple[Any, ...]] = {}

        def is_output(nid: str) -> bool:
            node_class = self.registry.get(prompt[nid]["class_type"])
            return bool(node_class and node_class.output_node)

        elist = ExecutionList(prompt, is_output, lambda nid: self.cache.get(nid) is not None)
        for nid in execute_outputs:
            elist.add_node(nid)
        try:
            while not elist.is_empty():
                nid = elist.stage()
                await self._run_node(
                    prompt, prompt_id, extra_data, nid, progress, ui_outputs, executed, results
                )
                elist.complete(nid)
                await asyncio.sleep(0)  # let HTTP handlers (interrupt, queue) in between nodes
        except _NodeFailure as failure:
            self.success = False
            await self._report_failure(prompt, prompt_id, failure, executed, current_outputs)
        else:
            await self.add_message("execution_success", {"prompt_id": prompt_id}, broadcast=False)
        self.history_result = {
            "outputs": {nid: ui["output"] for nid, ui in ui_outputs.items()},
            "meta": {nid: ui["meta"] for nid, ui in ui_outputs.items()},
        }
        self.last_node_id = None

    async def _run_node(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        extra_data: dict[str, Any],
        nid: str,
        progress: ProgressRegistry,
        ui_outputs: dict[str, dict[str, Any]],
        executed: list[str],
        results: dict[str, tuple[Any, ...]],
    ) -> None:
        node = prompt[nid]
        cached = self.cache.get(nid)
        if cached is not None:
            if self.client_id is not None:
                output = (cached.ui or {}).get("output")
                await self.sockets.send_json(
                    "executed",
                    {
                        "node": nid,
                        "display_node": nid,
                        "output": output,
                        "prompt_id": prompt_id,
                    },
                    self.client_id,
                )
                if cached.ui is not None:
                    ui_outputs[nid] = cached.ui
            await progress.finish(nid)
            results[nid] = cached.outputs
            return
        inputs: dict[str, Any] | None = None
        try:
            await progress.start(nid)
            inputs = self._inputs(prompt, nid, results)
            if self.client_id is not None:
                self.last_node_id = nid
                await self.sockets.send_json(
                    "executing",
                    {
                        "node": nid,
                        "display_node": nid,
                        "prompt_id": prompt_id,
                    },
                    self.client_id,
                )
            self._check_interrupt()
            ctx = _Context(self, progress, prompt, prompt_id, extra_data, nid)
            self.ran.setdefault(prompt_id, {})[nid] = dict(inputs)
            outputs, ui = await NODE_FUNCTIONS[node["class_type"]](ctx, inputs)
        except InterruptProcessingException as exc:
            raise _NodeFailure(nid, {"node_id": nid}, exc) from exc
        except Exception as exc:
            typ, _, tb = sys.exc_info()
            assert typ is not None
            formatted = {}
            if inputs is not None:
                formatted = {
                    name: [_format_value(v)] for name, v in inputs.items() if name in node["inputs"]
                }
            raise _NodeFailure(
                nid,
                {
                    "node_id": nid,
                    "exception_message": f"{exc}\n",
                    "exception_type": _full_type_name(typ),
                    "traceback": traceback.format_tb(tb),
                    "current_inputs": formatted,
                },
                exc,
            ) from exc
        if ui:
            entry = {
                "meta": {
                    "node_id": nid,
                    "display_node": nid,
                    "parent_node": None,
                    "real_node_id": nid,
                },
                "output": ui,
            }
            ui_outputs[nid] = entry
            if self.client_id is not None:
                await self.sockets.send_json(
                    "executed",
                    {
                        "node": nid,
                        "display_node": nid,
                        "output": ui,
                        "prompt_id": prompt_id,
                    },
                    self.client_id,
                )
        results[nid] = outputs
        self.cache.set(nid, CacheEntry(outputs, ui_outputs.get(nid)))
        await progress.finish(nid)
        executed.append(nid)

    def _inputs(
        self, prompt: dict[str, Any], nid: str, results: dict[str, tuple[Any, ...]]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # get_input_data: only declared inputs reach the node (others are ignored).
        node_class = self.registry.get(prompt[nid]["class_type"])
        declared = {n for s in node_class.inputs().values() for n in s} if node_class else set()
        for name, value in prompt[nid]["inputs"].items():
            if name not in declared:
                continue
            if is_link(value):
                source = results.get(value[0])
                if source is None:  # a cached ancestor that was not re-run
                    entry = self.cache.get(value[0])
                    assert entry is not None
                    source = entry.outputs
                out[name] = source[int(value[1])]
            else:
                out[name] = value
        return out

    def _check_interrupt(self) -> None:
        if self.interrupted:
            self.interrupted = False
            raise InterruptProcessingException

    async def _report_failure(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        failure: _NodeFailure,
        executed: list[str],
        current_outputs: list[str],
    ) -> None:
        base = {
            "prompt_id": prompt_id,
            "node_id": failure.node_id,
            "node_type": prompt[failure.node_id]["class_type"],
            "executed": list(executed),
        }
        if isinstance(failure.exc, InterruptProcessingException):
            await self.add_message("execution_interrupted", base, broadcast=True)
            return
        await self.add_message(
            "execution_error",
            {
                **base,
                "exception_message": failure.error["exception_message"],
                "exception_type": failure.error["exception_type"],
                "traceback": failure.error["traceback"],
                "current_inputs": failure.error["current_inputs"],
                "current_outputs": current_outputs,
            },
            broadcast=False,
        )

    async def send_progress(
        self,
        progress: ProgressRegistry,
        prompt_id: str,
        node_id: str,
        value: float,
        total: float,
        preview: tuple[str, Image.Image, int | None] | None,
    ) -> None:
        """main.py's progress hook + ``WebUIProgressHandler.update_handler``."""
        self._check_interrupt()
        await progress.update(node_id, value, total)
        metadata_client = self.sockets.supports_preview_metadata(self.client_id)
        encoded: bytes | None = None
        if preview is not None:
            fmt, img, max_size = preview
            encoded = await asyncio.to_thread(images.encode, img, fmt, max_size=max_size)
            if metadata_client:
                await self.sockets.send_bytes(
                    encode_preview_with_metadata(
                        encoded,
                        {
                            "node_id": node_id,
                            "prompt_id": prompt_id,
                            "display_node_id": node_id,
                            "parent_node_id": None,
                            "real_node_id": node_id,
                            "image_type": "image/png" if fmt == "PNG" else "image/jpeg",
                        },
                    ),
                    self.client_id,
                )
        await self.sockets.send_json(
            "progress",
            {
                "value": value,
                "max": total,
                "prompt_id": prompt_id,
                "node": node_id,
            },
            self.client_id,
        )
        if preview is not None and encoded is not None and not metadata_client:
            await self.sockets.send_bytes(encode_preview(encoded, preview[0]), self.client_id)


class _Context:
    """:class:`execution.NodeContext` for one node run."""

    def __init__(
        self,
        executor: Executor,
        progress: ProgressRegistry,
        prompt: dict[str, Any],
        prompt_id: str,
        extra_data: dict[str, Any],
        node_id: str,
    ) -> None:
        self._executor = executor
        self._progress = progress
        self.paths = executor.paths
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.extra_data = extra_data
        self.node_id = node_id
        method = extra_data.get("preview_method", executor.preview_method)
        self.preview_enabled = method not in ("none", None)

    async def progress(
        self, value: float, total: float, preview: tuple[str, Image.Image, int | None] | None
    ) -> None:
        await self._executor.send_progress(
            self._progress, self.prompt_id, self.node_id, value, total, preview
        )

    async def progress_text(self, text: str) -> None:
        await self._executor.sockets.send_bytes(encode_text(self.node_id, text), None)
