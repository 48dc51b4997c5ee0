"""Which files a user's prompt made: what the proxy itself can attribute, never what a node says.

A node's UI output (the ``executed`` event, the history entry's and the job's ``outputs``) is
the node's to write: ComfyUI's ``Preview3D`` echoes its ``camera_info`` input verbatim, and any
custom node may put any ``{filename, subfolder, type}`` there. Taking those dicts as the
user's files let a user name someone else's upload in a node input and be given it. So the
proxy attributes files by what it knows itself:

* A user's folder (``users/<comfy_user>-<tag>/`` in input/, output/ and temp/) is the user's,
  with no record: uploads are moved into it by the proxy, and every ``filename_prefix`` of the
  user's prompts is rewritten into it, so every output of a prefix the proxy wrote is there
  (``get_save_image_path`` keeps the prefix's directories as the subfolder). That is
  :meth:`~proxy.tenancy.files.FileScope.may_read`; nothing is recorded for it.
* Previews that ComfyUI names itself (``PreviewImage`` writes
  ``temp/ComfyUI_temp_<random>_00001_.png``, with no input of the user's in the name) cannot be
  moved into the folder: no input names them. They are recorded as the user's only when they
  come from a node of the user's own prompt whose class is one of ``isolation.preview_nodes``
  (the node ids are taken from the graph the proxy forwarded, kept in the prompt's record), are
  of type ``temp`` at the top of temp/, and nobody claimed that name first (first claim wins:
  an identical graph answered from ComfyUI's cache names the first user's file again).
* Nothing else: files a node names outside the user's folder (another user's upload echoed by
  ``Preview3D``, ``Preview3D``'s own ``output/preview3d_<uuid>.glb``) are not the user's.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator

from proxy.comfy.records import FileRef
from proxy.comfy.views import node_files

PREVIEW_KIND = "temp"
_PATH_CHARS = frozenset("/\\\0")


def preview_node_ids(
    nodes: Iterable[tuple[str, str]], preview_classes: Collection[str]
) -> tuple[str, ...]:
    """Ids of the nodes (``(id, class_type)`` of the forwarded graph) whose class writes
    previews named by ComfyUI."""
    return tuple(node_id for node_id, class_type in nodes if class_type in preview_classes)


def preview_files(node_id: object, node_output: object, previews: Collection[str]) -> list[FileRef]:
    """The previews one node's UI output names, if the node is one of the prompt's preview
    nodes: ``temp`` files at the top of temp/ with a plain name; nothing otherwise."""
    if not isinstance(node_id, str) or node_id not in previews:
        return []
    return [ref for ref in node_files(node_output) if _is_preview(ref)]


def attributed_outputs(outputs: object, previews: Collection[str]) -> Iterator[FileRef]:
    """The recordable files of an ``outputs`` object (``{node_id: ui}``: history entries and
    job details) of a prompt whose preview nodes are ``previews``."""
    if not isinstance(outputs, dict):
        return
    for node_id, node_output in outputs.items():
        yield from preview_files(node_id, node_output, previews)


def _is_preview(ref: FileRef) -> bool:
    kind, subfolder, name = ref
    # A subfolder or a path in the name is not how ComfyUI names its own previews.
    return (
        kind == PREVIEW_KIND
        and subfolder == ""
        and name not in (".", "..")
        and not _PATH_CHARS.intersection(name)
    )


__all__ = ["attributed_outputs", "preview_files", "preview_node_ids"]
