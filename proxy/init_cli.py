"""``comfygate init``: a working configuration for a first install, and the commands that follow.

Writes, under ``--dir`` (default ``./comfygate``):

- ``comfygate.toml``: the keys a first install sets (listen address, the ComfyUI URL, the
  secrets' and users' files), with the sections and comments of
  ``config/comfygate.example.toml``, which lists every other key;
- ``secrets/jwt_secret``, ``secrets/session_secret``, ``secrets/folder_secret``: generated
  secrets, one per file (mode 0600, in a 0700 directory), named by ``<key>_file`` in the
  configuration, so that they never sit in the TOML file, the process list or the environment;
- ``users.toml``: the users file with one admin, whose password is prompted for (on a terminal)
  or generated and printed once.

Paths in the configuration are absolute: the proxy resolves them from its working directory,
which need not be this one. Nothing is overwritten without ``--force`` (which also changes the
folder secret, so users' files move to new folders: said when it happens).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from yarl import URL

from proxy.auth.users import UsersFile, UsersFileError, validate_password, validate_username
from proxy.banner import comfyui_command, command_name, public_url
from proxy.errors import SettingsError
from proxy.preflight import check_startup
from proxy.settings import load_settings

DEFAULT_DIR = "comfygate"
DEFAULT_ADMIN = "admin"
DEFAULT_UPSTREAM = "http://127.0.0.1:8188"
CONFIG_NAME = "comfygate.toml"
USERS_NAME = "users.toml"
SECRETS_DIR = "secrets"
SECRET_FILES = {
    # file name -> the configuration key that reads it (every secret settings.py knows of that
    # a single-host install needs; Redis and metrics credentials come with those services)
    "jwt_secret": "auth.jwt.secret_file",
    "session_secret": "auth.session.secret_file",
    "folder_secret": "isolation.folder_secret_file",
}
SECRET_BYTES = 48
"""token_urlsafe(48): 64 characters, above every minimum (HS512's 64 bytes included)."""
PASSWORD_BYTES = 18
"""Generated admin password: 24 URL-safe characters."""

CONFIG_TEMPLATE = """\
# comfygate configuration written by `comfygate init`. Every other key, with its default and a
# comment: config/comfygate.example.toml. Validate with: comfygate check-config --config {config}
# Secrets live in files next to this one (mode 0600); never paste them here.

[server]
host = "127.0.0.1"             # listen address; "0.0.0.0" for all IPv4 interfaces
port = 8190

[upstream]
urls = [{upstream}]   # ComfyUI (--multi-user), reachable from the proxy only

[isolation]
# Keys users' folder names: keep it, and the same on every replica (changing it moves everyone
# to new, empty folders; `comfygate folders` helps migrating).
folder_secret_file = {folder_secret}

[auth]
comfy_multi_user = true        # ComfyUI runs with --multi-user: create each user there once

[auth.jwt]
# API tokens: `comfygate token create --config {config}` signs with this same secret.
secret_file = {jwt_secret}

[auth.session]
secret_file = {session_secret}   # signs browser session cookies

[auth.login]
# Login-page users: `comfygate user add NAME --role user --config {config}`
users_file = {users}

# Roles: viewer, user, power and admin are built in; a [roles.<name>] table adds a role or
# overrides the keys it sets of a built-in one (config/comfygate.example.toml,
# docs/identity.md#roles).
"""


class InitError(Exception):
    """A problem to report; nothing (more) is written."""


@dataclass(frozen=True)
class Layout:
    """Where ``init`` writes, as absolute paths."""

    directory: Path

    @property
    def config(self) -> Path:
        return self.directory / CONFIG_NAME

    @property
    def users(self) -> Path:
        return self.directory / USERS_NAME

    @property
    def secrets(self) -> Path:
        return self.directory / SECRETS_DIR

    def secret(self, name: str) -> Path:
        return self.secrets / name

    def files(self) -> list[Path]:
        return [self.config, self.users, *(self.secret(n) for n in SECRET_FILES)]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = subparsers.add_parser(
        "init",
        help="write a configuration with generated secrets and an admin user, "
        "and print the next commands",
    )
    init.add_argument(
        "--dir", default=DEFAULT_DIR, help=f"where to write (default: ./{DEFAULT_DIR})"
    )
    init.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"the admin's user name (default: {DEFAULT_ADMIN})"
    )
    init.add_argument(
        "--upstream", default=DEFAULT_UPSTREAM, help=f"ComfyUI's URL (default: {DEFAULT_UPSTREAM})"
    )
    init.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the admin's password from the first line of stdin (default: prompt on a "
        "terminal, else generate one and print it once)",
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")


def run(
    args: argparse.Namespace,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    prompt: Callable[[str], str] | None = None,
) -> int:
    """``comfygate init``; the exit status (0 written, 2 refused: nothing was changed)."""
    inp, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    try:
        layout, password, generated = _prepare(args, inp, prompt or getpass.getpass)
        replaced = _write(layout, args, password)
        config = load_settings(layout.config, environ={})
        check_startup(config)  # what serve will check: the files just written load
    except (InitError, UsersFileError) as exc:
        print(f"comfygate init: {exc}", file=err)
        return 2
    except SettingsError as exc:  # pragma: no cover - the template is tested to load
        print(f"comfygate init: the written configuration does not load:\n{exc}", file=err)
        return 2
    out.write(_summary(layout, args, config_url=public_url(config), replaced=replaced))
    if generated:
        out.write(
            f"\nPassword of {args.admin!r} (shown once, change it with "
            f"`{command_name()} user passwd {args.admin} --config {layout.config}`):\n\n"
            f"    {password}\n"
        )
    out.flush()
    return 0


def _prepare(
    args: argparse.Namespace, inp: TextIO, prompt: Callable[[str], str]
) -> tuple[Layout, str, bool]:
    """Check everything before writing anything: the layout, the URL, the name, the password."""
    layout = Layout(Path(args.dir).expanduser().resolve())
    existing = [str(p) for p in layout.files() if p.exists()]
    if existing and not args.force:
        raise InitError(
            f"{', '.join(existing)} already exist(s); nothing was written "
            "(--force overwrites them, and the new folder secret moves users' files to new "
            "folders)"
        )
    url = URL(args.upstream)
    if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
        raise InitError(f"--upstream {args.upstream!r}: an http(s) URL such as {DEFAULT_UPSTREAM}")
    validate_username(args.admin)
    if args.password_stdin:
        password = inp.readline().removesuffix("\n").removesuffix("\r")
        return layout, validate_password(password), False
    if inp.isatty():
        try:
            password = prompt(f"Password for {args.admin} (empty: generate one): ")
            if password:
                if prompt("Repeat password: ") != password:
                    raise InitError("the passwords do not match; nothing was written")
                return layout, validate_password(password), False
        except (EOFError, KeyboardInterrupt):
            raise InitError("no password given; nothing was written") from None
    return layout, secrets.token_urlsafe(PASSWORD_BYTES), True


def _write(layout: Layout, args: argparse.Namespace, password: str) -> bool:
    """Write every file; whether an existing folder secret was replaced."""
    layout.directory.mkdir(parents=True, exist_ok=True)
    layout.secrets.mkdir(mode=0o700, exist_ok=True)
    os.chmod(layout.secrets, 0o700)  # also when it existed (--force)
    replaced = layout.secret("folder_secret").exists()
    for name in SECRET_FILES:
        _write_private(layout.secret(name), secrets.token_urlsafe(SECRET_BYTES) + "\n")
    if layout.users.exists():  # --force: a users file with the new admin alone
        layout.users.unlink()
    UsersFile(layout.users).add(args.admin, password, ["admin"])  # 0600, atomic
    text = CONFIG_TEMPLATE.format(
        config=layout.config,
        upstream=_toml(str(URL(args.upstream)).rstrip("/")),
        folder_secret=_toml(str(layout.secret("folder_secret"))),
        jwt_secret=_toml(str(layout.secret("jwt_secret"))),
        session_secret=_toml(str(layout.secret("session_secret"))),
        users=_toml(str(layout.users)),
    )
    _write_private(layout.config, text)
    return replaced


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _write_private(path: Path, text: str) -> None:
    """Create or replace ``path`` with mode 0600 from the start (never readable by others)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, path)


def _summary(layout: Layout, args: argparse.Namespace, *, config_url: str, replaced: bool) -> str:
    config = layout.config
    relative = os.path.relpath(config)
    cmd = command_name()
    lines = [
        f"Wrote {config}",
        f"      {layout.users}  (user {args.admin!r}, role admin)",
        f"      {layout.secrets}/  ({', '.join(SECRET_FILES)}; mode 0600)",
    ]
    if replaced:
        lines.append(
            "Replaced the folder secret: users' files made before are in folders the proxy no "
            "longer derives (`comfygate folders` lists old and new names)."
        )
    lines += [
        "",
        "Next:",
        "  1. Start ComfyUI in its directory, reachable from this machine only:",
        f"       {comfyui_command(str(URL(args.upstream)))}",
        "  2. Start comfygate with this configuration:",
        f"       {cmd} serve --config {config}",
        f"     (in a comfygate checkout: make run CONFIG={relative})",
        f"  3. Open {config_url} and sign in as {args.admin!r}.",
        "  4. Add users and API tokens (the proxy sees new users at once):",
        f"       {cmd} user add alice --role user --config {config}",
        f"       {cmd} token create --sub alice --role user --ttl 30d --config {config}",
        f"  Check the configuration after editing it: {cmd} check-config --config {config}",
    ]
    return "\n".join(lines) + "\n"


__all__ = ["DEFAULT_DIR", "SECRET_FILES", "register", "run"]
