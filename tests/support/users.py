"""Users files (``[auth.login] users_file``) with known passwords."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from argon2 import PasswordHasher

from proxy.auth.users import UsersFile

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
"""argon2id at its cheapest: for tests that do not measure the login's cost."""


def write_users(
    path: Path,
    users: Mapping[str, Sequence[str]],
    password: str,
    *,
    hasher: PasswordHasher | None = None,
) -> Path:
    """``path`` holding each user (name -> roles) with ``password``."""
    file = UsersFile(path, hasher=hasher)
    file.load(missing_ok=True)
    for name, roles in users.items():
        file.add(name, password, list(roles))
    return path
