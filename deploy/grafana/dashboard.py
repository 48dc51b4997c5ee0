"""Generates ``deploy/grafana/dashboards/comfygate.json``, the Grafana dashboard of comfygate.

The JSON is what Grafana loads (Compose provisions it; import it anywhere else); this script is
its source, so panels stay uniform and every query uses the same selectors. After editing it:

    python deploy/grafana/dashboard.py > deploy/grafana/dashboards/comfygate.json

(``make dashboard``). A test fails when the committed JSON and this script disagree, when a
query does not parse (promtool) or names a metric comfygate does not export.

Conventions: every query selects ``job=~"$job", instance=~"$instance"``; several replicas report
on the same ComfyUI instances, so per-upstream gauges are combined with ``max``, never summed;
rates use ``$__rate_interval``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

UID = "comfygate"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"
API_RULES = 'rule!~"ws|view|upload|static"'
"""Requests whose duration says something about latency (not streams or long downloads)."""


def rate(metric: str, extra: str = "", by: str = "") -> str:
    """``sum [by (…)] (rate(metric{SEL, extra}[$__rate_interval]))``."""
    matchers = f"{SEL}, {extra}" if extra else SEL
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({metric}{{{matchers}}}[{RATE}]))"


def quantile(q: float, histogram: str, extra: str = "", by: str = "") -> str:
    """``histogram_quantile(q, sum by (le[, …]) (rate(histogram_bucket{…}[…])))``."""
    group = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, {rate(f'{histogram}_bucket', extra, group)})"


@dataclass
class Target:
    expr: str
    legend: str = ""


def p50_p99(histogram: str, extra: str = "", by: str = "") -> tuple[Target, Target]:
    """The median and the 99th percentile of ``histogram``, legends ``[{{by}} ]p50|p99``."""
    label = f"{{{{{by}}}}} " if by else ""
    return (
        Target(quantile(0.5, histogram, extra, by), f"{label}p50"),
        Target(quantile(0.99, histogram, extra, by), f"{label}p99"),
    )


def breaker_states() -> list[dict[str, Any]]:
    """Value mappings of a breaker-state gauge (0 closed, 1 half-open, 2 open)."""
    return [
        {
            "type": "value",
            "options": {
                "0": {"text": "closed", "color": "green"},
                "1": {"text": "half-open", "color": "orange"},
                "2": {"text": "open", "color": "red"},
            },
        }
    ]


@dataclass
class Panel:
    title: str
    targets: Sequence[Target]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 8
    """Stat panels only: rows of graphs are laid out to fill the 24 columns."""
    height: int = 8
    stack: bool = False
    mappings: list[dict[str, Any]] = field(default_factory=list)
    thresholds: list[tuple[float | None, str]] = field(default_factory=list)


@dataclass
class Row:
    title: str
    panels: Sequence[Panel]


def _ts(title: str, *targets: Target, unit: str = "short", **kw: Any) -> Panel:
    return Panel(title, targets, unit=unit, **kw)


def _stat(title: str, expr: str, unit: str, **kw: Any) -> Panel:
    return Panel(title, [Target(expr)], unit=unit, kind="stat", width=4, height=4, **kw)


ROWS: tuple[Row, ...] = (
    Row(
        "Overview",
        [
            _stat("Requests", rate("comfygate_http_requests_total"), "reqps"),
            _stat(
                "5xx ratio",
                rate("comfygate_http_requests_total", 'status=~"5.."')
                + " / "
                + rate("comfygate_http_requests_total"),
                "percentunit",
                thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
            ),
            _stat(
                "p99 latency (API)",
                quantile(0.99, "comfygate_http_request_duration_seconds", API_RULES),
                "s",
                thresholds=[(None, "green"), (1, "orange"), (2.5, "red")],
            ),
            _stat("Open WebSockets", f"sum(comfygate_websocket_connections{{{SEL}}})", "short"),
            _stat(
                "ComfyUI instances up",
                f"sum(max by (upstream) (comfygate_upstream_up{{{SEL}}}))",
                "short",
            ),
            _stat(
                "Prompts pending",
                "sum(max by (upstream) "
                f'(comfygate_upstream_queue_prompts{{{SEL}, state="pending"}}))',
                "short",
            ),
        ],
    ),
    Row(
        "HTTP",
        [
            _ts(
                "Requests by route rule",
                Target(rate("comfygate_http_requests_total", 'rule=~"$rule"', "rule"), "{{rule}}"),
                unit="reqps",
                stack=True,
            ),
            _ts(
                "Responses by status",
                Target(
                    rate("comfygate_http_requests_total", 'rule=~"$rule"', "status"), "{{status}}"
                ),
                unit="reqps",
                stack=True,
            ),
            _ts(
                "5xx ratio by route rule",
                Target(
                    rate("comfygate_http_requests_total", 'rule=~"$rule", status=~"5.."', "rule")
                    + " / "
                    + rate("comfygate_http_requests_total", 'rule=~"$rule"', "rule"),
                    "{{rule}}",
                ),
                unit="percentunit",
            ),
            _ts(
                "Latency p50 / p99 by route rule",
                *p50_p99("comfygate_http_request_duration_seconds", 'rule=~"$rule"', "rule"),
                unit="s",
                description="Request start to response end (WebSocket upgrades excluded).",
            ),
            _ts(
                "Proxy's own time p99 by route rule",
                Target(
                    quantile(
                        0.99, "comfygate_http_proxy_duration_seconds", 'rule=~"$rule"', "rule"
                    ),
                    "{{rule}}",
                ),
                unit="s",
                description="Total time minus time waiting on ComfyUI: guards, Redis, rewriting, "
                "and writing to the client.",
            ),
            _ts(
                "Proxy refusals by type",
                Target(rate("comfygate_rejections_total", by="type"), "{{type}}"),
                unit="reqps",
                stack=True,
                description="Every error comfygate answered itself (401, 403, 429, 502, 504…).",
            ),
            _ts(
                "Body bytes",
                Target(rate("comfygate_http_request_bytes_total", 'rule=~"$rule"'), "received"),
                Target(rate("comfygate_http_response_bytes_total", 'rule=~"$rule"'), "sent"),
                unit="Bps",
            ),
        ],
    ),
    Row(
        "ComfyUI instances",
        [
            _ts(
                "Up",
                Target(f"max by (upstream) (comfygate_upstream_up{{{SEL}}})", "{{upstream}}"),
                unit="short",
                description="1 when the last GET /prompt probe answered (max over replicas).",
            ),
            _ts(
                "Latency p50 / p99 (requests)",
                *p50_p99("comfygate_upstream_duration_seconds", by="upstream"),
                unit="s",
            ),
            _ts(
                "Queue depth",
                Target(
                    f"max by (upstream, state) (comfygate_upstream_queue_prompts{{{SEL}}})",
                    "{{upstream}} {{state}}",
                ),
                unit="short",
            ),
            _ts(
                "Request and probe errors",
                Target(
                    rate("comfygate_upstream_errors_total", by="upstream, kind"),
                    "{{upstream}} {{kind}}",
                ),
                Target(
                    rate("comfygate_upstream_probe_failures_total", by="upstream, kind"),
                    "{{upstream}} probe {{kind}}",
                ),
                unit="ops",
            ),
            _ts(
                "Probe round trip p99",
                Target(
                    quantile(0.99, "comfygate_upstream_probe_duration_seconds", by="upstream"),
                    "{{upstream}}",
                ),
                unit="s",
            ),
            _ts(
                "Instance breaker",
                Target(
                    f"max by (upstream) (comfygate_upstream_breaker_state{{{SEL}}})",
                    "{{upstream}}",
                ),
                unit="short",
                mappings=breaker_states(),
                description="0 closed (takes prompts), 1 half-open, 2 open.",
            ),
        ],
    ),
    Row(
        "Generation",
        [
            _ts(
                "Prompts submitted by role",
                Target(rate("comfygate_prompts_submitted_total", by="role"), "{{role}}"),
                unit="ops",
                stack=True,
            ),
            _ts(
                "Prompts finished by outcome",
                Target(rate("comfygate_prompts_finished_total", by="outcome"), "{{outcome}}"),
                unit="ops",
                stack=True,
            ),
            _ts(
                "Queue wait p50 / p99",
                *p50_p99("comfygate_prompt_queue_wait_seconds"),
                unit="s",
                description="From submission to execution_start.",
            ),
            _ts(
                "Execution time p50 / p99",
                *p50_p99("comfygate_prompt_execution_seconds"),
                unit="s",
                description="From execution_start to success, error or interruption.",
            ),
            _ts(
                "Outputs served by type",
                Target(rate("comfygate_outputs_served_total", by="type"), "{{type}}"),
                unit="ops",
                stack=True,
            ),
        ],
    ),
    Row(
        "WebSocket",
        [
            _ts(
                "Open connections",
                Target(
                    f"sum by (instance) (comfygate_websocket_connections{{{SEL}}})", "{{instance}}"
                ),
                unit="short",
                stack=True,
            ),
            _ts(
                "Frames by direction and kind",
                Target(
                    rate("comfygate_websocket_frames_total", by="direction, kind"),
                    "{{direction}} {{kind}}",
                ),
                unit="ops",
            ),
            _ts(
                "Bytes by direction",
                Target(rate("comfygate_websocket_bytes_total", by="direction"), "{{direction}}"),
                unit="Bps",
            ),
            _ts(
                "Slow clients",
                Target(rate("comfygate_websocket_previews_dropped_total"), "previews dropped"),
                Target(rate("comfygate_websocket_slow_clients_closed_total"), "closed (1013)"),
                unit="ops",
            ),
        ],
    ),
    Row(
        "Security",
        [
            _ts(
                "Authentication failures by reason",
                Target(rate("comfygate_auth_failures_total", by="reason"), "{{reason}}"),
                unit="ops",
                stack=True,
            ),
            _ts(
                "Rate-limit decisions",
                Target(
                    rate("comfygate_ratelimit_decisions_total", by="route_class, outcome"),
                    "{{route_class}} {{outcome}}",
                ),
                unit="ops",
            ),
            _ts(
                "Refusals by guard",
                Target(
                    rate("comfygate_csrf_refusals_total", by="reason"), "origin/csrf {{reason}}"
                ),
                Target(rate("comfygate_role_refusals_total", by="reason"), "role {{reason}}"),
                Target(
                    rate("comfygate_isolation_refusals_total", by="reason"), "isolation {{reason}}"
                ),
                unit="ops",
                stack=True,
            ),
            _ts(
                "Policy and quota refusals",
                Target(rate("comfygate_policy_refusals_total", by="reason"), "policy {{reason}}"),
                Target(
                    rate("comfygate_queue_quota_refusals_total", by="reason"), "quota {{reason}}"
                ),
                unit="ops",
                stack=True,
            ),
        ],
    ),
    Row(
        "Redis",
        [
            _ts(
                "Redis latency p50 / p99",
                *p50_p99("comfygate_redis_command_duration_seconds", by="op"),
                unit="s",
            ),
            _ts(
                "Redis errors",
                Target(rate("comfygate_redis_errors_total", by="op, kind"), "{{op}} {{kind}}"),
                unit="ops",
                stack=True,
            ),
            _ts(
                "Redis breaker",
                Target(
                    f"max by (instance) (comfygate_redis_breaker_state{{{SEL}}})", "{{instance}}"
                ),
                unit="short",
                mappings=breaker_states(),
                description="0 closed, 1 half-open, 2 open (Redis bypassed: fail modes apply).",
            ),
        ],
    ),
    Row(
        "Processes",
        [
            _ts(
                "Scrape up",
                Target(f"up{{{SEL}}}", "{{instance}}"),
                unit="short",
            ),
            _ts(
                "Workers",
                Target(f"sum by (instance) (comfygate_workers{{{SEL}}})", "{{instance}} alive"),
                Target(
                    "sum by (instance) "
                    f"(increase(comfygate_worker_restarts_total{{{SEL}}}[{RATE}]))",
                    "{{instance}} restarts",
                ),
                unit="short",
                description="Only with `comfygate serve --workers N` (N > 1).",
            ),
            _ts(
                "Version",
                Target(
                    f"max by (instance, version, python) (comfygate_build_info{{{SEL}}})",
                    "{{instance}} {{version}} (Python {{python}})",
                ),
                unit="short",
            ),
        ],
    ),
)


def _panel_json(panel: Panel, panel_id: int, x: int, y: int, width: int) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for v, c in panel.thresholds] or [
        {"color": "green", "value": None}
    ]
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "mappings": panel.mappings,
    }
    options: dict[str, Any]
    if panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        }
    else:
        defaults["color"] = {"mode": "palette-classic"}
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 5,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": t.expr,
                "legendFormat": t.legend or "__auto",
                "range": True,
                "refId": chr(ord("A") + i),
            }
            for i, t in enumerate(panel.targets)
        ],
    }


def _variable(name: str, label: str, query: str, *, include_all: bool) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-variable"},
        "definition": query,
        "refresh": 2,  # on time range change: replicas come and go
        "sort": 1,
        "multi": include_all,
        "includeAll": include_all,
        **(
            {"allValue": ".*", "current": {"text": "All", "value": "$__all"}} if include_all else {}
        ),
        "hide": 0,
    }


def _widths(count: int) -> list[int]:
    """Widths that fill every line of a row of ``count`` graphs (24 columns): three a line,
    the last line split evenly among what is left."""
    full, rest = divmod(count, 3)
    if rest == 1 and full:
        full, rest = full - 1, 4
    return [8] * (3 * full) + ([24 // rest] * rest if rest else [])


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schema of Grafana 10/11)."""
    panels: list[dict[str, Any]] = []
    panel_id, y = 1, 0
    for row in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id, y, x, row_height = panel_id + 1, y + 1, 0, 0
        widths = [p.width for p in row.panels]
        if all(p.kind == "timeseries" for p in row.panels):
            widths = _widths(len(row.panels))
        for panel, width in zip(row.panels, widths, strict=True):
            if x + width > 24:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel_json(panel, panel_id, x, y, width))
            panel_id, x, row_height = panel_id + 1, x + width, max(row_height, panel.height)
        y += row_height
    job = {
        **_variable("job", "Job", "label_values(comfygate_build_info, job)", include_all=False),
        "current": {"text": "comfygate", "value": "comfygate"},
    }
    return {
        "uid": UID,
        "title": "comfygate",
        "description": "comfygate: traffic, ComfyUI instances, generation, WebSocket relay, "
        "security decisions and Redis.",
        "tags": ["comfygate", "comfyui"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-3h", "to": "now"},
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                },
                job,
                _variable(
                    "instance",
                    "Instance",
                    'label_values(comfygate_build_info{job=~"$job"}, instance)',
                    include_all=True,
                ),
                _variable(
                    "rule",
                    "Route rule",
                    'label_values(comfygate_http_requests_total{job=~"$job"}, rule)',
                    include_all=True,
                ),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    """The JSON text exactly as committed (sorted keys, two-space indent, final newline)."""
    return json.dumps(dashboard(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
