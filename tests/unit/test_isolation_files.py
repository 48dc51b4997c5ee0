"""Which files a user may touch: path normalisation, /view resolution, upload targets."""

from __future__ import annotations

import json

import pytest

from proxy.tenancy.files import (
    FileScope,
    FileTarget,
    PathRefused,
    clean_relative,
    closing,
    field_part,
    file_part_head,
    is_asset_hash,
    original_ref_target,
    referenced_file,
    split_annotation,
    upload_filename,
    upload_subfolder,
    view_target,
)

SCOPE = FileScope("alice-1", "users/alice-1", ("shared", "team/common"))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", ""),
        (".", ""),
        ("a", "a"),
        ("a/b", "a/b"),
        ("a//b/./c/", "a/b/c"),
        ("./users/alice-1", "users/alice-1"),
        ("a..b", "a..b"),
        ("name.png", "name.png"),
    ],
)
def test_clean_relative(path: str, expected: str) -> None:
    assert clean_relative(path) == expected


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("..", "'..'"),
        ("a/../b", "'..'"),
        ("users/alice-1/../bob", "'..'"),
        ("a/.../b", "'..'"),
        ("/etc", "absolute"),
        ("//server/share", "absolute"),
        ("C:/x", "drive"),
        ("c:x", "drive"),
        ("a\\b", "backslash"),
        ("..\\x", "backslash"),
        ("a\0b", "NUL"),
    ],
)
def test_clean_relative_refuses(path: str, reason: str) -> None:
    with pytest.raises(PathRefused, match=reason):
        clean_relative(path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x.png", ("x.png", None)),
        ("x.png [output]", ("x.png", "output")),
        ("a/x.png [input]", ("a/x.png", "input")),
        ("x.png [temp]", ("x.png", "temp")),
        ("x.png [other]", ("x.png [other]", None)),
        ("x.png[output]", ("x.png[output]", None)),
    ],
)
def test_split_annotation(name: str, expected: tuple[str, str | None]) -> None:
    assert split_annotation(name) == expected


@pytest.mark.parametrize(
    ("kind", "folder", "readable"),
    [
        ("output", "users/alice-1", True),
        ("output", "users/alice-1/sub", True),
        ("temp", "users/alice-1", True),
        ("input", "users/alice-1/pics", True),
        ("input", "shared", True),
        ("input", "shared/deep", True),
        ("input", "team/common/x", True),
        ("input", "team", False),
        ("input", "sharedX", False),
        ("output", "shared", False),
        ("temp", "", False),
        ("output", "", False),
        ("output", "users/alice-10", False),
        ("output", "users/bob-2", False),
        ("output", "users", False),
        ("input", "", False),
    ],
)
def test_scope_may_read(kind: str, folder: str, readable: bool) -> None:
    assert SCOPE.may_read(kind, folder) is readable


@pytest.mark.parametrize(
    ("filename", "kind", "subfolder", "expected"),
    [
        ("x.png", None, None, FileTarget("output", "", "x.png")),
        ("x.png", "temp", "", FileTarget("temp", "", "x.png")),
        ("x.png [input]", "output", "a", FileTarget("input", "a", "x.png")),
        ("x.png", "output", "users//alice-1/./", FileTarget("output", "users/alice-1", "x.png")),
        # ComfyUI serves basename(filename) from <type>/<subfolder>:
        ("users/alice-1/x.png", "output", "", FileTarget("output", "", "x.png")),
    ],
)
def test_view_target(
    filename: str, kind: str | None, subfolder: str | None, expected: FileTarget
) -> None:
    assert view_target(filename, kind, subfolder) == expected


@pytest.mark.parametrize(
    ("filename", "kind", "subfolder", "reason"),
    [
        ("", None, None, "empty"),
        (" [output]", None, None, "empty"),
        ("../x.png", None, None, "'..'"),
        ("/etc/passwd", None, None, "absolute"),
        ("x.png", None, "users/bob/../alice-1", "'..'"),
        ("x.png", None, "/abs", "absolute"),
        ("x.png", None, "a\\..\\b", "backslash"),
        ("x\0.png", None, None, "NUL"),
        ("x.png", "models", None, "unknown type"),
        ("x.png", "", None, "unknown type"),
        ("dir/", None, None, "no file name"),
    ],
)
def test_view_target_refuses(
    filename: str, kind: str | None, subfolder: str | None, reason: str
) -> None:
    with pytest.raises(PathRefused, match=reason):
        view_target(filename, kind, subfolder)


def test_asset_hash_form() -> None:
    assert is_asset_hash("blake3:abc")
    assert is_asset_hash("BLAKE3:abc [output]")
    assert not is_asset_hash("blake3.png")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("x.png", FileTarget("input", "", "x.png")),
        ("users/alice-1/x.png", FileTarget("input", "users/alice-1", "x.png")),
        ("users/alice-1/x.png [output]", FileTarget("output", "users/alice-1", "x.png")),
        ("webcam/1.png [temp]", FileTarget("temp", "webcam", "1.png")),
    ],
)
def test_referenced_file(value: str, expected: FileTarget) -> None:
    assert referenced_file(value) == expected


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ({"filename": "x.png"}, FileTarget("output", "", "x.png")),
        (
            {"filename": "x.png", "subfolder": "users/alice-1", "type": "input"},
            FileTarget("input", "users/alice-1", "x.png"),
        ),
        (
            {"filename": "alice-1/x.png [temp]", "subfolder": "users"},
            FileTarget("temp", "users/alice-1", "x.png"),
        ),
    ],
)
def test_original_ref_target(ref: dict[str, str], expected: FileTarget) -> None:
    assert original_ref_target(json.dumps(ref)) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json", "not JSON"),
        ("[]", "string filename"),
        ('{"filename": 1}', "string filename"),
        ('{"filename": "x.png", "subfolder": 3}', "must be strings"),
        ('{"filename": "../x.png"}', "'..'"),
        ('{"filename": "x.png", "subfolder": "users/alice-1/../bob"}', "'..'"),
        ('{"filename": "x.png", "type": "models"}', "unknown type"),
        ('{"filename": ""}', "empty"),
    ],
)
def test_original_ref_target_refuses(raw: str, reason: str) -> None:
    with pytest.raises(PathRefused, match=reason):
        original_ref_target(raw)


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("", "users/alice-1"),
        ("pics", "users/alice-1/pics"),
        ("clipspace/", "users/alice-1/clipspace"),
        ("./a//b", "users/alice-1/a/b"),
    ],
)
def test_upload_subfolder(client: str, expected: str) -> None:
    assert upload_subfolder(SCOPE, client) == expected


@pytest.mark.parametrize("client", ["..", "../bob", "/abs", "a\\b", "C:x"])
def test_upload_subfolder_refuses(client: str) -> None:
    with pytest.raises(PathRefused):
        upload_subfolder(SCOPE, client)


@pytest.mark.parametrize("name", ["x.png", "写真 (1).png", "a..b.png", "per%22cent.png"])
def test_upload_filename(name: str) -> None:
    assert upload_filename(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b.png", "../x.png", 'q"uote.png', "back\\slash.png", "C:x.png"]
)
def test_upload_filename_refuses(name: str) -> None:
    with pytest.raises(PathRefused):
        upload_filename(name)


def test_multipart_framing() -> None:
    body = (
        field_part("B", "subfolder", "users/a")
        + file_part_head("B", "image", "x.png", [("Content-Type", "image/png")])
        + b"DATA\r\n"
        + closing("B")
    )
    assert body == (
        b'--B\r\nContent-Disposition: form-data; name="subfolder"\r\n\r\nusers/a\r\n'
        b'--B\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
        b"Content-Type: image/png\r\n\r\nDATA\r\n--B--\r\n"
    )
