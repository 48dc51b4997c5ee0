"""`make bench` (`python -m bench`): the fake ComfyUI upstream, comfygate and nginx side by side.

Layout:
  procs.py      child processes (CPU pinning, PDEATHSIG, cleanup), free ports, RSS
  targets.py    what is measured: `TargetSpec` list (direct / comfygate / nginx) and the launcher
  fixtures.py   the data the runs need, made through the fake's API (+ files in root/output)
  loadgen.py    HTTP load: wrk + bench/wrk/bench.lua, or an aiohttp closed loop without wrk
  wsload.py     WebSocket relay throughput, per-frame latency, idle sockets
  scenarios.py  one async function per measurement and the `SCENARIOS` list
  report.py     medians, paired ratios, tables, `GOALS` (PASS/MISS), JSON
  cli.py        argument parsing and the run loop (targets alternate inside each repetition)

Extending:
  * a comfygate variant (auth + rate limits on, policy on/off): append
    ``TargetSpec("comfygate+auth", "comfygate", env={...}, prepare=login)`` to
    `targets.default_targets()`; ``prepare`` may put a bearer token in ``running.headers``,
    which every load generator sends. Every scenario then measures it, with its own summary.
  * a scenario: ``async def fn(ctx, target) -> dict[str, float]`` plus a `Scenario` entry (title,
    metrics, which target kinds, repetitions, restart first, reset afterwards) in `SCENARIOS`.
  * a new kind of target (multi-instance): a starter in `targets.Launcher.start`.
"""
