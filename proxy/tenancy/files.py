"""Which files of ComfyUI's shared ``input/``, ``output/`` and ``temp/`` a user may touch (pure).

ComfyUI names a file ``(type, subfolder, filename)`` and confines it to the type's directory only
with ``os.path.commonpath`` (docs/comfyui-protocol.md#path-traversal-protections): any subfolder
inside ``output/`` is fair game, including other users' ``users/<owner>/``. The proxy therefore
decides on a *normalised* relative path, refuses anything that could mean something else on another
platform (``..``, absolute paths, drive letters, backslashes, NUL), and gives each user
``users/<owner>-<tag>/`` plus the configured shared input folders. Records in the ownership store
can widen this to single files (previews in ``temp/`` with an empty subfolder); the guard asks the
store, this module does not.

Nothing here does I/O; :mod:`proxy.isolation.submit_guard` applies it to requests.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.comfy.records import FileRef

FILE_TYPES = frozenset({"output", "input", "temp"})
"""ComfyUI's file types (``folder_paths.get_directory_by_type``)."""
ANNOTATIONS: tuple[tuple[str, str], ...] = (
    (" [output]", "output"),
    (" [input]", "input"),
    (" [temp]", "temp"),
)
"""``folder_paths.annotated_filepath``: a trailing annotation overrides the type."""
ASSET_HASH_PREFIX = "blake3:"
"""Newer ComfyUI resolves ``/view?filename=blake3:<hash>`` through its asset database, whatever
folder the file is in (not owner-scoped): admin-only."""
_DRIVE = re.compile(r"^[A-Za-z]:")
_HEADER_UNSAFE = frozenset('"\\\r\n\0')


class PathRefused(ValueError):
    """A path that could leave its folder or mean something else to ComfyUI than to the proxy."""


@dataclass(frozen=True, slots=True)
class FileScope:
    """What one user may read and write: the user's folder everywhere, shared folders in input/."""

    owner: str
    """The principal's ``comfy_user``."""
    folder: str
    """``users/<owner>-<tag>`` (:func:`proxy.tenancy.namespaces.user_folder`): the user's
    subfolder of input/, output/ and temp/."""
    shared_input_folders: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # SECURITY: an empty or unnormalised folder would make is_within() match far more.
        if not self.folder or clean_relative(self.folder) != self.folder:
            raise ValueError(f"not a user folder: {self.folder!r}")

    def owns(self, folder: str) -> bool:
        """Whether the normalised relative ``folder`` is the user's folder or below it."""
        return is_within(folder, self.folder)

    def may_read(self, kind: str, folder: str) -> bool:
        """Whether ``kind``/``folder`` is readable by folder alone (without a store record)."""
        if self.owns(folder):
            return True
        return kind == "input" and any(is_within(folder, f) for f in self.shared_input_folders)


@dataclass(frozen=True, slots=True)
class FileTarget:
    """One file as ComfyUI resolves it: type, normalised subfolder and plain file name."""

    kind: str
    folder: str
    name: str

    @property
    def ref(self) -> FileRef:
        """The ownership store's key for this file."""
        return (self.kind, self.folder, self.name)


def is_within(folder: str, root: str) -> bool:
    """``folder`` is ``root`` or below it (both normalised, relative, ``/``-separated)."""
    return folder == root or folder.startswith(root + "/")


def clean_relative(path: str) -> str:
    """``path`` as a normalised relative path (``""`` for the folder itself).

    Raises:
        PathRefused: NUL, backslash, absolute path, drive letter, or a ``..`` segment.
    """
    # SECURITY: refuse rather than normalise. A ".." that ComfyUI resolves differently (it joins
    # and calls abspath, so users/alice/../bob is "inside" output/) must never reach it, and a
    # backslash or drive letter is a separator or a root on a Windows ComfyUI.
    if "\0" in path:
        raise PathRefused("contains NUL")
    if "\\" in path:
        raise PathRefused("contains a backslash")
    if path.startswith("/"):
        raise PathRefused("is absolute")
    if _DRIVE.match(path):
        raise PathRefused("names a drive")
    segments = path.split("/")
    # "..." is ".." on Windows once trailing dots are stripped.
    if any(len(s) >= 2 and s.strip(".") == "" for s in segments):
        raise PathRefused("contains '..'")
    return "/".join(s for s in segments if s not in ("", "."))


def split_annotation(name: str) -> tuple[str, str | None]:
    """``"x.png [output]"`` -> ``("x.png", "output")``; no annotation -> ``(name, None)``."""
    for suffix, kind in ANNOTATIONS:
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    return name, None


def is_asset_hash(filename: str) -> bool:
    """The ``blake3:<hash>`` form of newer ComfyUI (asset lookup, not owner-scoped)."""
    return split_annotation(filename)[0].strip().lower().startswith(ASSET_HASH_PREFIX)


def view_target(filename: str, kind: str | None, subfolder: str | None) -> FileTarget:
    """The file ``GET /view`` serves, resolved like ComfyUI's handler does.

    The annotation in ``filename`` overrides ``kind`` (default ``output``); ComfyUI then uses
    only ``basename(filename)`` inside ``<type dir>/<subfolder>``.

    Raises:
        PathRefused: an empty name, traversal in ``filename`` or ``subfolder``, unknown type.
    """
    name, annotated = split_annotation(filename)
    if not name:
        raise PathRefused("empty filename")
    clean_relative(name)  # a "../x" refused here, even though ComfyUI would 400 it too
    resolved = annotated or (kind if kind is not None else "output")
    if resolved not in FILE_TYPES:
        raise PathRefused(f"unknown type {resolved!r}")
    base = posixpath.basename(name)
    if not base:
        raise PathRefused("no file name")
    return FileTarget(resolved, clean_relative(subfolder or ""), base)


def referenced_file(value: str, *, default_kind: str = "input") -> FileTarget:
    """The file a node input such as ``LoadImage.image`` names (``"sub/x.png [output]"``).

    ComfyUI joins the whole (annotation-free) value to the type's directory, so its directory
    part is the subfolder.

    Raises:
        PathRefused: an empty name or traversal.
    """
    name, annotated = split_annotation(value)
    rel = clean_relative(name)
    if not rel:
        raise PathRefused("empty file name")
    folder, _, base = rel.rpartition("/")
    return FileTarget(annotated or default_kind, folder, base)


def original_ref_target(raw: str) -> FileTarget:
    """The image a mask upload's ``original_ref`` (JSON ``{filename, subfolder, type}``) names.

    As in ComfyUI's ``/upload/mask``: the annotation overrides ``type`` (default ``output``),
    and the file is ``<type dir>/<subfolder>/<filename>`` (no basename: ``filename`` may hold
    directories).

    Raises:
        PathRefused: not a JSON object with a string ``filename``, traversal, unknown type.
    """
    try:
        ref = json.loads(raw)
    except ValueError:
        raise PathRefused("original_ref is not JSON") from None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise PathRefused("original_ref needs a string filename")
    subfolder = ref.get("subfolder", "")
    kind = ref.get("type", "output")
    if not isinstance(subfolder, str) or not isinstance(kind, str):
        raise PathRefused("original_ref subfolder and type must be strings")
    name, annotated = split_annotation(ref["filename"])
    resolved = annotated or kind
    if resolved not in FILE_TYPES:
        raise PathRefused(f"unknown type {resolved!r}")
    rel = clean_relative(posixpath.join(clean_relative(subfolder), clean_relative(name)))
    folder, _, base = rel.rpartition("/")
    if not base:
        raise PathRefused("empty file name")
    return FileTarget(resolved, folder, base)


def upload_subfolder(scope: FileScope, client_subfolder: str) -> str:
    """Where an upload lands: ``users/<owner>[/<client subfolder>]`` in input/.

    Raises:
        PathRefused: the client's subfolder tries to leave (``..``, absolute, ...).
    """
    rel = clean_relative(client_subfolder)
    return f"{scope.folder}/{rel}" if rel else scope.folder


def upload_filename(filename: str) -> str:
    """The uploaded file's name, if ComfyUI would write it where the subfolder says.

    ComfyUI joins it to the upload folder, so a ``/`` or ``..`` would move the file; the proxy
    also re-emits it in a quoted header, so quotes, backslashes and line breaks are refused.

    Raises:
        PathRefused: empty, a path rather than a name, or not safely quotable.
    """
    if not filename or filename in (".", ".."):
        raise PathRefused("empty file name")
    if "/" in filename or _HEADER_UNSAFE.intersection(filename) or _DRIVE.match(filename):
        raise PathRefused("file name must be a plain name")
    return filename


def safe_field_name(name: str) -> bool:
    """A multipart field name the proxy can re-emit in a quoted header unchanged."""
    return bool(name) and not _HEADER_UNSAFE.intersection(name)


# -- multipart framing of the rewritten upload body ---------------------------------------------


def field_part(boundary: str, name: str, value: str) -> bytes:
    """One text field: UTF-8, no Content-Type (so ComfyUI decodes it as UTF-8, like we did)."""
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
    return head.encode() + value.encode() + b"\r\n"


def file_part_head(
    boundary: str, name: str, filename: str, headers: Iterable[tuple[str, str]]
) -> bytes:
    """The head of a file part: our Content-Disposition, then the client's other part headers
    (Content-Type, Content-Transfer-Encoding...). The body and a CRLF follow."""
    lines = [
        f"--{boundary}",
        f'Content-Disposition: form-data; name="{name}"; filename="{filename}"',
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def closing(boundary: str) -> bytes:
    """The closing delimiter of the multipart body."""
    return f"--{boundary}--\r\n".encode()
