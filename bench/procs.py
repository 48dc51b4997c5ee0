"""Process management: free ports, CPU placement, starting/stopping children, RSS."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from proxy.upstream.http1 import Http1Pool

_PR_SET_PDEATHSIG = 1
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc platforms
    _LIBC = None


@dataclass(frozen=True)
class Placement:
    """Which CPUs the load generator and the servers (upstream + proxies) run on."""

    loadgen: frozenset[int] | None
    servers: frozenset[int] | None

    def describe(self) -> str:
        if self.loadgen is None or self.servers is None:
            return "no CPU pinning (fewer than 2 usable cores)"
        return (
            f"load generator (wrk, bench WebSocket/HTTP clients) pinned to core(s) "
            f"{sorted(self.loadgen)}; upstream fake + proxies pinned to core(s) "
            f"{sorted(self.servers)}"
        )


def plan_placement() -> Placement:
    """Core 0 for the load generator, core 1 for upstream + proxy (as the reference notes did)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return Placement(None, None)
    if len(cpus) < 2:
        return Placement(None, None)
    return Placement(frozenset({cpus[0]}), frozenset({cpus[1]}))


def pin_self(cpus: frozenset[int] | None) -> None:
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft
        return target
    return soft


def child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    """preexec_fn: die with the bench (PR_SET_PDEATHSIG) and run on the given CPUs."""

    def setup() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tree_cpu(root: psutil.Process) -> float:
    total = 0.0
    procs = [root]
    with contextlib.suppress(psutil.Error):
        procs += root.children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


class ForeignCpu:
    """CPU (in cores) used during a run by processes that are not the bench's own: another
    engineer's tests on the same machine make absolute figures meaningless, so every run
    records it."""

    def __init__(self) -> None:
        self.me = psutil.Process(os.getpid())

    def snapshot(self) -> tuple[float, float, float]:
        t = psutil.cpu_times()
        # irq/softirq left out: loopback packet processing lands there, for our own traffic too.
        busy = t.user + t.nice + t.system + getattr(t, "steal", 0.0)
        return time.monotonic(), busy, _tree_cpu(self.me)

    @staticmethod
    def cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        wall = b[0] - a[0]
        if wall <= 0:
            return 0.0
        return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / wall


class StartError(RuntimeError):
    pass


@dataclass
class Proc:
    """A child process started by the bench (always from the main thread: see PDEATHSIG)."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    _ps: psutil.Process | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss(self) -> int:
        """RSS in bytes of the process and all its descendants (nginx: master + workers)."""
        if self._ps is None:
            self._ps = psutil.Process(self.pid)
        total = 0
        procs = [self._ps]
        with contextlib.suppress(psutil.Error):
            procs += self._ps.children(recursive=True)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += int(p.memory_info().rss)
        return total

    def log_tail(self, lines: int = 12, width: int = 300) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = text.splitlines()[-lines:]
        return "\n".join(ln if len(ln) <= width else ln[:width] + " ..." for ln in tail)

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)


class ProcessGroup:
    """Every child the bench starts, so that all of them are stopped on exit or Ctrl-C."""

    def __init__(self, cpus: frozenset[int] | None) -> None:
        self.cpus = cpus
        self.procs: list[Proc] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,  # Ctrl-C reaches only the bench; it stops the children
                preexec_fn=child_setup(self.cpus),  # noqa: PLW1509
            )
        proc = Proc(name, list(argv), popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()


async def wait_http(
    url: str, proc: Proc | None, limit_s: float = 30.0, ok: Callable[[int], bool] | None = None
) -> None:
    """Poll ``url`` until it answers (any status accepted by ``ok``; default < 500)."""
    accept = ok or (lambda status: status < 500)
    deadline = time.monotonic() + limit_s
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise StartError(
                    f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
                )
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    if accept(resp.status):
                        return
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.05)
    tail = f"\n{proc.log_tail()}" if proc is not None else ""
    raise StartError(f"{url} not ready after {limit_s:.0f}s ({last}){tail}")


def local_pool(port: int) -> Http1Pool:
    """The proxy's own HTTP/1 client to an upstream on this machine (the micro-benchmarks')."""
    return Http1Pool(
        host="127.0.0.1",
        port=port,
        ssl=None,
        server_hostname=None,
        connect_timeout=5,
        read_timeout=30,
        keepalive_timeout=60,
    )


@contextlib.contextmanager
def served_by(module: str) -> Iterator[int]:
    """``python -m <module> --serve`` in a child process (a micro-benchmark's upstream on its
    own core share): it prints its port on stdout and exits when its stdin closes. Yields the
    port."""
    server = subprocess.Popen(
        [sys.executable, "-m", module, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        yield int(server.stdout.readline())
    finally:
        with contextlib.suppress(OSError):
            assert server.stdin is not None
            server.stdin.close()
        server.wait(timeout=10)
