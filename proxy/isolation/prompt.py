"""``POST /prompt`` for one user of a shared ComfyUI: the rewrite and the checks (pure).

What a submitted body becomes (docs/comfyui-protocol.md#submitting-a-prompt):

- ``client_id`` is the user's namespaced id, so targeted events reach only the user's socket;
  ComfyUI copies it over ``extra_data.client_id``. A prompt sent without one (nor
  ``extra_data.client_id``) goes without, as ComfyUI expects: its events are broadcast, and the
  WebSocket filter (:mod:`proxy.tenancy.events`) delivers them to every socket of the
  submitter and of nobody else (a broadcast within the tenant).
- ``prompt_id`` is the proxy's (the guard decides whether the client's own may be kept).
- ``front`` and ``number`` are dropped unless the user's role may jump the queue.
- Every ``filename_prefix`` string moves under ``users/<owner>/`` (once: one already inside the
  user's own folder, as read back from ``/history``, is kept).
- Every string in an input that reads files (as the instance's ``/object_info`` declares it:
  upload flags, file widgets, folder listings; see :mod:`proxy.comfy.schemas`), whatever
  its extension, wrapped in ``{"__value__": ...}`` or reached through primitive nodes, must
  name the user's folder or a shared input folder.

The body is the proxy's one reading (:mod:`proxy.comfy`); everything else in it is kept as
read and forwarded as the proxy serialises it. Sensitive
``extra_data`` keys (:data:`SENSITIVE_EXTRA_DATA`) are forwarded untouched and never copied into
an error, a log line or the ownership store.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from proxy.comfy.graph import (
    FILE_INPUT_NAMES,
    UPLOAD_READERS,
    Link,
    Node,
    Prompt,
    strings_in,
)
from proxy.comfy.names import MEDIA_EXTENSIONS
from proxy.comfy.schemas import STRUCTURED_TYPES
from proxy.comfy.violations import (
    FileRef,
    PromptRejected,
    Violation,
    describe_violation,
    node_errors,
)
from proxy.tenancy.files import FileScope, FileTarget, PathRefused, clean_relative
from proxy.tenancy.files import referenced_file as _referenced_file

SENSITIVE_EXTRA_DATA = frozenset({"auth_token_comfy_org", "api_key_comfy_org"})
"""Comfy.org credentials for partner nodes: forwarded, never logged, stored or echoed."""
DEFAULT_PREFIX = "ComfyUI"
"""Used when a prefix names no file stem (``""``, ``"."``): ComfyUI's own default."""
# Newer ComfyUI substitutes %Class.input% / %NodeTitle.widget% into the prefix on the server,
# after the proxy has looked: its value (possibly "../..") is unknown here.
_SERVER_SUBSTITUTION = re.compile(r"%[^%]*\.[^%]*%")

FILENAME_PREFIX_INVALID = "filename_prefix_invalid"
INPUT_PATH_INVALID = "input_path_invalid"
INPUT_FILE_FORBIDDEN = "input_file_forbidden"
INPUT_NOT_LITERAL = "input_not_literal"
_STRUCTURED_PASSED = frozenset({"camera_info"})
"""Keys of a ``LOAD_3D`` object that are not file names (the 3D camera, echoed back)."""
_BARE_ANNOTATION = re.compile(r"(?<! )\[(?:output|input|temp)\]$")
"""``"x[output]"``: ComfyUI's ``annotated_filepath`` strips 9 characters after any
``[output]``, so without the space it reads another name than the proxy would."""


# -- the graph ---------------------------------------------------------------------------------


def scoped_prefix(prefix: str, scope: FileScope) -> str:
    """``filename_prefix`` moved under ``users/<owner>/``.

    Raises:
        PathRefused: the prefix tries to leave (``..``, absolute, drive, backslash, NUL) or
            asks the server to substitute a node's value into it.
    """
    kept = clean_relative(prefix)
    if _SERVER_SUBSTITUTION.search(prefix):
        raise PathRefused("server-side %Node.input% substitution is not allowed here")
    if kept.startswith(f"{scope.folder}/"):
        # Idempotent: a workflow read back from /history (or a saved API-format one) already
        # names a file in the user's own folder; prefixing it again would nest the folder.
        # Another user's folder does not match and is moved under this user's like any name.
        return prefix
    # "" or "./" would normalise to users/<owner> itself, i.e. a file *named* <owner> in users/.
    return f"{scope.folder}/{prefix if kept else DEFAULT_PREFIX}"


def reads_file(class_type: str, name: str, value: object) -> bool:
    """Whether a *string* input names a file the node reads, known without ``/object_info``
    (the core loaders, and inputs named like files: any string, whatever its extension)."""
    if not isinstance(value, str):
        return False
    return (class_type, name) in UPLOAD_READERS or name in FILE_INPUT_NAMES


def check_graph(prompt: Prompt, scope: FileScope) -> list[Violation]:
    """Move every ``filename_prefix`` under the user's folder (in place) and return every
    input the user may not use (files outside their folder and the shared input folders)."""
    violations: list[Violation] = []
    for node in prompt.nodes.values():
        for name, value in list(node.inputs.items()):
            if name == "filename_prefix":
                found = _check_prefix(node, name, value, scope)
            elif prompt.reads_files(node, name):
                found = _check_file_input(prompt, node, name, value, scope)
            else:
                continue
            violations.extend(found)
    return violations


def _violation(
    node: Node,
    name: str,
    value: object,
    error_type: str,
    message: str,
    *,
    ref: FileRef | None = None,
) -> Violation:
    shown = value.to_json() if isinstance(value, Link) else value
    if not isinstance(shown, str | int | float | bool | list):
        shown = None
    return Violation(node.id, node.class_type, name, error_type, message, shown, ref)


def _check_prefix(node: Node, name: str, value: object, scope: FileScope) -> list[Violation]:
    # SECURITY: ComfyUI str()s any literal for a STRING input; a link or a list could carry
    # "/../users/<victim>/" past a check made on strings only.
    if not isinstance(value, str):
        message = "filename_prefix must be a text value"
        return [_violation(node, name, value, INPUT_NOT_LITERAL, message)]
    try:
        node.inputs[name] = scoped_prefix(value, scope)
    except PathRefused as exc:
        return [_violation(node, name, value, FILENAME_PREFIX_INVALID, f"filename_prefix {exc}")]
    return []


def _check_file_input(
    prompt: Prompt, node: Node, name: str, value: object, scope: FileScope
) -> list[Violation]:
    resolved = prompt.resolve(value) if isinstance(value, Link) else value
    spec = prompt.spec(node, name)
    if isinstance(resolved, Link):
        if spec is None and (node.class_type, name) not in UPLOAD_READERS:
            return []  # known by its name only: a link there carries a tensor, not a name
        # SECURITY: a loader fed by a node's output reads a name the proxy cannot see.
        message = f"{name} must be a file name, not a link"
        return [_violation(node, name, value, INPUT_NOT_LITERAL, message)]
    structured = spec is not None and spec.type in STRUCTURED_TYPES and isinstance(resolved, dict)
    if structured:
        assert isinstance(resolved, dict)
        # Empty names are "no file" there (Load3D's "recording": "").
        names = [
            s
            for k, v in resolved.items()
            if k not in _STRUCTURED_PASSED
            for s in strings_in(v)
            if s
        ]
    else:
        names = list(strings_in(resolved))
    found: list[Violation] = []
    for text in names:
        problem = _check_file_name(node, name, text, scope)
        if problem is not None:
            found.append(problem)
    return found


def _check_file_name(node: Node, name: str, text: str, scope: FileScope) -> Violation | None:
    if _BARE_ANNOTATION.search(text):
        message = f"{name}: write the annotation as ' [output]' (with a space) or not at all"
        return _violation(node, name, text, INPUT_PATH_INVALID, message)
    try:
        target = _referenced_file(text)
    except PathRefused as exc:
        return _violation(node, name, text, INPUT_PATH_INVALID, f"{name} {exc}")
    if scope.may_read(target.kind, target.folder):
        return None
    message = f"{name} must be one of your files ({scope.folder}/...) or a shared input"
    return _violation(node, name, text, INPUT_FILE_FORBIDDEN, message, ref=_ref(target))


def _ref(target: FileTarget) -> FileRef:
    return (target.kind, target.folder, target.name)


# -- the envelope ------------------------------------------------------------------------------


def is_canonical_uuid(value: object) -> bool:
    """A canonical (lowercase, hyphenated) UUID string, as newer ComfyUI requires."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def requested_prompt_id(body: Mapping[str, Any]) -> str | None:
    """The client's ``prompt_id`` if it is a canonical UUID (anything else is replaced)."""
    value = body.get("prompt_id")
    return value if is_canonical_uuid(value) else None


def rewrite_submission(
    body: Mapping[str, Any],
    *,
    prompt_id: str,
    client_id: str | None,
    may_prioritise: bool,
) -> dict[str, Any]:
    """The body ComfyUI receives; every key not named here is kept as sent.

    ``client_id`` None: the client named no socket; the prompt goes without one, so ComfyUI
    broadcasts its events (docs/comfyui-protocol.md#server-to-client-json-messages) and the proxy's
    filter keeps them in the tenant.
    """
    out = dict(body)
    out["prompt_id"] = prompt_id
    extra = body.get("extra_data")
    if client_id is None and (extra is None or isinstance(extra, dict)):
        # SECURITY: neither key may reach ComfyUI (ComfyUI reads extra_data.client_id when the
        # top-level one is absent): the client must not pick a socket id of its own choosing.
        out.pop("client_id", None)
        if isinstance(extra, dict) and "client_id" in extra:
            out["extra_data"] = {k: v for k, v in extra.items() if k != "client_id"}
    else:
        # SECURITY: present, so ComfyUI overwrites any extra_data.client_id the client set.
        out["client_id"] = client_id if client_id is not None else ""
    if not may_prioritise:
        out.pop("front", None)
        out.pop("number", None)
    return out


def client_id_of(body: Mapping[str, Any]) -> str:
    """The client's own ``client_id`` (``""`` when absent or not a string), or, without one, its
    ``extra_data.client_id`` (which ComfyUI reads then)."""
    value = body.get("client_id")
    if "client_id" not in body:
        extra = body.get("extra_data")
        value = extra.get("client_id") if isinstance(extra, dict) else None
    return value if isinstance(value, str) else ""


__all__ = [
    "DEFAULT_PREFIX",
    "FILENAME_PREFIX_INVALID",
    "INPUT_FILE_FORBIDDEN",
    "INPUT_NOT_LITERAL",
    "INPUT_PATH_INVALID",
    "MEDIA_EXTENSIONS",
    "SENSITIVE_EXTRA_DATA",
    "UPLOAD_READERS",
    "FileRef",
    "PromptRejected",
    "Violation",
    "check_graph",
    "client_id_of",
    "describe_violation",
    "is_canonical_uuid",
    "node_errors",
    "reads_file",
    "requested_prompt_id",
    "rewrite_submission",
    "scoped_prefix",
]
