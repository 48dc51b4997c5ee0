"""The stock frontend's bundled static files, which load without signing in.

Browsers fetch some of the page's own files without cookies: the web app manifest
(``<link rel="manifest">`` is fetched in ``omit``/anonymous credentials mode), so a proxy that
wants a credential on everything answers it 401 and the browser logs an error on every page
load. These files are the published frontend package (``comfyui-frontend-package`` on PyPI):
nothing in them is anyone's data, so they may load without authentication.

What counts, decided on the canonical target (``proxy.target``) only:

- ``GET``/``HEAD`` of rule ``static`` (or ``other``), with no query, no ``/api`` prefix and
  nothing the canonical encoding had to change (the target is exactly the path decided on);
- under ``/assets/`` - Vite's output directory: the hashed chunks (``index-BKeTeXLp.js``,
  ``manifest-CebUEmtR.json``), the import-map libraries (``assets/lib/``), images, icon fonts,
  the favicon - or one of the few unhashed files ``index.html`` links: ``/fonts/*.woff2``,
  ``/cursor/*.png``, ``/materialdesignicons.min.css``;
- every segment of plain file-name characters (no leading dot: no hidden files), a file
  extension of a static asset type.

Why this is exactly the frontend's files: ComfyUI serves the bare ``/assets/`` path only from
its web root, the frontend package's directory (its own asset *API* exists only under
``/api/assets``, which is rule ``assets``, never public; custom nodes' web files are under
``/extensions/<node>/``, never public). The content is the upstream's to decide, so the public
set is kept to paths that only the static web root answers. Not public: the page itself (``/``,
``index.html``: a browser navigation still goes to the login page), ``/extensions/*`` (custom
nodes' scripts), ``/scripts/*``, ``/templates/*``, ``/docs/*``, ``user.css``, and anything with a
query. A public request reaches ComfyUI without any identity (no ``Comfy-User``).

An authenticated request for the same files is handled as before (its credential decides); the
public path is taken only when there is no valid credential.
"""

from __future__ import annotations

import re

from aiohttp import hdrs, web

from proxy.state import RequestContext

_SEGMENT = r"[A-Za-z0-9@_][A-Za-z0-9@_.-]{0,127}"
_STATIC_TYPES = r"(?:js|mjs|css|json|woff2?|ttf|eot|svg|png|jpe?g|gif|webp|ico)"
PUBLIC_ASSET = re.compile(
    rf"/assets/(?:{_SEGMENT}/){{0,8}}{_SEGMENT}\.{_STATIC_TYPES}"
    r"|/fonts/[A-Za-z0-9_-]{1,128}\.woff2"
    r"|/cursor/[A-Za-z0-9_-]{1,128}\.png"
    r"|/materialdesignicons\.min\.css"
)
"""The stock frontend's bundled files (see the module docstring), on the canonical path."""


def is_public_asset(request: web.Request, ctx: RequestContext) -> bool:
    """Whether the request is for one of the stock frontend's bundled static files."""
    return (
        request.method in (hdrs.METH_GET, hdrs.METH_HEAD)
        # /assets/* is rule "static"; /fonts, /cursor and the icon font's CSS match no rule.
        and ctx.rule.name in ("static", "other")
        # The canonical target is the decision path itself: no query, no /api, no escapes.
        and ctx.upstream_path == ctx.path
        and PUBLIC_ASSET.fullmatch(ctx.path) is not None
    )


__all__ = ["PUBLIC_ASSET", "is_public_asset"]
