"""The issue-17 table: every comfygate variant next to nginx, one row per test, with the ratio
and the target, as the issue printed it (plus the ``--workers 2`` vs 1 row)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from bench.report import ScenarioResult, _table, fmt, fmt_ratio


@dataclass(frozen=True)
class Row:
    label: str
    scenario: str
    shown: str  # metric printed per target
    shown_mode: Literal["value", "added"]
    unit: str
    ratio_metric: str  # ratio column: target / nginx of this metric ("" for none)
    goal_mode: Literal["ratio", "value"]
    op: Literal[">=", "<="]
    threshold: float
    digits: int = 0


ROWS: tuple[Row, ...] = (
    Row("small GET, 64 conns: CPU/request", "get_small", "cpu_us_per_req", "value", "us",
        "rps", "ratio", ">=", 0.4),
    Row("small GET, 1 conn: added p50", "get_latency", "p50_us", "added", "us",
        "", "value", "<=", 300),
    Row("/view 512 KiB, 16 conns: CPU per 100 MB", "view_512k", "cpu_ms_per_100mb", "value",
        "ms", "mbps", "ratio", ">=", 0.55, 1),
    Row("POST /prompt 20 KB, 32 conns: CPU/request", "post_prompt", "cpu_us_per_req", "value",
        "us", "rps", "ratio", ">=", 0.6),
    Row("WebSocket binary relay, 8 conns", "ws_relay", "mbps", "value", "MB/s",
        "mbps", "ratio", ">=", 0.9),
    Row("WebSocket relay: CPU per 128 KiB frame", "ws_relay", "cpu_us_per_frame", "value", "us",
        "", "value", "<=", math.inf),
    Row("WebSocket 128 KiB preview, paced: added p50", "ws_latency", "p50_us", "added", "us",
        "", "value", "<=", 700),
    Row("idle WebSockets: memory per connection", "idle_ws", "kb_per_pair", "value", "KiB",
        "kb_per_pair", "value", "<=", 16, 1),
    Row("idle WebSockets: opens per second", "idle_ws", "opens_per_s", "value", "1/s",
        "opens_per_s", "ratio", ">=", 0.5),
)  # fmt: skip


def _value(res: ScenarioResult, target: str, row: Row) -> float:
    if row.shown_mode == "added":
        return res.added(target, row.shown)
    return res.median(target, row.shown)


def _goal_text(row: Row) -> str:
    if math.isinf(row.threshold):
        return ""
    if row.goal_mode == "ratio":
        return f"{row.op} {row.threshold:g}x"
    return f"{row.op} {row.threshold:g} {row.unit}"


def _verdict(row: Row, res: ScenarioResult, target: str, nginx: str | None) -> tuple[float, str]:
    if math.isinf(row.threshold):
        return math.nan, ""
    if row.goal_mode == "ratio":
        value = res.ratio(target, nginx, row.ratio_metric) if nginx else math.nan
    else:
        value = _value(res, target, row)
    if math.isnan(value):
        return value, "n/a"
    ok = value >= row.threshold if row.op == ">=" else value <= row.threshold
    return value, "PASS" if ok else "MISS"


def render(
    results: dict[str, ScenarioResult], workers: dict[str, Any] | None
) -> tuple[str, list[dict[str, Any]]]:
    """The table and its JSON (one record per row and comfygate target)."""
    any_res = next(iter(results.values()), None)
    if any_res is None:
        return "", []
    cg = [t for t in any_res.targets if any_res.kinds[t] == "comfygate"]
    nginx = next((t for t in any_res.targets if any_res.kinds[t] == "nginx"), None)
    shown = ([nginx] if nginx else []) + cg
    header = ["test", "unit", *shown, *(f"{t}/nginx" for t in cg), "target", *cg]
    rows = [header]
    data: list[dict[str, Any]] = []
    for row in ROWS:
        res = results.get(row.scenario)
        if res is None:
            continue
        line = [row.label, row.unit]
        line += [fmt(_value(res, t, row), row.digits) if t in res.targets else "-" for t in shown]
        for t in cg:
            if row.ratio_metric and nginx is not None and t in res.targets:
                line.append(fmt_ratio(res.ratio(t, nginx, row.ratio_metric)))
            else:
                line.append("")
        line.append(_goal_text(row))
        for t in cg:
            value, verdict = _verdict(row, res, t, nginx)
            line.append(verdict)
            data.append({"row": row.label, "target": t, "value": value, "result": verdict})
        rows.append(line)
    text = "== Issue 17 table: comfygate variants vs nginx (ratios paired per repetition)\n"
    text += _table(rows)
    if workers and workers.get("median"):
        med = workers["median"]
        parts = [
            f"--workers {n}: {m['rps']:,.0f} req/s, {m['rps_per_core']:,.0f} req/s per busy core"
            for n, m in med.items()
        ]
        text += (
            f"\n--workers 2 vs 1 (regular user, small GET, 64 conns, unpinned on "
            f"{workers.get('cores')} cores): {workers['scaling']:.2f}x  ({'; '.join(parts)})"
        )
    text += (
        "\n   CPU figures: the proxy's process CPU time (user + system) over the requests it "
        "served: they hold under contention, unlike req/s"
    )
    return text, data


__all__ = ["ROWS", "render"]
