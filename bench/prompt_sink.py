"""A stand-in upstream for measuring the proxy's own cost of ``POST /prompt``: it answers like
ComfyUI (``{"prompt_id", "number", "node_errors"}``) without validating or running anything.

The fake ComfyUI validates and queues a 200-node workflow in Python (tens of milliseconds, on the
same core as the proxy), which would hide what the proxy adds; ComfyUI's own cost is the same
with or without the proxy's checks, so it is left out. Also answers what the proxy asks on its
own: ``GET /prompt`` (readiness), ``GET /queue`` (quota reconciliation), ``GET /object_info``
(the fake ComfyUI's node definitions: the proxy types and checks prompts on them) and
``GET /history/...`` (the bench's readiness probe).

``python -m bench.prompt_sink --port 8199``
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from aiohttp import web

_numbers = itertools.count()
_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
_OBJECT_INFO = json.dumps(
    {
        name: node
        for file in ("comfyui_object_info.json", "comfyui_object_info_more.json")
        for name, node in json.loads((_DATA / file).read_text(encoding="utf-8")).items()
    }
)


async def post_prompt(request: web.Request) -> web.Response:
    await request.read()  # not even parsed: the sink's cost must not matter
    answer = {"prompt_id": "sink", "number": next(_numbers), "node_errors": {}}
    return web.json_response(answer)


async def get_prompt(request: web.Request) -> web.Response:
    return web.json_response({"exec_info": {"queue_remaining": 0}})


async def get_queue(request: web.Request) -> web.Response:
    return web.json_response({"queue_running": [], "queue_pending": []})


async def empty(request: web.Request) -> web.Response:
    return web.json_response({})


async def object_info(request: web.Request) -> web.Response:
    return web.Response(text=_OBJECT_INFO, content_type="application/json")


def make_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    for prefix in ("", "/api"):
        app.router.add_post(f"{prefix}/prompt", post_prompt)
        app.router.add_get(f"{prefix}/prompt", get_prompt)
        app.router.add_get(f"{prefix}/queue", get_queue)
        app.router.add_get(f"{prefix}/object_info", object_info)
        app.router.add_get(f"{prefix}/history/{{id}}", empty)
        app.router.add_post(f"{prefix}/queue", empty)
        app.router.add_post(f"{prefix}/history", empty)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prompt_sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    print(json.dumps({"event": "prompt_sink_listening", "port": args.port}), flush=True)
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
