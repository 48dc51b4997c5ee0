"""docs/operations.md stays true to deploy/ and to the metrics comfygate exports."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from proxy.observability.metrics import Metrics
from tests.deploy.files import GRAFANA, PROMETHEUS, ROOT, load_yaml_documents

OPERATIONS = ROOT / "docs" / "operations.md"
PREVIEW = GRAFANA / "preview.png"
MAX_PREVIEW_BYTES = 300 * 1024
OTHER_PROCESS_METRICS = (
    "comfygate_workers",  # the --workers supervisor's own
    "comfygate_worker_restarts_total",
    "comfygate_user_requests_total",  # opt-in per-user collector
)


def operations() -> str:
    text = OPERATIONS.read_text(encoding="utf-8")
    assert text.startswith("# Operations\n")
    return text


def test_every_exported_metric_is_listed() -> None:
    section = operations()
    names = [
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics(CollectorRegistry()).registry.collect()
    ]
    missing = [n for n in (*names, *OTHER_PROCESS_METRICS) if f"`{n}`" not in section]
    assert not missing, f"docs/operations.md does not list: {missing}"


def test_every_alert_is_listed() -> None:
    (rules,) = load_yaml_documents(PROMETHEUS / "alerts.yml")
    section = operations()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in section, rule["alert"]


def test_dashboard_preview_is_committed_small_and_shown() -> None:
    data = PREVIEW.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) <= MAX_PREVIEW_BYTES
    assert "(../deploy/grafana/preview.png)" in operations()


def test_paths_named_in_operations_exist() -> None:
    for path in set(re.findall(r"`((?:deploy|tests)/[\w./-]+)`", operations())):
        assert (ROOT / path).exists(), f"docs/operations.md names {path}, which does not exist"
