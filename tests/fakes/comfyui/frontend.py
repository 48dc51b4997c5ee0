# ruff: noqa: ASYNC240 - small blocking file calls on the loop, as ComfyUI does
"""Routes the stock frontend 1.27.10 calls at page load, plus static serving
(captures/frontend-requests.json, frontend-requests-tinyckpt.json, http-basic.json,
api-prefix.json).

* ``GET /`` -> ``index.html`` with ``Cache-Control: no-cache``, ``Pragma``, ``Expires: 0``.
* static ``/`` like ``web.static`` (no SPA fallback: unknown paths answer aiohttp's lazy
  FileResponse 404, ``application/octet-stream`` + chunked, as recorded). With
  ``frontend=False`` a one-page placeholder web root under ``root/web`` is served instead.
* ``/templates`` static from ``tests/data/comfyui_templates`` (small stand-in for the workflow
  templates package: ``index.json``, ``default.json``, one thumbnail).
* metadata routes: ``/system_stats`` (with ``argv``), ``/features``, ``/embeddings``,
  ``/extensions``, ``/i18n``, ``/workflow_templates``, ``/models``, ``/models/{folder}``,
  ``/experiment/models*``, ``/object_info`` (+ ``/{class}``).
* ``/internal`` sub-app (never mirrored under ``/api``): ``logs``, ``logs/raw``,
  ``logs/subscribe`` (PATCH), ``folder_paths``, ``files/{type}``.
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .paths import EXPERIMENT_HIDDEN, MODEL_FOLDERS

if TYPE_CHECKING:
    from .server import FakeComfyUI

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "data" / "comfyui_templates"
PLACEHOLDER_INDEX = """<!doctype html><html lang="en"><head><meta charset="UTF-8">
<title>ComfyUI</title></head><body><canvas id="graph-canvas"></canvas>
<p>fake ComfyUI (no frontend package served)</p></body></html>
"""
RAM = 25276514304


def frontend_root(setting: bool | Path | str, root: str) -> str:
    """The web root: the frontend package, a given directory, or a placeholder."""
    if setting is True:
        import comfyui_frontend_package  # type: ignore[import-untyped]  # noqa: PLC0415

        return os.path.join(os.path.dirname(comfyui_frontend_package.__file__), "static")
    if setting:
        return os.path.abspath(setting)
    web_root = os.path.join(root, "web")
    os.makedirs(web_root, exist_ok=True)
    index = os.path.join(web_root, "index.html")
    if not os.path.exists(index):
        with open(index, "w", encoding="utf-8") as fh:
            fh.write(PLACEHOLDER_INDEX)
    return web_root


def list_extensions(web_root: str) -> list[str]:
    files = glob.glob(os.path.join(glob.escape(web_root), "extensions/**/*.js"), recursive=True)
    return ["/" + os.path.relpath(f, web_root).replace("\\", "/") for f in files]


def system_stats(fake: FakeComfyUI) -> dict[str, Any]:
    return {
        "system": {
            "os": os.name,
            "ram_total": RAM,
            "ram_free": RAM - 1651466240,
            "comfyui_version": "0.3.64",
            "required_frontend_version": "1.27.10",
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": sys.version,
            "pytorch_version": "2.14.1+cu130",
            "embedded_python": False,
            "argv": fake.argv(),
        },
        "devices": [
            {
                "name": "cpu",
                "type": "cpu",
                "index": None,
                "vram_total": RAM,
                "vram_free": RAM - 1651466240,
                "torch_vram_total": RAM,
                "torch_vram_free": RAM - 1651466240,
            }
        ],
    }


def add_routes(fake: FakeComfyUI, routes: web.RouteTableDef) -> None:
    """Register the mirrored UI-support routes (``/`` is mirrored as ``/api/`` too)."""
    paths = fake.paths
    extensions = list_extensions(fake.web_root)

    @routes.get("/")
    async def get_root(request: web.Request) -> web.FileResponse:
        response = web.FileResponse(os.path.join(fake.web_root, "index.html"))
        response.headers["Cache-Control"] = "no-cache"
        response.headers["Pragma"] = "no-cache"
        response.headers["Expires"] = "0"
        return response

    @routes.get("/embeddings")
    async def get_embeddings(request: web.Request) -> web.Response:
        return web.json_response([os.path.splitext(n)[0] for n in paths.model_files("embeddings")])

    @routes.get("/models")
    async def list_model_types(request: web.Request) -> web.Response:
        return web.json_response(list(MODEL_FOLDERS))

    @routes.get("/models/{folder}")
    async def get_models(request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in MODEL_FOLDERS:
            return web.Response(status=404)
        return web.json_response(paths.model_files(folder))

    @routes.get("/extensions")
    async def get_extensions(request: web.Request) -> web.Response:
        return web.json_response(extensions)

    @routes.get("/system_stats")
    async def get_system_stats(request: web.Request) -> web.Response:
        return web.json_response(system_stats(fake))

    @routes.get("/features")
    async def get_features(request: web.Request) -> web.Response:
        return web.json_response(fake.server_features())

    @routes.get("/object_info")
    async def get_object_info(request: web.Request) -> web.Response:
        return web.json_response(fake.registry.object_info())

    @routes.get("/object_info/{node_class}")
    async def get_object_info_node(request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        if fake.registry.get(name) is None:
            return web.json_response({})
        return web.json_response({name: fake.registry.definition(name)})

    @routes.get("/i18n")
    async def get_i18n(request: web.Request) -> web.Response:
        return web.json_response({})

    @routes.get("/workflow_templates")
    async def get_workflow_templates(request: web.Request) -> web.Response:
        return web.json_response({})

    @routes.get("/experiment/models")
    async def get_model_folders(request: web.Request) -> web.Response:
        return web.json_response(
            [
                {"name": name, "folders": paths.model_dirs(name)}
                for name in MODEL_FOLDERS
                if name not in EXPERIMENT_HIDDEN
            ]
        )

    @routes.get("/experiment/models/{folder}")
    async def get_all_models(request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in MODEL_FOLDERS:
            return web.Response(status=404)
        files: list[dict[str, Any]] = []
        for index, base in enumerate(paths.model_dirs(folder)):
            for name in paths.model_files(folder):
                full = os.path.join(base, name)
                if os.path.isfile(full):
                    stat = os.stat(full)
                    files.append(
                        {
                            "name": name,
                            "pathIndex": index,
                            "modified": stat.st_mtime,
                            "created": stat.st_ctime,
                            "size": stat.st_size,
                        }
                    )
        return web.json_response(files)

    @routes.get("/experiment/models/preview/{folder}/{path_index}/{filename:.*}")
    async def get_model_preview(request: web.Request) -> web.StreamResponse:
        folder = request.match_info["folder"]
        dirs = paths.model_dirs(folder)
        try:
            base = dirs[int(request.match_info["path_index"])]
        except (ValueError, IndexError):
            return web.Response(status=404)
        stem = os.path.splitext(os.path.join(base, request.match_info["filename"]))[0]
        for ext in (".webp", ".png", ".jpg", ".jpeg", ".preview.png"):
            if os.path.isfile(stem + ext) and os.path.commonpath((base, stem + ext)) == base:
                return web.FileResponse(stem + ext, headers={"Content-Type": "image/webp"})
        return web.Response(status=404)


def internal_app(fake: FakeComfyUI) -> web.Application:
    """``api_server/routes/internal/internal_routes.py``: the ``/internal`` sub-application."""
    routes = web.RouteTableDef()

    @routes.get("/logs")
    async def get_logs(request: web.Request) -> web.Response:
        return web.json_response("".join(f"{t} - {m}\n" for t, m in fake.logs))

    @routes.get("/logs/raw")
    async def get_raw_logs(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "entries": [{"t": t, "m": m} for t, m in fake.logs],
                "size": {"cols": 80, "rows": 24},
            }
        )

    @routes.patch("/logs/subscribe")
    async def subscribe_logs(request: web.Request) -> web.Response:
        json_data = await request.json()
        client_id = json_data["clientId"]
        if json_data["enabled"]:
            fake.log_subscribers.add(client_id)
        else:
            fake.log_subscribers.discard(client_id)
        return web.Response(status=200)

    @routes.get("/folder_paths")
    async def get_folder_paths(request: web.Request) -> web.Response:
        return web.json_response({name: fake.paths.model_dirs(name) for name in MODEL_FOLDERS})

    @routes.get("/files/{directory_type}")
    async def get_files(request: web.Request) -> web.Response:
        kind = request.match_info["directory_type"]
        if kind not in ("output", "input", "temp"):
            return web.json_response({"error": "Invalid directory type"}, status=400)
        directory = fake.paths.by_type(kind) or ""
        entries = sorted(
            (e for e in os.scandir(directory) if e.is_file()), key=lambda e: -e.stat().st_mtime
        )
        return web.json_response([e.name for e in entries])

    app = web.Application()
    app.add_routes(routes)
    return app


def static_routes(fake: FakeComfyUI) -> list[web.AbstractRouteDef]:
    """``/templates`` and the web root, registered last like ComfyUI."""
    return [web.static("/templates", str(TEMPLATES_DIR)), web.static("/", fake.web_root)]
