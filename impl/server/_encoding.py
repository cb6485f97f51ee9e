"""Output chunks encoded once for every client (PROTOCOL 4.3).

Every client of an exec is sent the same chunks, so each chunk is encoded once, as the
``SessionResponse{output_chunk}`` a live client gets, and the bytes are kept on the chunk
(:attr:`Chunk.encoded`): every live client sends those very bytes, and encoding costs nothing
per client.  Only ``is_replay`` (6.2) and ``gap_before`` (6.4) differ between clients.  They
are fields 5 and 6 of ``OutputChunk``, after the data, so a client that needs them is sent the
shared body with them appended inside a new length prefix: one copy, nothing encoded again.

The result is byte for byte what protobuf and betterproto2 write for the same message (fields
in number order, proto3 defaults left out, the oneof member always written), so every parser
reads it as one ``OutputChunk``; ``tests/server/test_encoding.py`` holds it to that.  This
module imports neither asyncio nor grpc.
"""

from __future__ import annotations

from ._log import Chunk, Stream

__all__ = ["encode_chunk"]

_LEN = 2  # wire type of length-delimited fields
_OUTPUT_CHUNK = bytes([5 << 3 | _LEN])  # SessionResponse.output_chunk
_SEQUENCE = bytes([1 << 3])  # OutputChunk.sequence, varint
_TIMESTAMP = bytes([2 << 3])  # OutputChunk.timestamp, varint
_DATA = {Stream.STDOUT: bytes([3 << 3 | _LEN]), Stream.STDERR: bytes([4 << 3 | _LEN])}
_IS_REPLAY = bytes([5 << 3, 1])  # OutputChunk.is_replay = true
_GAP_BEFORE = bytes([6 << 3])  # OutputChunk.gap_before, varint
_ONE_BYTE = [bytes([n]) for n in range(0x80)]
_UINT64 = (1 << 64) - 1


def _varint(value: int) -> bytes:
    """Base-128, least significant group first; a negative int64 as its 64-bit two's
    complement (ten bytes), as protobuf writes it."""
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    value &= _UINT64
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_live(chunk: Chunk) -> bytes:
    head = b"".join(
        (
            _SEQUENCE + _varint(chunk.sequence) if chunk.sequence else b"",
            _TIMESTAMP + _varint(chunk.timestamp_ns) if chunk.timestamp_ns else b"",
            _DATA[chunk.stream],
            _varint(len(chunk.data)),
        )
    )
    return b"".join((_OUTPUT_CHUNK, _varint(len(head) + len(chunk.data)), head, chunk.data))


def encode_chunk(chunk: Chunk, is_replay: bool, gap_before: int) -> bytes:
    """The ``SessionResponse`` carrying ``chunk`` for one client; the same object for every
    live client of the chunk."""
    live = chunk.encoded
    if live is None:
        live = _encode_live(chunk)
        chunk.keep_encoded(live)
    if not is_replay and not gap_before:
        return live
    flags = b"".join(
        (
            _IS_REPLAY if is_replay else b"",
            _GAP_BEFORE + _varint(gap_before) if gap_before else b"",
        )
    )
    start = 2  # the body follows the tag and its length, a varint: find where it ends
    while live[start - 1] & 0x80:
        start += 1
    body = memoryview(live)[start:]
    return b"".join((_OUTPUT_CHUNK, _varint(len(body) + len(flags)), body, flags))
