"""RFC 6455 framing of the raw relay (``proxy.relay.ws_codec``): masking, every length class,
fragmentation, control frames between fragments, and what is refused with which close code."""

from __future__ import annotations

import os
import struct

import pytest

from proxy.relay.ws_codec import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    WsProtocolError,
    accept_key,
    apply_mask,
    client_frame,
    close_payload,
    parse_close,
    server_frame,
    server_header,
    valid_client_key,
)
from tests.support.raw_ws_peers import frame

LENGTHS = (0, 1, 125, 126, 127, 65535, 65536, 70000)


def raw_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None, rsv: int = 0
) -> bytes:
    """A frame built by hand (not by the codec under test)."""
    return frame(opcode, payload, fin=fin, mask=False if mask is None else mask, rsv=rsv)


def events(reader: FrameReader, data: bytes, step: int | None = None) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        out.extend((op, bytes(payload)) for op, payload in reader.feed(chunk))
    return out


def test_accept_key_is_the_rfc_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert valid_client_key("dGhlIHNhbXBsZSBub25jZQ==")
    assert not valid_client_key("dGhlIHNhbXBsZQ==")  # 11 bytes
    assert not valid_client_key("not base64!")
    assert not valid_client_key("")


def test_masking_is_its_own_inverse_and_matches_the_rfc() -> None:
    key = bytes([0x37, 0xFA, 0x21, 0x3D])
    # RFC 6455 5.7: "Hello" masked with 37 fa 21 3d.
    assert apply_mask(b"Hello", key) == bytes([0x7F, 0x9F, 0x4D, 0x51, 0x58])
    data = os.urandom(1001)
    assert apply_mask(apply_mask(data, key), key) == data
    assert apply_mask(b"", key) == b""


@pytest.mark.parametrize("length", LENGTHS)
def test_every_length_class_both_directions(length: int) -> None:
    payload = os.urandom(length)
    key = os.urandom(4)
    masked = client_frame(OP_BINARY, payload, key)
    assert masked == raw_frame(OP_BINARY, payload, mask=key)
    assert events(FrameReader(masked=True, max_size=1 << 20), masked) == [(OP_BINARY, payload)]
    plain = server_frame(OP_BINARY, payload)
    assert plain == raw_frame(OP_BINARY, payload)
    assert events(FrameReader(masked=False, max_size=1 << 20), plain) == [(OP_BINARY, payload)]
    # Byte by byte for the small ones, in odd chunks for the rest: the same events.
    step = 1 if length <= 126 else 997
    reader = FrameReader(masked=False, max_size=1 << 20)
    assert events(reader, plain, step) == [(OP_BINARY, payload)]
    assert reader.buffered == 0


def test_header_sizes_at_the_boundaries() -> None:
    assert len(server_header(0x82, 125)) == 2
    assert len(server_header(0x82, 126)) == 4
    assert len(server_header(0x82, 65535)) == 4
    assert len(server_header(0x82, 65536)) == 10


def test_client_frames_get_a_fresh_key_each() -> None:
    one, two = client_frame(OP_TEXT, b"same"), client_frame(OP_TEXT, b"same")
    assert one[2:6] != two[2:6] or one[6:] != two[6:]  # 2**-32 to be equal by chance
    reader = FrameReader(masked=True, max_size=100)
    assert events(reader, one + two) == [(OP_TEXT, b"same"), (OP_TEXT, b"same")]


def test_a_whole_unmasked_frame_is_passed_as_a_view_without_copy() -> None:
    frame = server_frame(OP_BINARY, b"x" * 1000)
    [(op, payload)] = FrameReader(masked=False, max_size=2000).feed(frame)
    assert op == OP_BINARY
    assert isinstance(payload, memoryview)
    assert payload.obj is frame


def test_fragmented_message_with_control_frames_between_fragments() -> None:
    key = os.urandom(4)
    data = (
        raw_frame(OP_TEXT, b"he", fin=False, mask=key)
        + raw_frame(OP_PING, b"p1", mask=key)
        + raw_frame(OP_CONTINUATION, b"ll", fin=False, mask=key)
        + raw_frame(OP_PONG, b"", mask=key)
        + raw_frame(OP_CONTINUATION, b"o", mask=key)
        + raw_frame(OP_BINARY, b"\x00", mask=key)
    )
    for step in (None, 1, 3):
        reader = FrameReader(masked=True, max_size=100)
        assert events(reader, data, step) == [
            (OP_PING, b"p1"),
            (OP_PONG, b""),
            (OP_TEXT, b"hello"),
            (OP_BINARY, b"\x00"),
        ]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (raw_frame(OP_BINARY, b"x", rsv=0x40), 1002),  # RSV1: no extension negotiated
        (raw_frame(OP_BINARY, b"x", rsv=0x20), 1002),
        (raw_frame(OP_BINARY, b"x", rsv=0x10), 1002),
        (raw_frame(0x3, b"x"), 1002),  # reserved data opcode
        (raw_frame(0xB, b"x"), 1002),  # reserved control opcode
        (raw_frame(OP_CONTINUATION, b"x"), 1002),  # continuation without a message
        (raw_frame(OP_TEXT, b"a", fin=False) + raw_frame(OP_TEXT, b"b"), 1002),
        (raw_frame(OP_PING, b"x", fin=False), 1002),  # fragmented control frame
        (raw_frame(OP_PING, b"x" * 126), 1002),  # control frame over 125 bytes
        (raw_frame(OP_BINARY, b"x", mask=b"abcd"), 1002),  # a server must not mask
        (bytes([0x82, 127]) + struct.pack("!Q", 1 << 63), 1002),
        (raw_frame(OP_BINARY, b"x" * 101), 1009),  # over the bound
        (raw_frame(OP_BINARY, b"x" * 60, fin=False) + raw_frame(OP_CONTINUATION, b"y" * 60), 1009),
    ],
)
def test_unreadable_frames_are_refused_with_their_code(data: bytes, code: int) -> None:
    reader = FrameReader(masked=False, max_size=100)
    with pytest.raises(WsProtocolError) as info:
        events(reader, data)
    assert info.value.code == code


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    reader = FrameReader(masked=False, max_size=1024)
    with pytest.raises(WsProtocolError) as info:
        reader.feed(bytes([0x82, 127]) + struct.pack("!Q", 1 << 40))
    assert info.value.code == 1009
    assert reader.buffered == 0  # nothing of it was kept


def test_a_client_must_mask() -> None:
    with pytest.raises(WsProtocolError) as info:
        FrameReader(masked=True, max_size=100).feed(raw_frame(OP_TEXT, b"x"))
    assert info.value.code == 1002


def test_close_payloads() -> None:
    assert parse_close(b"") == (None, "")
    assert parse_close(close_payload(4001, "tab closed")) == (4001, "tab closed")
    assert len(close_payload(1000, "é" * 100)) <= 125  # cut on a character boundary
    parse_close(close_payload(1000, "é" * 100))
    for bad, code in ((b"\x03", 1002), (struct.pack("!H", 1005), 1002), (b"\x03\xe8\xff", 1007)):
        with pytest.raises(WsProtocolError) as info:
            parse_close(bad)
        assert info.value.code == code
    close = raw_frame(OP_CLOSE, close_payload(1001, "bye"))
    assert events(FrameReader(masked=False, max_size=10), close) == [
        (OP_CLOSE, close_payload(1001, "bye"))
    ]
