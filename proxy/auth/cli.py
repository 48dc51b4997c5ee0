"""``comfygate user add|remove|list|passwd`` and ``comfygate token create|revoke``.

Wired into :mod:`proxy.cli` by ``register(sub)`` (adds the sub-commands) and ``run(args,
settings)`` (runs one; returns the exit status). Exit status: 0 done, 1 the operation failed (no
such user, Redis down, ...), 2 a usage or configuration problem.

Passwords come from a prompt (twice, not echoed) or, with ``--password-stdin``, from the first
line of standard input; never from the command line, where other users could read them in the
process list. ``user remove`` and ``user passwd`` end the user's browser sessions (the proxy
re-reads the file when it changes; see :mod:`proxy.auth.liveness`), as does a role change made
by editing the file. ``token create`` prints the token alone on stdout, so it can be captured with
``$(...)``; its ``jti`` (for ``token revoke``) goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from proxy.auth.revocation import RedisRevocationList, RevocationUnavailable
from proxy.auth.tokens import issue_token
from proxy.auth.users import UsersFile, UsersFileError, validate_password, validate_username
from proxy.observability.logging import configure_logging
from proxy.redis.client import connect
from proxy.settings import Settings
from proxy.settings.auth import SYMMETRIC

DEFAULT_ROLE = "user"
DEFAULT_REVOKE_SECONDS = 366 * 24 * 3600.0
"""``token revoke`` without ``--until`` and without ``auth.jwt.max_lifetime_seconds``: how long
the revocation is kept (the token's real expiry is unknown to the CLI)."""

_TTL_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


NO_SIGNING_KEY_HELP = (
    "auth.jwt.secret is empty: cannot sign a token. Give it the secret the running proxy "
    "uses (a token signed with another secret is refused): --config FILE with "
    "auth.jwt.secret_file (or auth.jwt.secret) set, or COMFYGATE_AUTH__JWT__SECRET in the "
    "environment of both. `comfygate init` writes a configuration with one; a proxy started "
    "without a secret signs with a random one of its own that no command can use."
)


class CliError(Exception):
    """A problem to report on stderr, with the exit status to return."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def parse_ttl(value: str) -> float:
    """``30d``, ``12h``, ``15m``, ``90s`` or plain seconds -> seconds (> 0)."""
    match = _TTL_RE.fullmatch(value.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: use a positive number with s, m, h or d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``user`` and ``token`` to ``comfygate``'s sub-commands."""
    user = subparsers.add_parser("user", help="manage login-page users (the users file)")
    user_sub = user.add_subparsers(dest="subcommand", required=True)

    add = user_sub.add_parser("add", help="create a user")
    _common(add)
    add.add_argument("name", help="1-64 characters of A-Z a-z 0-9 _ . @ -")
    add.add_argument(
        "--role",
        action="append",
        dest="roles",
        metavar="ROLE",
        help=f"a configured role; repeat for several (default: {DEFAULT_ROLE})",
    )
    _password_arg(add)

    remove = user_sub.add_parser("remove", help="delete a user")
    _common(remove)
    remove.add_argument("name")

    listing = user_sub.add_parser("list", help="list users and their roles")
    _common(listing)

    passwd = user_sub.add_parser("passwd", help="set a user's password")
    _common(passwd)
    passwd.add_argument("name")
    _password_arg(passwd)

    token = subparsers.add_parser("token", help="issue or revoke API tokens")
    token_sub = token.add_subparsers(dest="subcommand", required=True)

    create = token_sub.add_parser("create", help="issue a signed token (printed on stdout)")
    _config_arg(create)
    create.add_argument("--sub", required=True, help="the subject (user name) of the token")
    create.add_argument(
        "--role",
        action="append",
        dest="roles",
        metavar="ROLE",
        help=f"a configured role; repeat for several (default: {DEFAULT_ROLE})",
    )
    create.add_argument(
        "--ttl", type=parse_ttl, default=parse_ttl("30d"), help="lifetime, e.g. 12h, 30d"
    )

    revoke = token_sub.add_parser(
        "revoke", help="revoke a token by its jti (needs the proxy's Redis: [redis] settings)"
    )
    _config_arg(revoke)
    revoke.add_argument("jti", help="the token id printed by `token create`")
    revoke.add_argument(
        "--until",
        type=float,
        help="unix time the revocation is kept until (the token's exp); default: "
        "now + auth.jwt.max_lifetime_seconds, or a year",
    )


def _config_arg(parser: argparse.ArgumentParser) -> None:
    # Same flag as every other comfygate command: proxy.cli loads settings from args.config.
    parser.add_argument(
        "--config",
        "-c",
        help="TOML configuration file (default: $COMFYGATE_CONFIG, else built-in defaults)",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    _config_arg(parser)
    parser.add_argument("--users-file", help="default: auth.login.users_file from the config")


def _password_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of prompting",
    )


def run(
    args: argparse.Namespace,
    settings: Settings,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    prompt: Callable[[str], str] = getpass.getpass,
    configure_logs: bool = True,
) -> int:
    """Run ``comfygate user ...`` or ``comfygate token ...``; the exit status.

    The streams and the prompt are parameters so tests can drive it without a terminal.
    """
    io = _Io(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr, prompt)
    if configure_logs:
        # Log lines (e.g. a users-file permission warning) go to stderr: stdout carries only
        # the command's output, such as the token of `token create`.
        configure_logging(settings.logging, stream=io.err)
    try:
        if args.command == "user":
            return _user(args, settings, io)
        if args.command == "token":
            return _token(args, settings, io)
        raise CliError(f"unknown command {args.command!r}", 2)
    except CliError as exc:
        print(f"comfygate {args.command}: {exc}", file=io.err)
        return exc.status


class _Io:
    def __init__(
        self, stdin: TextIO, stdout: TextIO, stderr: TextIO, prompt: Callable[[str], str]
    ) -> None:
        self.inp, self.out, self.err, self.prompt = stdin, stdout, stderr, prompt


# ------------------------------------------------------------------------------------- user


def _user(args: argparse.Namespace, settings: Settings, io: _Io) -> int:
    path = args.users_file or settings.auth.login.users_file
    if not path:
        raise CliError("no users file: pass --users-file or set auth.login.users_file", 2)
    users = UsersFile(path)
    try:
        if args.subcommand == "list":
            users.load()
            for record in users.list():
                print(f"{record.name}\t{','.join(record.roles)}", file=io.out)
            return 0
        if args.subcommand == "add":
            validate_username(args.name)  # before asking for a password
            roles = _roles(args.roles, settings)
            record = users.add(args.name, _password(args, io), roles)
            print(f"added {record.name} ({', '.join(record.roles)}) to {path}", file=io.err)
            hint = _users_file_hint(path, settings)
            if hint:
                print(hint, file=io.err)
            return 0
        if args.subcommand == "remove":
            users.remove(args.name)
            print(f"removed {args.name} from {path}", file=io.err)
            print(_SESSIONS_END, file=io.err)
            return 0
        if args.subcommand == "passwd":
            if users.get(args.name) is None:
                users.load()  # a missing file is reported as such
                raise CliError(f"no user {args.name!r}")
            record = users.set_password(args.name, _password(args, io))
            print(f"password of {record.name} changed", file=io.err)
            print(_SESSIONS_END, file=io.err)
            return 0
    except UsersFileError as exc:
        raise CliError(str(exc)) from None
    raise CliError(f"unknown user command {args.subcommand!r}", 2)


def _users_file_hint(path: str, settings: Settings) -> str:
    """What to tell the proxy when the file written is not the one it reads (empty if it is)."""
    configured = settings.auth.login.users_file
    if configured and Path(configured).resolve() == Path(path).resolve():
        return ""
    if configured:
        return (
            f"note: the proxy with this configuration reads {configured}, not {path}: point "
            f'auth.login.users_file at it (users_file = "{path}") to sign in with this user'
        )
    return (
        "note: the proxy reads no users file yet: set auth.login.users_file = "
        f'"{path}" in its configuration (or COMFYGATE_AUTH__LOGIN__USERS_FILE={path}), '
        "restart it, and pass the same --config to `comfygate user ...` next time"
    )


_SESSIONS_END = (
    "their browser sessions end at their next request, and open WebSockets at the next "
    "recheck (auth.relay_recheck_seconds), on every proxy that reads this users file"
)


def _roles(requested: Sequence[str] | None, settings: Settings) -> list[str]:
    roles = list(dict.fromkeys(requested or [DEFAULT_ROLE]))
    unknown = [r for r in roles if r not in settings.roles]
    if unknown:
        raise CliError(
            f"unknown role(s) {unknown}: configured roles are {sorted(settings.roles)}", 2
        )
    return roles


def _password(args: argparse.Namespace, io: _Io) -> str:
    try:
        if args.password_stdin:
            # One line, its line ending removed; everything else (spaces too) is the password.
            password = io.inp.readline().removesuffix("\n").removesuffix("\r")
        else:
            password = io.prompt("Password: ")
            if io.prompt("Repeat password: ") != password:
                raise CliError("the passwords do not match")
        return validate_password(password)
    except UsersFileError as exc:
        raise CliError(str(exc)) from None
    except (EOFError, KeyboardInterrupt):
        raise CliError("no password given") from None


# ------------------------------------------------------------------------------------ token


def _token(args: argparse.Namespace, settings: Settings, io: _Io) -> int:
    if args.subcommand == "create":
        roles = _roles(args.roles, settings)
        jwt = settings.auth.jwt
        if jwt.algorithms[0] in SYMMETRIC and not jwt.secret:
            raise CliError(NO_SIGNING_KEY_HELP, 2)
        try:
            token, jti = issue_token(
                settings.auth.jwt, subject=args.sub, roles=roles, ttl_seconds=args.ttl
            )
        except (ValueError, OSError) as exc:
            raise CliError(str(exc), 2) from None
        print(token, file=io.out)
        print(f"jti: {jti}", file=io.err)
        return 0
    if args.subcommand == "revoke":
        return asyncio.run(_revoke(args, settings, io))
    raise CliError(f"unknown token command {args.subcommand!r}", 2)


async def _revoke(args: argparse.Namespace, settings: Settings, io: _Io) -> int:
    connection = connect(settings.redis)
    if connection is None:
        raise CliError(
            "no Redis configured (redis.url, redis.sentinels or redis.cluster_nodes): without "
            "Redis, revocations live only in the memory of a "
            "running proxy and cannot be added from here (configure Redis, or restart the proxy "
            "with a new auth.jwt.secret to invalidate every token)",
            2,
        )
    now = time.time()
    if args.until is not None:
        until = args.until
    elif settings.auth.jwt.max_lifetime_seconds > 0:
        until = now + settings.auth.jwt.max_lifetime_seconds
    else:
        until = now + DEFAULT_REVOKE_SECONDS
    try:
        await RedisRevocationList(connection.client).revoke(args.jti, until)
    except ValueError as exc:
        raise CliError(str(exc), 2) from None
    except RevocationUnavailable as exc:
        raise CliError(f"{exc.message} (is the configured Redis reachable?)") from None
    finally:
        await connection.close()
    print(
        f"revoked {args.jti} until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(until))} UTC"
        " (with the browser sessions signed in with it)",
        file=io.err,
    )
    return 0


__all__ = ["CliError", "parse_ttl", "register", "run"]
