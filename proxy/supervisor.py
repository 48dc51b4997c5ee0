"""``comfygate serve --workers N``: one supervisor process and N workers on one port.

Each worker is a fresh interpreter (``multiprocessing`` *spawn*: nothing of the supervisor's
state, event loop or sockets is inherited) running :func:`proxy.server.serve` with
``SO_REUSEPORT``: every worker binds the same address and the kernel spreads new connections
over them. State the workers must agree on (rate limits, queue quotas, prompt ownership,
revocations, login throttling) lives in Redis; without Redis each worker keeps its own, so the
supervisor warns.

The supervisor

* starts the workers and waits until each listens; one failing to start (a configuration
  error, the port taken) stops them all and the supervisor exits with its status;
* restarts a worker that dies afterwards, with a growing delay while they keep dying;
* forwards SIGTERM/SIGINT (graceful stop: it waits for the workers' drain and grace, then
  kills what is left) and SIGHUP (reload) to every worker;
* serves the one metrics listener: before any worker starts it points
  ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory, where every worker's prometheus-client
  keeps its values, and reads them all on each scrape (plus ``comfygate_workers`` and
  ``comfygate_worker_restarts_total``, its own).

A worker notices the supervisor's end through its pipe (end of file) and stops as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import structlog
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.registry import Collector

from proxy.auth.authenticator import bootstrap_token, jwt_settings_for_run, session_secret
from proxy.banner import banner, print_banner, probe_urls, warn_unreachable
from proxy.errors import SettingsError
from proxy.monitoring.exposition import (
    MULTIPROC_ENV,
    exposition_registry,
    start_metrics_listener,
)
from proxy.observability.logging import configure_logging
from proxy.settings import Settings
from proxy.tenancy.namespaces import folder_names, generated_secret, warn_if_unstable

log = structlog.get_logger("comfygate.supervisor")

READY = "ready"
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_MARGIN_SECONDS = 10.0
"""Beyond a worker's own drain + grace, before it is killed."""
RESTART_DELAY_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_SECONDS = 60.0
"""A worker that ran this long before dying restarts without delay history."""
EXIT_SETTINGS = 2
EXIT_WAIT_SECONDS = 5.0


class StartupFailed(Exception):
    def __init__(self, index: int, exitcode: int | None) -> None:
        super().__init__(f"worker {index} failed to start (exit status {exitcode})")
        self.exitcode = exitcode


# -- the worker side -----------------------------------------------------------------------


@dataclass
class WorkerLink:
    """:class:`proxy.server.Supervised` over a pipe to the supervisor."""

    index: int
    conn: Connection

    def ready(self) -> None:
        self.conn.send(READY)

    def on_orphaned(self, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        fd = self.conn.fileno()

        def readable() -> None:
            # The supervisor never writes after start: readable means its end was closed.
            with contextlib.suppress(EOFError, OSError):
                if not self.conn.poll() or self.conn.recv() is not None:
                    return
            loop.remove_reader(fd)
            log.warning("supervisor_gone")
            callback()

        loop.add_reader(fd, readable)


def worker_main(settings: Settings, index: int, conn: Connection) -> None:
    """Entry point of a worker process (runs in a fresh interpreter)."""
    from proxy.server import run, serve  # noqa: PLC0415 - imported in the worker only

    configure_logging(settings.logging)
    structlog.contextvars.bind_contextvars(worker=index)  # on every log line of this worker
    try:
        run(serve(settings, worker=WorkerLink(index, conn)))
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_SETTINGS)


# -- the supervisor side -------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    """It listens, and so has its signal handlers (before that, SIGHUP would kill it)."""


class Supervisor:
    """Starts, watches, restarts and stops the workers (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        *,
        workers: int | None = None,
        config_path: str | None = None,
        bootstrap_token: str | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.bootstrap_token = bootstrap_token
        self.count = workers or settings.server.workers
        self._spawn_ctx = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self.stopping = False
        self._stop = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self, directory: Path | None) -> int:
        """Serve until SIGTERM/SIGINT; the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.forward, signal.SIGHUP)
        metrics_runner = None
        try:
            failed: StartupFailed | None = None
            try:
                async with asyncio.TaskGroup() as group:  # one failing cancels the others
                    for index in range(self.count):
                        group.create_task(self._start(index))
            except* StartupFailed as failures:
                failed = failures.exceptions[0]  # type: ignore[assignment]
            if failed is not None:
                log.error("worker_start_failed", error=str(failed))
                return failed.exitcode if failed.exitcode == EXIT_SETTINGS else 1
            metrics = self.settings.metrics
            if directory is not None and metrics.enabled and not metrics.on_main_port:
                registry = exposition_registry(metrics, extra=[SupervisorCollector(self)])
                metrics_runner = await start_metrics_listener(metrics, registry)
            self._watchers = [
                asyncio.create_task(self._watch(i), name=f"worker-{i}") for i in self.workers
            ]
            log.info(
                "supervisor_started",
                workers=self.count,
                pids=[w.process.pid for w in self.workers.values()],
                listen=f"{self.settings.server.host}:{self.settings.server.port}",
                metrics=(
                    f"http://{metrics.host}:{metrics.port}{metrics.path}"
                    if metrics_runner is not None
                    else ("main port" if metrics.enabled else "off")
                ),
            )
            await self._print_banner()
            await self._stop.wait()
            return 0
        finally:
            self.stopping = True
            for task in self._watchers:
                task.cancel()
            await asyncio.gather(*self._watchers, return_exceptions=True)
            await self._stop_all()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("supervisor_stopped", restarts=self.restarts)

    async def _print_banner(self) -> None:
        """Once every worker listens: the console banner (the workers print none)."""
        upstreams = await probe_urls(self.settings)
        warn_unreachable(upstreams)
        text = banner(
            self.settings,
            upstreams=upstreams,
            config_path=self.config_path,
            bootstrap_token=self.bootstrap_token,
            workers=self.count,
        )
        print_banner(text)

    def request_stop(self) -> None:
        if not self.stopping:
            log.info("supervisor_stopping")
        self.stopping = True  # at once: workers hit by the same Ctrl-C must not be restarted
        self._stop.set()

    def forward(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every worker that listens (SIGHUP: reload). One still starting
        loads the files it reads at startup (policy...) afresh anyway."""
        ready = [w for w in self.workers.values() if w.ready and w.process.is_alive()]
        log.info("signal_forwarded", signal=sig.name, workers=len(ready))
        for worker in ready:
            if worker.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, sig)

    # -- one worker ------------------------------------------------------------------------
    def _spawn(self, index: int) -> _Worker:
        # A socket pair: the worker writes READY on its end, and reads end-of-file there
        # when the supervisor's end closes (the supervisor exited or was killed).
        ours, theirs = self._spawn_ctx.Pipe()
        process = self._spawn_ctx.Process(
            target=worker_main,
            args=(self.settings, index, theirs),
            name=f"comfygate-worker-{index}",
            daemon=False,
        )
        process.start()
        theirs.close()  # the worker has its copy; ours alone keeps the pair open
        worker = _Worker(index, process, ours)
        self.workers[index] = worker
        return worker

    async def _start(self, index: int) -> _Worker:
        """Spawn worker ``index`` and wait until it listens.

        Raises:
            StartupFailed: it exited (or hung) first.
        """
        worker = self._spawn(index)
        message = await asyncio.to_thread(_receive, worker.conn, STARTUP_TIMEOUT_SECONDS)
        if message != READY:
            # Its end of the pipe closes just before it is reaped: give it a moment to exit
            # with its own status (2: configuration) before killing a hung one.
            await asyncio.to_thread(worker.process.join, EXIT_WAIT_SECONDS)
            if worker.process.is_alive():
                worker.process.kill()
            await _join(worker.process)
            raise StartupFailed(index, worker.process.exitcode)
        worker.started = time.monotonic()
        worker.ready = True
        return worker

    async def _watch(self, index: int) -> None:
        """Restart worker ``index`` whenever it dies, until the supervisor stops."""
        failures = 0
        while not self.stopping:
            worker = self.workers[index]
            await _join(worker.process)
            if self.stopping:
                return
            ran = time.monotonic() - worker.started
            failures = 0 if ran >= STABLE_SECONDS else failures + 1
            delay = RESTART_DELAY_SECONDS[min(failures, len(RESTART_DELAY_SECONDS) - 1)]
            log.error(
                "worker_died",
                worker=index,
                pid=worker.process.pid,
                exitcode=worker.process.exitcode,
                restart_in_seconds=delay if failures else 0,
            )
            self._forget(worker)
            if failures:
                await asyncio.sleep(delay)  # back-off while workers keep dying
            if self.stopping:
                return
            try:
                await self._start(index)
            except StartupFailed as exc:
                log.error("worker_restart_failed", worker=index, error=str(exc))
                continue  # its sentinel is ready: the loop waits the next delay
            self.restarts += 1
            log.info("worker_restarted", worker=index, pid=self.workers[index].process.pid)

    def _forget(self, worker: _Worker) -> None:
        """A dead worker's live gauges (open sockets...) must not count any more."""
        directory = os.environ.get(MULTIPROC_ENV)
        if directory and worker.process.pid is not None:
            mark_process_dead(worker.process.pid, directory)  # type: ignore[no-untyped-call]
        worker.conn.close()

    async def _stop_all(self) -> None:
        """SIGTERM to every worker; wait for their drain and grace; kill the rest."""
        alive = [w for w in self.workers.values() if w.process.is_alive()]
        for worker in alive:
            with contextlib.suppress(ProcessLookupError):
                worker.process.terminate()
        server = self.settings.server
        budget = server.drain_seconds + server.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        try:
            async with asyncio.timeout(budget):
                await asyncio.gather(*(_join(w.process) for w in alive))
        except TimeoutError:
            for worker in alive:
                if worker.process.is_alive():
                    log.warning("worker_killed", worker=worker.index, pid=worker.process.pid)
                    worker.process.kill()
            await asyncio.gather(*(_join(w.process) for w in alive))
        for worker in self.workers.values():
            worker.conn.close()

    def alive(self) -> int:
        return sum(1 for w in self.workers.values() if w.process.is_alive())


class SupervisorCollector(Collector):
    """The supervisor's own metrics, served next to the workers' aggregate."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "comfygate_workers", "Worker processes alive.", value=self._supervisor.alive()
        )
        yield CounterMetricFamily(
            "comfygate_worker_restarts",
            "Workers restarted after an unexpected exit.",
            value=self._supervisor.restarts,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _receive(conn: Connection, timeout: float) -> object:
    """The worker's first message (None: it closed its end, i.e. exited, or said nothing in
    time). Runs in a thread: blocking waits keep the supervisor's loop free."""
    try:
        return conn.recv() if conn.poll(timeout) else None
    except (EOFError, OSError):
        return None


async def _join(process: BaseProcess) -> None:
    """Wait for ``process`` to end and reap it (in a thread: one per worker at most). A
    cancelled wait leaves its thread until the process ends, which stopping ensures."""
    await asyncio.to_thread(process.join)


def _shared_auth_secrets(settings: Settings) -> tuple[Settings, str | None]:
    """Without configured JWT and session secrets each worker would sign with a key of its own
    (a token or cookie from one worker refused by the next): the supervisor generates them for
    all (for this run only, with the same warnings a single process logs), and the one-time
    admin token of a first run, printed once every worker listens."""
    auth = settings.auth
    jwt_settings, bootstrap = jwt_settings_for_run(auth)
    session = auth.session
    if auth.enabled and not session.secret:
        session_secret(auth)  # logs what a random session secret means
        session = session.model_copy(update={"secret": secrets.token_urlsafe(48)})
    shared = auth.model_copy(update={"jwt": jwt_settings, "session": session})
    settings = settings.model_copy(update={"auth": shared})
    token = bootstrap_token(jwt_settings, settings.roles) if bootstrap else None
    return settings, token


def _shared_folder_secret(settings: Settings) -> Settings:
    """Without a configured ``isolation.folder_secret`` each worker would name users' folders
    with a key of its own: the supervisor generates one for all of them (for this run only;
    it warns what that means)."""
    isolation = settings.isolation
    if isolation.folder_secret:
        return settings
    names = folder_names("")
    warn_if_unstable(names, isolation=isolation.enabled, shared_state=settings.redis.mode != "none")
    shared = isolation.model_copy(update={"folder_secret": generated_secret()})
    return settings.model_copy(update={"isolation": shared})


def supervise(settings: Settings, *, config_path: str | None = None) -> int:
    """Run the supervisor and its workers until SIGTERM/SIGINT; the exit status."""
    if settings.redis.mode == "none":
        log.warning(
            "workers_without_redis",
            workers=settings.server.workers,
            detail="rate limits, queue quotas, prompt ownership, revocations and login "
            "throttling are kept per worker process; configure [redis] to share them",
        )
    settings = _shared_folder_secret(settings)
    settings, token = _shared_auth_secrets(settings)
    directory: Path | None = None
    if settings.metrics.enabled:
        # Before any worker starts: each one's prometheus-client picks its value class at
        # import, from this variable (inherited through the environment).
        directory = Path(tempfile.mkdtemp(prefix="comfygate-metrics-"))
        os.environ[MULTIPROC_ENV] = str(directory)
    else:
        os.environ.pop(MULTIPROC_ENV, None)
    status = 0

    async def main() -> None:
        nonlocal status
        supervisor = Supervisor(settings, config_path=config_path, bootstrap_token=token)
        status = await supervisor.run(directory)

    try:
        try:
            import uvloop  # noqa: PLC0415
        except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
            asyncio.run(main())
        else:
            uvloop.run(main())
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    return status
