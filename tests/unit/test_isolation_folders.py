"""Keyed folder names: the migration command and the process key without a secret."""

from __future__ import annotations

import io

import pytest

from proxy.cli import main
from proxy.isolation import cli as isolation_cli
from proxy.principal import comfy_user_id
from proxy.tenancy.files import FileScope
from proxy.tenancy.namespaces import folder_names, user_folder
from tests.conftest import make_settings

SECRET = "unit-test-folder-secret-0123456789abcdef0123"


def test_folders_command_maps_old_names_to_keyed_ones() -> None:
    settings = make_settings("http://127.0.0.1:1", isolation={"folder_secret": SECRET})
    out = io.StringIO()
    assert isolation_cli.run(settings, ["alice", "bob smith"], out) == 0
    lines = [line.split("\t") for line in out.getvalue().splitlines()]
    alice, bob = comfy_user_id("alice"), comfy_user_id("bob smith")
    assert lines == [
        ["alice", f"users/{alice}", user_folder(alice, SECRET.encode())],
        ["bob smith", f"users/{bob}", user_folder(bob, SECRET.encode())],
    ]


def test_folders_command_refuses_without_a_secret(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["folders", "alice"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "isolation.folder_secret is not set" in captured.err


def test_without_a_secret_one_process_key_is_used() -> None:
    first, second = folder_names(""), folder_names("")
    assert first.generated
    assert first.key == second.key  # every app of the process names folders alike
    assert not folder_names(SECRET).generated
    assert folder_names(SECRET).key == SECRET.encode()


@pytest.mark.parametrize("folder", ["", "users/../x", "/users/a", "users//a", "users/a/"])
def test_a_scope_needs_a_clean_folder(folder: str) -> None:
    with pytest.raises(ValueError, match=r"not a user folder|absolute|'\.\.'"):
        FileScope("a", folder)
