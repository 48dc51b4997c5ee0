"""Command line: ``comfygate serve`` and ``comfygate check-config`` (also ``python -m proxy``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from proxy import __version__, init_cli
from proxy.auth import cli as auth_cli
from proxy.errors import SettingsError
from proxy.isolation import cli as isolation_cli
from proxy.observability.logging import configure_logging
from proxy.preflight import check_startup, format_warnings, preflight
from proxy.settings import CONFIG_ENV, Settings, load_settings, redacted
from proxy.settings.auth import DEFAULT_ROLES


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
    init_cli.register(sub)  # init: a first configuration, secrets and an admin
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


def _describe_roles(settings: Settings) -> str:
    """The effective roles, one line each, for people reading ``check-config``'s stderr."""
    builtin = settings.auth.builtin_roles
    lines = [
        "effective roles ("
        + ("built-in + configured" if builtin else "configured only: auth.builtin_roles = false")
        + "):"
    ]
    width = max((len(name) for name in settings.roles), default=0)
    for name, role in settings.roles.items():
        if name in DEFAULT_ROLES:
            origin = "built-in" if role == DEFAULT_ROLES[name] else "built-in, overridden"
        else:
            origin = "configured"
        traits = []
        if role.admin:
            traits.append("admin")
        if not role.submit:
            traits.append("read-only")
        if role.allow_routes:
            traits.append(f"allow_routes={','.join(role.allow_routes)}")
        if role.queue_quota is not None:
            traits.append(f"queue_quota={role.queue_quota}")
        detail = f"  ({'; '.join(traits)})" if traits else ""
        lines.append(f"  {name.ljust(width)}  {origin}{detail}")
    if not any(role.admin for role in settings.roles.values()):
        lines.append("  (no admin role: nobody can use the admin-only routes)")
    return "\n".join(lines) + "\n"


def _check_config(settings: Settings) -> int:
    """``check-config``: everything ``serve`` would refuse (exit 2, nothing on stdout), else the
    settings on stdout, and the warnings and the effective roles on stderr."""
    report = preflight(settings)
    if not report.ok:  # the refusals alone, exactly what serve prints
        print(report.message(), file=sys.stderr)
        return 2
    sys.stderr.write(format_warnings(report.warnings))
    sys.stderr.write(_describe_roles(settings))
    print(json.dumps(redacted(settings), indent=2))
    return 0


def _run(settings: Settings, config_path: str | None = None) -> int:
    if settings.server.workers > 1:
        from proxy.limits.limiter import warn_if_process_local  # noqa: PLC0415
        from proxy.supervisor import supervise  # noqa: PLC0415

        warn_if_process_local(
            redis_configured=settings.redis.mode != "none",
            enabled=settings.rate_limits.enabled,
            workers=settings.server.workers,
        )

        return supervise(settings, config_path=config_path)
    from proxy.server import run, serve  # noqa: PLC0415 - keeps check-config free of server imports

    run(serve(settings, config_path=config_path))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "init":  # writes a configuration: reads none
        return init_cli.run(args)
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
        return _check_config(settings)
    try:
        # The same checks as check-config, before anything opens: a list and exit 2, never a
        # traceback from a half-started app.
        check_startup(settings)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(settings.logging)
    try:
        return _run(settings, args.config or os.environ.get(CONFIG_ENV) or None)
    except SettingsError as exc:  # found while starting (a key, a users file, a busy port)
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
