"""deploy/prometheus: ``promtool check config``, ``promtool check rules``, and ``promtool test
rules`` (the alerts fire on synthetic series and stay quiet on a healthy installation)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from proxy.settings import Settings
from tests.deploy.files import (
    PROMETHEUS,
    exported_metric_names,
    load_yaml_documents,
    metric_names_in,
    tool,
)

PROMTOOL_HINT = "apt-get install prometheus; .ci/run installs it"
TOKEN_FILE = "/run/secrets/metrics_token"
REQUIRED_ALERTS = {
    "ComfygateDown",  # gateway down
    "ComfyUIUpstreamDown",  # upstream down
    "ComfygateHighErrorRatio",  # 5xx ratio
    "ComfygateHighLatencyP99",  # p99 latency
    "ComfygateRedisBreakerOpen",  # Redis breaker open
    "ComfyUIQueueDepthHigh",  # queue depth high
    "ComfygateAuthFailureSpike",
    "ComfygateRateLimitSpike",
}


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = tool("promtool", PROMTOOL_HINT)
    return subprocess.run(
        [binary, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_yaml_documents(PROMETHEUS / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", PROMETHEUS / "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_check_config(tmp_path: Path) -> None:
    """The whole folder as Compose mounts it; only the secret's path is mapped to a real file
    (promtool insists that credentials files exist)."""
    folder = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, folder)
    token = tmp_path / "metrics_token"
    token.write_text("scrape-token\n", encoding="utf-8")
    config = folder / "prometheus.yml"
    text = config.read_text(encoding="utf-8")
    assert TOKEN_FILE in text
    config.write_text(text.replace(TOKEN_FILE, str(token)), encoding="utf-8")
    result = promtool("check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_proven_to_fire() -> None:
    (tests,) = load_yaml_documents(PROMETHEUS / "alerts_test.yml")
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in alert_rules()}
    assert names == fired, f"alerts without a firing test: {names - fired}"
    assert names >= REQUIRED_ALERTS


def test_alerts_are_labelled_and_explained() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        assert 'job="comfygate"' in rule["expr"], f"{rule['alert']} does not select the job"


def test_alerts_use_only_exported_metrics() -> None:
    used = set()
    for rule in alert_rules():
        used |= metric_names_in(rule["expr"])
    unknown = used - exported_metric_names()
    assert not unknown, f"alerts use metrics comfygate does not export: {sorted(unknown)}"


def test_scrape_job_matches_comfygates_metrics_listener() -> None:
    (config,) = load_yaml_documents(PROMETHEUS / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "comfygate"]
    metrics = Settings().metrics
    assert job["metrics_path"] == metrics.path
    (dns,) = job["dns_sd_configs"]
    assert dns["port"] == metrics.port
    assert job["authorization"]["credentials_file"] == TOKEN_FILE
    assert config["rule_files"] == ["alerts.yml"]
