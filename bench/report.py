"""Medians, ratios, tables, the PASS/MISS summary and the JSON file."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.scenarios import Metric, Scenario

Values = dict[str, float]

# Added to every run by the runner: CPU used meanwhile by processes that are not the bench's.
FOREIGN = Metric(
    "foreign_cores", "CPU used by other processes", "cores", False, ratio=False, digits=2
)


@dataclass
class ScenarioResult:
    scenario: Scenario
    targets: list[str]  # names in run order
    kinds: dict[str, str]  # target name -> kind
    runs: dict[str, list[Values | None]] = field(default_factory=dict)  # per repetition
    failures: dict[str, list[str]] = field(default_factory=dict)

    def values(self, target: str, key: str) -> list[float]:
        out = []
        for run in self.runs.get(target, []):
            if run is not None and key in run and not math.isnan(run[key]):
                out.append(run[key])
        return out

    def median(self, target: str, key: str) -> float:
        vals = self.values(target, key)
        return statistics.median(vals) if vals else math.nan

    def _paired(self, a: str, b: str, key: str, op: Callable[[float, float], float]) -> float:
        """Median over repetitions of op(a_rep, b_rep): each run compared with its neighbour."""
        out = []
        for ra, rb in zip(self.runs.get(a, []), self.runs.get(b, []), strict=False):
            if ra is None or rb is None or key not in ra or key not in rb:
                continue
            v = op(ra[key], rb[key])
            if not math.isnan(v):
                out.append(v)
        return statistics.median(out) if out else math.nan

    def ratio(self, a: str, b: str, key: str) -> float:
        return self._paired(a, b, key, lambda x, y: x / y if y else math.nan)

    def added(self, a: str, key: str, direct: str = "direct") -> float:
        return self._paired(a, direct, key, lambda x, y: x - y)


def fmt(v: float, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 100 or digits == 0:
        return f"{v:,.{digits if abs(v) < 100 else 0}f}"
    return f"{v:,.{digits}f}"


def fmt_ratio(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.2f}x"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _proxy_targets(res: ScenarioResult, kind: str) -> list[str]:
    return [t for t in res.targets if res.kinds[t] == kind]


def render_scenario(res: ScenarioResult, reps: int) -> str:
    sc = res.scenario
    cg = _proxy_targets(res, "comfygate")
    nginx = _proxy_targets(res, "nginx")
    has_direct = "direct" in res.targets
    ratio_cols: list[tuple[str, str]] = []
    for name in cg:
        if has_direct:
            ratio_cols.append((name, "direct"))
        ratio_cols.extend((name, n) for n in nginx)
    header = ["metric", "unit", *res.targets, *(f"{a}/{b}" for a, b in ratio_cols)]
    rows = [header]
    for m in (*sc.metrics, FOREIGN):
        row = [m.label, m.unit, *(fmt(res.median(t, m.key), m.digits) for t in res.targets)]
        for a, b in ratio_cols:
            row.append(fmt_ratio(res.ratio(a, b, m.key)) if m.ratio else "")
        rows.append(row)
        if m.added and has_direct:
            added = ["  added vs direct", m.unit]
            added += ["" if t == "direct" else fmt(res.added(t, m.key)) for t in res.targets]
            for a, b in ratio_cols:
                added.append(
                    fmt_ratio(res.added(a, m.key) / res.added(b, m.key))
                    if b != "direct" and res.added(b, m.key) > 0
                    else ""
                )
            rows.append(added)
    n = reps if sc.reps is None else sc.reps
    out = [f"== {sc.title}  [{sc.name}; median of {n} run(s) per target]", _table(rows)]
    for note in sc.notes:
        out.append(f"   note: {note}")
    busy = max((v for t in res.targets for v in res.values(t, FOREIGN.key)), default=0.0)
    if busy > 0.2:
        out.append(
            f"   warning: other processes used up to {busy:.2f} cores during these runs: "
            "absolute figures are unreliable, paired ratios less so"
        )
    for target, msgs in res.failures.items():
        for msg in msgs:
            out.append(f"   FAILED {target}: {msg}")
    return "\n".join(out)


@dataclass(frozen=True)
class Goal:
    label: str
    scenario: str
    metric: str
    mode: Literal["vs_nginx", "added", "value"]
    op: Literal[">=", "<=", "<"]
    threshold: float
    unit: str = ""


GOALS: list[Goal] = [
    Goal("small GETs (64 conn) >= 0.4x nginx", "get_small", "rps", "vs_nginx", ">=", 0.4),
    Goal("added p50 at 1 connection <= 300 us", "get_latency", "p50_us", "added", "<=", 300, "us"),
    Goal("GET /view 512 KiB >= 0.5x nginx", "view_512k", "mbps", "vs_nginx", ">=", 0.5),
    Goal("POST /prompt 20 KB >= 0.6x nginx", "post_prompt", "rps", "vs_nginx", ">=", 0.6),
    Goal("WebSocket relay >= 0.8x nginx", "ws_relay", "mbps", "vs_nginx", ">=", 0.8),
    Goal("<= 20 KB per idle WebSocket pair", "idle_ws", "kb_per_pair", "value", "<=", 20, "KiB"),
    Goal(
        "200 MB GET /view: peak RSS growth < 20 MB",
        "stream_200mb",
        "get_peak_mb",
        "value",
        "<",
        20,
        "MB",
    ),
    Goal(
        "200 MB upload: peak RSS growth < 20 MB",
        "stream_200mb",
        "upload_peak_mb",
        "value",
        "<",
        20,
        "MB",
    ),
]


RATE_LIMIT_GOALS: list[Goal] = [
    Goal("small GETs, auth + rate limit >= 0.3x nginx", "get_small", "rps", "vs_nginx", ">=", 0.3),
    Goal("added p50 at 1 connection <= 500 us", "get_latency", "p50_us", "added", "<=", 500, "us"),
    Goal(
        "POST /prompt, auth + rate limit >= 0.5x nginx", "post_prompt", "rps", "vs_nginx", ">=", 0.5
    ),
]
"""Targets of the variants with rate limits in Redis (a round trip on every request)."""


def goals_for(target: str) -> list[Goal]:
    return RATE_LIMIT_GOALS if target.endswith("+rl") else GOALS


def evaluate(goal: Goal, results: dict[str, ScenarioResult], target: str) -> tuple[float, str]:
    res = results.get(goal.scenario)
    if res is None or target not in res.targets:
        return math.nan, "n/a"
    if goal.mode == "vs_nginx":
        nginx = _proxy_targets(res, "nginx")
        value = res.ratio(target, nginx[0], goal.metric) if nginx else math.nan
    elif goal.mode == "added":
        value = res.added(target, goal.metric)
    else:
        value = res.median(target, goal.metric)
    if math.isnan(value):
        return value, "n/a"
    ok = {
        ">=": value >= goal.threshold,
        "<=": value <= goal.threshold,
        "<": value < goal.threshold,
    }[goal.op]
    return value, "PASS" if ok else "MISS"


def render_summary(
    results: dict[str, ScenarioResult], target: str
) -> tuple[str, list[dict[str, Any]]]:
    rows = [["target", "measured", "result"]]
    data = []
    for goal in goals_for(target):
        value, verdict = evaluate(goal, results, target)
        shown = fmt_ratio(value) if goal.mode == "vs_nginx" else f"{fmt(value, 1)} {goal.unit}"
        rows.append([goal.label, shown, verdict])
        data.append({"goal": goal.label, "value": value, "result": verdict})
    return f"== Summary for {target}\n" + _table(rows), data


def to_json(res: ScenarioResult) -> dict[str, Any]:
    sc = res.scenario
    out: dict[str, Any] = {
        "title": sc.title,
        "notes": list(sc.notes),
        "runs": res.runs,
        "failures": res.failures,
        "median": {
            t: {m.key: res.median(t, m.key) for m in (*sc.metrics, FOREIGN)} for t in res.targets
        },
        "ratios": {},
        "added": {},
    }
    for a in res.targets:
        if res.kinds[a] != "comfygate":
            continue
        for b in res.targets:
            if b == a or res.kinds[b] == "comfygate":
                continue
            out["ratios"][f"{a}/{b}"] = {
                m.key: res.ratio(a, b, m.key) for m in sc.metrics if m.ratio
            }
    for t in res.targets:
        if t != "direct" and "direct" in res.targets:
            out["added"][t] = {m.key: res.added(t, m.key) for m in sc.metrics if m.added}
    return out


def metric_by_key(sc: Scenario, key: str) -> Metric | None:
    return next((m for m in sc.metrics if m.key == key), None)
