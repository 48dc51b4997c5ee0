"""User-data paths as ComfyUI reads them, and the proxy's own serialisation of them.

ComfyUI (``app/user_manager.py``) resolves a user-data path in layers, and the proxy must land
on exactly the same relative path before deciding on it:

* ``{file}`` and ``{dest}`` route parameters: aiohttp's match value (the path segment decoded
  once, ``%2F`` included), then ``parse.unquote`` again *if a ``%`` remains*;
* ``GET /userdata?dir=``: the query value (decoded by yarl), then the same conditional unquote;
* ``GET /v2/userdata?path=``: the query value, ``parse.unquote`` once unconditionally, then the
  conditional unquote (so up to three decodings).

The result is joined under the ComfyUI user's directory. The proxy accepts only a *canonical*
relative path (no empty segments or ones ending in ``.`` or a space, so no ``.``/``..`` on any
platform; no leading ``/`` or drive letter, no backslash, no control characters, no undecodable
bytes), prefixes the caller's own folder, and serialises the result
so that ComfyUI's layers decode it back to exactly that path.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote

Segments = tuple[str, ...]

PREFIX_ROOT = "comfygate-users"
"""Under ComfyUI's single user directory, ``comfygate-users/<comfy_user>/`` is one user's own."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE = re.compile(r"^[A-Za-z]:")
_REENCODE = re.compile(r"[%{}]")
_PATH_SAFE_ESCAPE = re.compile(r"%(?!25|2[Ff])")


class UserdataPathError(ValueError):
    """A user-data path the proxy cannot canonicalise (traversal, absolute, malformed)."""


def comfy_unquote_again(value: str) -> str:
    """ComfyUI's "check if filename is url encoded": unquote once more when a ``%`` remains."""
    return unquote(value) if "%" in value else value


def route_value(segment: str) -> str:
    """aiohttp's match value for one segment of a ``path_safe`` path (``proxy.routes``'s
    normalised form keeps only ``%2F`` and ``%25`` encoded; both decode here).

    Raises:
        UserdataPathError: another escape is left (undecodable bytes): nothing to decide on.
    """
    if _PATH_SAFE_ESCAPE.search(segment):
        raise UserdataPathError("undecodable escape in the path")
    return unquote(segment)


def canonical(relative: str, *, directory: bool = False) -> Segments:
    """The segments of a relative user-data path, or an error for anything that is not plainly
    one. ``directory``: one trailing ``/`` is allowed (the frontend lists ``subgraphs/``); an
    empty directory is the root (``()``)."""
    if relative.startswith("/") or _DRIVE.match(relative):
        raise UserdataPathError("absolute path")
    if directory and relative.endswith("/"):
        relative = relative[:-1]
    if directory and relative == "":
        return ()
    if relative == "":
        raise UserdataPathError("empty path")
    if "\\" in relative or _CONTROL.search(relative) or "\ufffd" in relative:
        # A backslash is a separator on Windows; U+FFFD is what unquote made of invalid UTF-8.
        raise UserdataPathError("backslash, control or undecodable character in the path")
    segments = tuple(relative.split("/"))
    if any(s == "" or s.endswith((".", " ")) for s in segments):
        # Windows drops a name's trailing dots and spaces: ".. " would be ".." there.
        raise UserdataPathError("empty segment, or one ending in '.' or ' ', in the path")
    return segments


def _comfy_form(segments: Segments) -> str:
    """A value that ComfyUI's conditional unquote turns back into ``segments`` joined.

    Encoded once more when it holds a ``%`` (which that unquote would otherwise decode) or a
    brace (aiohttp's ``{file}`` pattern excludes ``{}`` after decoding, so a bare one is a 404).
    """
    joined = "/".join(segments)
    return quote(joined, safe="/") if _REENCODE.search(joined) else joined


def path_param(segments: Segments) -> str:
    """The raw path segment for ``/userdata/{file}`` (and ``{dest}``)."""
    return quote(_comfy_form(segments), safe="")


def dir_query(segments: Segments) -> str:
    """The raw query value for ``GET /userdata?dir=``."""
    return quote(_comfy_form(segments), safe="")


def v2_path_query(segments: Segments) -> str:
    """The raw query value for ``GET /v2/userdata?path=`` (one more unconditional unquote)."""
    return quote(quote(_comfy_form(segments), safe=""), safe="")


def strip_prefix(path: str, prefix: Segments) -> str | None:
    """A path ComfyUI reported relative to the real user root, made relative to the caller's
    own folder; None when it is not inside it. ComfyUI answers ``POST /userdata`` with
    ``os.path.relpath`` (backslashes on Windows), so either separator is accepted."""
    if not prefix:
        return path
    for sep in ("/", "\\"):
        head = sep.join(prefix) + sep
        if path.startswith(head) and len(path) > len(head):
            return path[len(head) :]
    return None
