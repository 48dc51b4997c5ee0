"""``check-config`` and ``serve`` validate identically (issue 15): every check that used to happen
only while the app started (users file, JWT keys, Redis TLS files, login templates, workflow
policy, secret lengths) is reported by ``check-config`` with exit status 2, and ``serve`` refuses
the same configuration with the same list, exit status 2, no traceback and nothing left open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.auth.users import UsersFile
from proxy.cli import main
from proxy.preflight import preflight
from proxy.settings import load_settings
from tests.redis_server import free_port
from tests.support.env import clear_comfygate_environment

ROOT = Path(__file__).resolve().parents[2]
GOOD_SECRET = "k" * 48
SERVE_TIMEOUT = 60


@pytest.fixture(autouse=True)
def _no_environment_config(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_comfygate_environment(monkeypatch)


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def check_config(path: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["check-config", "-c", path])
    out = capsys.readouterr()
    return status, out.out, out.err


def serve(path: str) -> subprocess.CompletedProcess[str]:
    """``python -m proxy serve`` on a free port, as an operator runs it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("COMFYGATE_")}
    environ["COMFYGATE_METRICS__ENABLED"] = "false"
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "-c", path, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT,
        env=environ,
        cwd=ROOT,
        check=False,
    )


def problems_of(stderr: str) -> list[str]:
    """The problem lines (indented) of an 'invalid ...:' report."""
    return [line.strip() for line in stderr.splitlines() if line.startswith("  ")]


def assert_refused_alike(path: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """check-config and serve refuse ``path`` with exit 2 and the same problems; serve prints
    no traceback and leaves nothing open. The problems, for the caller to look at."""
    status, out, err = check_config(path, capsys)
    assert (status, out) == (2, "")
    problems = problems_of(err)
    assert problems
    served = serve(path)
    assert served.returncode == 2, served.stderr
    assert problems_of(served.stderr) == problems
    for noise in ("Traceback (most recent call last)", "Unclosed", "one-time admin token"):
        assert noise not in served.stderr
    assert served.stdout == ""  # refused before logging started: nothing was opened
    return problems


# -- the configurations of the issue ------------------------------------------------------------


def test_short_session_secret_and_missing_users_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "users.toml"
    path = write(
        tmp_path / "c.toml",
        f'[auth.session]\nsecret = "short"\n[auth.login]\nusers_file = "{missing}"\n',
    )
    [problem] = assert_refused_alike(path, capsys)
    assert problem.startswith("auth.session.secret: must be at least 32 bytes")
    # With a long enough secret, the users file is next, with how to create it.
    path = write(
        tmp_path / "c.toml",
        f'[auth.session]\nsecret = "{GOOD_SECRET}"\n[auth.login]\nusers_file = "{missing}"\n',
    )
    [problem] = assert_refused_alike(path, capsys)
    assert problem.startswith(f"auth.login.users_file: users file '{missing}': not found")
    assert f"comfygate user add NAME --role admin --users-file {missing}" in problem
    assert "comfygate init" in problem


def test_every_startup_problem_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Configuration problems and policy problems in one report, each block with its heading."""
    write(tmp_path / "users.toml", "[users.alice]\npassword = 'x'\n")
    write(tmp_path / "policy" / "p.toml", "[policies.base]\ncolour = 'blue'\n")
    write(tmp_path / "bad.pem", "not a key\n")
    path = write(
        tmp_path / "c.toml",
        f"""
[auth.jwt]
algorithms = ["RS256"]
public_keys = ["{tmp_path / "bad.pem"}"]
private_key = "{tmp_path / "missing.pem"}"
[auth.login]
users_file = "{tmp_path / "users.toml"}"
templates_dir = "{tmp_path / "no-templates"}"
[policy]
dir = "{tmp_path / "policy"}"
""",
    )
    problems = assert_refused_alike(path, capsys)
    assert [p.split(":", 1)[0] for p in problems] == [
        "auth.login.users_file",
        "auth.jwt.public_keys[0]",
        "auth.jwt.private_key",
        "auth.login.templates_dir",
        str(tmp_path / "policy" / "p.toml"),
    ]
    _, _, err = check_config(path, capsys)
    assert err.index("invalid configuration:") < err.index("invalid workflow policy:")


def test_asymmetric_algorithm_without_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "c.toml", '[auth.jwt]\nalgorithms = ["ES256"]\n')
    assert assert_refused_alike(path, capsys) == ["auth.jwt: ES256 needs public_keys or jwks_url"]


def test_redis_tls_files_must_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A CA bundle that is not PEM used to fail every Redis command at run time."""
    ca = write(tmp_path / "ca.pem", "garbage\n")
    path = write(
        tmp_path / "c.toml",
        f'[redis]\nurl = "rediss://127.0.0.1:1"\ntls_ca_certs = "{ca}"\n',
    )
    [problem] = assert_refused_alike(path, capsys)
    assert problem.startswith("redis.tls_ca_certs: not a PEM CA bundle")


def test_redis_url_that_redis_py_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "c.toml", '[redis]\nurl = "redis://:hunter2@host:port/0"\n')
    [problem] = assert_refused_alike(path, capsys)
    assert problem.startswith("redis.url: ")
    assert "hunter2" not in problem  # the URL's password is never echoed


# -- what passes, with what it warns about -----------------------------------------------------


def private_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(private: bytes) -> bytes:
    key = serialization.load_pem_private_key(private, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_valid_keys_files_and_templates_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = private_pem()
    (tmp_path / "private.pem").write_bytes(private)
    (tmp_path / "public.pem").write_bytes(public_pem(private))
    users = UsersFile(tmp_path / "users.toml")
    users.add("alice", "correct horse battery", ["user", "ghost"])
    (tmp_path / "templates").mkdir()
    path = write(
        tmp_path / "c.toml",
        f"""
[auth.jwt]
algorithms = ["RS256"]
public_keys = ["{tmp_path / "public.pem"}"]
private_key = "{tmp_path / "private.pem"}"
[auth.session]
secret = "{GOOD_SECRET}"
[auth.login]
users_file = "{tmp_path / "users.toml"}"
templates_dir = "{tmp_path / "templates"}"
[isolation]
folder_secret = "{GOOD_SECRET}"
""",
    )
    status, out, err = check_config(path, capsys)
    assert status == 0, err
    assert json.loads(out)["auth"]["jwt"]["algorithms"] == ["RS256"]
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, err
    assert "user 'alice' has roles ['ghost'] that are not configured" in warnings[0]
    assert "has no login.html" in warnings[1]


def test_first_run_defaults_pass_with_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    """The example configuration (`make run`) starts; check-config says what a first run lacks."""
    status, out, err = check_config(str(ROOT / "config" / "comfygate.example.toml"), capsys)
    assert status == 0
    assert json.loads(out)["server"]["port"] == 8190
    for key in ("auth.jwt.secret", "auth.session.secret", "isolation.folder_secret"):
        [line] = [w for w in err.splitlines() if w.startswith(f"warning: {key}: not set")]
        assert "comfygate init" in line


def test_short_jwt_secret_is_a_warning() -> None:
    settings = load_settings(
        None, overrides={"auth": {"jwt": {"algorithms": ["HS512"], "secret": "s" * 40}}}, environ={}
    )
    report = preflight(settings)
    assert report.ok
    assert any("shorter than 64 bytes" in w for w in report.warnings)
