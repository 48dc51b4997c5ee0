"""``comfygate folders SUBJECT...``: where each user's files live, for moving them.

Before folder names were keyed (``isolation.folder_secret``) a user's files were in
``users/<comfy_user>/``; now they are in ``users/<comfy_user>-<tag>/``. This prints, for each
subject (the token's ``sub``, the login name), one tab-separated line::

    <subject>  users/<comfy_user>  users/<comfy_user>-<tag>

so that an operator can move the folders of ComfyUI's input/, output/ and temp/ once, with the
proxy stopped, e.g. ``mv output/users/alice-2bd806c97f0e output/users/alice-2bd806c97f0e-7ec1…``.
It refuses to run without a configured secret: a random one would print names no proxy uses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from proxy.principal import comfy_user_id
from proxy.settings import Settings
from proxy.tenancy.namespaces import folder_names, legacy_user_folder


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    folders = subparsers.add_parser(
        "folders",
        help="print each user's old and current file folder (to migrate to keyed folder names)",
    )
    folders.add_argument(
        "--config",
        "-c",
        help="TOML configuration file (default: $COMFYGATE_CONFIG, else built-in defaults)",
    )
    folders.add_argument("subjects", nargs="+", help="users (token subject / login name)")


def run(settings: Settings, subjects: Sequence[str], out: TextIO = sys.stdout) -> int:
    secret = settings.isolation.folder_secret
    if not secret:
        print(
            "isolation.folder_secret is not set: folder names are random per process; "
            "configure it (folder_secret_file / COMFYGATE_ISOLATION__FOLDER_SECRET) first",
            file=sys.stderr,
        )
        return 2
    names = folder_names(secret)
    for subject in subjects:
        owner = comfy_user_id(subject)
        print(f"{subject}\t{legacy_user_folder(owner)}\t{names.of(owner)}", file=out)
    return 0
