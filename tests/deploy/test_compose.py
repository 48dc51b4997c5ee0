"""deploy/compose: the structure ``docker compose config`` would check (no Docker engine runs
here), the network isolation of ComfyUI and Redis, and comfygate's configuration in it loaded
with the real settings model."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy.settings import load_settings
from tests.deploy.files import COMPOSE, COMPOSE_CONFIG, DEPLOY, ROOT, load_yaml_documents

SERVICES = {"comfygate", "redis", "comfyui", "prometheus", "grafana"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def compose() -> dict[str, Any]:
    (doc,) = load_yaml_documents(COMPOSE)
    return doc


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == "-" else ""

    return _VARIABLE.sub(one, value)


def variables_used() -> set[str]:
    return {m.group(1) for m in _VARIABLE.finditer(COMPOSE.read_text(encoding="utf-8"))}


def service(name: str) -> dict[str, Any]:
    return dict(compose()["services"][name])


def test_services_and_healthchecks() -> None:
    services = compose()["services"]
    assert set(services) == SERVICES
    for name, spec in services.items():
        assert "healthcheck" in spec, f"{name}: no healthcheck"
        assert spec["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        assert spec.get("restart") == "unless-stopped", name


def test_images_are_pinned() -> None:
    for name, spec in compose()["services"].items():
        image = spec["image"]
        if name == "comfyui":
            # The placeholder: the operator's image, required (compose refuses to start without).
            assert image.startswith("${COMFYUI_IMAGE:?")
            continue
        tag = interpolate(image, {}).rsplit(":", 1)[-1]
        assert re.match(r"v?\d", tag), f"{name}: {image} not pinned to a version"


def test_comfyui_and_redis_are_reachable_only_through_the_backend() -> None:
    networks = compose()["networks"]
    assert networks["backend"]["internal"] is True
    for name in ("comfyui", "redis"):
        spec = service(name)
        assert "ports" not in spec, f"{name} publishes a port"
        assert "expose" not in spec
        assert spec["networks"] == ["backend"], f"{name} is on {spec['networks']}"
    attached = {n for n, s in compose()["services"].items() if "backend" in s["networks"]}
    assert attached == {"comfygate", "comfyui", "redis"}
    # Only comfygate faces clients; the monitoring UIs listen on loopback.
    for name in ("prometheus", "grafana"):
        for port in service(name)["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"


def test_gpu_reservation_is_documented_for_comfyui() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    block = text[text.index("  comfyui:") : text.index("  prometheus:")]
    assert re.search(r"#\s+- driver: nvidia", block)
    assert re.search(r"#\s+capabilities: \[gpu\]", block)


def test_bind_mounts_exist_and_named_volumes_are_declared() -> None:
    declared = set(compose()["volumes"])
    for name, spec in compose()["services"].items():
        for volume in spec.get("volumes", []):
            source = interpolate(volume, {}).split(":", 1)[0]
            if source.startswith("."):
                if name == "comfyui":
                    continue  # the operator's models folder
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
    build = service("comfygate")["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()


def test_secrets_are_files_and_every_one_is_made_by_the_script(tmp_path: Path) -> None:
    secrets = compose()["secrets"]
    for name, spec in compose()["services"].items():
        for secret in spec.get("secrets", []):
            assert secret in secrets, f"{name}: undeclared secret {secret}"
    # SECURITY: no secret value in the environment, only paths.
    for name, spec in compose()["services"].items():
        for key, value in spec.get("environment", {}).items():
            if re.search(r"SECRET|PASSWORD|TOKEN", key):
                assert key.endswith(("_FILE", "__FILE")), f"{name}: {key} is not a file"
                assert str(value).startswith("/run/secrets/")
    # make-secrets.sh, run in a copy of the folder, creates every declared file.
    folder = tmp_path / "compose"
    folder.mkdir()
    script = folder / "make-secrets.sh"
    script.write_text((COMPOSE.parent / "make-secrets.sh").read_text("utf-8"), "utf-8")
    subprocess.run(["sh", str(script)], check=True, capture_output=True, timeout=60)
    for spec in secrets.values():
        made = folder / spec["file"]
        assert made.is_file(), spec["file"]
        assert len(made.read_text("utf-8").strip()) >= 32, spec["file"]
        assert made.stat().st_mode & 0o004, f"{made.name}: unreadable for the non-root containers"
    assert (folder / "secrets").stat().st_mode & 0o077 == 0
    ignored = (COMPOSE.parent / ".gitignore").read_text("utf-8").split()
    assert "secrets/" in ignored
    assert ".env" in ignored


def test_env_example_lists_every_variable() -> None:
    example = (COMPOSE.parent / "env.example").read_text(encoding="utf-8")
    listed = set(re.findall(r"^(\w+)=", example, flags=re.MULTILINE))
    assert variables_used() == listed


def comfygate_settings(tmp_path: Path) -> Any:
    """comfygate's configuration in the Compose deployment: comfygate.toml plus the service's
    environment (interpolated with the defaults), secrets as files under tmp_path."""
    spec = service("comfygate")
    env: dict[str, str] = {}
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for key, raw in spec["environment"].items():
        value = interpolate(str(raw), {})
        if value.startswith("/run/secrets/"):
            path = secrets / Path(value).name
            path.write_text("x" * 64, encoding="utf-8")
            value = str(path)
        env[key] = value
    (mount,) = [v for v in spec["volumes"] if v.startswith("./comfygate.toml:")]
    assert mount.split(":")[1] == env.pop("COMFYGATE_CONFIG")
    return load_settings(COMPOSE_CONFIG, environ=env)


def test_comfygate_configuration_loads_and_fits_the_stack(tmp_path: Path) -> None:
    settings = comfygate_settings(tmp_path)
    assert settings.server.host == "0.0.0.0"
    assert settings.server.workers >= 2  # several workers need Redis, which is configured
    assert settings.redis.url == "redis://redis:6379/0"
    assert settings.upstream.urls == ("http://comfyui:8188",)
    assert settings.metrics.host == "0.0.0.0"
    assert settings.metrics.bearer_token
    # Published port = the proxy's port; the healthcheck asks that port.
    spec = service("comfygate")
    (published,) = spec["ports"]
    assert interpolate(published, {}).rsplit(":", 1)[-1] == str(settings.server.port)
    assert f"127.0.0.1:{settings.server.port}/healthz" in " ".join(spec["healthcheck"]["test"])
    # Prometheus scrapes the metrics port, with the same token file.
    (prometheus_config,) = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")
    (job,) = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == "comfygate"]
    assert job["dns_sd_configs"][0]["names"] == ["comfygate"]
    assert job["dns_sd_configs"][0]["port"] == settings.metrics.port
    token_path = spec["environment"]["COMFYGATE_METRICS__BEARER_TOKEN_FILE"]
    assert job["authorization"]["credentials_file"] == token_path
    assert "metrics_token" in service("prometheus")["secrets"]
    assert "../prometheus:/etc/prometheus:ro" in service("prometheus")["volumes"]
    # Graceful shutdown fits in docker's stop timeout.
    grace = float(spec["stop_grace_period"].removesuffix("s"))
    assert grace > settings.server.drain_seconds + settings.server.shutdown_grace_seconds


def test_comfygate_container_is_hardened() -> None:
    spec = service("comfygate")
    assert spec["read_only"] is True
    assert "/tmp" in spec["tmpfs"]  # the workers' metric files
    assert spec["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in spec["security_opt"]
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.skipif(os.environ.get("COMFYUI_IMAGE") is not None, reason="set by the caller")
def test_comfyui_image_is_required() -> None:
    with pytest.raises(KeyError, match="COMFYUI_IMAGE"):
        interpolate(service("comfyui")["image"], {})
