"""The users file: login names, argon2id password hashes and comfygate roles, in TOML.

::

    [users.alice]
    password = "$argon2id$v=19$m=65536,t=3,p=4$..."
    roles = ["user"]

Managed with ``comfygate user add|remove|list|passwd``; read by the login page. Names are
case-insensitive for lookup (``Alice`` logs in as ``alice``) and unique regardless of case, so
the subject a session carries is always the name as written in the file.

:meth:`UsersFile.verify` burns one full argon2 verification even for an unknown name, so the
response time does not tell whether an account exists. It is CPU-bound (tens of ms): callers on
the event loop run it in an executor.
"""

from __future__ import annotations

import builtins
import os
import re
import secrets
import stat
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

log = structlog.get_logger("comfygate.auth")

USERNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
ROLE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
"""Longer input is refused before hashing: argon2 cost grows with it, and no human types this."""

_HEADER = (
    "# comfygate users: managed with `comfygate user add|remove|list|passwd`.\n"
    "# Passwords are argon2id hashes; never put a clear-text password here.\n"
)


_Change = Callable[[dict[str, "UserRecord"]], None]
"""A change ``UsersFile._mutate`` applies to a fresh copy of the accounts."""


class UsersFileError(Exception):
    """The users file cannot be read or written, or a change to it is not valid."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One account. ``password_hash`` is an argon2 PHC string; never logged, never printed."""

    name: str
    password_hash: str
    roles: tuple[str, ...]

    def __repr__(self) -> str:  # keep the hash out of tracebacks and debug output
        return f"UserRecord(name={self.name!r}, roles={self.roles!r})"


def validate_username(name: str) -> str:
    """The name itself, or :class:`UsersFileError` when it is not 1-64 of ``[A-Za-z0-9_.@-]``."""
    if not USERNAME_RE.fullmatch(name):
        raise UsersFileError(
            f"invalid user name {name!r}: use 1-64 characters of A-Z a-z 0-9 _ . @ -"
        )
    return name


def validate_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UsersFileError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UsersFileError(f"password too long: at most {MAX_PASSWORD_LENGTH} characters")
    return password


def _validate_roles(roles: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(roles))  # de-duplicated, order kept
    if not out:
        raise UsersFileError("at least one role is required")
    for role in out:
        if not ROLE_RE.fullmatch(role):
            raise UsersFileError(f"invalid role name {role!r}")
    return out


class UsersFile:
    """A users file on disk and its parsed contents.

    Reads are served from memory and refreshed when the file's mtime/size/inode change, so
    ``comfygate user add`` takes effect in a running proxy without a restart. Every change is
    written atomically (temp file in the same directory, fsync, rename) with mode 0600, after
    re-reading the file, so a concurrent change by the CLI is not silently overwritten.
    """

    def __init__(self, path: str | os.PathLike[str], *, hasher: PasswordHasher | None = None):
        self.path = Path(path)
        self._hasher = hasher or PasswordHasher()  # argon2id, RFC 9106 low-memory profile
        self._users: dict[str, UserRecord] = {}  # by casefolded name
        self._stamp: tuple[int, int, int] | None = None
        # Mutations can come from executor threads (rehash on verify) and the caller's thread.
        self._lock = threading.RLock()
        # A hash of a random password with the same parameters: verified against for unknown
        # names so they cost exactly what a wrong password costs (no user enumeration).
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    # ----------------------------------------------------------------------------- reading

    def load(self, *, missing_ok: bool = False) -> None:
        """(Re)read the file.

        Raises:
            UsersFileError: missing (unless ``missing_ok``), unreadable or malformed.
        """
        with self._lock:
            try:
                st = self.path.stat()
                raw = self.path.read_bytes()
            except FileNotFoundError:
                if not missing_ok:
                    raise UsersFileError(f"users file {str(self.path)!r}: not found") from None
                self._users, self._stamp = {}, None
                return
            except OSError as exc:
                raise UsersFileError(
                    f"users file {str(self.path)!r}: {exc.strerror or exc}"
                ) from None
            self._users = self._parse(raw)
            self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning(
                    "users_file_permissions",
                    path=str(self.path),
                    mode=oct(stat.S_IMODE(st.st_mode)),
                    hint="readable by others; chmod 600",
                )

    def _parse(self, raw: bytes) -> dict[str, UserRecord]:
        where = f"users file {str(self.path)!r}"
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UsersFileError(f"{where}: {exc}") from None
        unknown = set(data) - {"users"}
        if unknown:
            raise UsersFileError(f"{where}: unknown top-level keys {sorted(unknown)}")
        table = data.get("users", {})
        if not isinstance(table, dict):
            raise UsersFileError(f"{where}: [users] must be a table")
        users: dict[str, UserRecord] = {}
        for name, entry in table.items():
            try:
                validate_username(name)
                if not isinstance(entry, dict) or set(entry) - {"password", "roles"}:
                    raise UsersFileError("must have only 'password' and 'roles'")
                password = entry.get("password")
                roles = entry.get("roles")
                if not isinstance(password, str) or not password.startswith("$argon2"):
                    raise UsersFileError("'password' must be an argon2 hash")
                if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                    raise UsersFileError("'roles' must be a list of role names")
                record = UserRecord(name, password, _validate_roles(roles))
            except UsersFileError as exc:
                raise UsersFileError(f"{where}: users.{name}: {exc}") from None
            if name.casefold() in users:
                raise UsersFileError(f"{where}: users.{name}: duplicate name (names ignore case)")
            users[name.casefold()] = record
        return users

    def _refresh(self) -> None:
        """Re-read when the file changed on disk; keep the last good contents if it is broken."""
        try:
            st = self.path.stat()
        except OSError:
            return  # deleted or unreadable: keep serving what was loaded
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
            try:
                self.load()
            except UsersFileError as exc:
                log.error("users_file_invalid", error=str(exc))

    def get(self, name: str) -> UserRecord | None:
        with self._lock:
            self._refresh()
            return self._users.get(name.casefold())

    def list(self) -> builtins.list[UserRecord]:
        """Every account, sorted by name."""
        with self._lock:
            self._refresh()
            return sorted(self._users.values(), key=lambda u: u.name.casefold())

    # --------------------------------------------------------------------------- verifying

    def verify(self, username: str, password: str) -> UserRecord | None:
        """The account when the password is right, else None - in the same time for an unknown
        name. Rehashes (and saves) a hash whose argon2 parameters are out of date."""
        record = self.get(username) if USERNAME_RE.fullmatch(username) else None
        if len(password) > MAX_PASSWORD_LENGTH:
            password = password[:MAX_PASSWORD_LENGTH]  # still costs one full verification
            record = None
        target = record.password_hash if record is not None else self._dummy_hash
        try:
            self._hasher.verify(target, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if record is None:
            return None  # the random dummy password was guessed: not an account either way
        if self._hasher.check_needs_rehash(record.password_hash):
            record = self._rehash(record, password)
        return record

    def _rehash(self, record: UserRecord, password: str) -> UserRecord:
        fresh = replace(record, password_hash=self._hasher.hash(password))
        try:
            with self._lock:
                self._mutate(lambda users: _replace_hash(users, record, fresh))
        except UsersFileError as exc:
            # A read-only users file must not break logins; the old hash still verifies.
            log.warning("users_file_rehash_failed", user=record.name, error=str(exc))
            return record
        log.info("password_rehashed", user=record.name)
        return fresh

    # ---------------------------------------------------------------------------- changing

    def add(self, name: str, password: str, roles: Iterable[str]) -> UserRecord:
        """Create an account. Raises :class:`UsersFileError` if the name exists (any case)."""
        validate_username(name)
        validate_password(password)
        record = UserRecord(name, self._hasher.hash(password), _validate_roles(roles))

        def change(users: dict[str, UserRecord]) -> None:
            if name.casefold() in users:
                raise UsersFileError(f"user {users[name.casefold()].name!r} already exists")
            users[name.casefold()] = record

        self._mutate(change, missing_ok=True)
        return record

    def remove(self, name: str) -> None:
        """Delete an account. Raises :class:`UsersFileError` if there is none by that name."""

        def change(users: dict[str, UserRecord]) -> None:
            if users.pop(name.casefold(), None) is None:
                raise UsersFileError(f"no user {name!r}")

        self._mutate(change)

    def set_password(self, name: str, password: str) -> UserRecord:
        """Replace an account's password (its roles stay)."""
        validate_password(password)
        new_hash = self._hasher.hash(password)
        result: builtins.list[UserRecord] = []

        def change(users: dict[str, UserRecord]) -> None:
            old = users.get(name.casefold())
            if old is None:
                raise UsersFileError(f"no user {name!r}")
            users[name.casefold()] = replace(old, password_hash=new_hash)
            result.append(users[name.casefold()])

        self._mutate(change)
        return result[0]

    def _mutate(self, change: _Change, *, missing_ok: bool = False) -> None:
        with self._lock:
            self.load(missing_ok=missing_ok)  # start from what is on disk now, not a stale copy
            users = dict(self._users)
            change(users)
            self._write(users)
            self._users = users

    def _write(self, users: dict[str, UserRecord]) -> None:
        text = _HEADER + "".join(
            _render(u) for u in sorted(users.values(), key=lambda u: u.name.casefold())
        )
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise UsersFileError(
                f"cannot write {str(self.path)!r}: {exc.strerror or exc}"
            ) from None
        try:
            # mkstemp creates 0600 already; fchmod makes that explicit whatever the umask did.
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)  # atomic: readers see the old file or the new one
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise UsersFileError(
                f"cannot write {str(self.path)!r}: {exc.strerror or exc}"
            ) from None
        _fsync_dir(directory)
        st = self.path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)


def _replace_hash(users: dict[str, UserRecord], old: UserRecord, new: UserRecord) -> None:
    current = users.get(old.name.casefold())
    # Only if nothing changed meanwhile (e.g. `comfygate user passwd` since the file was read).
    if current is not None and current.password_hash == old.password_hash:
        users[old.name.casefold()] = new


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _toml_string(value: str) -> str:
    """A TOML basic string. Written by hand: the standard library only reads TOML."""
    out = []
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _render(user: UserRecord) -> str:
    roles = ", ".join(_toml_string(r) for r in user.roles)
    return (
        f"\n[users.{_toml_string(user.name)}]\n"
        f"password = {_toml_string(user.password_hash)}\n"
        f"roles = [{roles}]\n"
    )


__all__ = [
    "MIN_PASSWORD_LENGTH",
    "UserRecord",
    "UsersFile",
    "UsersFileError",
    "validate_password",
    "validate_username",
]
