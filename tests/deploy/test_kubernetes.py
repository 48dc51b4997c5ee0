"""deploy/kubernetes: schema validation (kubernetes-validate bundles the API's JSON schemas, so
this runs offline), the kustomization, and what the manifests promise about comfygate: probes
on its real routes and ports, its configuration loading, a hardened pod, and NetworkPolicies
under which only comfygate reaches ComfyUI and Redis."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from dockerfile_parse import DockerfileParser

from proxy.app import create_app
from proxy.settings import Settings, load_settings
from tests.deploy.files import (
    DOCKERFILE,
    KUBERNETES,
    find_object,
    kubernetes_objects,
    load_yaml_documents,
)
from tests.deploy.networkpolicy import Pod, allowed

KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
"""The oldest minor release still commonly run, and the newest the package knows."""
OPTIONAL_RESOURCES = {"servicemonitor.yaml"}
"""Files kustomization.yaml lists only as a comment (they need a CRD)."""
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
NAMESPACE = "comfygate"
GATEWAY = {"app.kubernetes.io/name": "comfygate", "app.kubernetes.io/component": "gateway"}


def kustomization() -> dict[str, Any]:
    (doc,) = load_yaml_documents(KUBERNETES / "kustomization.yaml")
    return dict(doc)


def gateway_deployment() -> dict[str, Any]:
    return find_object("Deployment", "comfygate")


def gateway_container() -> dict[str, Any]:
    (container,) = gateway_deployment()["spec"]["template"]["spec"]["containers"]
    return dict(container)


def configmap_toml() -> str:
    return str(find_object("ConfigMap", "comfygate-config")["data"]["comfygate.toml"])


def configured_settings(tmp_path: Path) -> Settings:
    """The ConfigMap's TOML loaded as the pod loads it, with the Secret's placeholder values
    as the files its *_file keys name (their mount point mapped into tmp_path)."""
    secret = find_object("Secret", "comfygate-secrets")
    mount = _mount_path("secrets")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key, value in secret["stringData"].items():
        (secrets_dir / key).write_text(value, encoding="utf-8")
    config = tmp_path / "comfygate.toml"
    config.write_text(configmap_toml().replace(f"{mount}/", f"{secrets_dir}/"), encoding="utf-8")
    env = {e["name"]: e["value"] for e in gateway_container().get("env", []) if "value" in e}
    env.pop("COMFYGATE_CONFIG")
    return load_settings(config, environ=env)


def _mount_path(volume: str) -> str:
    (mount,) = [m for m in gateway_container()["volumeMounts"] if m["name"] == volume]
    return str(mount["mountPath"])


def _container_port(name: str) -> int:
    (port,) = [p for p in gateway_container()["ports"] if p["name"] == name]
    return int(port["containerPort"])


# -- schemas and the kustomization --------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_api_schemas(version: str) -> None:
    checked = 0
    for path, obj in kubernetes_objects():
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            first_line = str(exc).splitlines()[0]
            pytest.fail(f"{path.name}: {obj['kind']}/{obj['metadata']['name']}: {first_line}")
        checked += 1
    assert checked >= 12


def test_the_validator_is_not_vacuous() -> None:
    pdb = copy.deepcopy(find_object("PodDisruptionBudget", "comfygate"))
    pdb["spec"]["maxUnavailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pdb, KUBERNETES_VERSIONS[-1], strict=True)


def test_servicemonitor_selects_the_metrics_service() -> None:
    monitor = find_object("ServiceMonitor", "comfygate")
    service = find_object("Service", "comfygate-metrics")
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == Settings().metrics.path
    # job="comfygate", as the alerts and the dashboard select (not the Service's name).
    assert labels[monitor["spec"]["jobLabel"]] == "comfygate"


def test_kustomization_lists_every_manifest() -> None:
    kust = kustomization()
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    listed = set(kust["resources"])
    assert listed | OPTIONAL_RESOURCES == files
    assert not listed & OPTIONAL_RESOURCES
    text = (KUBERNETES / "kustomization.yaml").read_text(encoding="utf-8")
    for optional in OPTIONAL_RESOURCES:
        assert re.search(rf"#\s*-\s*{re.escape(optional)}", text), f"{optional} not mentioned"
    assert kust["namespace"] == NAMESPACE
    # The namespace comes from kustomize only, so `kubectl apply -k` can retarget it.
    for path, obj in kubernetes_objects():
        assert "namespace" not in obj["metadata"], f"{path.name}: hard-coded namespace"
    # Every image the manifests run can be set from the kustomization.
    images = {i["name"] for i in kust["images"]}
    for _, obj in kubernetes_objects():
        pod = _pod_spec(obj)
        for container in pod["containers"] if pod is not None else []:
            name = container["image"].split(":")[0]
            assert name in images or name == "redis", f"image {name} not in kustomization"


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    template = obj.get("spec", {}).get("template")
    return template["spec"] if template else None


# -- what the manifests promise about comfygate -------------------------------------------------


def test_probes_use_comfygates_routes_and_port(tmp_path: Path) -> None:
    container = gateway_container()
    settings = configured_settings(tmp_path)
    paths = {r.resource.canonical for r in create_app(settings).router.routes() if r.resource}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in paths, f"{probe}: comfygate has no route {http['path']}"
        assert http["port"] == "http"
    assert _container_port("http") == settings.server.port
    assert settings.server.host == "0.0.0.0"


def test_metrics_port_is_consistent_everywhere(tmp_path: Path) -> None:
    settings = configured_settings(tmp_path)
    metrics_port = _container_port("metrics")
    assert metrics_port == settings.metrics.port
    assert settings.metrics.enabled
    assert not settings.metrics.on_main_port
    assert settings.metrics.host == "0.0.0.0"
    annotations = gateway_deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == settings.metrics.path
    (port,) = find_object("Service", "comfygate-metrics")["spec"]["ports"]
    assert port["port"] == metrics_port
    assert port["targetPort"] == "metrics"
    # The gateway's own Service never exposes /metrics.
    gateway_ports = find_object("Service", "comfygate")["spec"]["ports"]
    assert {p["targetPort"] for p in gateway_ports} == {"http"}
    dockerfile = DockerfileParser(str(DOCKERFILE))
    assert str(metrics_port) in " ".join(
        i["value"] for i in dockerfile.structure if i["instruction"] == "EXPOSE"
    )


def test_configmap_and_secret_make_a_valid_shared_configuration(tmp_path: Path) -> None:
    settings = configured_settings(tmp_path)
    # Several replicas must share state and keys, or each would mint its own.
    assert settings.redis.url.startswith("redis://")
    assert settings.redis.url.endswith("@redis:6379/0")
    assert settings.auth.jwt.secret
    assert settings.auth.session.secret
    assert settings.upstream.urls == ("http://comfyui-0.comfyui:8188",)
    # The pod reads the files where the ConfigMap says.
    env = {e["name"]: e.get("value") for e in gateway_container()["env"]}
    assert env["COMFYGATE_CONFIG"] == f"{_mount_path('config')}/comfygate.toml"
    assert f"{_mount_path('secrets')}/" in configmap_toml()
    redis = find_object("Deployment", "redis")
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    password_ref = redis_container["env"][0]["valueFrom"]["secretKeyRef"]
    assert password_ref == {"name": "comfygate-secrets", "key": "redis-password"}
    secret = find_object("Secret", "comfygate-secrets")["stringData"]
    assert f":{secret['redis-password']}@" in secret["redis-url"]


def test_termination_grace_outlasts_drain_and_shutdown(tmp_path: Path) -> None:
    server = configured_settings(tmp_path).server
    grace = gateway_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert server.drain_seconds > 0, "pods must answer 503 while endpoints are removed"
    assert grace > server.drain_seconds + server.shutdown_grace_seconds


def test_gateway_pods_are_hardened_and_spread() -> None:
    deployment = gateway_deployment()
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    dockerfile_uid = int(DockerfileParser(str(DOCKERFILE)).args["APP_UID"])
    assert spec["replicas"] >= 2
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    container = gateway_container()
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    assert "memory" in container["resources"]["limits"]
    # A writable /tmp (the workers' metric files) on a read-only root file system.
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == GATEWAY


def test_services_hpa_and_pdb_target_the_right_pods() -> None:
    workloads = {
        (o["kind"], o["metadata"]["name"]): o["spec"]["template"]["metadata"]["labels"]
        for _, o in kubernetes_objects()
        if o["kind"] in ("Deployment", "StatefulSet")
    }
    for _, obj in kubernetes_objects():
        if obj["kind"] != "Service":
            continue
        selector = obj["spec"]["selector"]
        matched = [k for k, labels in workloads.items() if selector.items() <= labels.items()]
        assert matched, f"Service {obj['metadata']['name']} selects no pods"
    deployment = gateway_deployment()
    assert deployment["spec"]["selector"]["matchLabels"] == GATEWAY
    assert find_object("PodDisruptionBudget", "comfygate")["spec"]["selector"]["matchLabels"] == (
        GATEWAY
    )
    hpa = find_object("HorizontalPodAutoscaler", "comfygate")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "comfygate",
    }
    assert hpa["minReplicas"] >= 2
    assert hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    # ComfyUI: a headless Service giving each GPU instance a stable name for upstream.urls.
    comfyui = find_object("Service", "comfyui")["spec"]
    assert comfyui["clusterIP"] == "None"
    assert find_object("StatefulSet", "comfyui")["spec"]["serviceName"] == "comfyui"


# -- network policies ---------------------------------------------------------------------------

COMFYGATE = Pod(GATEWAY, NAMESPACE, {"kubernetes.io/metadata.name": NAMESPACE})
COMFYUI = Pod(
    {"app.kubernetes.io/name": "comfyui", "app.kubernetes.io/component": "gpu-worker"},
    NAMESPACE,
    {"kubernetes.io/metadata.name": NAMESPACE},
)
REDIS = Pod(
    {"app.kubernetes.io/name": "redis", "app.kubernetes.io/component": "state"},
    NAMESPACE,
    {"kubernetes.io/metadata.name": NAMESPACE},
)
NEIGHBOUR = Pod({"app": "debug-shell"}, NAMESPACE, {"kubernetes.io/metadata.name": NAMESPACE})
PROMETHEUS = Pod(
    {"app.kubernetes.io/name": "prometheus"},
    "monitoring",
    {"kubernetes.io/metadata.name": "monitoring"},
)
OUTSIDER = Pod({"app": "web"}, "default", {"kubernetes.io/metadata.name": "default"})
KUBE_DNS = Pod(
    {"k8s-app": "kube-dns"}, "kube-system", {"kubernetes.io/metadata.name": "kube-system"}
)


@pytest.fixture(scope="module")
def policies() -> list[dict[str, Any]]:
    docs = load_yaml_documents(KUBERNETES / "networkpolicies.yaml")
    for doc in docs:
        doc["metadata"]["namespace"] = NAMESPACE  # what kustomize does
    return docs


def test_manifest_labels_match_the_pods_the_policies_are_tested_with() -> None:
    for pod, (kind, name) in (
        (COMFYGATE, ("Deployment", "comfygate")),
        (COMFYUI, ("StatefulSet", "comfyui")),
        (REDIS, ("Deployment", "redis")),
    ):
        assert find_object(kind, name)["spec"]["template"]["metadata"]["labels"] == pod.labels


@pytest.mark.parametrize(
    ("source", "destination", "port", "expected"),
    [
        (COMFYGATE, COMFYUI, 8188, True),
        (COMFYGATE, REDIS, 6379, True),
        (NEIGHBOUR, COMFYUI, 8188, False),
        (OUTSIDER, COMFYUI, 8188, False),
        (PROMETHEUS, COMFYUI, 8188, False),
        (NEIGHBOUR, REDIS, 6379, False),
        (COMFYUI, REDIS, 6379, False),
        (OUTSIDER, COMFYGATE, 8190, True),
        (PROMETHEUS, COMFYGATE, 9464, True),
        (OUTSIDER, COMFYGATE, 9464, False),
        (COMFYGATE, OUTSIDER, 443, False),
        (COMFYUI, OUTSIDER, 443, False),
    ],
    ids=lambda v: v if isinstance(v, int | bool) else None,
)
def test_who_may_connect_to_whom(
    policies: list[dict[str, Any]], source: Pod, destination: Pod, port: int, expected: bool
) -> None:
    assert allowed(policies, source=source, destination=destination, port=port) is expected


def test_comfygate_resolves_names(policies: list[dict[str, Any]]) -> None:
    for protocol in ("UDP", "TCP"):
        assert allowed(policies, source=COMFYGATE, destination=KUBE_DNS, port=53, protocol=protocol)


def test_only_the_gateway_reaches_comfyui_on_any_port(policies: list[dict[str, Any]]) -> None:
    for source in (NEIGHBOUR, OUTSIDER, PROMETHEUS, REDIS):
        for port in (8188, 22, 80):
            assert not allowed(policies, source=source, destination=COMFYUI, port=port)
