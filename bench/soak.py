"""``make soak``: mixed load through two comfygate replicas while faults are injected.

Everything runs on loopback, as real processes: one ``redis-server`` (the suite's helper), two
fake ComfyUI instances (``python -m tests.fakes.comfyui``) and two comfygate replicas in front
of both, sharing the Redis. Several users (``--users``) each keep a WebSocket open (as a
browser tab: reconnected with the same ``clientId`` when its replica goes away), submit
prompts (about ``--rate`` per second in all, each to a replica chosen as a load balancer
would: any replica whose ``/readyz`` answers and is not draining), poll like the UI
(``/api/jobs``, ``/history?max_items=20``, ``/queue``), read their prompts' entries and
download their images; a trickle of bad requests (malformed JSON, unknown node, no token,
others' ids and files) runs alongside.

Faults at fixed fractions of ``--duration`` (deterministic structure; ``--seed`` fixes the
load's randomness): Redis stopped for ``--redis-outage`` seconds; replica 1 SIGKILLed and
restarted; ComfyUI instance 2 SIGKILLed for ``--comfy-outage`` seconds and restarted (empty
queue and history, its files kept); replica 2 stopped with SIGTERM (graceful) and restarted.
Each fault's window runs from the fault until recovery (every replica ready, a canary prompt
through each replica finished) plus ``GRACE_SECONDS``.

Printed at the end, with the promise each row must keep (exit status 1 when one fails):

- accepted / completed / failed visibly (an error entry or ``execution_error`` for the owner)
  / lost (accepted, then nothing: no entry, no event) / duplicated (run twice: two
  ``execution_success`` on one socket, or an entry on both instances) / contradicted
  (completed for one view, failed for another);
- cross-user leaks: another user's prompt id in a user's socket events, history, jobs or
  queue; another user's entry or image served;
- deaf sockets: a socket open (steadily, since ``SOCKET_SETTLE_SECONDS`` before the
  submission) that never heard the end of its own finished prompt;
- 5xx answers outside fault windows;
- RSS slope per replica process after warm-up (least squares, MB/hour; a process alive for
  less than ``MIN_SLOPE_SECONDS`` after warm-up is shown, not judged);
- recovery time after each fault.

Run: ``make soak`` (3 minutes), ``make soak SOAK_ARGS="--duration 600 --users 8"``. Logs of
every process are kept under ``--log-dir`` (default: a temporary directory, printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from bench.fixtures import api_graph
from bench.procs import Proc, ProcessGroup, free_port, wait_http
from bench.targets import BENCH_JWT_SECRET, PASS_THROUGH, default_comfygate_cmd, fake_command
from tests.redis_server import RedisServer, start_redis

GRACE_SECONDS = 5.0
SOCKET_SETTLE_SECONDS = 2.0
"""A socket hears prompts submitted this long after it opened (its links to every instance
are made by then); earlier ones are not judged."""
WARMUP_FRACTION = 0.15
PROCESS_WARMUP_SECONDS = 20.0
MIN_SLOPE_SECONDS = 45.0
RSS_EVERY_SECONDS = 2.0
POLL_EVERY_SECONDS = 2.0
BAD_EVERY_SECONDS = 1.5
DRAIN_SECONDS = 30.0
RECOVERY_LIMIT_SECONDS = 30.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)
FOLDER_SECRET = "soak-folder-secret-0123456789abcdef0123456789"


def token(user: str, roles: tuple[str, ...] = ("user",)) -> str:
    now = int(time.time())
    claims = {"sub": user, "roles": list(roles), "iat": now, "exp": now + 86_400, "jti": user}
    return jwt.encode(claims, BENCH_JWT_SECRET, algorithm="HS256")


# -- the processes ---------------------------------------------------------------------------


@dataclass
class Replica:
    index: int
    port: int
    proc: Proc | None = None
    generation: int = 0
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Instance:
    index: int
    port: int
    root: Path
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"127.0.0.1:{self.port}"


class Cluster:
    """Redis, the fake instances and the replicas, each stoppable and restartable in place."""

    def __init__(self, log_dir: Path, replicas: int = 2, instances: int = 2) -> None:
        self.log_dir = log_dir
        self.group = ProcessGroup(None)
        self.redis: RedisServer | None = None
        self.instances = [
            Instance(i, free_port(), log_dir / f"comfyui-{i + 1}") for i in range(instances)
        ]
        self.replicas = [Replica(i, free_port()) for i in range(replicas)]

    async def start(self) -> None:
        self.redis = start_redis()
        for instance in self.instances:
            await self.start_instance(instance)
        for replica in self.replicas:
            await self.start_replica(replica)

    async def start_instance(self, instance: Instance) -> None:
        argv, _ = fake_command(instance.port, instance.root)
        log = self.log_dir / f"comfyui-{instance.index + 1}.log"
        instance.proc = self.group.spawn(f"comfyui-{instance.index + 1}", argv, log)
        await wait_http(f"{instance.url}/prompt", instance.proc)

    def kill_instance(self, instance: Instance) -> None:
        assert instance.proc is not None
        os.killpg(instance.proc.pid, signal.SIGKILL)
        instance.proc.popen.wait()
        self.group.procs.remove(instance.proc)

    def replica_env(self) -> dict[str, str]:
        assert self.redis is not None
        return {
            "COMFYGATE_UPSTREAM__URLS": json.dumps([i.url for i in self.instances]),
            **PASS_THROUGH,
            "COMFYGATE_UPSTREAM__CHECK_MULTI_USER_AT_STARTUP": "false",
            "COMFYGATE_UPSTREAM__HEALTH__INTERVAL_SECONDS": "1",
            "COMFYGATE_UPSTREAM__HEALTH__OPEN_SECONDS": "2",
            "COMFYGATE_UPSTREAM__HEALTH__MAX_OPEN_SECONDS": "4",
            "COMFYGATE_REDIS__URL": self.redis.url,
            "COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET,
            "COMFYGATE_ISOLATION__FOLDER_SECRET": FOLDER_SECRET,
            "COMFYGATE_LOGGING__FORMAT": "json",
            "COMFYGATE_METRICS__PORT": str(free_port()),
        }

    async def start_replica(self, replica: Replica) -> None:
        argv = [*default_comfygate_cmd(), "serve", "--host", "127.0.0.1", "--port"]
        argv.append(str(replica.port))
        replica.generation += 1
        replica.started_at = time.monotonic()
        name = f"replica-{replica.index + 1}"
        log = self.log_dir / f"{name}.log"
        replica.proc = self.group.spawn(name, argv, log, env=self.replica_env())
        await wait_http(f"{replica.url}/healthz", replica.proc, ok=lambda s: s == 200)

    def signal_replica(self, replica: Replica, sig: signal.Signals) -> None:
        assert replica.proc is not None
        replica.proc.popen.send_signal(sig)

    async def wait_exit(self, replica: Replica, limit: float = 60.0) -> int | None:
        assert replica.proc is not None
        popen = replica.proc.popen
        try:
            code: int | None = await asyncio.to_thread(popen.wait, limit)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            os.killpg(replica.proc.pid, signal.SIGKILL)
            replica.proc.popen.wait()
        self.group.procs.remove(replica.proc)
        return code

    def stop(self) -> None:
        self.group.stop_all()
        if self.redis is not None:
            self.redis.stop()


# -- what the load saw -------------------------------------------------------------------


@dataclass
class Connection:
    """One WebSocket connection of a user's tab."""

    user: str
    opened_at: float
    closed_at: float | None = None
    events: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))


@dataclass
class Prompt:
    prompt_id: str
    user: str
    submitted_at: float
    replica: int
    outcome: str = ""
    """completed, failed, lost (after the drain)."""


@dataclass
class Window:
    name: str
    started: float
    repaired: float = 0.0
    recovered: float | None = None

    def covers(self, t: float) -> bool:
        end = (self.recovered or float("inf")) + GRACE_SECONDS
        return self.started <= t <= end


@dataclass
class Record:
    prompts: dict[str, Prompt] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)
    connections: list[Connection] = field(default_factory=list)
    seen_ids: list[tuple[str, str, str]] = field(default_factory=list)
    """(user, prompt id, where) of every id a user was shown."""
    leaks: list[str] = field(default_factory=list)
    answers: list[tuple[float, str, int]] = field(default_factory=list)
    """(time, route, status) of every HTTP answer."""
    connection_errors: list[tuple[float, str]] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    windows: list[Window] = field(default_factory=list)
    rss: dict[tuple[int, int], list[tuple[float, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    images: Counter[int] = field(default_factory=Counter)
    polled: dict[str, str] = field(default_factory=dict)
    """Each prompt's ``status_str`` as last seen in its owner's ``/history`` polls."""
    sigterm_exit: int | None = None
    killed_with: list[str] = field(default_factory=list)
    """The prompts the killed instance held when it was killed (one running: it may have sent
    its end just before; then it completed, and must not be reported lost)."""
    """Exit status of the replica stopped with SIGTERM (0: a clean, graceful stop)."""


# -- the load -------------------------------------------------------------------------------


class Load:
    def __init__(self, cluster: Cluster, args: argparse.Namespace, record: Record) -> None:
        self.cluster = cluster
        self.args = args
        self.record = record
        self.users = [f"soak-user-{i + 1}" for i in range(args.users)]
        self.headers = {u: {"Authorization": f"Bearer {token(u)}"} for u in self.users}
        self.live: set[int] = {r.index for r in cluster.replicas}
        self.load_stop = asyncio.Event()
        """Ends submissions, polls, bad requests and the fault plan."""
        self.stopping = asyncio.Event()
        """Ends the sockets and the watchers (after the drain)."""
        self.final_at = float("inf")
        self.session: aiohttp.ClientSession | None = None
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def pick(self, rng: random.Random, prefer: int | None = None) -> Replica:
        live = sorted(self.live) or [r.index for r in self.cluster.replicas]
        index = prefer if prefer in live else rng.choice(live)
        return self.cluster.replicas[index]

    async def call(
        self,
        replica: Replica,
        method: str,
        path: str,
        route: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, bytes]:
        assert self.session is not None
        try:
            async with self.session.request(
                method,
                replica.url + path,
                headers={**(headers or {}), "Content-Type": "application/json"},
                data=body,
                timeout=REQUEST_TIMEOUT,
            ) as resp:
                data = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.record.connection_errors.append((self.now(), f"{route}: {type(exc).__name__}"))
            return 0, b""
        self.record.answers.append((self.now(), route, resp.status))
        self.record.statuses[f"{route} {resp.status}"] += 1
        return resp.status, data

    # -- users ------------------------------------------------------------------------
    async def socket(self, n: int) -> None:
        user = self.users[n]
        client_id = f"soak-tab-{n + 1}"
        rng = random.Random(self.args.seed * 1000 + n)
        assert self.session is not None
        while not self.stopping.is_set():
            replica = self.pick(rng, prefer=n % len(self.cluster.replicas))
            try:
                async with self.session.ws_connect(
                    f"{replica.url}/ws?clientId={client_id}",
                    headers=self.headers[user],
                    heartbeat=None,
                ) as ws:
                    conn = Connection(user, self.now())
                    self.record.connections.append(conn)
                    try:
                        await self._read(ws, conn, user)
                    finally:
                        conn.closed_at = self.now()
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.5)  # a browser's reconnect delay

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, conn: Connection, user: str) -> None:
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while True:
                receive = asyncio.ensure_future(ws.receive())
                done, _ = await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    receive.cancel()
                    return
                msg = receive.result()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    if msg.type is aiohttp.WSMsgType.BINARY:
                        continue
                    return  # closed or failed: reconnect
                frame = orjson.loads(msg.data)
                data = frame.get("data") if isinstance(frame, dict) else None
                if isinstance(data, dict) and isinstance(data.get("prompt_id"), str):
                    prompt_id = data["prompt_id"]
                    kind = frame.get("type", "")
                    if kind == "executing" and data.get("node") is None:
                        kind = "end"
                    conn.events[prompt_id][kind] += 1
                    self.record.seen_ids.append((user, prompt_id, "socket"))
        finally:
            stop.cancel()

    async def submitter(self, n: int) -> None:
        user = self.users[n]
        client_id = f"soak-tab-{n + 1}"
        rng = random.Random(self.args.seed * 2000 + n)
        every = len(self.users) / self.args.rate
        count = 0
        while not self.load_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.load_stop.wait(), rng.uniform(0.5, 1.5) * every)
            if self.load_stop.is_set():
                return
            count += 1
            replica = self.pick(rng)
            graph = soak_graph(f"soak_{n + 1}_{count}", rng)
            body = orjson.dumps({"prompt": graph, "client_id": client_id})
            at = self.now()
            status, data = await self.call(
                replica, "POST", "/prompt", "POST /prompt", headers=self.headers[user], body=body
            )
            if status == 200:
                prompt_id = orjson.loads(data)["prompt_id"]
                self.record.prompts[prompt_id] = Prompt(prompt_id, user, at, replica.index)
                self.record.owner[prompt_id] = user

    async def poller(self, n: int) -> None:
        user = self.users[n]
        rng = random.Random(self.args.seed * 3000 + n)
        headers = self.headers[user]
        rounds = 0
        while not self.load_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.load_stop.wait(), rng.uniform(0.8, 1.2) * POLL_EVERY_SECONDS
                )
            if self.load_stop.is_set():
                return
            rounds += 1
            replica = self.pick(rng)
            path = "/api/jobs?status=in_progress,pending&limit=200&offset=0"
            status, data = await self.call(replica, "GET", path, "GET /api/jobs", headers=headers)
            if status == 200:
                for job in orjson.loads(data).get("jobs", []):
                    self.record.seen_ids.append((user, str(job.get("id")), "jobs"))
            status, data = await self.call(
                replica, "GET", "/history?max_items=20", "GET /history", headers=headers
            )
            history = orjson.loads(data) if status == 200 else {}
            for prompt_id, entry in history.items():
                self.record.seen_ids.append((user, prompt_id, "history"))
                status_str = entry.get("status", {}).get("status_str")
                if isinstance(status_str, str):
                    self.record.polled[prompt_id] = status_str
            status, data = await self.call(replica, "GET", "/queue", "GET /queue", headers=headers)
            if status == 200:
                queue = orjson.loads(data)
                for section in ("queue_running", "queue_pending"):
                    for item in queue.get(section, []):
                        self.record.seen_ids.append((user, str(item[1]), "queue"))
            if rounds % 2 == 0 and history:
                await self._download(replica, user, history, rng)

    async def _download(
        self, replica: Replica, user: str, history: dict[str, Any], rng: random.Random
    ) -> None:
        prompt_id = rng.choice(sorted(history))
        status, data = await self.call(
            replica, "GET", f"/history/{prompt_id}", "GET /history/{id}", headers=self.headers[user]
        )
        entry = orjson.loads(data).get(prompt_id) if status == 200 else None
        for image in _images(entry):
            query = _view_query(image)
            status, _ = await self.call(
                replica, "GET", f"/view?{query}", "GET /view", headers=self.headers[user]
            )
            self.record.images[status] += 1

    async def bad_requests(self) -> None:
        rng = random.Random(self.args.seed * 4000)
        kinds = ["malformed", "unknown_node", "no_token", "others_entry", "others_image"]
        n = 0
        while not self.load_stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.load_stop.wait(), BAD_EVERY_SECONDS)
            if self.load_stop.is_set():
                return
            kind = kinds[n % len(kinds)]
            n += 1
            attacker = rng.randrange(len(self.users))
            user = self.users[attacker]
            replica = self.pick(rng)
            headers = self.headers[user]
            if kind == "malformed":
                await self.call(
                    replica, "POST", "/prompt", "bad: malformed", headers=headers, body=b'{"prompt"'
                )
            elif kind == "unknown_node":
                graph = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
                body = orjson.dumps({"prompt": graph, "client_id": "bad"})
                await self.call(
                    replica, "POST", "/prompt", "bad: unknown node", headers=headers, body=body
                )
            elif kind == "no_token":
                await self.call(replica, "GET", "/history", "bad: no token")
            else:
                others = [p for p in list(self.record.prompts.values()) if p.user != user]
                if not others:
                    continue
                victim = rng.choice(others)
                status, data = await self.call(
                    replica,
                    "GET",
                    f"/history/{victim.prompt_id}",
                    "bad: others' entry",
                    headers=headers,
                )
                if status == 200 and orjson.loads(data):
                    self.record.leaks.append(f"{user} read {victim.user}'s entry")
                if kind == "others_image":
                    owner = self.headers[victim.user]
                    status, data = await self.call(
                        replica,
                        "GET",
                        f"/history/{victim.prompt_id}",
                        "GET /history/{id}",
                        headers=owner,
                    )
                    entry = orjson.loads(data).get(victim.prompt_id) if status == 200 else None
                    for image in _images(entry)[:1]:
                        query = _view_query(image)
                        status, _ = await self.call(
                            replica, "GET", f"/view?{query}", "bad: others' image", headers=headers
                        )
                        if status == 200:
                            self.record.leaks.append(f"{user} downloaded {victim.user}'s image")

    # -- the load balancer's view ------------------------------------------------------
    async def health(self) -> None:
        assert self.session is not None
        while not self.stopping.is_set():
            for replica in self.cluster.replicas:
                if await self._serving(replica):
                    self.live.add(replica.index)
                else:
                    self.live.discard(replica.index)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.25)

    async def _serving(self, replica: Replica) -> bool:
        """Alive and not draining (``/readyz`` 503 for Redis or an instance still serves)."""
        assert self.session is not None
        try:
            async with self.session.get(
                f"{replica.url}/readyz", timeout=aiohttp.ClientTimeout(total=1)
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return False
        return not (isinstance(body, dict) and body.get("status") == "draining")

    async def rss(self) -> None:
        while not self.stopping.is_set():
            for replica in self.cluster.replicas:
                proc = replica.proc
                if proc is not None and proc.alive():
                    with contextlib.suppress(Exception):
                        self.record.rss[(replica.index, replica.generation)].append(
                            (time.monotonic(), proc.rss())
                        )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), RSS_EVERY_SECONDS)

    # -- faults -----------------------------------------------------------------------
    async def faults(self) -> None:
        duration = self.args.duration
        plan: list[tuple[float, str, Callable[[], Awaitable[None]]]] = [
            (0.15, "Redis restarted", self._redis_outage),
            (0.35, "replica 1 SIGKILLed", self._replica_killed),
            (0.55, "ComfyUI 2 killed", self._comfy_outage),
            (0.75, "replica 2 SIGTERMed", self._replica_terminated),
        ]
        for fraction, name, fault in plan:
            wait = self.t0 + fraction * duration - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.load_stop.wait(), max(0.0, wait))
            if self.load_stop.is_set():
                return
            window = Window(name, self.now())
            self.record.windows.append(window)
            print(f"[{self.now():6.1f}s] fault: {name}", flush=True)
            await fault()
            window.repaired = self.now()
            await self._recovered(window)
            print(
                f"[{self.now():6.1f}s] recovered from {name} in "
                f"{(window.recovered or self.now()) - window.repaired:.1f}s",
                flush=True,
            )

    async def _redis_outage(self) -> None:
        assert self.cluster.redis is not None
        self.cluster.redis.stop()  # SIGTERM, waited for
        await asyncio.sleep(self.args.redis_outage)  # the outage itself
        self.cluster.redis.start()

    async def _replica_killed(self) -> None:
        replica = self.cluster.replicas[0]
        self.cluster.signal_replica(replica, signal.SIGKILL)
        await self.cluster.wait_exit(replica)
        await asyncio.sleep(2.0)  # the orchestrator's restart delay
        await self.cluster.start_replica(replica)

    async def _comfy_outage(self) -> None:
        instance = self.cluster.instances[1]
        await self._busy(instance)
        self.cluster.kill_instance(instance)
        await asyncio.sleep(self.args.comfy_outage)  # the outage itself
        await self.cluster.start_instance(instance)

    async def _busy(self, instance: Instance, limit: float = 10.0) -> None:
        """Until ``instance`` runs a prompt (read from it directly, as the harness), at most
        ``limit`` seconds: the kill then loses prompts, whose owners must be told."""
        assert self.session is not None
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                async with self.session.get(f"{instance.url}/queue") as resp:
                    queue = await resp.json()
                    held = [i[1] for s in ("queue_running", "queue_pending") for i in queue[s]]
                    if queue.get("queue_running"):
                        self.record.killed_with = held
                        return
            await asyncio.sleep(0.02)  # sampling another process's queue

    async def _replica_terminated(self) -> None:
        replica = self.cluster.replicas[1]
        self.cluster.signal_replica(replica, signal.SIGTERM)
        code = await self.cluster.wait_exit(replica)
        self.record.sigterm_exit = code
        await asyncio.sleep(1.0)
        await self.cluster.start_replica(replica)

    async def _recovered(self, window: Window) -> None:
        """Every replica ready, every instance up on each, and a canary prompt through each
        replica finished (a canary user of its own per fault: its retries never meet a rate
        limit another fault's canary used up)."""
        deadline = time.monotonic() + 120
        canary = f"soak-canary-{len(self.record.windows)}"
        while time.monotonic() < deadline:
            if not await self._all_ready():
                await asyncio.sleep(0.1)  # polling a recovering system
            elif await self._canaries(canary):
                window.recovered = self.now()
                return
            else:
                await asyncio.sleep(1.0)  # a canary failed: try again, without hammering

    async def _all_ready(self) -> bool:
        assert self.session is not None
        for replica in self.cluster.replicas:
            try:
                async with self.session.get(
                    f"{replica.url}/readyz", timeout=aiohttp.ClientTimeout(total=1)
                ) as resp:
                    body = await resp.json(content_type=None)
                    if resp.status != 200:
                        return False
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
                return False
            states = body.get("upstreams", {}) if isinstance(body, dict) else {}
            if any(states.get(i.name) != "up" for i in self.cluster.instances):
                return False
        return True

    async def _canaries(self, user: str) -> bool:
        assert self.session is not None
        headers = {"Authorization": f"Bearer {token(user)}"}
        for replica in self.cluster.replicas:
            body = orjson.dumps({"prompt": api_graph("soak_canary"), "client_id": "canary"})
            try:
                async with self.session.post(
                    f"{replica.url}/prompt", data=body, headers=headers, timeout=REQUEST_TIMEOUT
                ) as resp:
                    if resp.status != 200:
                        return False
                    prompt_id = (await resp.json())["prompt_id"]
                for _ in range(50):
                    async with self.session.get(
                        f"{replica.url}/history/{prompt_id}",
                        headers=headers,
                        timeout=REQUEST_TIMEOUT,
                    ) as resp:
                        if resp.status == 200 and (await resp.json()).get(prompt_id):
                            break
                    await asyncio.sleep(0.1)  # polling the prompt's end, as a script would
                else:
                    return False
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
                return False
        return True

    # -- the run ----------------------------------------------------------------------
    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            self.session = session
            tasks = [asyncio.create_task(self.health()), asyncio.create_task(self.rss())]
            tasks += [asyncio.create_task(self.socket(n)) for n in range(len(self.users))]
            await asyncio.sleep(SOCKET_SETTLE_SECONDS)  # the tabs open before the first prompt
            load = [asyncio.create_task(self.submitter(n)) for n in range(len(self.users))]
            load += [asyncio.create_task(self.poller(n)) for n in range(len(self.users))]
            load.append(asyncio.create_task(self.bad_requests()))
            if self.args.faults:
                load.append(asyncio.create_task(self.faults()))
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.load_stop.wait(), self.args.duration)
                print(f"[{self.now():6.1f}s] load stops; draining", flush=True)
                self.load_stop.set()  # a fault under way finishes its repair and recovery
                await asyncio.gather(*load)
                await self.drain()
            finally:
                self.final_at = self.now()
                self.load_stop.set()
                self.stopping.set()
                for task in load:
                    task.cancel()
                await asyncio.gather(*tasks, *load, return_exceptions=True)

    async def drain(self) -> None:
        """Until every accepted prompt has an outcome its owner can see (or the bound)."""
        deadline = time.monotonic() + DRAIN_SECONDS
        pending = dict(self.record.prompts)
        rng = random.Random(self.args.seed)
        while pending and time.monotonic() < deadline:
            for prompt_id, prompt in list(pending.items()):
                outcome = await self.outcome(prompt, rng)
                if outcome:
                    prompt.outcome = outcome
                    del pending[prompt_id]
            if pending:
                await asyncio.sleep(0.5)  # prompts still running
        for prompt in pending.values():
            prompt.outcome = "lost"

    async def outcome(self, prompt: Prompt, rng: random.Random) -> str:
        replica = self.pick(rng)
        status, data = await self.call(
            replica,
            "GET",
            f"/history/{prompt.prompt_id}",
            "drain /history/{id}",
            headers=self.headers[prompt.user],
        )
        entry = orjson.loads(data).get(prompt.prompt_id) if status == 200 else None
        if isinstance(entry, dict):
            state = entry.get("status", {}).get("status_str")
            return "completed" if state == "success" else "failed"
        # No entry now (its instance restarted empty since): what the owner saw before.
        heard = Counter[str]()
        for conn in self.record.connections:
            if conn.user == prompt.user:
                heard.update(conn.events.get(prompt.prompt_id, Counter()))
        if heard["execution_error"]:
            return "failed"
        if heard["execution_success"]:
            return "completed"
        polled = self.record.polled.get(prompt.prompt_id)
        if polled is not None:
            return "completed" if polled == "success" else "failed"
        return ""


HEAVY_SHARE = 0.25
"""Prompts that run for a while (noise and blur on 768x768: about 0.3 s on the fake), so that
an instance killed has some running and queued."""


def soak_graph(prefix: str, rng: random.Random) -> dict[str, Any]:
    """EmptyImage -> SaveImage of a random small size, or now and then a heavier chain."""
    graph = api_graph(prefix)
    if rng.random() >= HEAVY_SHARE:
        size = rng.choice((64, 128, 256))
        graph["1"]["inputs"].update({"width": size, "height": size})
        return graph
    graph["1"]["inputs"].update({"width": 768, "height": 768})
    graph["3"] = {
        "class_type": "ImageAddNoise",
        "inputs": {"image": ["1", 0], "seed": rng.randrange(1 << 32), "strength": 0.5},
    }
    graph["4"] = {
        "class_type": "ImageBlur",
        "inputs": {"image": ["3", 0], "blur_radius": 8, "sigma": 4.0},
    }
    graph["2"]["inputs"]["images"] = ["4", 0]
    return graph


def _view_query(image: dict[str, str]) -> str:
    return f"filename={image['filename']}&type=output&subfolder={image['subfolder']}"


def _images(entry: object) -> list[dict[str, str]]:
    if not isinstance(entry, dict):
        return []
    out = []
    for node in (entry.get("outputs") or {}).values():
        for image in node.get("images", []) if isinstance(node, dict) else []:
            if isinstance(image, dict) and image.get("type") == "output":
                out.append({"filename": str(image["filename"]), "subfolder": image["subfolder"]})
    return out


# -- the report -----------------------------------------------------------------------------


async def duplicates_on_instances(cluster: Cluster) -> int:
    """Prompt ids in more than one instance's history (read directly, as the harness)."""
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for instance in cluster.instances:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(f"{instance.url}/history") as resp:
                    seen.update(list(orjson.loads(await resp.read())))
    return sum(1 for n in seen.values() if n > 1)


def slope_mb_per_hour(samples: list[tuple[float, int]]) -> float:
    xs = [t for t, _ in samples]
    ys = [r / 1e6 for _, r in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 3600


def report(load: Load, record: Record, args: argparse.Namespace, instance_dups: int) -> bool:
    prompts = list(record.prompts.values())
    outcomes = Counter(p.outcome for p in prompts)
    # Socket views: ends heard per prompt (over every connection of its owner).
    heard: dict[str, Counter[str]] = defaultdict(Counter)
    dup_runs = 0
    for conn in record.connections:
        for prompt_id, events in conn.events.items():
            heard[prompt_id].update(events)
            if events["execution_success"] > 1:
                dup_runs += 1
    contradicted = sum(
        1
        for p in prompts
        if (p.outcome == "completed" and heard[p.prompt_id]["execution_error"])
        or (p.outcome == "failed" and heard[p.prompt_id]["execution_success"])
    )
    # Leaks: ids shown to a user that belong to another.
    leaks = list(record.leaks)
    for user, prompt_id, where in record.seen_ids:
        owner = record.owner.get(prompt_id)
        if owner is not None and owner != user:
            leaks.append(f"{user} saw {owner}'s {prompt_id} in {where}")
    # Deaf sockets: open steadily since before the submission, never heard the end.
    deaf = 0
    for p in prompts:
        if p.outcome not in ("completed", "failed"):
            continue
        for conn in record.connections:
            if conn.user != p.user or conn.opened_at > p.submitted_at - SOCKET_SETTLE_SECONDS:
                continue
            if conn.closed_at is not None and conn.closed_at < load.final_at:
                continue  # it went away (its replica did): a new one took over
            events = conn.events.get(p.prompt_id, Counter())
            wanted = "execution_error" if p.outcome == "failed" else "end"
            if not events[wanted]:
                deaf += 1
    five_xx = [
        (t, route, s)
        for t, route, s in record.answers
        if s >= 500 and not any(w.covers(t) for w in record.windows)
    ]
    in_windows = sum(1 for _, _, s in record.answers if s >= 500) - len(five_xx)
    # RSS slope per replica process, after the run's and the process's warm-up.
    warm = WARMUP_FRACTION * args.duration
    slopes: list[tuple[str, float, float, bool]] = []
    rss_late: list[tuple[str, float, float]] = []
    for (index, generation), samples in sorted(record.rss.items()):
        born = samples[0][0]  # sampled from its start on (every RSS_EVERY_SECONDS)
        kept = [
            (t, r) for t, r in samples if t - born >= PROCESS_WARMUP_SECONDS and t - load.t0 >= warm
        ]
        span = kept[-1][0] - kept[0][0] if len(kept) > 1 else 0.0
        judged = span >= MIN_SLOPE_SECONDS
        slope = slope_mb_per_hour(kept) if len(kept) > 2 else 0.0
        slopes.append((f"replica {index + 1} #{generation}", slope, span, judged))
        # The second half alone, shown: bounded caches (ownership, locations) fill during the
        # first, so a slope that falls from one half to the next is warm-up, not a leak.
        late = kept[len(kept) // 2 :]
        late_span = late[-1][0] - late[0][0] if len(late) > 1 else 0.0
        if late_span >= MIN_SLOPE_SECONDS and len(late) > 2:
            rss_late.append(
                (f"replica {index + 1} #{generation}", slope_mb_per_hour(late), late_span)
            )

    rows: list[tuple[str, str, bool | None]] = []

    def row(name: str, value: object, ok: bool | None = None) -> None:
        rows.append((name, str(value), ok))

    row("duration (s), users, target rate (/s)", f"{args.duration:.0f}, {args.users}, {args.rate}")
    row("prompts accepted", len(prompts))
    row("  completed", outcomes["completed"])
    row("  failed visibly (error entry or execution_error)", outcomes["failed"])
    row("  lost silently", outcomes["lost"], outcomes["lost"] == 0)
    row("  duplicated (run twice)", dup_runs + instance_dups, dup_runs + instance_dups == 0)
    row("  contradicted (completed and failed)", contradicted, contradicted == 0)
    refused = {
        k.removeprefix("POST /prompt "): n
        for k, n in sorted(record.statuses.items())
        if k.startswith("POST /prompt ") and not k.endswith(" 200")
    }
    row("submissions refused (status: count)", refused or 0)
    killed = [record.prompts[p] for p in record.killed_with if p in record.prompts]
    row(
        "prompts on the killed instance (outcomes)",
        dict(Counter(p.outcome for p in killed)) or 0,
    )
    row("cross-user leaks", len(leaks), not leaks)
    row("deaf sockets (owner's open socket missed the end)", deaf, deaf == 0)
    row("5xx outside fault windows", len(five_xx), not five_xx)
    row("5xx inside fault windows", in_windows)
    row("connection errors (replica gone)", len(record.connection_errors))
    if any(w.name.endswith("SIGTERMed") for w in record.windows):
        row("exit status after SIGTERM", record.sigterm_exit, record.sigterm_exit == 0)
    row("image downloads (status: count)", dict(sorted(record.images.items())))
    for name, slope, span, judged in slopes:
        verdict = (slope <= args.rss_slope_limit) if judged else None
        row(f"RSS slope {name} (MB/h over {span:.0f}s)", f"{slope:+.0f}", verdict)
    for name, slope, span in rss_late:
        row(f"  second half {name} (MB/h over {span:.0f}s)", f"{slope:+.0f}")
    for window in record.windows:
        took = (window.recovered - window.repaired) if window.recovered is not None else None
        shown = f"{took:.1f}" if took is not None else "not recovered"
        row(
            f"recovery after {window.name} (s)",
            shown,
            took is not None and took <= RECOVERY_LIMIT_SECONDS,
        )

    width = max(len(r[0]) for r in rows) + 2
    print("\ncomfygate soak")
    for name, value, ok in rows:
        mark = "" if ok is None else ("  ok" if ok else "  FAIL")
        print(f"  {name:<{width}} {value}{mark}")
    if five_xx:
        print("\n5xx outside fault windows (first 10):")
        for t, route, status in five_xx[:10]:
            print(f"  {t:7.1f}s {route} {status}")
    if leaks:
        print("\nleaks (first 10):")
        for leak in leaks[:10]:
            print(f"  {leak}")
    return all(ok is not False for _, _, ok in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--rate", type=float, default=4.0, help="prompts per second, in all")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--redis-outage", type=float, default=5.0, help="seconds")
    parser.add_argument("--comfy-outage", type=float, default=10.0, help="seconds")
    parser.add_argument("--rss-slope-limit", type=float, default=100.0, help="MB/hour")
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument(
        "--faults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="inject the four faults (--no-faults: steady load, e.g. for a long RSS slope)",
    )
    args = parser.parse_args(argv)
    if not 30 <= args.duration <= 3600:
        parser.error("--duration: 30 to 3600 seconds")
    if not 1 <= args.users <= 64:
        parser.error("--users: 1 to 64")
    if not 0 < args.rate <= 50:
        parser.error("--rate: up to 50 prompts per second")
    return args


async def main_async(args: argparse.Namespace) -> int:
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="comfygate-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"soak: logs in {log_dir}", flush=True)
    cluster = Cluster(log_dir)
    record = Record()
    try:
        await cluster.start()
        load = Load(cluster, args, record)
        await asyncio.wait_for(load.run(), args.duration + 300)
        instance_dups = await duplicates_on_instances(cluster)
    finally:
        cluster.stop()
    return 0 if report(load, record, args, instance_dups) else 1


def main(argv: list[str] | None = None) -> None:
    sys.exit(asyncio.run(main_async(parse_args(argv))))


if __name__ == "__main__":
    main()
