"""``POST /prompt`` for one user of a shared ComfyUI: the rewrite and the checks (pure).

What a submitted body becomes (protocol doc 3):

- ``client_id`` is always the user's namespaced id, so targeted events reach only the user's
  sockets and nothing is broadcast; ComfyUI copies it over ``extra_data.client_id``.
- ``prompt_id`` is the proxy's (the guard decides whether the client's own may be kept).
- ``front`` and ``number`` are dropped unless the user's role may jump the queue.
- Every ``filename_prefix`` string moves under ``users/<owner>/``.
- File names that read files (:data:`UPLOAD_READERS`, and media-looking ``image``/``video``/
  ``audio``/``file`` strings) must name the user's folder or a shared input folder.

Everything else in the body is kept as it was (re-serialised JSON, same values). Sensitive
``extra_data`` keys (:data:`SENSITIVE_EXTRA_DATA`) are forwarded untouched and never copied into
an error, a log line or the ownership store.
"""

from __future__ import annotations

import codecs
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import orjson

from proxy.errors import Rejection
from proxy.isolation.files import FileScope, FileTarget, PathRefused, clean_relative
from proxy.isolation.files import referenced_file as _referenced_file
from proxy.state import RequestContext

SENSITIVE_EXTRA_DATA = frozenset({"auth_token_comfy_org", "api_key_comfy_org"})
"""Comfy.org credentials for partner nodes: forwarded, never logged, stored or echoed."""
UPLOAD_READERS = frozenset(
    {("LoadImage", "image"), ("LoadImageMask", "image"), ("LoadImageOutput", "image")}
)
"""Core node inputs that read a file by name (from input/, or as annotated)."""
FILE_INPUT_NAMES = frozenset({"image", "video", "audio", "file"})
"""Input names that, holding a media file name, read that file (custom loaders use these)."""
MEDIA_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm",
    ".avif", ".heic", ".heif", ".exr", ".ico", ".svg", ".jfif",
    ".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
    ".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a", ".aac", ".wma",
    ".glb", ".gltf", ".obj", ".fbx", ".stl", ".ply", ".spz", ".splat",
    ".safetensors", ".latent", ".npy", ".txt", ".json",
)  # fmt: skip
DEFAULT_PREFIX = "ComfyUI"
"""Used when a prefix names no file stem (``""``, ``"."``): ComfyUI's own default."""
# Newer ComfyUI substitutes %Class.input% / %NodeTitle.widget% into the prefix on the server,
# after the proxy has looked: its value (possibly "../..") is unknown here.
_SERVER_SUBSTITUTION = re.compile(r"%[^%]*\.[^%]*%")

FileRef = tuple[str, str, str]
"""``(type, subfolder, filename)``, as :data:`proxy.isolation.ownership.FileRef`."""

FILENAME_PREFIX_INVALID = "filename_prefix_invalid"
INPUT_PATH_INVALID = "input_path_invalid"
INPUT_FILE_FORBIDDEN = "input_file_forbidden"
INPUT_NOT_LITERAL = "input_not_literal"


@dataclass(frozen=True, slots=True)
class Violation:
    """One node input the proxy refuses, in the terms of ComfyUI's ``node_errors``."""

    node_id: str
    class_type: str
    input_name: str
    error_type: str
    message: str
    received_value: Any = None
    ref: FileRef | None = None
    """Set when the only problem is the folder: a store record of the user's may still allow
    the file (e.g. a preview in temp/ with an empty subfolder)."""
    details: str = ""
    """ComfyUI's per-error ``details`` (e.g. the policy rule broken); the input name if empty."""


class PromptRejected(Rejection):
    """A prompt refused by isolation, with ComfyUI's ``node_errors`` for each violation.

    ``error_type`` is the first violation's type; ``extra`` names its node. ``chain`` renders
    :attr:`node_errors` as the body's ``node_errors`` (ComfyUI shape, protocol doc 3).
    """

    status = 400

    def __init__(self, violations: Sequence[Violation]) -> None:
        first = violations[0]
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(
            f"Prompt refused: {describe_violation(first, input_word='input ')}{more}",
            error_type=first.error_type,
            details="\n".join(describe_violation(v) for v in violations),
            extra={
                "node_id": first.node_id,
                "class_type": first.class_type,
                "input_name": first.input_name,
            },
        )
        self.violations = tuple(violations)
        self.node_errors = node_errors(violations)


def node_errors(violations: Sequence[Violation]) -> dict[str, Any]:
    """``{node_id: {"errors": [...], "dependent_outputs": [], "class_type": ...}}``."""
    out: dict[str, Any] = {}
    for v in violations:
        if not v.node_id:
            continue  # about the whole prompt (e.g. its size): only in the top-level error
        entry = out.setdefault(
            v.node_id, {"errors": [], "dependent_outputs": [], "class_type": v.class_type}
        )
        extra_info: dict[str, Any] = {}
        if v.input_name:
            extra_info = {"input_name": v.input_name, "received_value": v.received_value}
        entry["errors"].append(
            {
                "type": v.error_type,
                "message": v.message,
                "details": v.details or v.input_name,
                "extra_info": extra_info,
            }
        )
    return out


def describe_violation(v: Violation, *, input_word: str = "") -> str:
    """One line about a violation: the prompt's, a node's, or one of its inputs'."""
    if not v.node_id:
        return v.message
    if not v.input_name:
        return f"node {v.node_id} ({v.class_type}): {v.message}"
    return f"node {v.node_id} ({v.class_type}) {input_word}{v.input_name}: {v.message}"


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
    # "" or "./" would normalise to users/<owner> itself, i.e. a file *named* <owner> in users/.
    return f"{scope.folder}/{prefix if kept else DEFAULT_PREFIX}"


def is_link(value: object) -> bool:
    """A linked input ``[node_id, slot]`` (ComfyUI treats every list as a link)."""
    return isinstance(value, list)


def reads_file(class_type: str, name: str, value: object) -> bool:
    """Whether a *string* input names a file the node will read."""
    if (class_type, name) in UPLOAD_READERS:
        return True
    if name not in FILE_INPUT_NAMES or not isinstance(value, str):
        return False
    stem = value
    for suffix in (" [output]", " [input]", " [temp]"):
        stem = stem.removesuffix(suffix)
    return stem.lower().endswith(MEDIA_EXTENSIONS)


def check_graph(prompt: object, scope: FileScope) -> tuple[object, list[Violation]]:
    """The graph with prefixes moved, and every input the user may not use.

    Nodes and inputs that are not what ComfyUI expects (not an object, no ``inputs``) are left
    for ComfyUI to refuse. Links are left alone except where a literal is required.
    """
    if not isinstance(prompt, dict):
        return prompt, []
    violations: list[Violation] = []
    graph: dict[str, Any] = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            graph[node_id] = node
            continue
        class_type = node.get("class_type")
        class_name = class_type if isinstance(class_type, str) else ""
        new_inputs = dict(inputs)
        for name, value in inputs.items():
            found = _check_input(
                str(node_id), class_name, name, value, scope=scope, new_inputs=new_inputs
            )
            if found is not None:
                violations.append(found)
        graph[node_id] = {**node, "inputs": new_inputs}
    return graph, violations


def _check_input(
    node_id: str,
    class_type: str,
    name: str,
    value: object,
    *,
    scope: FileScope,
    new_inputs: dict[str, Any],
) -> Violation | None:
    def violation(error_type: str, message: str, ref: FileRef | None = None) -> Violation:
        shown = value if isinstance(value, str | int | float | bool | list) else None
        return Violation(node_id, class_type, name, error_type, message, shown, ref)

    if name == "filename_prefix":
        # SECURITY: ComfyUI str()s any literal for a STRING input; a link or an object could
        # carry "/../users/<victim>/" past a check made on strings only.
        if not isinstance(value, str):
            return violation(INPUT_NOT_LITERAL, "filename_prefix must be a text value")
        try:
            new_inputs[name] = scoped_prefix(value, scope)
        except PathRefused as exc:
            return violation(FILENAME_PREFIX_INVALID, f"filename_prefix {exc}")
        return None
    if not reads_file(class_type, name, value):
        return None
    if not isinstance(value, str):
        # SECURITY: a loader fed by a link reads a name the proxy cannot see.
        return violation(INPUT_NOT_LITERAL, f"{name} must be a file name, not a link")
    try:
        target = _referenced_file(value)
    except PathRefused as exc:
        return violation(INPUT_PATH_INVALID, f"{name} {exc}")
    if scope.may_read(target.kind, target.folder):
        return None
    return violation(
        INPUT_FILE_FORBIDDEN,
        f"{name} must be one of your files ({scope.folder}/...) or a shared input",
        ref=_ref(target),
    )


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
    prompt: object,
    prompt_id: str,
    client_id: str,
    may_prioritise: bool,
) -> dict[str, Any]:
    """The body ComfyUI receives; every key not named here is kept as sent."""
    out = dict(body)
    if "prompt" in body:
        out["prompt"] = prompt
    out["prompt_id"] = prompt_id
    # SECURITY: always present, so ComfyUI overwrites any extra_data.client_id the client set
    # and never broadcasts this prompt's events to every socket (protocol doc 4.3).
    out["client_id"] = client_id
    if not may_prioritise:
        out.pop("front", None)
        out.pop("number", None)
    return out


def client_id_of(body: Mapping[str, Any]) -> str:
    """The client's own ``client_id`` (``""`` when absent or not a string)."""
    value = body.get("client_id")
    return value if isinstance(value, str) else ""


# -- the bytes ---------------------------------------------------------------------------------


class NotJson(Enum):
    """The body is not JSON ComfyUI could read: it will refuse it on its own."""

    NOT_JSON = "not_json"


NOT_JSON: Final = NotJson.NOT_JSON


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """A request body as ComfyUI will read it."""

    value: object
    exact_json: bool = False
    """Read by ``json.loads`` (NaN, huge integers...): written back the same way."""


def parse_body(raw: bytes, charset: str | None) -> ParsedBody | NotJson:
    """The body as ComfyUI's ``await request.json()`` reads it, or :data:`NOT_JSON`.

    aiohttp decodes with the request's charset (UTF-8 when none) and calls ``json.loads``, which
    also accepts ``NaN``, huge integers and lone surrogates that orjson refuses: those take the
    slow path, so nothing ComfyUI would accept escapes the checks.
    """
    if charset is None or _codec(charset) == "utf-8":
        try:
            return ParsedBody(orjson.loads(raw))
        except orjson.JSONDecodeError:
            pass
    try:
        # SECURITY: decode as ComfyUI will (a charset=utf-7 body reads "+AC4-" as ".").
        return ParsedBody(json.loads(raw.decode(charset or "utf-8")), exact_json=True)
    except (LookupError, ValueError, RecursionError):
        return NOT_JSON


def parse_request_body(ctx: RequestContext, charset: str | None) -> ParsedBody | NotJson:
    """:func:`parse_body` of ``ctx.body``, parsed once for every guard that inspects it (the
    workflow policy, then isolation): a 200-node workflow is not decoded twice. The cache is
    tied to the body object, so a guard that replaces ``ctx.body`` never sees a stale parse."""
    raw = ctx.body if ctx.body is not None else b""
    cached = ctx.parsed_body
    if cached is not None and cached[0] is raw and isinstance(cached[1], ParsedBody | NotJson):
        return cached[1]
    parsed = parse_body(raw, charset)
    ctx.parsed_body = (raw, parsed)
    return parsed


def dump_body(value: object, *, exact_json: bool = False) -> bytes:
    """UTF-8 JSON for the rewritten body (sent with ``Content-Type: application/json``)."""
    if exact_json:
        # ASCII escapes keep lone surrogates; allow_nan keeps NaN/Infinity as json.loads read them.
        return json.dumps(value).encode("ascii")
    return orjson.dumps(value)


def _codec(charset: str) -> str:
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return charset
