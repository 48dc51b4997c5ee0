"""`python -m bench`: start the fake upstream, comfygate and nginx, run the scenarios with the
targets alternating inside every repetition, print tables + summary, write .bench/results-*.json."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import gc
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from bench import (
    issue_table,
    multi_history,
    multi_placement,
    own_history,
    policy_cost,
    report,
    workers_scaling,
)
from bench.fixtures import Fixtures, place_files
from bench.loadgen import pick_load_generator
from bench.procs import (
    ForeignCpu,
    ProcessGroup,
    free_port,
    pin_self,
    plan_placement,
    raise_nofile,
    wait_http,
)
from bench.report import ScenarioResult
from bench.scenarios import SCENARIOS, BenchContext, Options, Scenario
from bench.targets import (
    REPO,
    Launcher,
    RunningTarget,
    TargetSpec,
    default_comfygate_cmd,
    default_targets,
    fake_command,
    nginx_available,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1 repetition of 1 s")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    p.add_argument("--duration", type=float, default=None, help="seconds per run (default 3)")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    p.add_argument("--targets", default="", help="comma-separated target names")
    p.add_argument("--idle-ws", type=int, default=2000, help="idle WebSockets to hold (2000)")
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    p.add_argument("--aiohttp-loadgen", action="store_true", help="do not use wrk")
    p.add_argument(
        "--comfygate-cmd",
        default=os.environ.get("BENCH_COMFYGATE_CMD", ""),
        help="command that runs comfygate (default: .venv/bin/comfygate); `serve --host H "
        "--port P` is appended",
    )
    p.add_argument("--keep-logs", action="store_true", help="copy process logs to .bench/")
    p.add_argument("--list", action="store_true", help="list scenarios and targets, then exit")
    p.add_argument("--no-multi", action="store_true", help="skip the multi-instance run")
    p.add_argument("--no-workers", action="store_true", help="skip the --workers 2 vs 1 run")
    p.add_argument(
        "--view-others",
        type=int,
        default=own_history.OTHERS,
        help="entries of other users in ComfyUI for the tenant-view run (10000)",
    )
    return p.parse_args(argv)


def scan_log(path: Path, limit: int = 8) -> dict[str, Any]:
    """Warnings and errors in a comfygate log: JSON lines by level, other lines that look like
    tracebacks."""
    levels: collections.Counter[str] = collections.Counter()
    events: collections.Counter[str] = collections.Counter()
    samples: list[str] = []
    try:
        with path.open("rb") as f:
            for raw in f:
                line = raw.strip()
                if not line:
                    continue
                level, event = "", ""
                if line.startswith(b"{"):
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        rec = None
                    if isinstance(rec, dict):
                        level = str(rec.get("level") or rec.get("levelname") or "").lower()
                        event = str(rec.get("event") or rec.get("msg") or rec.get("message") or "")
                        exc = rec.get("exception")
                        if isinstance(exc, list) and exc and isinstance(exc[0], dict):
                            event += f" ({exc[0].get('exc_type')}: {exc[0].get('exc_value')})"
                        elif isinstance(exc, str):
                            event += f" ({exc.strip().splitlines()[-1][:100]})"
                elif b"Traceback" in line or b"Error" in line or b"error" in line:
                    level, event = "stderr", line.decode(errors="replace")[:160]
                if level in ("warning", "warn", "error", "critical", "exception", "stderr"):
                    levels[level] += 1
                    events[f"{level}: {event[:120]}"] += 1
                    if len(samples) < limit:
                        samples.append(line.decode(errors="replace")[:400])
    except OSError:
        return {}
    return {
        "counts": dict(levels),
        "top": events.most_common(limit),
        "samples": samples,
        "bytes": path.stat().st_size if path.exists() else 0,
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.opts = Options(idle_ws=args.idle_ws)
        if args.quick:
            self.opts.reps, self.opts.duration = 1, 1.0
        if args.reps is not None:
            self.opts.reps = args.reps
        if args.duration is not None:
            self.opts.duration = args.duration
        self.placement = plan_placement()
        self.group = ProcessGroup(self.placement.servers)
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out_dir = REPO / ".bench"
        self.problems: list[str] = []
        self.rss_trace: dict[str, list[tuple[str, float]]] = {}
        self.load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.foreign = ForeignCpu()
        self.multi: dict[str, Any] = {}
        self.policy: dict[str, Any] = {}
        self.views: dict[str, Any] = {}
        self.workers: dict[str, Any] = {}

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def scenarios(self) -> list[Scenario]:
        only = {s for s in self.args.only.split(",") if s}
        return [s for s in SCENARIOS if not only or s.name in only]

    def target_specs(self) -> list[TargetSpec]:
        wanted = {s for s in self.args.targets.split(",") if s}
        specs = [t for t in default_targets() if not wanted or t.name in wanted]
        if self.args.no_nginx or not nginx_available():
            specs = [t for t in specs if t.kind != "nginx"]
        return specs

    async def run(self) -> int:
        pin_self(self.placement.loadgen)
        nofile = raise_nofile(65536)
        tmp = Path(tempfile.mkdtemp(prefix="comfygate-bench-"))
        os.chmod(tmp, 0o755)
        started = time.monotonic()
        try:
            return await self._run(tmp, nofile, started)
        finally:
            self.group.stop_all()
            if self.args.keep_logs:
                logs = self.out_dir / f"logs-{self.stamp}"
                with contextlib.suppress(OSError):
                    shutil.copytree(tmp / "logs", logs)
                    self.log(f"logs kept in {logs}")
            shutil.rmtree(tmp, ignore_errors=True)

    async def _run(self, tmp: Path, nofile: int, started: float) -> int:
        loadgen = pick_load_generator(self.args.aiohttp_loadgen)
        root = tmp / "root"
        for sub in ("input", "output", "temp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        place_files(root / "output")
        logs = tmp / "logs"

        fake_port = free_port()
        fake_argv, fake_name = fake_command(fake_port, root)
        fake = self.group.spawn("fake-comfyui", fake_argv, logs / "fake.log", cwd=REPO)
        fake_base = f"http://127.0.0.1:{fake_port}"
        await wait_http(f"{fake_base}/history/bench-ready", fake)

        cg_cmd = shlex.split(self.args.comfygate_cmd) or default_comfygate_cmd()
        launcher = Launcher(self.group, tmp, fake_port, cg_cmd, logs, root=root)
        specs = self.target_specs()
        self.log(
            f"comfygate bench {self.stamp}: {self.opts.reps} rep(s) x {self.opts.duration:g} s"
        )
        self.log(f"placement: {self.placement.describe()}")
        self.log(f"load generator: {loadgen.name}; upstream: {fake_name}; RLIMIT_NOFILE {nofile}")
        self.load_start = os.getloadavg()
        self.log(
            f"load average {self.load_start[0]:.2f} (1 min): anything else running on this machine "
            "moves absolute figures; the ratios pair each run with its neighbours"
        )
        if not nginx_available():
            self.log("nginx not on PATH: no nginx reference, ratios vs nginx are n/a")

        running: dict[str, RunningTarget] = {}
        for spec in specs:
            try:
                running[spec.name] = await launcher.start(spec)
            except Exception as exc:
                self.problems.append(f"{spec.name} did not start: {exc}")
                self.log(f"!! {spec.name} did not start: {exc}")
        for name, t in running.items():
            if t.proc is not None:
                self.log(f"  {name}: {' '.join(t.proc.argv)} (port {t.port}, pid {t.pid_str()})")

        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as control:
            fixtures = Fixtures(fake_base, tmp)
            await fixtures.setup(control)
            self.log(
                f"fixtures: history entry {fixtures.history_size} B, "
                f"prompt body {fixtures.prompt_body_size} B"
            )
            ctx = BenchContext(self.opts, fake_base, fake, fixtures, control, loadgen, tmp)
            results: dict[str, ScenarioResult] = {}
            for sc in self.scenarios():
                results[sc.name] = await self._scenario(ctx, sc, running, launcher)
                self.log(report.render_scenario(results[sc.name], self.opts.reps))
                self.log("")
        only = {s for s in self.args.only.split(",") if s}
        if not self.args.no_workers and (not only or "workers" in only):
            # --workers 2 vs 1: processes of their own, unpinned (the workers need the cores).
            try:
                self.workers = await workers_scaling.run(
                    tmp,
                    cg_cmd,
                    loadgen,
                    reps=self.opts.reps,
                    duration=self.opts.duration,
                    restore_cpus=self.placement.loadgen,
                    log=self.log,
                )
            except Exception as exc:
                self.problems.append(f"workers: {type(exc).__name__}: {exc}")
                self.log(f"!! workers: {exc}")
            self.log("")
        if not self.args.no_multi and (not only or "multi" in only):
            # Several instances: processes of their own (placement: 4 fakes vs 1).
            try:
                self.multi["placement"] = await multi_placement.run(
                    self.group, tmp, cg_cmd, reps=self.opts.reps, log=self.log
                )
            except Exception as exc:
                self.problems.append(f"multi-instance placement: {type(exc).__name__}: {exc}")
                self.log(f"!! multi-instance placement: {exc}")
            self.log("")
            # Merged views: GET /history over 4 instances vs the same history on one.
            try:
                self.multi["history"] = await multi_history.run(
                    self.group, tmp, cg_cmd, reps=self.opts.reps, log=self.log
                )
            except Exception as exc:
                self.problems.append(f"multi-instance history: {type(exc).__name__}: {exc}")
                self.log(f"!! multi-instance history: {exc}")
            self.log("")

        if not only or "views" in only:
            # A user's history and jobs with everyone else's history in ComfyUI (own processes).
            try:
                self.views = await own_history.run(
                    self.group,
                    tmp,
                    cg_cmd,
                    reps=self.opts.reps,
                    others=self.args.view_others,
                    duration=self.opts.duration,
                    log=self.log,
                    loadgen=loadgen,
                )
            except Exception as exc:
                self.problems.append(f"tenant views: {type(exc).__name__}: {exc}")
                self.log(f"!! tenant views: {exc}")
            self.log("")

        if not only or "policy" in only:
            # The workflow policy's cost: a 200-node workflow, policy on vs off (own processes).
            try:
                self.policy = await policy_cost.run(
                    self.group,
                    tmp,
                    cg_cmd,
                    loadgen,
                    reps=self.opts.reps,
                    duration=self.opts.duration,
                    log=self.log,
                )
            except Exception as exc:
                self.problems.append(f"workflow policy: {type(exc).__name__}: {exc}")
                self.log(f"!! workflow policy: {exc}")
            self.log("")

        log_scan = {
            name: scan_log(t.proc.log_path)
            for name, t in running.items()
            if t.proc is not None and t.kind == "comfygate"
        }
        elapsed = time.monotonic() - started
        return self._finish(results, running, log_scan, elapsed, loadgen.name, fake_name)

    async def _scenario(
        self,
        ctx: BenchContext,
        sc: Scenario,
        running: dict[str, RunningTarget],
        launcher: Launcher,
    ) -> ScenarioResult:
        names = [n for n, t in running.items() if t.kind in sc.kinds]
        kinds = {n: running[n].kind for n in names}
        res = ScenarioResult(sc, names, dict(kinds))
        if sc.fresh:
            for n in names:
                if running[n].proc is not None:
                    running[n] = await launcher.restart(running[n])
        reps = self.opts.reps if sc.reps is None else sc.reps
        for rep in range(reps):
            for n in names:
                t = running[n]
                if t.proc is not None and not t.proc.alive():
                    msg = f"{n} died (exit {t.proc.popen.returncode}) before {sc.name}: restarting"
                    self.problems.append(msg + f"\n{t.proc.log_tail(15)}")
                    self.log(f"!! {msg}")
                    running[n] = t = await launcher.restart(t)
                self.log(f"-- {sc.name} rep {rep + 1}/{reps}: {n}")
                values: dict[str, float] | None
                try:
                    before = self.foreign.snapshot()
                    async with asyncio.timeout(self.opts.duration * 4 + 240):
                        values = await sc.run(ctx, t)
                    values[report.FOREIGN.key] = self.foreign.cores(before, self.foreign.snapshot())
                except Exception as exc:
                    values = None
                    msg = f"rep {rep + 1}: {type(exc).__name__}: {exc}"
                    res.failures.setdefault(n, []).append(msg)
                    self.problems.append(f"{sc.name} / {n}: {msg}")
                    self.log(f"!! {sc.name} / {n}: {msg}")
                res.runs.setdefault(n, []).append(values)
                if sc.after is not None:
                    await sc.after(ctx)
                gc.collect()
        for n in names:
            t = running[n]
            if t.proc is not None and t.proc.alive():
                self.rss_trace.setdefault(n, []).append((sc.name, t.rss() / 1e6))
        return res

    def _finish(
        self,
        results: dict[str, ScenarioResult],
        running: dict[str, RunningTarget],
        log_scan: dict[str, dict[str, Any]],
        elapsed: float,
        loadgen: str,
        fake_name: str,
    ) -> int:
        summaries = []
        table, table_data = issue_table.render(results, self.workers)
        if table:
            self.log(table)
            self.log("")
        for name, t in running.items():
            if t.kind != "comfygate":
                continue
            text, data = report.render_summary(results, name)
            self.log(text)
            summaries.append({"target": name, "goals": data})
        self.log("")
        if self.rss_trace:
            self.log("proxy RSS after each scenario (MB; growth across scenarios hints at leaks):")
            for name, trace in self.rss_trace.items():
                self.log(f"  {name}: " + ", ".join(f"{s} {v:.0f}" for s, v in trace))
        for name, scan in log_scan.items():
            if scan.get("counts"):
                self.log(f"{name} log: {scan['counts']} (log {scan['bytes']:,} B)")
                for event, count in scan["top"]:
                    self.log(f"  {count:>7}  {event}")
            else:
                self.log(f"{name} log: no warnings or errors ({scan.get('bytes', 0):,} B)")
        for p in self.problems:
            self.log(f"problem: {p}")
        self.log(f"total time {elapsed:.0f} s")
        self.out_dir.mkdir(exist_ok=True)
        path = self.out_dir / f"results-{self.stamp}.json"
        doc = {
            "timestamp": self.stamp,
            "options": vars(self.opts),
            "placement": self.placement.describe(),
            "load_generator": loadgen,
            "upstream": fake_name,
            "targets": {
                n: {
                    "kind": t.kind,
                    "env": dict(t.spec.env),
                    "argv": t.proc.argv if t.proc else None,
                }
                for n, t in running.items()
            },
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
            },
            "scenarios": {name: report.to_json(r) for name, r in results.items()},
            "summary": summaries,
            "rss_trace_mb": self.rss_trace,
            "comfygate_logs": log_scan,
            "problems": self.problems,
            "multi_instance": self.multi,
            "workflow_policy": self.policy,
            "tenant_views": self.views,
            "workers": self.workers,
            "issue_table": table_data,
            "load_average": {"start": self.load_start, "end": os.getloadavg()},
            "seconds": elapsed,
        }
        path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        self.log(f"results written to {path.relative_to(REPO)}")
        return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.name:14} {sc.title}")
        print(f"{'multi':14} POST /prompt through 1 vs 4 instances: placement overhead")
        print(f"{'multi':14} GET /history merged over 4 instances vs 1 (same history)")
        print(f"{'policy':14} POST /prompt, 200-node workflow: workflow policy on vs off")
        print(f"{'views':14} a user's GET /history, /api/jobs with 10,000 others' entries")
        print(f"{'workers':14} small GETs through --workers 2 vs 1 (unpinned)")
        for t in default_targets():
            print(f"target {t.name:12} {t.kind:10} {t.description}")
        return 0
    bench = Bench(args)

    async def guarded() -> int:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        if task is not None:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await bench.run()

    try:
        return uvloop.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        bench.group.stop_all()
        print("\ninterrupted: processes stopped, temp dir removed", file=sys.stderr)
        return 130
