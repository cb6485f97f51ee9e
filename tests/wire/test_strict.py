"""``execstream.wire._strict``: requests are parsed strictly (PROTOCOL 2.5).

Synchronous checks of the hand-written parser the generated glue uses: every valid encoding
decodes as betterproto2 would decode it, and every malformation protobuf's decoder would
tolerate or crash on raises ``MalformedMessage`` naming the message type.  The grpc side (a
malformed request ends the call with INVALID_ARGUMENT) is covered end to end by
tests/server/test_wire_fuzz.py and the conformance suite's 2.5 cases.
"""

from __future__ import annotations

import pytest

from execstream import wire
from execstream.wire import ContainerSignalRequest, Resize, SessionRequest, Start
from execstream.wire._strict import MalformedMessage, parse_strict


def test_valid_requests_decode_as_betterproto_does() -> None:
    request = SessionRequest(
        start=Start(
            container_id="c",
            exec_id="e",
            command=["echo", "hi"],
            env={"": "", "K": "V"},
            tty=True,
            terminal_size=Resize(width=80, height=24),
            replay_from_sequence=7,
        )
    )
    assert parse_strict(SessionRequest, bytes(request)) == request
    assert parse_strict(SessionRequest, b"") == SessionRequest()


def test_the_generated_glue_parses_through_this_module() -> None:
    assert wire.MalformedMessage is MalformedMessage
    for method in wire.METHODS:
        with pytest.raises(MalformedMessage, match=method.request_type.__name__):
            method.parse_request(b"\x0a\x05ab")  # field 1 runs past the end


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\x0a\x05ab", "field 1 runs past the end"),
        (b"\x08\x80", "truncated varint"),  # stdin declared as varint, cut short
        (b"\x0b", "wire type 3 in field 1"),  # start-group: never valid in proto3
        (b"\x00", "field number 0"),
        (b"\x19\x01\x02", "truncated field 3"),  # a fixed64 with 2 of its 8 bytes
        (b"\x0a\x02\x0a\x80", "field 1 Start"),  # the nested Start is itself truncated
        (b"\x12\x01x\x1a\x00", "SessionRequest.msg has 2 members set: stdin, resize"),
    ],
)
def test_malformed_session_requests_are_refused(data: bytes, says: str) -> None:
    with pytest.raises(MalformedMessage) as caught:
        parse_strict(SessionRequest, data)
    assert "SessionRequest" in str(caught.value)
    assert says in str(caught.value)


def test_invalid_utf8_in_a_string_names_the_message() -> None:
    data = b"\x12\x02\xff\xfe"  # ContainerSignalRequest.signal = invalid UTF-8
    with pytest.raises(MalformedMessage, match="ContainerSignalRequest"):
        parse_strict(ContainerSignalRequest, data)


def test_a_string_field_sent_as_a_varint_is_the_wrong_type() -> None:
    data = b"\x08\x05"  # container_id (a string) with wire type 0
    with pytest.raises(MalformedMessage, match="ContainerSignalRequest"):
        parse_strict(ContainerSignalRequest, data)


def test_only_message_types_are_accepted() -> None:
    with pytest.raises(TypeError):
        parse_strict(int, b"")
