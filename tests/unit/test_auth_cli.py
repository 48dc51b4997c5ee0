"""``comfygate user ...`` and ``comfygate token ...``, driven like ``proxy.cli.main`` does."""

from __future__ import annotations

import argparse
import asyncio
import io
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from proxy.auth import cli as auth_cli
from proxy.auth.revocation import MemoryRevocationList, RedisRevocationList
from proxy.auth.tokens import build_verifier
from proxy.auth.users import UsersFile
from proxy.settings import Settings, load_settings

SECRET = "s" * 40
PASSWORD = "correct horse battery"


class Result:
    def __init__(self, status: int, out: str, err: str) -> None:
        self.status, self.out, self.err = status, out, err


def settings_for(**sections: dict[str, Any]) -> Settings:
    overrides: dict[str, dict[str, Any]] = {"auth": {"jwt": {"secret": SECRET}}}
    overrides.update(sections)
    return load_settings(None, overrides=overrides, environ={})


def main(
    argv: list[str],
    settings: Settings,
    *,
    stdin: str = "",
    prompts: list[str] | None = None,
) -> Result:
    """What ``proxy.cli.main`` does for these commands: parse with the registered
    sub-commands, then ``run(args, settings)``."""
    parser = argparse.ArgumentParser(prog="comfygate")
    sub = parser.add_subparsers(dest="command", required=True)
    auth_cli.register(sub)
    args = parser.parse_args(argv)
    answers: Iterator[str] = iter(prompts or [])
    out, err = io.StringIO(), io.StringIO()
    status = auth_cli.run(
        args,
        settings,
        stdin=io.StringIO(stdin),
        stdout=out,
        stderr=err,
        prompt=lambda _: next(answers),
        configure_logs=False,  # keep the suite's structlog configuration
    )
    return Result(status, out.getvalue(), err.getvalue())


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    return tmp_path / "users.toml"


@pytest.fixture
def settings(users_file: Path) -> Settings:
    return settings_for(auth={"jwt": {"secret": SECRET}, "login": {"users_file": str(users_file)}})


def test_user_add_from_stdin_then_list(settings: Settings, users_file: Path) -> None:
    r = main(
        ["user", "add", "alice", "--role", "admin", "--password-stdin"],
        settings,
        stdin=PASSWORD + "\n",
    )
    assert (r.status, r.out) == (0, "")
    assert "added alice (admin)" in r.err
    assert PASSWORD not in users_file.read_text()
    assert stat.S_IMODE(users_file.stat().st_mode) == 0o600
    assert UsersFile(users_file).verify("alice", PASSWORD) is not None
    r = main(["user", "add", "bob", "--password-stdin"], settings, stdin=PASSWORD)
    assert r.status == 0
    r = main(["user", "list"], settings)
    assert (r.status, r.out) == (0, "alice\tadmin\nbob\tuser\n")


def test_user_add_prompts_twice(settings: Settings, users_file: Path) -> None:
    r = main(["user", "add", "alice"], settings, prompts=[PASSWORD, PASSWORD])
    assert r.status == 0
    assert UsersFile(users_file).verify("alice", PASSWORD) is not None


def test_user_add_refuses_mismatched_prompts(settings: Settings, users_file: Path) -> None:
    r = main(["user", "add", "alice"], settings, prompts=[PASSWORD, PASSWORD + "x"])
    assert r.status == 1
    assert "do not match" in r.err
    assert not users_file.exists()


@pytest.mark.parametrize(
    ("argv", "stdin", "status", "message"),
    [
        (["user", "add", "al ice", "--password-stdin"], PASSWORD, 1, "invalid user name"),
        (["user", "add", "alice", "--password-stdin"], "short", 1, "too short"),
        (["user", "add", "alice", "--password-stdin"], "", 1, "too short"),
        (["user", "add", "alice", "--role", "root", "--password-stdin"], PASSWORD, 2, "root"),
        (["user", "remove", "alice"], "", 1, "not found"),
        (["user", "passwd", "alice", "--password-stdin"], PASSWORD, 1, "not found"),
        (["user", "list"], "", 1, "not found"),
    ],
)
def test_user_errors(
    settings: Settings, argv: list[str], stdin: str, status: int, message: str
) -> None:
    r = main(argv, settings, stdin=stdin)
    assert r.status == status
    assert message in r.err


def test_user_passwd_and_remove(settings: Settings, users_file: Path) -> None:
    main(["user", "add", "alice", "--password-stdin"], settings, stdin=PASSWORD)
    r = main(["user", "passwd", "alice", "--password-stdin"], settings, stdin="new password\n")
    assert r.status == 0
    users = UsersFile(users_file)
    assert users.verify("alice", "new password") is not None
    assert users.verify("alice", PASSWORD) is None
    r = main(["user", "passwd", "bob", "--password-stdin"], settings, stdin=PASSWORD)
    assert (r.status, "no user 'bob'" in r.err) == (1, True)
    assert main(["user", "remove", "alice"], settings).status == 0
    assert main(["user", "list"], settings).out == ""
    r = main(["user", "add", "ALICE", "--password-stdin"], settings, stdin=PASSWORD)
    assert r.status == 0


def test_users_file_flag_overrides_config(tmp_path: Path, settings: Settings) -> None:
    other = tmp_path / "other.toml"
    r = main(
        ["user", "add", "alice", "--users-file", str(other), "--password-stdin"],
        settings,
        stdin=PASSWORD,
    )
    assert r.status == 0
    assert other.exists()


def test_no_users_file_configured_is_a_usage_error() -> None:
    r = main(["user", "list"], settings_for())
    assert r.status == 2
    assert "--users-file" in r.err


async def test_token_create_prints_only_a_token_that_verifies(settings: Settings) -> None:
    r = main(
        ["token", "create", "--sub", "alice", "--role", "user", "--role", "admin", "--ttl", "2h"],
        settings,
    )
    assert r.status == 0
    token = r.out.strip()
    assert r.out == token + "\n"
    assert r.err.startswith("jti: ")
    verifier = build_verifier(
        settings.auth.jwt, settings.roles, session=None, revocations=MemoryRevocationList()
    )
    principal = await verifier.verify(token)
    assert principal.subject == "alice"
    assert principal.roles == {"user", "admin"}
    assert principal.token_id == r.err.removeprefix("jti: ").strip()
    assert principal.expires_at is not None


def test_token_create_errors() -> None:
    r = main(["token", "create", "--sub", "alice", "--role", "nope"], settings_for())
    assert (r.status, "nope" in r.err) == (2, True)
    no_secret = settings_for(auth={"jwt": {"secret": ""}})
    r = main(["token", "create", "--sub", "alice"], no_secret)
    assert (r.status, r.out) == (2, "")
    assert "secret" in r.err


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("15m", 900), ("45s", 45), ("90", 90), ("1.5h", 5400)],
)
def test_ttl_suffixes(value: str, seconds: float) -> None:
    assert auth_cli.parse_ttl(value) == seconds


@pytest.mark.parametrize("value", ["", "0", "-1d", "1w", "d", "1 d x"])
def test_bad_ttl_is_refused(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        auth_cli.parse_ttl(value)


def test_token_revoke_without_redis_explains_and_exits_2() -> None:
    r = main(["token", "revoke", "some-jti"], settings_for())
    assert r.status == 2
    assert "in the memory of a running proxy" in r.err


async def test_token_revoke_writes_to_redis(redis_url: str) -> None:
    settings = settings_for(redis={"url": redis_url})
    # run() drives its own event loop (as from the command line): off this test's loop.
    r = await asyncio.to_thread(main, ["token", "revoke", "jti-123"], settings)
    assert r.status == 0, r.err
    client = redis.Redis.from_url(redis_url)
    try:
        assert await RedisRevocationList(client).is_revoked("jti-123")
        assert not await RedisRevocationList(client).is_revoked("jti-456")
    finally:
        await client.aclose()
