"""The users file: argon2id hashes, constant-cost verification, atomic 0600 writes, rehash."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Literal

import pytest
from argon2 import PasswordHasher

from proxy.auth.users import UserRecord, UsersFile, UsersFileError

PASSWORD = "correct horse battery"


class CountingHasher(PasswordHasher):
    """Cheap parameters (fast tests) and a record of which hashes were verified."""

    def __init__(self, time_cost: int = 1, memory_cost: int = 8) -> None:
        super().__init__(time_cost=time_cost, memory_cost=memory_cost, parallelism=1)
        self.verified: list[str] = []

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        self.verified.append(hash if isinstance(hash, str) else hash.decode())
        return super().verify(hash, password)


@pytest.fixture
def hasher() -> CountingHasher:
    return CountingHasher()


@pytest.fixture
def users(tmp_path: Path, hasher: CountingHasher) -> UsersFile:
    return UsersFile(tmp_path / "users.toml", hasher=hasher)


def test_add_writes_argon2id_hash_roles_and_mode_0600(users: UsersFile) -> None:
    users.add("alice", PASSWORD, ["user", "admin"])
    data = tomllib.loads(users.path.read_text())
    entry = data["users"]["alice"]
    assert entry["password"].startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert PASSWORD not in users.path.read_text()
    assert entry["roles"] == ["user", "admin"]
    assert stat.S_IMODE(users.path.stat().st_mode) == 0o600


def test_right_password_returns_the_record(users: UsersFile) -> None:
    users.add("alice", PASSWORD, ["user"])
    record = users.verify("alice", PASSWORD)
    assert record is not None
    assert (record.name, record.roles) == ("alice", ("user",))


def test_wrong_password_returns_none(users: UsersFile) -> None:
    users.add("alice", PASSWORD, ["user"])
    assert users.verify("alice", PASSWORD + "!") is None
    assert users.verify("alice", "") is None


def test_unknown_user_costs_one_verification_like_a_wrong_password(
    users: UsersFile, hasher: CountingHasher
) -> None:
    users.add("alice", PASSWORD, ["user"])
    hasher.verified.clear()
    assert users.verify("mallory", PASSWORD) is None
    assert users.verify("not a valid name!", PASSWORD) is None
    assert users.verify("alice", "x" * 5000) is None  # over-long: still one verification
    # Exactly one argon2 verification each, against a hash with the same parameters as a real
    # one, so the time taken says nothing about whether the account exists.
    assert len(hasher.verified) == 3
    real = users.list()[0].password_hash
    assert all(h.split("$")[3] == real.split("$")[3] for h in hasher.verified)


def test_names_are_case_insensitive_and_unique(users: UsersFile) -> None:
    users.add("Alice", PASSWORD, ["user"])
    record = users.verify("alice", PASSWORD)
    assert record is not None
    assert record.name == "Alice"  # the subject is the name as written in the file
    with pytest.raises(UsersFileError, match="already exists"):
        users.add("ALICE", PASSWORD, ["user"])


@pytest.mark.parametrize("name", ["", "a" * 65, "al ice", "al/ice", 'a"b', "ä", "a\nb"])
def test_invalid_names_are_refused(users: UsersFile, name: str) -> None:
    with pytest.raises(UsersFileError, match="invalid user name"):
        users.add(name, PASSWORD, ["user"])


def test_names_with_dots_and_at_round_trip(users: UsersFile, tmp_path: Path) -> None:
    users.add("a.b@example.com", PASSWORD, ["user"])
    users.add("x_y-z", PASSWORD, ["viewer"])
    fresh = UsersFile(users.path, hasher=CountingHasher())
    fresh.load()
    assert [u.name for u in fresh.list()] == ["a.b@example.com", "x_y-z"]


def test_short_passwords_and_empty_roles_are_refused(users: UsersFile) -> None:
    with pytest.raises(UsersFileError, match="too short"):
        users.add("alice", "short", ["user"])
    with pytest.raises(UsersFileError, match="at least one role"):
        users.add("alice", PASSWORD, [])
    assert not users.path.exists()


def test_remove_set_password_and_list(users: UsersFile) -> None:
    users.add("bob", PASSWORD, ["user"])
    users.add("alice", PASSWORD, ["admin"])
    assert [u.name for u in users.list()] == ["alice", "bob"]
    users.set_password("bob", "another password")
    assert users.verify("bob", PASSWORD) is None
    assert users.verify("bob", "another password") is not None
    users.remove("alice")
    assert [u.name for u in users.list()] == ["bob"]
    with pytest.raises(UsersFileError, match="no user"):
        users.remove("alice")
    with pytest.raises(UsersFileError, match="no user"):
        users.set_password("alice", PASSWORD)


def test_missing_file_is_an_error_unless_allowed(users: UsersFile) -> None:
    with pytest.raises(UsersFileError, match="not found"):
        users.load()
    users.load(missing_ok=True)
    assert users.list() == []


def test_write_is_atomic_and_leaves_no_temp_file(
    users: UsersFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    users.add("alice", PASSWORD, ["user"])
    before = users.path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(UsersFileError, match="No space left"):
        users.add("bob", PASSWORD, ["user"])
    assert users.path.read_bytes() == before  # the old file is intact
    assert [p.name for p in users.path.parent.iterdir()] == ["users.toml"]
    monkeypatch.undo()
    assert [u.name for u in users.list()] == ["alice"]  # memory matches the disk


def test_changes_by_another_writer_are_seen_and_kept(users: UsersFile) -> None:
    users.add("alice", PASSWORD, ["user"])
    cli = UsersFile(users.path, hasher=CountingHasher())  # e.g. `comfygate user add` meanwhile
    cli.add("bob", PASSWORD, ["user"])
    assert users.verify("bob", PASSWORD) is not None  # picked up without a restart
    users.add("carol", PASSWORD, ["user"])  # re-reads before writing: bob is not lost
    assert {u.name for u in cli.list()} == {"alice", "bob", "carol"}


def test_outdated_hash_parameters_are_rehashed_on_verify(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    UsersFile(path, hasher=CountingHasher(time_cost=1)).add("alice", PASSWORD, ["user"])
    assert "t=1," in path.read_text()
    stronger = UsersFile(path, hasher=CountingHasher(time_cost=2))
    stronger.load()
    record = stronger.verify("alice", PASSWORD)
    assert record is not None
    assert "$m=8,t=2,p=1$" in record.password_hash
    assert "$m=8,t=2,p=1$" in tomllib.loads(path.read_text())["users"]["alice"]["password"]
    assert stronger.verify("alice", PASSWORD) is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rehash_failure_does_not_break_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users.toml"
    UsersFile(path, hasher=CountingHasher(time_cost=1)).add("alice", PASSWORD, ["user"])
    stronger = UsersFile(path, hasher=CountingHasher(time_cost=2))
    stronger.load()

    def read_only(src: str, dst: str) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    record = stronger.verify("alice", PASSWORD)
    assert record is not None  # the old hash still verifies; the upgrade waits
    assert "t=1," in record.password_hash
    assert "t=1," in path.read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("users = 1", "must be a table"),
        ("[other]\nx = 1", "unknown top-level keys"),
        ('[users.alice]\npassword = "plain"\nroles = ["user"]', "must be an argon2 hash"),
        ('[users.alice]\npassword = "$argon2id$x"\nroles = "user"', "list of role names"),
        ('[users."a b"]\npassword = "$argon2id$x"\nroles = ["user"]', "invalid user name"),
        ('[users.alice]\npassword = "$argon2id$x"\nroles = ["user"]\nadmin = true', "only"),
        (
            '[users.alice]\npassword = "$argon2id$x"\nroles = ["u"]\n'
            '[users.ALICE]\npassword = "$argon2id$x"\nroles = ["u"]',
            "duplicate name",
        ),
        ("[users", "users file"),
    ],
)
def test_malformed_files_are_reported(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(UsersFileError, match=message):
        UsersFile(path, hasher=CountingHasher()).load()


def test_a_broken_edit_keeps_the_last_good_contents(users: UsersFile) -> None:
    users.add("alice", PASSWORD, ["user"])
    users.path.write_text("[users")  # a half-saved manual edit
    assert users.verify("alice", PASSWORD) is not None


def test_record_repr_hides_the_hash() -> None:
    record = UserRecord("alice", "$argon2id$v=19$secret", ("user",))
    assert "argon2" not in repr(record)
