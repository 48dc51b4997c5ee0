"""Per-user names on the shared ComfyUI: client ids and file folders.

ComfyUI routes a socket's events by the ``clientId`` it connected with and lets any socket claim any
id (docs/comfyui-protocol.md#connect-and-clientid-takeover). The upstream therefore only ever sees
ids derived from (user, client id): one user can never claim another's socket, and a client id
chosen by the UI maps to the same upstream id on every replica and every reconnect.

A user's files live in ``users/<comfy_user>-<tag>/`` of ComfyUI's input/, output/ and temp/,
where ``<tag>`` is 16 hex digits of an HMAC of the user keyed by ``isolation.folder_secret``.
The readable part is for operators; the tag makes the name unguessable to anyone without the
secret, so a folder name cannot be derived from a user name (or another user's comfy_user,
which is not secret: it is a hash of the subject). The name must be the same on every replica
and after every restart, so the key comes from configuration; without one a random key is
generated for the process (:func:`folder_names`), which only suits a single-process trial.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import structlog
from aiohttp import web

log = structlog.get_logger("comfygate.isolation")

USER_FOLDER_ROOT = "users"
"""Outputs and uploads of a user live under ``users/<comfy_user>-<tag>/`` in ComfyUI's folders."""
TAG_HEX_DIGITS = 16
"""64 bits of HMAC: far beyond what can be tried through the proxy, short enough to read."""
_FOLDER_LABEL = b"comfygate/isolation/user-folder/v1\0"
"""Domain separation: the same secret reused elsewhere never yields these tags."""

_process_key: bytes | None = None
"""The generated key of this process, when no secret is configured (one per process, so that
every app built in it, e.g. by tests, names folders alike)."""


def upstream_client_id(owner: str, client_id: str) -> str:
    """The id ComfyUI sees for ``client_id`` of ``owner`` (32 hex chars, like ComfyUI's own)."""
    return hashlib.sha256(f"{owner}\0{client_id}".encode()).hexdigest()[:32]


def user_folder(owner: str, key: bytes) -> str:
    """``users/<owner>-<tag>``: the subfolder (of output/, temp/ and input/) of ``owner``.

    ``owner`` is a principal's ``comfy_user`` (only ``[A-Za-z0-9_-]``), so the name is
    path-safe; the tag is lowercase hex, so names differ on case-insensitive file systems too.
    """
    tag = hmac.new(key, _FOLDER_LABEL + owner.encode(), hashlib.sha256).hexdigest()
    return f"{USER_FOLDER_ROOT}/{owner}-{tag[:TAG_HEX_DIGITS]}"


def legacy_user_folder(owner: str) -> str:
    """``users/<owner>``: where comfygate before folder secrets kept a user's files (the
    migration maps these to :func:`user_folder`)."""
    return f"{USER_FOLDER_ROOT}/{owner}"


@dataclass(frozen=True, slots=True)
class FolderNames:
    """The folder naming of one running proxy (its key never leaves the process)."""

    key: bytes
    generated: bool = False
    """True when no ``isolation.folder_secret`` is configured (a random per-process key)."""

    def of(self, owner: str) -> str:
        return user_folder(owner, self.key)


FOLDERS: web.AppKey[FolderNames] = web.AppKey("comfygate.folders", FolderNames)


def folder_names(secret: str) -> FolderNames:
    """The naming for a configured ``isolation.folder_secret``, or the process's random key."""
    global _process_key  # noqa: PLW0603 - one generated key per process, by design
    if secret:
        return FolderNames(secret.encode())
    if _process_key is None:
        _process_key = secrets.token_bytes(32)
    return FolderNames(_process_key, generated=True)


def generated_secret() -> str:
    """A fresh secret for ``isolation.folder_secret`` (the supervisor hands one to its workers
    when none is configured, so that one run's workers agree)."""
    return secrets.token_urlsafe(48)


def warn_if_unstable(names: FolderNames, *, isolation: bool, shared_state: bool) -> None:
    """Say at startup what a generated key means: files change folder at every restart, and
    replicas (which share state through Redis) each name folders differently."""
    if not isolation or not names.generated:
        return
    detail = (
        "isolation.folder_secret is not set: users' folders are keyed by a random secret of "
        "this process; after a restart every user gets a new, empty folder (their earlier "
        "files stay on disk, reachable by admins only)"
    )
    if shared_state:
        detail += (
            "; Redis is configured, so other replicas presumably run: each names folders "
            "differently and users' files disappear between them. Set isolation.folder_secret "
            "(or folder_secret_file) to the same value on every replica"
        )
    log.warning("folder_secret_generated", detail=detail)
