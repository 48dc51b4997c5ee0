"""The workflow policy's cost: ``POST /prompt`` of a realistic 200-node workflow through comfygate
with the policy on vs off (``COMFYGATE_POLICY__ENABLED=false``), everything else equal.

A stand-in upstream (:mod:`bench.prompt_sink`: answers like ComfyUI, validates and runs
nothing, so that what is measured is the proxy) and two comfygate processes (``policy-on``,
``policy-off``), started like the main run's. Both are called as a non-admin role (admins skip
the policy) whose rate limits and queue quota are lifted, so each request pays what a user's
does: authentication, the policy (or not), isolation's rewrite. The body is what the stock
frontend sends: the API-format graph (10 chains of EmptyImage -> 17 filters -> ImageScale ->
Preview/SaveImage = 200 nodes) plus the UI workflow in ``extra_data.extra_pnginfo``. The two
variants alternate inside every repetition; the verdict is the median of the paired ratios
on/off (target >= 0.80).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.fixtures import ui_workflow
from bench.loadgen import LoadGenerator
from bench.procs import ProcessGroup, free_port, wait_http
from bench.targets import BENCH_JWT_SECRET, PASS_THROUGH, REPO, bench_token
from proxy.settings.limits import ROUTE_CLASSES

ROLE = "bench_policy"
"""A plain (non-admin) role: the built-in policy's base applies to it."""
CHAINS = 10
FILTERS = 17
CONNECTIONS = 32
TARGET_RATIO = 0.8
VARIANTS = {"policy-on": "true", "policy-off": "false"}


def workflow_200() -> dict[str, Any]:
    """200 nodes the fake can run: per chain EmptyImage -> 17 x ImageBlur/ImageAddNoise ->
    ImageScale -> PreviewImage (SaveImage for the last chain)."""
    graph: dict[str, Any] = {}
    node_id = 0

    def add(class_type: str, **inputs: Any) -> str:
        nonlocal node_id
        node_id += 1
        graph[str(node_id)] = {
            "class_type": class_type,
            "inputs": inputs,
            "_meta": {"title": class_type},
        }
        return str(node_id)

    for chain in range(CHAINS):
        last = add("EmptyImage", width=64, height=64, batch_size=1, color=0x101010 * (chain + 1))
        for step in range(FILTERS):
            if step % 2:
                last = add("ImageAddNoise", image=[last, 0], seed=chain * 100 + step, strength=0.1)
            else:
                last = add("ImageBlur", image=[last, 0], blur_radius=1, sigma=1.0)
        last = add(
            "ImageScale",
            image=[last, 0],
            upscale_method="bilinear",
            width=96,
            height=96,
            crop="disabled",
        )
        if chain == CHAINS - 1:
            add("SaveImage", images=[last, 0], filename_prefix="bench_policy")
        else:
            add("PreviewImage", images=[last, 0])
    assert len(graph) == CHAINS * (FILTERS + 3) == 200
    return graph


def body_200() -> bytes:
    return orjson.dumps(
        {
            "prompt": workflow_200(),
            "client_id": "bench-policy",
            "extra_data": {"extra_pnginfo": {"workflow": ui_workflow(200)}},
        }
    )


def roles_env() -> str:
    """``COMFYGATE_ROLES``: the bench role without rate limits or queue quota (admin too, for
    the queue clearing between runs)."""
    unlimited = {"rate": "unlimited"}
    classes = ROUTE_CLASSES  # every class, the frontend's files included
    limits = dict.fromkeys(classes, unlimited)
    return json.dumps(
        {
            ROLE: {"rate_limits": limits, "queue_quota": 0},
            "admin": {"admin": True, "rate_limits": limits, "queue_quota": 0},
        }
    )


@dataclass
class Setup:
    fake: str = ""
    proxies: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    body_file: Path | None = None


async def start(group: ProcessGroup, tmp: Path, comfygate_cmd: list[str]) -> Setup:
    setup = Setup(headers={"Authorization": f"Bearer {bench_token((ROLE,))}"})
    logs = tmp / "logs"
    port = free_port()
    argv = [sys.executable, "-m", "bench.prompt_sink", "--port", str(port)]
    proc = group.spawn("sink-policy", argv, logs / "sink-policy.log", cwd=REPO)
    setup.fake = f"http://127.0.0.1:{port}"
    await wait_http(f"{setup.fake}/history/bench-ready", proc)
    for name, enabled in VARIANTS.items():
        port = free_port()
        env = {
            "COMFYGATE_UPSTREAM__URLS": json.dumps([setup.fake]),
            **PASS_THROUGH,
            "COMFYGATE_AUTH__JWT__SECRET": BENCH_JWT_SECRET,
            "COMFYGATE_ROLES": roles_env(),
            "COMFYGATE_POLICY__ENABLED": enabled,
            "COMFYGATE_LOGGING__FORMAT": "json",
            "COMFYGATE_METRICS__ENABLED": "false",  # its own port would clash between proxies
        }
        argv = [*comfygate_cmd, "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = group.spawn(f"comfygate-{name}", argv, logs / f"comfygate-{name}.log", env=env)
        base = f"http://127.0.0.1:{port}"
        await wait_http(f"{base}/readyz", proc, ok=lambda status: status == 200)
        setup.proxies[name] = base
    setup.body_file = tmp / "prompt-200-nodes.json"
    setup.body_file.write_bytes(body_200())
    return setup


async def check_accepted(session: aiohttp.ClientSession, setup: Setup) -> None:
    """Both variants must accept the workflow (a refusal would measure the wrong thing)."""
    assert setup.body_file is not None
    body = setup.body_file.read_bytes()
    for name, base in setup.proxies.items():
        async with session.post(f"{base}/prompt", data=body, headers=setup.headers) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"{name} refused the 200-node prompt: {resp.status} {text}")
    await clear(session, setup)


async def clear(session: aiohttp.ClientSession, setup: Setup) -> None:
    for path in ("/queue", "/history"):
        async with session.post(f"{setup.fake}{path}", json={"clear": True}) as resp:
            await resp.read()


async def run(
    group: ProcessGroup,
    tmp: Path,
    comfygate_cmd: list[str],
    loadgen: LoadGenerator,
    *,
    reps: int,
    duration: float,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Start the processes, alternate the two variants in every repetition, print the figures."""
    setup = await start(group, tmp, comfygate_cmd)
    assert setup.body_file is not None
    size = setup.body_file.stat().st_size
    rps: dict[str, list[float]] = {name: [] for name in setup.proxies}
    bad: dict[str, int] = dict.fromkeys(setup.proxies, 0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await check_accepted(session, setup)
        for rep in range(reps):
            for name, base in setup.proxies.items():
                log(f"-- policy rep {rep + 1}/{reps}: {name}")
                result = await loadgen.run(
                    f"{base}/prompt",
                    connections=CONNECTIONS,
                    duration=duration,
                    headers=setup.headers,
                    body_file=setup.body_file,
                )
                rps[name].append(result.rps)
                bad[name] += result.bad_status + result.errors
                await clear(session, setup)
    ratios = [on / off for on, off in zip(rps["policy-on"], rps["policy-off"], strict=True) if off]
    ratio = statistics.median(ratios) if ratios else float("nan")
    medians = {name: statistics.median(values) for name, values in rps.items()}
    verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
    log(
        f"workflow policy: POST /prompt, 200-node workflow ({size:,} B body), {CONNECTIONS} "
        f"connections, {loadgen.name}, median of {reps} run(s)"
    )
    for name, value in medians.items():
        log(f"  {name:10} {value:10,.0f} req/s   (non-2xx + errors: {bad[name]})")
    log(f"  policy on / off: {ratio:.2f}x (target >= {TARGET_RATIO:.2f}x): {verdict}")
    return {
        "body_bytes": size,
        "rps": rps,
        "median_rps": medians,
        "ratio_on_off": ratio,
        "target": TARGET_RATIO,
        "result": verdict,
        "bad": bad,
    }
