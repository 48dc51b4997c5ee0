"""``comfygate init`` (issue 15): a configuration with generated secrets and an admin user that
the proxy, ``user add`` and ``token create`` all read alike; never overwriting without
``--force``; the next commands printed. And what ``token create`` / ``user add`` say when the
secret or the users file the proxy needs is missing."""

from __future__ import annotations

import asyncio
import io
import re
import stat
from pathlib import Path

import pytest

from proxy.auth.revocation import MemoryRevocationList
from proxy.auth.tokens import build_verifier
from proxy.auth.users import UsersFile
from proxy.banner import command_name
from proxy.cli import main
from proxy.init_cli import SECRET_FILES
from proxy.preflight import preflight
from proxy.settings import load_settings
from tests.support.env import clear_comfygate_environment

PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def _no_environment_config(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_comfygate_environment(monkeypatch)
    # `user`/`token` point the log at the command's stderr, here capsys' (closed after the
    # test): keep the suite's structlog configuration instead.
    monkeypatch.setattr("proxy.auth.cli.configure_logging", lambda *_a, **_k: None)


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def init(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *args: str,
    stdin: io.StringIO | None = None,
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", stdin if stdin is not None else io.StringIO(""))
    status = main(["init", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_configuration_that_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "cg"
    status, out, err = init(
        monkeypatch, capsys, "--dir", str(directory), "--upstream", "http://10.0.0.5:8288"
    )
    assert (status, err) == (0, "")
    config = directory / "comfygate.toml"
    settings = load_settings(config, environ={})
    report = preflight(settings)
    assert report.ok
    assert report.warnings == []  # every secret set, the users file there
    assert settings.upstream.urls == ("http://10.0.0.5:8288",)
    assert settings.auth.comfy_multi_user
    # Each secret from a file of its own, long enough, different from the others, 0600.
    values = set()
    for name in SECRET_FILES:
        secret_file = directory / "secrets" / name
        assert mode(secret_file) == 0o600
        values.add(secret_file.read_text().strip())
    assert mode(directory / "secrets") == 0o700
    assert mode(config) == 0o600
    assert {len(v) for v in values} == {64}
    assert len(values) == 3
    assert settings.auth.jwt.secret in values
    assert settings.auth.session.secret in values
    assert settings.isolation.folder_secret in values
    assert not any(v in config.read_text() for v in values)  # referenced, never inline
    # The admin, with the password printed once (stdin is not a terminal: generated).
    [password] = re.findall(r"shown once.*\n\n    (\S+)\n", out)
    users = UsersFile(settings.auth.login.users_file)
    users.load()
    record = users.verify("admin", password)
    assert record is not None
    assert record.roles == ("admin",)
    assert mode(directory / "users.toml") == 0o600
    # The next commands, in order, with this configuration.
    steps = [
        "python main.py --listen 10.0.0.5 --port 8288 --multi-user",
        f"comfygate serve --config {config}",
        "Open http://127.0.0.1:8190/ and sign in as 'admin'",
        f"comfygate user add alice --role user --config {config}",
        f"comfygate token create --sub alice --role user --ttl 30d --config {config}",
    ]
    positions = [out.index(step) for step in steps]
    assert positions == sorted(positions)


def test_init_never_overwrites_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "cg"
    assert init(monkeypatch, capsys, "--dir", str(directory))[0] == 0
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    status, out, err = init(monkeypatch, capsys, "--dir", str(directory), "--admin", "root")
    assert (status, out) == (2, "")
    assert "already exist" in err
    assert "--force" in err
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before
    # --force: new secrets, a users file with the new admin alone, and a word on folders.
    status, out, _ = init(
        monkeypatch, capsys, "--dir", str(directory), "--admin", "root", "--force"
    )
    assert status == 0
    assert "Replaced the folder secret" in out
    folder = directory / "secrets" / "folder_secret"
    assert folder.read_bytes() != before[folder]
    users = UsersFile(directory / "users.toml")
    users.load()
    assert [u.name for u in users.list()] == ["root"]


def test_init_password_from_prompt_or_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    answers = iter([PASSWORD, PASSWORD])
    monkeypatch.setattr("getpass.getpass", lambda _prompt: next(answers))
    args = ("--dir", str(tmp_path / "a"), "--admin", "boss")
    status, out, _ = init(monkeypatch, capsys, *args, stdin=FakeTty())
    assert status == 0
    assert "shown once" not in out  # chosen, not generated: never printed
    users = UsersFile(tmp_path / "a" / "users.toml")
    users.load()
    assert users.verify("boss", PASSWORD) is not None

    stdin = io.StringIO(PASSWORD + "\n")
    status, out, _ = init(
        monkeypatch, capsys, "--dir", str(tmp_path / "b"), "--password-stdin", stdin=stdin
    )
    assert status == 0
    assert PASSWORD not in out
    users = UsersFile(tmp_path / "b" / "users.toml")
    users.load()
    assert users.verify("admin", PASSWORD) is not None

    mismatch = iter([PASSWORD, "something else"])
    monkeypatch.setattr("getpass.getpass", lambda _prompt: next(mismatch))
    status, _, err = init(monkeypatch, capsys, "--dir", str(tmp_path / "c"), stdin=FakeTty())
    assert status == 2
    assert "do not match" in err
    assert not (tmp_path / "c").exists()  # checked before anything is written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--upstream", "ftp://host"), "an http(s) url"),
        (("--admin", "no spaces"), "invalid user name"),
    ],
)
def test_init_refuses_bad_input(
    args: tuple[str, ...],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, err = init(monkeypatch, capsys, "--dir", str(tmp_path / "cg"), *args)
    assert status == 2
    assert message in err.lower()
    assert not (tmp_path / "cg").exists()


def test_user_and_token_commands_use_the_proxys_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--config``: the users file the proxy reads, and the secret it verifies with."""
    directory = tmp_path / "cg"
    assert init(monkeypatch, capsys, "--dir", str(directory))[0] == 0
    config = str(directory / "comfygate.toml")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    args = ["user", "add", "alice", "--role", "user", "--password-stdin", "--config", config]
    assert main(args) == 0
    assert "note:" not in capsys.readouterr().err  # the file the proxy reads: nothing to add
    settings = load_settings(config, environ={})
    users = UsersFile(settings.auth.login.users_file)
    users.load()
    assert users.verify("alice", PASSWORD) is not None

    assert main(["token", "create", "--sub", "alice", "--config", config]) == 0
    token = capsys.readouterr().out.strip()
    verifier = build_verifier(
        settings.auth.jwt, settings.roles, session=None, revocations=MemoryRevocationList()
    )
    principal = asyncio.run(verifier.verify(token))
    assert (principal.subject, principal.roles) == ("alice", frozenset({"user"}))


def test_token_create_without_a_secret_says_how_to_set_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["token", "create", "--sub", "alice"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    for hint in (
        "auth.jwt.secret is empty",
        "COMFYGATE_AUTH__JWT__SECRET",
        "auth.jwt.secret_file",
        "comfygate init",
        "the running proxy",
    ):
        assert hint in out.err


def test_user_add_to_another_file_says_where_the_proxy_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "other.toml"
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["user", "add", "bob", "--password-stdin", "--users-file", str(target)]) == 0
    err = capsys.readouterr().err
    assert f'auth.login.users_file = "{target}"' in err
    assert "restart it" in err

    config = tmp_path / "c.toml"
    config.write_text(f'[auth.login]\nusers_file = "{tmp_path / "users.toml"}"\n')
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    args = ["user", "add", "carol", "--password-stdin", "--users-file", str(target)]
    assert main([*args, "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert f"reads {tmp_path / 'users.toml'}, not {target}" in err


@pytest.mark.parametrize(
    ("argv0", "on_path", "expected"),
    [
        (".venv/bin/comfygate", None, ".venv/bin/comfygate"),  # a checkout: the path works
        ("/usr/local/bin/comfygate", "/usr/local/bin/comfygate", "comfygate"),
        ("/x/proxy/__main__.py", None, "comfygate"),  # python -m proxy: the documented name
    ],
)
def test_printed_commands_run_as_typed(
    argv0: str, on_path: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", [argv0])
    monkeypatch.setattr("shutil.which", lambda _name: on_path)
    assert command_name() == expected
