"""The console banner a person sees once comfygate serves: where it listens, whether ComfyUI
answers, where state lives, which protections are on, and what to do next (with the one-time
admin token of a first run).

Printed on stderr once the listener is open (a second instance that cannot bind the port prints
its error alone), by the process itself or, with ``--workers N``, by the supervisor once every
worker listens. Not a log line: it is for the person at the console; the ``proxy_started`` and
``upstream_unreachable`` log lines carry the same facts for log collection.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import aiohttp
import structlog
from yarl import URL

from proxy import __version__
from proxy.auth.authenticator import bootstrap_notice
from proxy.settings import Settings
from proxy.upstream.health_checks import probe
from proxy.upstream.pool import PROBE_TIMEOUT_SECONDS, Upstream

log = structlog.get_logger("comfygate")

COMFYUI_COMMAND = "python main.py --listen 127.0.0.1 --port 8188 --multi-user"
"""How the README and ``comfygate init`` tell people to start ComfyUI behind the proxy."""


def comfyui_command(url: str) -> str:
    """:data:`COMFYUI_COMMAND` for the ComfyUI the proxy expects at ``url``."""
    parsed = URL(url)
    host = parsed.host or "127.0.0.1"
    port = parsed.explicit_port or 8188
    return f"python main.py --listen {host} --port {port} --multi-user"


def command_name() -> str:
    """How to run comfygate again as it was run now: ``comfygate`` when that is on the PATH,
    else the path it was started by (``.venv/bin/comfygate`` in a checkout), so that the
    printed commands work when copied."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name != "comfygate":
        return "comfygate"  # python -m proxy, or a test runner: the documented name
    on_path = shutil.which("comfygate")
    if on_path is not None and Path(on_path).resolve() == Path(argv0).resolve():
        return "comfygate"
    return argv0


def public_url(settings: Settings) -> str:
    """The URL to open in a browser (``server.public_url``, else the listen address)."""
    server = settings.server
    if server.public_url:
        return f"{server.public_url}{server.base_path}/"
    host = server.host
    if host in ("0.0.0.0", "::", ""):  # every interface: loopback works on this machine
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.port}{server.base_path}/"


def config_flag(config_path: str | None) -> str:
    return f" --config {config_path}" if config_path else ""


def banner(
    settings: Settings,
    *,
    upstreams: Mapping[str, bool],
    config_path: str | None = None,
    bootstrap_token: str | None = None,
    workers: int = 1,
) -> str:
    """The text; ``upstreams``: each probed ComfyUI URL -> whether it answered."""
    lines = [f"comfygate {__version__} is serving on {public_url(settings)}"]
    if workers > 1:
        lines[0] += f" ({workers} worker processes)"
    for url, up in upstreams.items():
        state = "reachable" if up else "NOT reachable (pages show a retrying notice until it is)"
        lines.append(f"  ComfyUI     {url}: {state}")
    if not upstreams and settings.upstream.discovery.hostname:
        lines.append(f"  ComfyUI     found in DNS: {settings.upstream.discovery.hostname}")
    redis = settings.redis
    state = f"Redis ({redis.mode})" if redis.mode != "none" else "in this process (no Redis)"
    lines.append(f"  state       {state}")
    lines.append(
        "  protections "
        + ", ".join(
            f"{name} {'on' if on else 'OFF'}"
            for name, on in (
                ("auth", settings.auth.enabled),
                ("isolation", settings.isolation.enabled),
                ("workflow policy", settings.policy.enabled),
                ("rate limits", settings.rate_limits.enabled),
            )
        )
    )
    login = settings.auth.login.users_file
    lines.append(f"  users file  {login or 'none (password sign-in off)'}")
    lines.append("")
    flag = config_flag(config_path)
    for url in [u for u, up in upstreams.items() if not up][:1]:
        lines.append(f"Start ComfyUI:   {comfyui_command(url)}  (in ComfyUI's directory)")
    if bootstrap_token:
        lines.append(bootstrap_notice(bootstrap_token).rstrip("\n"))
    else:
        lines.append(f"Sign in at {public_url(settings)}login")
        users = f" --users-file {login}" if login and not config_path else ""
        cmd = command_name()
        lines.append(f"Add a user:      {cmd} user add NAME --role user{flag}{users}")
        if settings.auth.jwt.secret:
            lines.append(f"API token:       {cmd} token create --sub NAME{flag}")
    return "\n".join(lines) + "\n"


def print_banner(text: str, stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stderr
    out.write("\n" + text + "\n")
    out.flush()


def warn_unreachable(upstreams: Mapping[str, bool]) -> None:
    """The log line of a ComfyUI that does not answer at startup (``/readyz`` says 503)."""
    for url, up in upstreams.items():
        if not up:
            log.warning(
                "upstream_unreachable",
                upstream=url,
                detail="ComfyUI does not answer: /readyz answers 503 and browsers get a "
                f"retrying page until it does; start it with `{comfyui_command(url)}`",
            )


async def probe_urls(settings: Settings) -> dict[str, bool]:
    """Whether each configured ComfyUI answers ``GET /prompt`` now (for the supervisor, which
    has no upstream pool of its own)."""
    upstreams = [Upstream.from_url(i.url, name=i.name) for i in settings.upstream.static_instances]
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        results = await asyncio.gather(
            *(probe(session, u, PROBE_TIMEOUT_SECONDS) for u in upstreams)
        )
    return {u.base: r.up for u, r in zip(upstreams, results, strict=True)}


__all__ = [
    "COMFYUI_COMMAND",
    "banner",
    "comfyui_command",
    "command_name",
    "config_flag",
    "print_banner",
    "probe_urls",
    "public_url",
    "warn_unreachable",
]
