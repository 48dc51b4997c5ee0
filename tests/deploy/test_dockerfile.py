"""deploy/docker/Dockerfile: its structure (parsed), and its install steps replayed here.

No Docker engine runs on these machines, so the image is never built in the suite. Instead:
the Dockerfile is parsed (dockerfile-parse) and held to the rules that matter (multi-stage,
pinned base, non-root user, health check, entrypoint, no secrets baked in), and the steps of
its build stage are replayed on the host: the same files (the .dockerignore allowlist) become a
wheel, the wheel is installed into a fresh virtualenv, and that install is started with the
image's environment and answers the image's own HEALTHCHECK command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

from proxy.settings import Settings
from tests.deploy.files import DOCKERFILE, DOCKERIGNORE, ROOT
from tests.redis_server import free_port

PINNED_PYTHON = re.compile(r"^python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?$")
STARTUP_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE), cache_content=True)


def stages(parser: DockerfileParser) -> list[list[dict[str, Any]]]:
    """The instructions of each stage (comments dropped), in order."""
    result: list[list[dict[str, Any]]] = []
    for instruction in parser.structure:
        if instruction["instruction"] == "FROM":
            result.append([])
        if result and instruction["instruction"] != "COMMENT":
            result[-1].append(instruction)
    return result


def final_stage(parser: DockerfileParser) -> list[dict[str, Any]]:
    return stages(parser)[-1]


def instructions(stage: list[dict[str, Any]], name: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == name]


def exec_form(value: str) -> list[str]:
    """A JSON-array (exec form) instruction value; shell form is refused (no signals via sh)."""
    parsed = json.loads(value)
    assert isinstance(parsed, list), f"not exec form: {value}"
    return [str(p) for p in parsed]


def healthcheck_command(parser: DockerfileParser) -> list[str]:
    (value,) = instructions(final_stage(parser), "HEALTHCHECK")
    _options, _, command = value.partition("CMD")
    return exec_form(command.strip())


def test_multi_stage_build_on_a_pinned_slim_python(dockerfile: DockerfileParser) -> None:
    assert dockerfile.is_multistage
    froms = [i["value"] for i in dockerfile.structure if i["instruction"] == "FROM"]
    assert len(froms) >= 2
    # Both stages run the same interpreter: the venv copied from the build stage links to it.
    assert len(set(dockerfile.parent_images)) == 1, dockerfile.parent_images
    base = dockerfile.parent_images[0]
    assert PINNED_PYTHON.match(base), f"base image {base!r} is not a pinned python:3.11 slim"
    # The runtime stage copies the venv only: no compiler, no sources, no wheel cache.
    copies = instructions(final_stage(dockerfile), "COPY")
    assert any(c.startswith("--from=build /opt/comfygate") for c in copies), copies
    assert not any(" proxy " in f" {c} " for c in copies), "sources copied into the runtime"


def test_runs_as_a_fixed_unprivileged_user(dockerfile: DockerfileParser) -> None:
    users = instructions(final_stage(dockerfile), "USER")
    assert users, "the runtime stage has no USER: it would run as root"
    user, _, group = users[-1].partition(":")
    runtime_args = dict(
        a.split("=", 1) for a in instructions(final_stage(dockerfile), "ARG") if "=" in a
    )
    # Numeric (runAsNonRoot can check it), the user the image creates, not root.
    assert user == group == runtime_args["APP_UID"]
    assert int(user) >= 10000, "UID collides with host system users"


def test_entrypoint_is_comfygate_serve_in_exec_form(dockerfile: DockerfileParser) -> None:
    stage = final_stage(dockerfile)
    (entrypoint,) = instructions(stage, "ENTRYPOINT")
    (cmd,) = instructions(stage, "CMD")
    # Exec form: comfygate is PID 1 and receives SIGTERM itself (graceful shutdown).
    assert exec_form(entrypoint) == ["comfygate"]
    assert exec_form(cmd) == ["serve"]
    assert instructions(stage, "STOPSIGNAL") == ["SIGTERM"]


def test_healthcheck_asks_healthz_with_python(dockerfile: DockerfileParser) -> None:
    (value,) = instructions(final_stage(dockerfile), "HEALTHCHECK")
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in value
    command = healthcheck_command(dockerfile)
    assert command[:2] == ["python", "-c"], "the slim image has no curl or wget"
    assert "/healthz" in command[2]
    assert "COMFYGATE_SERVER__PORT" in command[2]


def test_exposes_the_proxy_and_metrics_ports(dockerfile: DockerfileParser) -> None:
    defaults = Settings()
    exposed = {int(p) for e in instructions(final_stage(dockerfile), "EXPOSE") for p in e.split()}
    assert exposed == {defaults.server.port, defaults.metrics.port}


def test_configuration_by_environment_and_volume(dockerfile: DockerfileParser) -> None:
    envs = dockerfile.envs
    assert envs["COMFYGATE_CONFIG"] == "/etc/comfygate/comfygate.toml"
    # Reachable from outside the container's own loopback.
    assert envs["COMFYGATE_SERVER__HOST"] == "0.0.0.0"
    assert envs["COMFYGATE_METRICS__HOST"] == "0.0.0.0"
    volumes = [json.loads(v) for v in instructions(final_stage(dockerfile), "VOLUME")]
    assert ["/etc/comfygate"] in volumes
    # SECURITY: no secret value is baked into the image (files are referenced, not contents).
    for key in envs:
        upper = key.upper()
        if any(word in upper for word in ("SECRET", "PASSWORD", "TOKEN", "PRIVATE_KEY")):
            assert upper.endswith("_FILE"), f"secret {key} set in the image"


def test_build_context_is_an_allowlist_covering_every_copy(dockerfile: DockerfileParser) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore must exclude everything first"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    for value in (i for s in stages(dockerfile) for i in instructions(s, "COPY")):
        if value.startswith("--from="):
            continue
        *sources, _dest = value.split()
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source}: excluded by .dockerignore"
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
    for secret_prone in (".venv", ".git", "tests", "deploy"):
        assert secret_prone not in allowed


# -- the build replayed on the host -------------------------------------------------------------


def _context_copy(parser: DockerfileParser, destination: Path) -> None:
    """The files the build stage COPYs, and nothing else (what .dockerignore lets through)."""
    (build_stage, *_rest) = stages(parser)
    for value in instructions(build_stage, "COPY"):
        *sources, _dest = value.split()
        for source in sources:
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(
                    src, destination / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            else:
                (destination / source).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, destination / source)


def _run(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, check=False, **kwargs
    )
    assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_build_installs_only_from_the_hash_pinned_lock(dockerfile: DockerfileParser) -> None:
    """The image gets the versions CI tested: every package from a committed lock file, checked
    by hash; the wheel built with the locked backend and installed without resolving anything."""
    (build_stage, *_rest) = stages(dockerfile)
    run = " ".join(instructions(build_stage, "RUN"))
    steps = [step.strip() for step in run.split("&&")]
    pip_installs = [s for s in steps if re.search(r"\bpip install ", s)]
    assert pip_installs, run
    for step in pip_installs:
        # Either a lock file, checked by hash, or the local wheel with no dependency resolution.
        assert ("--require-hashes -r requirements/" in step) or (
            "--no-deps" in step and "/wheels/" in step
        ), step
    assert any("-r requirements/runtime.txt" in s for s in pip_installs)
    assert any("-r requirements/build.txt" in s for s in pip_installs)
    (wheel_step,) = [s for s in steps if re.search(r"\bpip wheel ", s)]
    assert "--no-build-isolation" in wheel_step
    assert "--no-deps" in wheel_step


@pytest.fixture(scope="module")
def installed_venv(dockerfile: DockerfileParser, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build stage's RUN, on the host: the locked build backend in a build venv, ``pip
    wheel`` of the context with it, then a fresh venv with the runtime lock and that wheel."""
    work = tmp_path_factory.mktemp("docker-build")
    context = work / "src"
    context.mkdir()
    _context_copy(dockerfile, context)
    quiet = ("--quiet", "--no-compile", "--disable-pip-version-check")
    builder = work / "build-venv"  # stands in for the build stage's own interpreter
    _run(sys.executable, "-m", "venv", builder)
    _run(
        builder / "bin" / "pip",
        "install",
        *quiet,
        "--require-hashes",
        "-r",
        context / "requirements" / "build.txt",
    )
    wheels = work / "wheels"
    _run(
        builder / "bin" / "python",
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        wheels,
        ".",
        cwd=context,
    )
    (wheel,) = wheels.glob("comfygate-*.whl")
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", venv)
    _run(
        venv / "bin" / "pip",
        "install",
        *quiet,
        "--require-hashes",
        "-r",
        context / "requirements" / "runtime.txt",
    )
    _run(venv / "bin" / "pip", "install", *quiet, "--no-deps", wheel)
    return venv


def _image_environment(parser: DockerfileParser, venv: Path, **overrides: str) -> dict[str, str]:
    """The runtime stage's ENV, with its paths mapped onto this host."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMFYGATE_")}
    env.update(parser.envs)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    env.update(overrides)
    return env


def test_the_wheel_installs_a_working_comfygate(
    installed_venv: Path, dockerfile: DockerfileParser, tmp_path: Path
) -> None:
    comfygate = installed_venv / "bin" / "comfygate"
    assert "usage: comfygate" in _run(comfygate, "--help").stdout
    # The package came from the wheel, not from this checkout.
    where = _run(
        installed_venv / "bin" / "python",
        "-c",
        "import proxy; print(proxy.__file__)",
        cwd=tmp_path,  # not this checkout, whose proxy/ would shadow the installed one
    )
    assert where.stdout.strip().startswith(str(installed_venv))
    # check-config with the image's environment and its default configuration file.
    config = tmp_path / "comfygate.toml"
    shutil.copy2(ROOT / "config" / "comfygate.example.toml", config)
    env = _image_environment(dockerfile, installed_venv, COMFYGATE_CONFIG=str(config))
    merged = json.loads(_run(comfygate, "check-config", env=env, cwd=tmp_path).stdout)
    assert merged["server"]["host"] == "0.0.0.0"
    assert merged["metrics"]["host"] == "0.0.0.0"


def test_the_installed_server_passes_the_image_healthcheck(
    installed_venv: Path, dockerfile: DockerfileParser, tmp_path: Path
) -> None:
    config = tmp_path / "comfygate.toml"
    shutil.copy2(ROOT / "config" / "comfygate.example.toml", config)
    port = free_port()
    env = _image_environment(
        dockerfile,
        installed_venv,
        COMFYGATE_CONFIG=str(config),
        # A container has its own network namespace; this machine does not: stay on loopback.
        COMFYGATE_SERVER__HOST="127.0.0.1",
        COMFYGATE_SERVER__PORT=str(port),
        COMFYGATE_METRICS__HOST="127.0.0.1",
        COMFYGATE_METRICS__PORT=str(free_port()),
        COMFYGATE_UPSTREAM__URLS=f'["http://127.0.0.1:{free_port()}"]',
    )
    entrypoint = exec_form(instructions(final_stage(dockerfile), "ENTRYPOINT")[0])
    cmd = exec_form(instructions(final_stage(dockerfile), "CMD")[0])
    server = subprocess.Popen(
        [*entrypoint, *cmd],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert server.stdout is not None
        started = False
        seen: list[str] = []
        for line in server.stdout:  # JSON log lines (the image sets COMFYGATE_LOGGING__FORMAT)
            seen.append(line)
            if '"proxy_started"' in line:
                started = True
                break
        assert started, "comfygate never logged proxy_started:\n" + "".join(seen)
        check = subprocess.run(
            healthcheck_command(dockerfile), env=env, capture_output=True, timeout=10, check=False
        )
        assert check.returncode == 0, check.stderr
        # The wheel carries the package data (templates, stylesheet): the login page renders.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5) as resp:
            assert resp.status == 200
            assert b"<form" in resp.read()
    finally:
        server.terminate()
        server.wait(timeout=30)
