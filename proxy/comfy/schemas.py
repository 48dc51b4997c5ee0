"""What each node type's inputs are, read from ComfyUI's ``/object_info`` (pure).

The prompt model types literals and recognises file-reading inputs with this, exactly as the
instance declares them, never by the value's extension. An input **reads files** when its spec
(``[type, {extra}]``, docs/comfyui-protocol.md#node-model-and-system-metadata) says so:

- an upload flag: ``image_upload``, ``audio_upload``, ``video_upload``, ``file_upload``,
  ``animated_image_upload``... (any ``*_upload: true``), or ``image_folder``;
- a widget type whose value names a file: ``WEBCAM`` and ``AUDIO_RECORD`` (a captured file in
  input/), ``LOAD_3D``/``LOAD_3D_ANIMATION`` (an object of rendered files in temp/);
- a combo listing input files rather than choices: a legacy list combo (``[["a.png"], {}]``) or
  ``["COMBO", {"options": [...]}]`` that is not a model list and whose options are empty (no
  file uploaded yet) or look like file names (an extension or a ``/``) -- LoadLatent's
  ``latent``, custom loaders; ``remote`` combos only when they list ``/internal/files``.

ComfyUI checks a combo value against its options only when the node has no ``VALIDATE_INPUTS``
for it, which ``/object_info`` does not tell (LoadImage, LoadAudio accept any existing file):
so the options are never trusted to confine a value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.comfy.names import MEDIA_EXTENSIONS, MODEL_EXTENSIONS, is_model_input

SCALAR_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN"})
"""Input types ComfyUI's validation converts a literal to (``int()``, ``float()``...)."""
FILE_WIDGET_TYPES = frozenset({"WEBCAM", "AUDIO_RECORD", "LOAD_3D", "LOAD_3D_ANIMATION"})
"""Widget types whose literal names files the node reads (``get_annotated_filepath``)."""
STRUCTURED_TYPES = frozenset({"LOAD_3D", "LOAD_3D_ANIMATION", "LOAD3D_CAMERA"})
"""Widget types whose literal is an object (``{"image": ..., "mask": ..., "camera_info":
{...}}``; ``LOAD3D_CAMERA``: the camera state ``Preview3D`` takes and echoes, which names no
file the node reads): the only inputs where a plain JSON object is accepted. What a node
echoes back is never taken as the user's file (:mod:`proxy.tenancy.attribution`)."""
COMBO = "COMBO"
_FILE_LIST_ROUTE = "/internal/files"
_FILE_NAME_ENDINGS = tuple(dict.fromkeys((*MEDIA_EXTENSIONS, ".latent")))


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One declared input of a node type."""

    type: str
    """``INT``, ``FLOAT``, ``STRING``, ``BOOLEAN``, ``COMBO`` (either combo form), or the
    type a link must carry (``IMAGE``, ``MODEL``, ``*``...)."""
    category: str
    """``required``, ``optional`` or ``hidden`` (ComfyUI fills hidden inputs itself)."""
    reads_files: bool = False
    """A string in this input names a file the node reads (module doc)."""

    @property
    def structured(self) -> bool:
        """A plain JSON object is a valid literal here (``LOAD_3D``...)."""
        return self.type in STRUCTURED_TYPES


@dataclass(frozen=True, slots=True)
class NodeSchema:
    """One node type: its inputs by name and how many outputs it has."""

    inputs: Mapping[str, InputSpec]
    outputs: int | None = None
    """None when ``/object_info`` did not say (links to any index >= 0 pass)."""


@dataclass(frozen=True, slots=True)
class NodeSchemas:
    """Every node type an instance (or several) offers (see :func:`schemas_from_object_info`)."""

    classes: Mapping[str, NodeSchema] = field(default_factory=dict)

    def get(self, class_type: str) -> NodeSchema | None:
        return self.classes.get(class_type)

    def __contains__(self, class_type: object) -> bool:
        return class_type in self.classes


def schemas_from_object_info(info: Mapping[str, Any]) -> NodeSchemas:
    """The node types of an ``/object_info`` answer (unknown shapes are skipped: a node type
    whose ``input`` is not an object has no inputs the proxy knows of)."""
    classes: dict[str, NodeSchema] = {}
    for class_type, definition in info.items():
        if not isinstance(definition, Mapping):
            continue
        sections = definition.get("input")
        inputs: dict[str, InputSpec] = {}
        if isinstance(sections, Mapping):
            for category in ("required", "optional", "hidden"):
                specs = sections.get(category)
                if not isinstance(specs, Mapping):
                    continue
                for name, spec in specs.items():
                    if isinstance(name, str) and name not in inputs:
                        inputs[name] = input_spec(name, spec, category)
        outputs = definition.get("output")
        classes[class_type] = NodeSchema(
            inputs, len(outputs) if isinstance(outputs, list | tuple) else None
        )
    return NodeSchemas(classes)


def input_spec(name: str, spec: object, category: str) -> InputSpec:
    """One ``/object_info`` input spec (``[type, {extra}]``, or a bare type string for hidden
    inputs) as an :class:`InputSpec`."""
    if isinstance(spec, str):
        return InputSpec(spec, category)
    if not isinstance(spec, list | tuple) or not spec:
        return InputSpec("*", category)
    head = spec[0]
    extra = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    options: object = None
    if isinstance(head, list | tuple):
        kind, options = COMBO, head
    elif isinstance(head, str):
        kind = head
        if head == COMBO:
            options = extra.get("options")
    else:
        kind = "*"
    return InputSpec(kind, category, _reads_files(name, kind, extra, options))


def _reads_files(name: str, kind: str, extra: Mapping[str, Any], options: object) -> bool:
    if any(k.endswith("_upload") and v is True for k, v in extra.items() if isinstance(k, str)):
        return True
    if "image_folder" in extra or kind in FILE_WIDGET_TYPES:
        return True
    if kind != COMBO:
        return False
    remote = extra.get("remote")
    if isinstance(remote, Mapping):
        route = remote.get("route")
        return isinstance(route, str) and route.startswith(_FILE_LIST_ROUTE)
    names = [o for o in options if isinstance(o, str)] if isinstance(options, list | tuple) else []
    if is_model_input(name, names[0] if names else None):
        return False
    if any(n.lower().endswith(MODEL_EXTENSIONS) for n in names):
        return False  # a custom loader's model list: the model allowlist judges it
    if not names:
        # SECURITY: an empty listing (no file uploaded yet) cannot be told from an empty
        # enum; a value there is confined like a file name (default deny).
        return not isinstance(options, list | tuple) or not options
    return any(n.lower().endswith(_FILE_NAME_ENDINGS) or "/" in n for n in names)


__all__ = [
    "COMBO",
    "FILE_WIDGET_TYPES",
    "SCALAR_TYPES",
    "STRUCTURED_TYPES",
    "InputSpec",
    "NodeSchema",
    "NodeSchemas",
    "input_spec",
    "schemas_from_object_info",
]
