"""Per-user names on the shared ComfyUI: client ids and file folders.

ComfyUI routes a socket's events by the ``clientId`` it connected with and lets any socket claim
any id (protocol doc 4.1). The upstream therefore only ever sees ids derived from (user, client
id): one user can never claim another's socket, and a client id chosen by the UI maps to the
same upstream id on every replica and every reconnect.
"""

from __future__ import annotations

import hashlib

USER_FOLDER_ROOT = "users"
"""Outputs and uploads of a user live under ``users/<comfy_user>/`` in ComfyUI's folders."""


def upstream_client_id(owner: str, client_id: str) -> str:
    """The id ComfyUI sees for ``client_id`` of ``owner`` (32 hex chars, like ComfyUI's own)."""
    return hashlib.sha256(f"{owner}\0{client_id}".encode()).hexdigest()[:32]


def user_folder(owner: str) -> str:
    """``users/<owner>``: the subfolder (of output/, temp/ and input/) that belongs to ``owner``.

    ``owner`` is a principal's ``comfy_user`` (only ``[A-Za-z0-9_-]``), so it is path-safe.
    """
    return f"{USER_FOLDER_ROOT}/{owner}"
