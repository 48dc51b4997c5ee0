"""Upload replication helpers: finding the file part in a spooled multipart body, and the
files a prompt reads."""

from __future__ import annotations

import tempfile

import pytest

from proxy.multi.replication import _boundary, locate_file_part, referenced_files

BOUNDARY = "comfygate-0123"


def multipart(content: bytes, *, field_first: bool = True) -> bytes:
    parts = []
    field = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="type"\r\n\r\ninput\r\n'
    if field_first:
        parts.append(field.encode())
    parts.append(
        (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="image"; filename="cat.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + content
        + b"\r\n"
    )
    if not field_first:
        parts.append(field.encode())
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts)


@pytest.mark.parametrize("field_first", [True, False])
@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"tiny",
        # Looks like the delimiter but is not one, across the scanner's 1 MiB blocks.
        (b"x" * (1024 * 1024 - 5) + f"\r\n--{BOUNDARY[:-1]}X".encode()) * 3,
    ],
    ids=["empty", "tiny", "3MiB-near-misses"],
)
def test_locate_file_part(content: bytes, field_first: bool) -> None:
    body = multipart(content, field_first=field_first)
    with tempfile.TemporaryFile() as file:
        file.write(body)
        located = locate_file_part(file, BOUNDARY.encode())
    assert located is not None
    start, end, headers = located
    assert body[start:end] == content
    assert headers == [("Content-Type", "image/png")]


def test_locate_file_part_without_a_file() -> None:
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--{BOUNDARY}--\r\n'
    )
    with tempfile.TemporaryFile() as file:
        file.write(body.encode())
        assert locate_file_part(file, BOUNDARY.encode()) is None


def test_boundary() -> None:
    assert _boundary('multipart/form-data; boundary="abc"') == b"abc"
    assert _boundary("multipart/form-data; charset=utf-8; boundary=x-y") == b"x-y"
    assert _boundary("application/json") is None


def test_referenced_files() -> None:
    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "users/a/cat.png"}},
        "2": {"class_type": "LoadImageOutput", "inputs": {"image": "out_0001.png [output]"}},
        "3": {"class_type": "VHS_LoadVideo", "inputs": {"video": "clip.mp4"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": ["9", 0]}},  # a link
        "5": {"class_type": "LoadImage", "inputs": {"image": "../../etc/passwd"}},  # refused
        "6": {"class_type": "LoadImage", "inputs": {"image": "users/a/cat.png"}},  # repeated
        "7": "not a node",
    }
    assert referenced_files(graph) == [
        ("input", "users/a", "cat.png"),
        ("output", "", "out_0001.png"),
        ("input", "", "clip.mp4"),
    ]
    assert referenced_files(None) == []
