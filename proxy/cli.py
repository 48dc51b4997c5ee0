"""Command line: ``comfygate serve`` and ``comfygate check-config`` (also ``python -m proxy``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from proxy import __version__
from proxy.auth import cli as auth_cli
from proxy.errors import SettingsError
from proxy.observability.logging import configure_logging
from proxy.settings import Settings, load_settings, redacted


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfygate",
        description="A transparent, authenticating, multi-tenant reverse proxy for ComfyUI.",
    )
    parser.add_argument("--version", action="version", version=f"comfygate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    _config_arg(serve)
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--base-path", help="serve under a sub-path, e.g. /comfy (server.base_path)")
    serve.add_argument(
        "--upstream", action="append", help="ComfyUI URL; repeat for several (upstream.urls)"
    )

    check = sub.add_parser("check-config", help="validate the configuration and print it")
    _config_arg(check)
    auth_cli.register(sub)  # user add|remove|list|passwd, token create|revoke
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help="TOML configuration file (default: $COMFYGATE_CONFIG, else built-in defaults)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    server: dict[str, Any] = {}
    for key in ("host", "port", "base_path"):
        value = getattr(args, key, None)
        if value is not None:
            server[key] = value
    out: dict[str, dict[str, Any]] = {"server": server} if server else {}
    if getattr(args, "upstream", None):
        out["upstream"] = {"urls": tuple(args.upstream)}
    return out


def _run(settings: Settings) -> None:
    from proxy.server import serve  # noqa: PLC0415 - keeps check-config free of server imports

    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command in ("user", "token"):
        return auth_cli.run(args, settings)
    if args.command == "check-config":
        print(json.dumps(redacted(settings), indent=2))
        return 0
    configure_logging(settings.logging)
    try:
        _run(settings)
    except SettingsError as exc:  # found while starting (a key, a users file)
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
