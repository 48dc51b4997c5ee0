"""What of ComfyUI's catalog a role may see: pure filters over ``/object_info`` and the model lists.

No I/O, no aiohttp: the cache (:mod:`proxy.policy.catalog.cache`) and the handlers
(:mod:`proxy.policy.catalog.view`) call these on parsed JSON.

Two shapes of combo input exist in ``/object_info``
(docs/comfyui-protocol.md#node-model-and-system-metadata)::

    "ckpt_name":  [["a.safetensors", "b.ckpt"], {"tooltip": ...}]       # legacy: options first
    "unet_name":  ["COMBO", {"options": ["a.safetensors"], ...}]        # newer (V3 schema)

and the V3 dynamic combos carry whole input sections per option
(``["COMFY_DYNAMICCOMBO_V3", {"options": [{"key": ..., "inputs": {"required": {...}}}]}]``),
which are filtered recursively. Only options that name a model file (``is_model_input``) are
judged; sampler names, schedulers, dtypes... pass untouched. A combo keeps its shape and every
key but the removed options (and a ``default`` that named a removed model).

Nothing is deep-copied: a node definition without a removed option is the very object of the
upstream answer, so a filtered copy costs dicts only for the nodes that change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from proxy.policy.model import RolePolicy, is_model_input, model_folders

ObjectInfo = dict[str, Any]
"""``{ClassName: node_def}`` as ComfyUI answers ``GET /object_info``."""

_SECTIONS_SKIPPED = frozenset({"hidden"})  # PROMPT, UNIQUE_ID...: never combos


FOLDER_ALIASES: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("diffusion_models", "unet"),
    "unet": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "clip": ("text_encoders", "clip"),
}
"""ComfyUI's renamed model folders (``folder_paths.map_legacy``): one folder under two names,
judged under both, as the checker judges ``unet_name``/``clip_name`` (``MODEL_INPUT_FOLDERS``)."""


def folder_names(folder: str) -> tuple[str, ...]:
    """The names a model folder of ``/models/{folder}`` is known by in policies."""
    return FOLDER_ALIASES.get(folder, (folder,))


def allows_model(policy: RolePolicy, value: str, folders: tuple[str, ...]) -> bool:
    """A combo option judged exactly as the checker judges a submitted input value: by each of
    the principal's roles, in the folders the input reads from (``model_folders``; none for a
    custom loader's input)."""
    return policy.unrestricted or any(m.allows_model(value, folders) for m in policy.members)


# -- /object_info ------------------------------------------------------------------------------


def model_classes(info: Mapping[str, Any]) -> frozenset[str]:
    """Classes with at least one model-file option anywhere in their inputs.

    Computed once per upstream answer, so a role's copy only walks these (a few dozen of ~500).
    """
    return frozenset(
        name
        for name, node in info.items()
        if isinstance(node, Mapping) and _sections_name_models(node.get("input"))
    )


def filter_object_info(
    info: Mapping[str, Any], policy: RolePolicy, models: frozenset[str]
) -> ObjectInfo:
    """The node types ``policy`` allows, their model combos narrowed to allowed models.

    ``models`` is :func:`model_classes` of ``info``.
    """
    if policy.allows_every_model:
        models = frozenset()  # node types only: no combo needs a look
    out: ObjectInfo = {}
    for name, node in info.items():
        if not policy.allows_node(name):
            continue
        out[name] = filter_node(name, node, policy) if name in models else node
    return out


def filter_node(class_type: str, node: Any, policy: RolePolicy) -> Any:
    """One node definition with its model combos narrowed (the same object if nothing changes)."""
    if not isinstance(node, dict):
        return node
    inputs = node.get("input")
    new_inputs = _filter_sections(class_type, inputs, policy)
    if new_inputs is inputs:
        return node
    return {**node, "input": new_inputs}


def _filter_sections(class_type: str, sections: Any, policy: RolePolicy) -> Any:
    """``{"required": {...}, "optional": {...}, "hidden": {...}}`` narrowed; same object if
    unchanged."""
    if not isinstance(sections, dict):
        return sections
    changed: dict[str, Any] = {}
    for section, specs in sections.items():
        if section in _SECTIONS_SKIPPED or not isinstance(specs, dict):
            continue
        new_specs = _filter_specs(class_type, specs, policy)
        if new_specs is not specs:
            changed[section] = new_specs
    return {**sections, **changed} if changed else sections


def _filter_specs(class_type: str, specs: dict[str, Any], policy: RolePolicy) -> dict[str, Any]:
    changed: dict[str, Any] = {}
    for input_name, spec in specs.items():
        new_spec = _filter_spec(class_type, input_name, spec, policy)
        if new_spec is not spec:
            changed[input_name] = new_spec
    return {**specs, **changed} if changed else specs


def _filter_spec(class_type: str, input_name: str, spec: Any, policy: RolePolicy) -> Any:
    """One input spec (``[type_or_options, {config}]``) narrowed; same object if unchanged."""
    if not isinstance(spec, list) or not spec:
        return spec
    head = spec[0]
    config = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else None
    if isinstance(head, list):  # legacy combo: the options are the type
        kept = _filter_options(class_type, input_name, head, policy)
        if kept is head:
            return spec
        rest = spec[1:]
        if config is not None:
            rest = [_drop_removed_default(config, head, kept), *spec[2:]]
        return [kept, *rest]
    if config is None or not isinstance(config.get("options"), list):
        return spec
    options: list[Any] = config["options"]
    kept = _filter_options(class_type, input_name, options, policy)
    if kept is options:
        return spec
    new_config = _drop_removed_default({**config, "options": kept}, options, kept)
    return [head, new_config, *spec[2:]]


def _filter_options(
    class_type: str, input_name: str, options: list[Any], policy: RolePolicy
) -> list[Any]:
    """Model-file options the policy refuses removed; dynamic-combo options (dicts carrying
    ``inputs``) filtered recursively. The same list object if nothing changes."""
    kept: list[Any] = []
    changed = False
    folders = model_folders(class_type, input_name)
    for option in options:
        if isinstance(option, str):
            # SECURITY: judged exactly as the checker judges a submitted input value, so the UI
            # never offers a model that /prompt would refuse, and never lists one it hides.
            if is_model_input(input_name, option) and not allows_model(policy, option, folders):
                changed = True
                continue
        elif isinstance(option, dict) and isinstance(option.get("inputs"), dict):
            new_inputs = _filter_sections(class_type, option["inputs"], policy)
            if new_inputs is not option["inputs"]:
                kept.append({**option, "inputs": new_inputs})
                changed = True
                continue
        kept.append(option)
    return kept if changed else options


def _drop_removed_default(
    config: dict[str, Any], before: list[Any], after: list[Any]
) -> dict[str, Any]:
    """A ``default`` naming a removed option would still show (and leak) its name: drop it, the
    frontend then selects the first remaining option."""
    default = config.get("default")
    if isinstance(default, str) and default in before and default not in after:
        return {k: v for k, v in config.items() if k != "default"}
    return config


def _sections_name_models(sections: Any) -> bool:
    if not isinstance(sections, Mapping):
        return False
    for section, specs in sections.items():
        if section in _SECTIONS_SKIPPED or not isinstance(specs, Mapping):
            continue
        for input_name, spec in specs.items():
            if _spec_names_models(input_name, spec):
                return True
    return False


def _spec_names_models(input_name: str, spec: Any) -> bool:
    if not isinstance(spec, list) or not spec:
        return False
    options = spec[0]
    if not isinstance(options, list):
        config = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
        options = config.get("options")
        if not isinstance(options, list):
            return False
    for option in options:
        if isinstance(option, str) and is_model_input(input_name, option):
            return True
        if isinstance(option, Mapping) and _sections_name_models(option.get("inputs")):
            return True
    return False


def single_class(info: Mapping[str, Any], class_type: str, policy: RolePolicy | None) -> ObjectInfo:
    """``GET /object_info/{class}``: ``{class: node_def}``, or ``{}`` exactly as ComfyUI answers
    for a class it does not know when the class is unknown or not allowed (``policy`` None: no
    filtering)."""
    node = info.get(class_type)
    if node is None:
        return {}
    if policy is None:
        return {class_type: node}
    if not policy.allows_node(class_type):
        return {}
    return {class_type: filter_node(class_type, node, policy)}


# -- model lists -------------------------------------------------------------------------------


def filter_model_names(names: list[Any], folder: str, policy: RolePolicy) -> list[Any]:
    """``/models/{folder}`` (file names) and ``/embeddings`` (names without extension).

    SECURITY: every entry of a model folder is judged, whatever its extension (ComfyUI lists
    ``.pt2``/``.pkl`` too); entries that are not strings are not names and pass.
    """
    folders = folder_names(folder)
    return [n for n in names if not isinstance(n, str) or allows_model(policy, n, folders)]


def filter_model_entries(entries: list[Any], folder: str, policy: RolePolicy) -> list[Any]:
    """``/experiment/models/{folder}``: ``[{"name", "pathIndex", "modified", ...}]`` by name.

    An entry without a string ``name`` is dropped: it cannot be judged.
    """
    folders = folder_names(folder)
    return [
        e
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("name"), str)
        and allows_model(policy, e["name"], folders)
    ]


# -- several instances (issue 8) ---------------------------------------------------------------


def union_object_info(infos: Sequence[Mapping[str, Any]]) -> ObjectInfo:
    """One catalog for several ComfyUI instances: every class any of them has; for a class
    several have, the first definition, with its combo options the union of all of theirs
    (so a model present on any instance is offered). One instance: its answer unchanged."""
    if len(infos) == 1:
        return dict(infos[0])
    out: ObjectInfo = {}
    for info in infos:
        for name, node in info.items():
            if name not in out:
                out[name] = node
            else:
                out[name] = _merge_node(out[name], node)
    return out


def _merge_node(first: Any, other: Any) -> Any:
    if not isinstance(first, dict) or not isinstance(other, dict):
        return first
    a, b = first.get("input"), other.get("input")
    if not isinstance(a, dict) or not isinstance(b, dict):
        return first
    sections: dict[str, Any] = {}
    for section, specs in a.items():
        theirs = b.get(section)
        if not isinstance(specs, dict) or not isinstance(theirs, dict):
            sections[section] = specs
            continue
        sections[section] = {
            name: _merge_spec(spec, theirs.get(name)) for name, spec in specs.items()
        }
    return {**first, "input": sections}


def _merge_spec(spec: Any, other: Any) -> Any:
    if not isinstance(spec, list) or not isinstance(other, list) or not spec or not other:
        return spec
    if isinstance(spec[0], list) and isinstance(other[0], list):
        return [_union(spec[0], other[0]), *spec[1:]]
    a = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else None
    b = other[1] if len(other) > 1 and isinstance(other[1], dict) else None
    if a is None or b is None:
        return spec
    if isinstance(a.get("options"), list) and isinstance(b.get("options"), list):
        return [spec[0], {**a, "options": _union(a["options"], b["options"])}, *spec[2:]]
    return spec


def _union(first: Iterable[Any], other: Iterable[Any]) -> list[Any]:
    """Options of both, in order, without repeats (unhashable options kept from ``first``)."""
    out = list(first)
    seen = {o for o in out if isinstance(o, str | int | float)}
    for option in other:
        if isinstance(option, str | int | float) and option not in seen:
            seen.add(option)
            out.append(option)
    return out
