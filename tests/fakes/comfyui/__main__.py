"""CLI: ``python -m tests.fakes.comfyui --host 127.0.0.1 --port 8188 [--root DIR] [--frontend]
[--no-origin-check]`` serves the fake forever (uvloop when installed, no per-request logging,
request recording off unless ``--record``) for the benchmark and manual runs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from .server import FakeComfyUI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.comfyui", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--root", type=Path, default=None, help="data dir (default: a temp dir)")
    parser.add_argument("--frontend", action="store_true", help="serve comfyui-frontend-package")
    parser.add_argument("--no-origin-check", action="store_true")
    parser.add_argument("--no-sec-fetch-check", action="store_true")
    parser.add_argument("--max-upload-size", type=float, default=100, help="MB, like ComfyUI")
    parser.add_argument("--record", action="store_true", help="keep the request log (memory!)")
    parser.add_argument("--enable-compress-response-body", action="store_true")
    parser.add_argument(
        "--history-entries", type=int, default=0, help="finished prompts of nobody's at start"
    )
    parser.add_argument(
        "--execution-seconds", type=float, default=0.0, help="each prompt's simulated GPU time"
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    root = args.root or Path(tempfile.mkdtemp(prefix="fake-comfyui-"))
    fake = FakeComfyUI(
        root,
        frontend=args.frontend,
        origin_check=not args.no_origin_check,
        sec_fetch_check=not args.no_sec_fetch_check,
        max_upload_size=int(args.max_upload_size * 1024 * 1024),
        record=args.record,
        compress_responses=args.enable_compress_response_body,
    )
    fake.queue.preload_history(args.history_entries, padding=1400)  # ~2 KB entries
    fake.queue.execution_seconds = args.execution_seconds
    port = await fake.start(args.host, args.port)
    print(f"fake ComfyUI on http://{args.host}:{port} (root {root})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    try:
        import uvloop  # noqa: PLC0415

        runner = uvloop.run
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args))


if __name__ == "__main__":
    main()
