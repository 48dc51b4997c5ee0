"""Paths of the deployment files, loaders, and the external tools their tests run.

Tools missing on a developer's machine skip their test with the reason; in CI (``CI=true``)
they fail it instead, as the Redis and Chromium fixtures do (``.ci/run`` installs them).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_CONFIG = DEPLOY / "compose" / "comfygate.toml"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "comfygate.json"
SYSTEMD_UNIT = DEPLOY / "systemd" / "comfygate.service"

METRIC_NAME = re.compile(r"\bcomfygate_[a-z0-9_]+")
_SAMPLE_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def concrete_query(expr: str, rate_window: str) -> str:
    """A dashboard query with its Grafana variables filled in: every job, instance and rule,
    ``$__rate_interval`` = ``rate_window`` (for a Prometheus queried directly)."""
    return (
        expr.replace("$__rate_interval", rate_window)
        .replace('job=~"$job"', 'job=~"comfygate"')
        .replace("$instance", ".*")
        .replace("$rule", ".*")
    )


def tool(name: str, install_hint: str) -> str:
    """The path of an external tool; skips (locally) or fails (CI) when it is missing."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} not found ({install_hint})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file, each a mapping."""
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"
    return docs


def kubernetes_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in deploy/kubernetes (the kustomization itself excluded)."""
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_documents(path):
            yield path, doc


def find_object(kind: str, name: str) -> dict[str, Any]:
    for _, obj in kubernetes_objects():
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name} in deploy/kubernetes")


def base_metric_name(sample_name: str) -> str:
    """``comfygate_x_total`` / ``_bucket`` / ``_count`` / ``_sum`` -> ``comfygate_x``."""
    for suffix in _SAMPLE_SUFFIXES:
        if sample_name.endswith(suffix):
            return sample_name.removesuffix(suffix)
    return sample_name


def exported_metric_names() -> set[str]:
    """Base names of every metric comfygate can export.

    The app's collectors (:class:`proxy.observability.metrics.Metrics`, on a fresh registry),
    plus the few that processes other than the app register (the ``--workers`` supervisor,
    the opt-in per-user collector): those are recognised by their name appearing as a string
    literal in the package's sources.
    """
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    from proxy.observability.metrics import Metrics  # noqa: PLC0415

    names = {m.name for m in Metrics(CollectorRegistry()).registry.collect()}
    for source in (ROOT / "proxy").rglob("*.py"):
        names.update(re.findall(r"""["'](comfygate_[a-z0-9_]+)["']""", source.read_text("utf-8")))
    # Counters are collected under their name without _total; keep both spellings comparable.
    return {base_metric_name(n) for n in names}


def metric_names_in(text: str) -> set[str]:
    """Base names of the comfygate metrics an expression (or a file of them) refers to."""
    return {base_metric_name(n) for n in METRIC_NAME.findall(text)}
