"""What each instance can run, read from its ``/object_info``: node types and model lists.

ComfyUI's ``/object_info`` describes every node class; loaders declare their model inputs as
combos whose options are the files in the model folders (``ckpt_name`` lists ``checkpoints/``).
:class:`Capabilities` keeps the class names and, for each (class, model input), the options.

The document is large (MBs on a real install) and ComfyUI rebuilds it on every call, so it is
fetched through the workflow-policy catalog's per-instance cache (``app[CATALOG]``), which also
answers clients' ``/object_info``: one fetch per instance serves both. It is parsed again only
when the catalog holds a new copy. Refreshed every ``upstream.placement.
capabilities_refresh_seconds``, when an instance joins and when it comes back up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from proxy.comfy.names import is_model_input
from proxy.periodic import Periodic

if TYPE_CHECKING:
    from prometheus_client import Counter

log = structlog.get_logger("comfygate.upstream.capabilities")

ModelKey = tuple[str, str]
"""``(class_type, input_name)`` of a model input."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Node types and model files one instance offers."""

    nodes: frozenset[str]
    models: Mapping[ModelKey, frozenset[str]]
    """For each loader input that names a model file: the files the instance has."""
    version: object = None
    """Which ``/object_info`` copy this was parsed from (parse once per copy)."""

    def has_node(self, class_type: str) -> bool:
        return class_type in self.nodes

    def has_model(self, class_type: str, input_name: str, value: str) -> bool:
        """Whether the instance lists ``value`` for that input; True when the input is not a
        known model list there (nothing to judge by: ComfyUI will validate it)."""
        options = self.models.get((class_type, input_name))
        return options is None or value in options


def combo_options(spec: object) -> list[str] | None:
    """The options of a combo input spec, old (``[[...], {...}]``) or new (``["COMBO",
    {"options": [...]}]``) form; None for any other input type."""
    if not isinstance(spec, list) or not spec:
        return None
    head = spec[0]
    if isinstance(head, list):
        return [o for o in head if isinstance(o, str)]
    if head == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        options = spec[1].get("options")
        if isinstance(options, list):
            return [o for o in options if isinstance(o, str)]
    return None


def parse_object_info(info: Mapping[str, Any], version: object = None) -> Capabilities:
    """Capabilities from an ``/object_info`` document (unknown shapes are skipped)."""
    models: dict[ModelKey, frozenset[str]] = {}
    for class_type, definition in info.items():
        inputs = definition.get("input") if isinstance(definition, dict) else None
        if not isinstance(inputs, dict):
            continue
        for section in ("required", "optional"):
            specs = inputs.get(section)
            if not isinstance(specs, dict):
                continue
            for input_name, spec in specs.items():
                options = combo_options(spec)
                if options is None:
                    continue
                if is_model_input(input_name, options[0] if options else None):
                    models[(class_type, input_name)] = frozenset(options)
    return Capabilities(nodes=frozenset(info), models=models, version=version)


ObjectInfoSource = Callable[[str], Awaitable[tuple[object, Mapping[str, Any]] | None]]
"""Given an instance name: ``(version, document)`` of its current ``/object_info``, or None
when it could not be read."""


class CapabilityRefresher:
    """Keeps ``Instance.capabilities`` of every instance current."""

    def __init__(
        self,
        instances: Callable[[], list[Any]],
        source: ObjectInfoSource,
        *,
        interval: float,
        failures: Counter | None = None,
    ) -> None:
        """``instances``: the registry's ``pool.instances`` (objects with ``upstream`` and a
        settable ``capabilities``); ``failures``: ``Metrics.task_failures``."""
        self._instances = instances
        self._source = source
        self._loop = Periodic(
            self.refresh_all,
            interval,
            name="comfygate-capabilities",
            log=log,
            event="capabilities_refresh_failed",
            failures=failures,
        )

    async def refresh(self, name: str) -> None:
        """Read one instance's capabilities again (on join, on up, on schedule)."""
        instance = next((i for i in self._instances() if i.upstream.name == name), None)
        if instance is None:
            return
        try:
            fetched = await self._source(name)
        except Exception as exc:  # noqa: BLE001 - an unreadable instance keeps what we knew
            log.warning("capabilities_unavailable", upstream=name, error=type(exc).__name__)
            return
        if fetched is None:
            return
        version, info = fetched
        current = instance.capabilities
        if current is not None and version is not None and current.version == version:
            return
        instance.capabilities = parse_object_info(info, version)
        log.info(
            "capabilities_read",
            upstream=name,
            nodes=len(instance.capabilities.nodes),
            model_lists=len(instance.capabilities.models),
        )

    async def refresh_all(self) -> None:
        await asyncio.gather(*(self.refresh(i.upstream.name) for i in self._instances()))

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
