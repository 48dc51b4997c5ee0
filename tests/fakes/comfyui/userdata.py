# ruff: noqa: ASYNC230, ASYNC240 - small blocking file calls on the loop, as ComfyUI does
"""``/users``, ``/settings``, ``/userdata`` and ``/v2/userdata`` (ComfyUI 0.3.64
``app/user_manager.py`` and ``app/app_settings.py``; captures/http-basic.json).

Single-user by default (ComfyUI without ``--multi-user``): the ``Comfy-User`` header is ignored,
every request is user ``default`` (``user/default/`` under root), so all clients share one set
of saved workflows, settings and ``user.css``; ``GET /users`` answers
``{"storage": "server", "migrated": <user/default exists>}``. With ``multi_user=True``
(``--multi-user``) the users are ``user/users.json`` as it was at start (``{}`` without it: not
even ``default`` exists), new ones come from ``POST /users`` (written back to users.json), the
``Comfy-User`` header selects the user (no header: ``default``), ``GET /users`` lists everyone,
and an unknown user gets 401 (settings), 403 (/v2/userdata) or 500 (other userdata routes).

Paths as ComfyUI resolves them: ``{file}`` is aiohttp's match value (one segment, ``%2F``
decoded), unquoted once more when it still contains ``%``; ``dir=`` likewise; ``/v2/userdata``'s
``path=`` is unquoted once, then once more when a ``%`` remains. The result is joined under the
user's directory and confined with a commonpath check (403; 400 on /v2/userdata).
``/v2/userdata`` lists the whole tree below ``path`` (``os.walk``), directories first.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import uuid
from typing import TYPE_CHECKING, Any
from urllib import parse

from aiohttp import web

from .paths import inside

if TYPE_CHECKING:
    from .server import FakeComfyUI


def _file_info(path: str, relative_to: str) -> dict[str, Any]:
    return {
        "path": os.path.relpath(path, relative_to).replace(os.sep, "/"),
        "size": os.path.getsize(path),
        "modified": os.path.getmtime(path),
        "created": os.path.getctime(path),
    }


class UserData:
    """``UserManager`` + ``AppSettings`` state."""

    def __init__(self, fake: FakeComfyUI) -> None:
        self.fake = fake
        self.root = fake.paths.user
        self.users: dict[str, str] = {"default": "default"}
        if fake.multi_user:
            self.users = {}
            if os.path.isfile(self.users_file):
                with open(self.users_file, encoding="utf-8") as fh:
                    self.users = json.load(fh)

    @property
    def users_file(self) -> str:
        return os.path.join(self.root, "users.json")

    def user_id(self, request: web.Request) -> str:
        user = "default"
        if self.fake.multi_user and "comfy-user" in request.headers:
            user = request.headers["comfy-user"]
        if user not in self.users:
            raise KeyError("Unknown user: " + user)
        return user

    def filepath(
        self, request: web.Request, file: str | None, create_dir: bool = True
    ) -> str | None:
        user_root = os.path.abspath(os.path.join(self.root, self.user_id(request)))
        if os.path.commonpath((self.root, user_root)) != self.root:
            return None
        path = user_root
        if file is not None:
            if "%" in file:
                file = parse.unquote(file)
            path = os.path.abspath(os.path.join(user_root, file))
            if not inside(user_root, path):
                return None
        parent = os.path.split(path)[0]
        if create_dir and not os.path.exists(parent):
            os.makedirs(parent, exist_ok=True)
        return path

    def settings_file(self, request: web.Request) -> str:
        path = self.filepath(request, "comfy.settings.json")
        assert path is not None
        return path

    def get_settings(self, request: web.Request) -> dict[str, Any]:
        try:
            path = self.settings_file(request)
        except KeyError as exc:
            raise web.HTTPUnauthorized() from exc
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                data: dict[str, Any] = json.load(fh)
                return data
        return {}

    def save_settings(self, request: web.Request, settings: dict[str, Any]) -> None:
        with open(self.settings_file(request), "w", encoding="utf-8") as fh:
            json.dump(settings, fh, indent=4)


def add_routes(fake: FakeComfyUI, routes: web.RouteTableDef) -> None:
    """Register the mirrored user/settings/userdata routes."""
    data = fake.userdata

    @routes.get("/users")
    async def get_users(request: web.Request) -> web.Response:
        if fake.multi_user:
            return web.json_response({"storage": "server", "users": data.users})
        user_dir = data.filepath(request, None, create_dir=False)
        return web.json_response({"storage": "server", "migrated": os.path.exists(user_dir or "")})

    @routes.post("/users")
    async def post_users(request: web.Request) -> web.Response:
        body = await request.json()
        username = body["username"]
        if username in data.users.values():
            return web.json_response({"error": "Duplicate username."}, status=400)
        name = username.strip()
        if not name:  # ComfyUI's add_user raises: aiohttp's plain-text 500
            raise ValueError("username not provided")
        user_id = re.sub("[^a-zA-Z0-9-_]+", "-", name)
        user_id = f"{user_id}_{uuid.uuid4()}"
        data.users[user_id] = name
        with open(data.users_file, "w", encoding="utf-8") as fh:
            json.dump(data.users, fh)
        return web.json_response(user_id)

    @routes.get("/settings")
    async def get_settings(request: web.Request) -> web.Response:
        return web.json_response(data.get_settings(request))

    @routes.get("/settings/{id}")
    async def get_setting(request: web.Request) -> web.Response:
        return web.json_response(data.get_settings(request).get(request.match_info["id"]))

    @routes.post("/settings")
    async def post_settings(request: web.Request) -> web.Response:
        settings = data.get_settings(request)
        new = await request.json()
        data.save_settings(request, {**settings, **new})
        return web.Response(status=200)

    @routes.post("/settings/{id}")
    async def post_setting(request: web.Request) -> web.Response:
        settings = data.get_settings(request)
        settings[request.match_info["id"]] = await request.json()
        data.save_settings(request, settings)
        return web.Response(status=200)

    @routes.get("/userdata")
    async def list_userdata(request: web.Request) -> web.Response:
        query = request.rel_url.query
        directory = query.get("dir", "")
        if not directory:
            return web.Response(status=400, text="Directory not provided")
        path = data.filepath(request, directory)
        if not path:
            return web.Response(status=403, text="Invalid directory")
        if not os.path.exists(path):
            return web.Response(status=404, text="Directory not found")
        recurse = query.get("recurse", "").lower() == "true"
        full_info = query.get("full_info", "").lower() == "true"
        split = query.get("split", "").lower() == "true"
        pattern = (
            os.path.join(glob.escape(path), "**", "*")
            if recurse
            else os.path.join(glob.escape(path), "*")
        )
        results: list[Any] = []
        for full in glob.glob(pattern, recursive=recurse):
            if not os.path.isfile(full):
                continue
            if full_info:
                results.append(_file_info(full, path))
                continue
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            results.append([rel, *rel.split("/")] if split else rel)
        return web.json_response(results)

    @routes.get("/v2/userdata")
    async def list_userdata_v2(request: web.Request) -> web.Response:
        rel = parse.unquote(request.rel_url.query.get("path", ""))
        try:
            base = data.filepath(request, None, create_dir=False)
            target = data.filepath(request, rel, create_dir=False) if rel else base
        except KeyError:
            return web.Response(status=403, text="Invalid user specified in request")
        if not target or not base:
            return web.Response(status=400, text="Invalid path requested")
        if not os.path.exists(target):
            if target == base:
                return web.json_response([])
            return web.Response(status=404, text="Requested path not found")
        if not os.path.isdir(target):
            return web.Response(status=400, text="Requested path is not a directory")
        results: list[dict[str, Any]] = []
        for top, dirs, names in os.walk(target, topdown=True):
            for name in dirs:
                rel_dir = os.path.relpath(os.path.join(top, name), base).replace(os.sep, "/")
                results.append({"name": name, "path": rel_dir, "type": "directory"})
            for name in names:
                full = os.path.join(top, name)
                item: dict[str, Any] = {
                    "name": name,
                    "path": os.path.relpath(full, base).replace(os.sep, "/"),
                    "type": "file",
                }
                stat = os.stat(full)
                item["size"] = stat.st_size
                item["modified"] = stat.st_mtime
                results.append(item)
        results.sort(key=lambda x: (x["type"] != "directory", x["name"].lower()))
        return web.json_response(results)

    def user_path(request: web.Request, check_exists: bool = False, param: str = "file") -> Any:
        file = request.match_info.get(param)
        if not file:
            return web.Response(status=400)
        path = data.filepath(request, file)
        if not path:
            return web.Response(status=403)
        if check_exists and not os.path.exists(path):
            return web.Response(status=404)
        return path

    @routes.get("/userdata/{file}")
    async def get_userdata(request: web.Request) -> web.StreamResponse:
        path = user_path(request, check_exists=True)
        if not isinstance(path, str):
            return path  # type: ignore[no-any-return]
        return web.FileResponse(path)

    @routes.post("/userdata/{file}")
    async def post_userdata(request: web.Request) -> web.Response:
        path = user_path(request)
        if not isinstance(path, str):
            return path  # type: ignore[no-any-return]
        overwrite = request.query.get("overwrite", "true") != "false"
        full_info = request.query.get("full_info", "false").lower() == "true"
        if not overwrite and os.path.exists(path):
            return web.Response(status=409, text="File already exists")
        try:
            body = await request.read()
            with open(path, "wb") as fh:
                fh.write(body)
        except OSError:
            return web.Response(
                status=400,
                reason='Invalid filename. Please avoid special characters like :\\/*?"<>|',
            )
        user_root = data.filepath(request, None) or ""
        resp = _file_info(path, user_root) if full_info else os.path.relpath(path, user_root)
        return web.json_response(resp)

    @routes.delete("/userdata/{file}")
    async def delete_userdata(request: web.Request) -> web.Response:
        path = user_path(request, check_exists=True)
        if not isinstance(path, str):
            return path  # type: ignore[no-any-return]
        os.remove(path)
        return web.Response(status=204)

    @routes.post("/userdata/{file}/move/{dest}")
    async def move_userdata(request: web.Request) -> web.Response:
        source = user_path(request, check_exists=True)
        if not isinstance(source, str):
            return source  # type: ignore[no-any-return]
        dest = user_path(request, check_exists=False, param="dest")
        if not isinstance(dest, str):
            return dest  # type: ignore[no-any-return]
        overwrite = request.query.get("overwrite", "true") != "false"
        full_info = request.query.get("full_info", "false").lower() == "true"
        if not overwrite and os.path.exists(dest):
            return web.Response(status=409, text="File already exists")
        shutil.move(source, dest)
        user_root = data.filepath(request, None) or ""
        resp = _file_info(dest, user_root) if full_info else os.path.relpath(dest, user_root)
        return web.json_response(resp)
