"""What the proxy knows of a prompt it forwarded, and how ComfyUI names a file: the vocabulary
the history, queue and jobs views (:mod:`proxy.comfy.views`) filter by, and the ownership
store (:mod:`proxy.tenancy.ownership`) keeps."""

from __future__ import annotations

from dataclasses import dataclass

FileRef = tuple[str, str, str]
"""``(type, subfolder, filename)`` as ComfyUI names a file (``type``: output/temp/input)."""


@dataclass(frozen=True, slots=True)
class PromptRecord:
    prompt_id: str
    owner: str
    """The principal's ``comfy_user`` (stable, ComfyUI-safe)."""
    upstream: str
    client_id: str
    """The namespaced client id ComfyUI saw."""
    created_at: float
    role: str = ""
    """The submitter's role label (``metrics.role_label``), for the generation metrics: they
    read it from here instead of writing a record of their own on every submission."""
    sent_client_id: str | None = None
    """The ``client_id`` the client itself sent (``""``: none), shown back to its owner in
    place of the namespaced one (:func:`proxy.comfy.views.show_client_ids`); None in
    records written before it was kept (the namespaced id then stays)."""
    previews: tuple[str, ...] = ()
    """Ids of the forwarded graph's preview nodes (``isolation.preview_nodes``): the only
    nodes whose UI output may name files of the submitter outside its folder
    (:mod:`proxy.tenancy.attribution`)."""


__all__ = ["FileRef", "PromptRecord"]
