"""Command line: ``comfygate serve`` and ``comfygate check-config`` (also ``python -m proxy``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from proxy import __version__
from proxy.auth import cli as auth_cli
from proxy.errors import SettingsError
from proxy.isolation import cli as isolation_cli
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
    serve.add_argument(
        "--workers", type=int, help="processes serving the port under a supervisor (server.workers)"
    )

    check = sub.add_parser(
        "check-config",
        help="validate the configuration and the workflow policy files, and print the settings",
    )
    _config_arg(check)
    auth_cli.register(sub)  # user add|remove|list|passwd, token create|revoke
    isolation_cli.register(sub)  # folders SUBJECT...
    return parser


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help="TOML configuration file (default: $COMFYGATE_CONFIG, else built-in defaults)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    server: dict[str, Any] = {}
    for key in ("host", "port", "base_path", "workers"):
        value = getattr(args, key, None)
        if value is not None:
            server[key] = value
    out: dict[str, dict[str, Any]] = {"server": server} if server else {}
    if getattr(args, "upstream", None):
        out["upstream"] = {"urls": tuple(args.upstream)}
    return out


def _check_policy(settings: Settings) -> None:
    """Load the workflow policy files as startup does (``create_app`` builds the policy store
    whether or not ``policy.enabled``), so a bad file fails here and not at the next deploy.

    Raises:
        PolicyError: every problem of the files at once.
    """
    from proxy.policy.loader import load_policy  # noqa: PLC0415 - only this command needs it

    load_policy(settings.policy, settings.roles)


def _run(settings: Settings) -> int:
    if settings.server.workers > 1:
        from proxy.limits.limiter import warn_if_process_local  # noqa: PLC0415
        from proxy.supervisor import supervise  # noqa: PLC0415

        warn_if_process_local(
            redis_configured=settings.redis.mode != "none",
            enabled=settings.rate_limits.enabled,
            workers=settings.server.workers,
        )

        return supervise(settings)
    from proxy.server import run, serve  # noqa: PLC0415 - keeps check-config free of server imports

    run(serve(settings))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command in ("user", "token"):
        return auth_cli.run(args, settings)
    if args.command == "folders":
        return isolation_cli.run(settings, args.subjects)
    if args.command == "check-config":
        try:
            _check_policy(settings)
        except SettingsError as exc:  # the same message startup prints: file, key, rule
            print(exc, file=sys.stderr)
            return 2
        print(json.dumps(redacted(settings), indent=2))
        return 0
    configure_logging(settings.logging)
    try:
        return _run(settings)
    except SettingsError as exc:  # found while starting (a key, a users file, a busy port)
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
