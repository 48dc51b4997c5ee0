"""Render a picture of the Grafana dashboard from real data: ``make dashboard-preview``.

Grafana cannot be installed on these machines (it is in neither Debian nor PyPI), so this is a
stand-in, and the picture says so: it starts the monitored stack of :mod:`tests.deploy.stack`
(``comfygate serve --workers 2``, the fake ComfyUI, Redis, Debian's Prometheus), drives a
scripted workload for a couple of minutes, runs every query of
deploy/grafana/dashboards/comfygate.json through Prometheus' ``query_range`` API, and draws
the panels in the dashboard's own grid as SVG in headless Chromium, then screenshots it.

    python -m tests.deploy.preview [--seconds 120] [--out deploy/grafana/preview.png]
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import math
import random
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image
from playwright.async_api import async_playwright

from tests.deploy.files import DASHBOARD, ROOT, concrete_query
from tests.deploy.stack import Stack, WorkloadResult, generate, monitored_stack, refusals
from tests.redis_server import start_redis

CHROMIUM = "/usr/bin/chromium"
WIDTH = 1500
ROW_HEIGHT = 30
MARGIN = 8
PALETTE = (
    "#73BF69", "#F2CC0C", "#8AB8FF", "#FF780A", "#F2495C",
    "#5794F2", "#B877D9", "#FADE2A", "#37872D", "#C4162A",
)  # fmt: skip
STEP = 2.0
RATE_WINDOW = "10s"
MAX_BYTES = 300 * 1024


# -- workload -----------------------------------------------------------------------------------


async def drive(stack: Stack, seconds: float) -> None:
    """Traffic with a shape: a few users whose activity rises and falls, refusals now and then,
    one minute of an impatient script hitting its rate limit."""
    rng = random.Random(7)
    started = time.monotonic()
    result = WorkloadResult()
    tick = 0
    while (elapsed := time.monotonic() - started) < seconds:
        phase = elapsed / seconds
        intensity = 0.5 + 0.5 * math.sin(phase * 2 * math.pi * 1.5)
        users = [f"user{i}" for i in range(1 + round(3 * intensity))]
        async with asyncio.TaskGroup() as group:  # one failure cancels the rest
            for user in users:
                group.create_task(generate(stack, user, rng.randint(1, 2), result))
            if tick % 3 == 0:
                burst = 30 if 0.4 < phase < 0.7 else 3
                group.create_task(refusals(stack, result, burst=burst))
        tick += 1
        await asyncio.sleep(1.0)  # pacing the scripted traffic (not synchronisation)


# -- rendering ----------------------------------------------------------------------------------


def substitute(expr: str) -> str:
    return concrete_query(expr, RATE_WINDOW)


def legend(fmt: str, metric: dict[str, str]) -> str:
    if fmt in ("", "__auto"):
        labels = {k: v for k, v in metric.items() if k not in ("job", "instance", "__name__")}
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    out = fmt
    for key, value in metric.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def fmt_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "s":
        if value == 0:
            return "0 s"
        return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    suffix = {"reqps": " req/s", "ops": " /s", "Bps": "B/s"}.get(unit, "")
    for threshold, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g} {prefix}{suffix.strip()}"
    if unit == "Bps":
        return f"{value:.3g} B/s"
    return f"{value:.3g}{suffix}"


def nice_max(value: float) -> float:
    if value <= 0 or math.isnan(value):
        return 1.0
    exponent = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exponent:
            return step * exponent
    return 10 * exponent


def timeseries_svg(
    series: Sequence[tuple[str, list[tuple[float, float]]]],
    unit: str,
    start: float,
    end: float,
    width: int,
    height: int,
    *,
    stack: bool,
) -> str:
    left, bottom, top, right = 62, 18, 6, 8
    plot_w, plot_h = width - left - right, height - top - bottom
    if stack:
        totals: dict[float, float] = {}
        stacked = []
        for name, points in series:
            lifted = []
            for t, v in points:
                base = totals.get(t, 0.0)
                value = base + (0.0 if math.isnan(v) else v)
                totals[t] = value
                lifted.append((t, value))
            stacked.append((name, lifted))
        series = stacked
    values = [v for _, pts in series for _, v in pts if not math.isnan(v)]
    top_value = nice_max(max(values, default=0.0))
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for i in range(5):
        y = top + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" class="axis" text-anchor="end">'
            f"{html.escape(fmt_value(top_value * i / 4, unit))}</text>"
        )
    for i in range(5):
        t = start + (end - start) * i / 4
        x = left + plot_w * i / 4
        label = datetime.fromtimestamp(t, tz=UTC).strftime("%H:%M:%S")
        parts.append(
            f'<text x="{x:.1f}" y="{height - 3}" class="axis" text-anchor="middle">{label}</text>'
        )

    def xy(t: float, v: float) -> str:
        x = left + plot_w * (t - start) / (end - start)
        y = top + plot_h - plot_h * min(v, top_value) / top_value
        return f"{x:.1f},{y:.1f}"

    for index, (_name, points) in reversed(list(enumerate(series))):
        color = PALETTE[index % len(PALETTE)]
        runs: list[list[tuple[float, float]]] = [[]]
        for t, v in points:
            if math.isnan(v):
                runs.append([])
            else:
                runs[-1].append((t, v))
        for run in (r for r in runs if r):
            line = " ".join(xy(t, v) for t, v in run)
            area = f"{xy(run[0][0], 0)} {line} {xy(run[-1][0], 0)}"
            opacity = 0.22 if stack else 0.06
            parts.append(f'<polygon points="{area}" fill="{color}" fill-opacity="{opacity}"/>')
            parts.append(
                f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="1.4"/>'
            )
    parts.append("</svg>")
    return "".join(parts)


def stat_html(points: list[tuple[float, float]], panel: dict[str, Any]) -> str:
    unit = panel["fieldConfig"]["defaults"]["unit"]
    last = next((v for _, v in reversed(points) if not math.isnan(v)), float("nan"))
    color = "#73BF69"
    for step in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]:
        if step["value"] is None or (not math.isnan(last) and last >= step["value"]):
            color = {"green": "#73BF69", "orange": "#FF9830", "red": "#F2495C"}.get(
                step["color"], step["color"]
            )
    return f'<div class="stat" style="color:{color}">{html.escape(fmt_value(last, unit))}</div>'


async def render(stack: Stack, start: float, end: float, out: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    col = (WIDTH - MARGIN) / 24
    blocks: list[str] = []
    bottom = 0
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        x, y = MARGIN + grid["x"] * col, 70 + grid["y"] * ROW_HEIGHT
        w, h = grid["w"] * col - MARGIN, grid["h"] * ROW_HEIGHT - MARGIN
        bottom = max(bottom, int(y + h))
        style = f"left:{x:.0f}px;top:{y:.0f}px;width:{w:.0f}px;height:{h:.0f}px"
        if panel["type"] == "row":
            blocks.append(f'<div class="row" style="{style}">{html.escape(panel["title"])}</div>')
            continue
        series: list[tuple[str, list[tuple[float, float]]]] = []
        for target in panel["targets"]:
            result = await stack.query_range(substitute(target["expr"]), start, end, STEP)
            for item in result:
                points = [(float(t), float(v)) for t, v in item["values"]]
                series.append((legend(target["legendFormat"], item["metric"]), points))
        series.sort(key=lambda s: s[0])
        unit = panel["fieldConfig"]["defaults"]["unit"]
        if panel["type"] == "stat":
            points = series[0][1] if series else []
            body = stat_html(points, panel)
        else:
            chart_h = int(h - 30 - 18 * min(2, math.ceil(len(series) / 4)))
            stacked = panel["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
            body = timeseries_svg(series, unit, start, end, int(w - 12), chart_h, stack=stacked)
            keys = "".join(
                f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>'
                f"{html.escape(name)}</span>"
                for i, (name, _) in enumerate(series[:8])
            )
            body += f'<div class="legend">{keys or "<em>no data</em>"}</div>'
        blocks.append(
            f'<div class="panel" style="{style}"><div class="title">{html.escape(panel["title"])}'
            f"</div>{body}</div>"
        )
    when = datetime.fromtimestamp(end, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin:0; background:#111217; color:#ccccdc; font:12px Inter, "DejaVu Sans", sans-serif; }}
.top {{ position:absolute; left:{MARGIN}px; top:8px; right:{MARGIN}px; height:54px; }}
.top h1 {{ font-size:18px; margin:0 0 6px 0; color:#d8d9da; font-weight:500; }}
.vars span {{ background:#181b1f; border:1px solid #2c3235; padding:2px 8px; margin-right:6px; }}
.note {{ position:absolute; right:0; top:2px; color:#8e8e8e; font-size:11px; text-align:right; }}
.row {{ position:absolute; font-size:14px; color:#d8d9da; padding-top:8px; }}
.panel {{ position:absolute; background:#181b1f; border:1px solid #24292e; border-radius:2px;
  box-sizing:border-box; padding:4px 6px; overflow:hidden; }}
.title {{ font-size:12px; font-weight:500; color:#d8d9da; margin-bottom:2px; }}
.stat {{ font-size:30px; font-weight:500; text-align:center; margin-top:14px; }}
.legend {{ font-size:10.5px; line-height:16px; }}
.legend span {{ margin-right:10px; white-space:nowrap; }}
.legend i {{ display:inline-block; width:12px; height:3px; margin:0 4px 3px 0; }}
.grid {{ stroke:#2a2d33; stroke-width:1; }}
.axis {{ fill:#8e8e8e; font-size:10px; }}
</style></head><body>
<div class="top"><h1>comfygate</h1><div class="vars"><span>Data source: Prometheus</span>
<span>Job: comfygate</span><span>Instance: All</span><span>Route rule: All</span>
<span>Last {round(end - start)} seconds</span></div>
<div class="note">Preview drawn by tests/deploy/preview.py, not Grafana: the queries of<br>
deploy/grafana/dashboards/comfygate.json on a real Prometheus, {when},<br>
scripted workload on comfygate --workers 2 and the fake ComfyUI.</div></div>
{"".join(blocks)}</body></html>"""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page_ = await browser.new_page(viewport={"width": WIDTH, "height": bottom + MARGIN})
        await page_.set_content(page)
        await page_.screenshot(path=str(out), full_page=True)
        await browser.close()
    # A palette of 64 colours keeps the picture small enough to live in git.
    Image.open(out).convert("RGB").quantize(colors=64).save(out, optimize=True)


async def main(seconds: float, out: Path) -> None:
    redis = start_redis()
    try:
        with tempfile.TemporaryDirectory(prefix="comfygate-preview-") as work:
            # Reads limited low enough for the impatient script to hit; submissions not.
            limits = {
                "read": {"rate": "5/second", "burst": 10},
                "submit": {"rate": "600/minute", "burst": 60},
                "ws_connect": {"rate": "600/minute", "burst": 60},
            }
            env = {
                "COMFYGATE_RATE_LIMITS__DEFAULT": json.dumps(limits),
                # A loaded machine must not turn Redis latency into refusals (fail modes).
                "COMFYGATE_RATE_LIMITS__REDIS_BUDGET_MS": "2000",
            }
            async with monitored_stack(Path(work), redis.url, workers=2, env=env) as stack:
                start = time.time()
                await drive(stack, seconds)
                end = time.time()
                await stack.wait_scraped_after(end)
                await render(stack, start, end, out)
    finally:
        redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.deploy.preview", description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=ROOT / "deploy" / "grafana" / "preview.png")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.out))
    size = args.out.stat().st_size
    print(f"{args.out}: {size // 1024} KiB")
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is larger than {MAX_BYTES // 1024} KiB")
