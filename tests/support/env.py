"""The process environment of tests that load settings the way ``comfygate`` does."""

from __future__ import annotations

import os

import pytest


def clear_comfygate_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``COMFYGATE_*`` variable of the developer's shell reaches the settings under test."""
    for name in list(os.environ):
        if name.startswith("COMFYGATE_"):
            monkeypatch.delenv(name)
