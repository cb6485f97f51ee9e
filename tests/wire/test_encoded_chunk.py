"""A chunk encoded once for every client reads as one ``OutputChunk`` everywhere.

The server encodes each output chunk once and appends ``is_replay``/``gap_before`` for the
clients that need them (``execstream.server._encoding``).  Whatever the values, the bytes must
be exactly betterproto2's encoding of the same ``SessionResponse``, and betterproto2, the
protobuf runtime and the conformance suite's own wire parser must all read them as one
``output_chunk`` with those values [PROTOCOL 4.3, 6.2, 6.4].
"""

from __future__ import annotations

from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

from execstream import wire
from execstream.conformance import _protowire
from execstream.server._encoding import encode_chunk
from execstream.server._log import Chunk, Stream

from . import test_roundtrip

UINT64 = st.integers(0, (1 << 64) - 1)
# Small values too, where a varint is one byte or a field is left out as a default.
SMALL = st.integers(0, 300)
CHUNKS = st.builds(
    Chunk,
    sequence=SMALL | UINT64,
    timestamp_ns=SMALL | st.integers(-(1 << 63), (1 << 63) - 1),
    stream=st.sampled_from(Stream),
    data=st.binary(max_size=300) | st.binary(min_size=16_000, max_size=70_000),
)


def _message(chunk: Chunk, is_replay: bool, gap: int) -> wire.SessionResponse:
    stdout = chunk.data if chunk.stream is Stream.STDOUT else None
    stderr = chunk.data if chunk.stream is Stream.STDERR else None
    return wire.SessionResponse(
        output_chunk=wire.OutputChunk(
            sequence=chunk.sequence,
            timestamp=chunk.timestamp_ns,
            stdout=stdout,
            stderr=stderr,
            is_replay=is_replay,
            gap_before=gap,
        )
    )


@settings(max_examples=150, deadline=None)
@given(chunk=CHUNKS, is_replay=st.booleans(), gap=SMALL | UINT64, live_first=st.booleans())
def test_every_parser_reads_one_output_chunk(
    exec_pb2: ModuleType, chunk: Chunk, is_replay: bool, gap: int, live_first: bool
) -> None:
    if live_first:  # the flagged form is made from the kept live form, or without one
        encode_chunk(chunk, False, 0)
    data = encode_chunk(chunk, is_replay, gap)
    expected = _message(chunk, is_replay, gap)

    assert data == bytes(expected)  # byte for byte what betterproto2 writes
    assert wire.SessionResponse.FromString(data) == expected
    parsed = exec_pb2.SessionResponse.FromString(data)
    test_roundtrip.assert_same(expected, parsed)

    fields = list(_protowire.decode(data))
    assert [(number, kind) for number, kind, _ in fields] == [(5, _protowire.LEN)]
    assert _protowire.shape_errors("SessionResponse", data) == []
    body = fields[0][2]
    assert isinstance(body, bytes)
    numbers = [number for number, _, _ in _protowire.decode(body)]
    assert numbers == sorted(set(numbers)), "each field once, in number order"


def test_live_clients_share_one_encoding() -> None:
    chunk = Chunk(7, 1_700_000_000_000_000_000, Stream.STDOUT, b"x" * 65536)
    first = encode_chunk(chunk, False, 0)
    assert chunk.encoded is first
    assert encode_chunk(chunk, False, 0) is first
    # A replayed or gapped copy leaves the shared bytes as they were.
    flagged = encode_chunk(chunk, True, 3)
    assert flagged != first and chunk.encoded is first
    assert wire.SessionResponse.FromString(flagged).output_chunk == wire.OutputChunk(
        sequence=7,
        timestamp=1_700_000_000_000_000_000,
        stdout=b"x" * 65536,
        is_replay=True,
        gap_before=3,
    )


def test_the_kept_encoding_is_not_part_of_the_chunk() -> None:
    chunk = Chunk(1, 2, Stream.STDERR, b"abc")
    encode_chunk(chunk, False, 0)
    assert chunk == Chunk(1, 2, Stream.STDERR, b"abc")
    assert "encoded" not in repr(chunk)
