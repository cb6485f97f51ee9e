"""Just enough of the protobuf encoding to be a client that knows only the published contract.

PROTOCOL 1.3: a client that knows only the published fields of ``dagger.exec.Exec`` must be
able to run and attach to execs.  The generated messages know execstream's additions, so the
wire-compatibility cases encode requests and decode responses here, by field number and wire
type, against the published table below — which is how a client built from the published
``.proto`` sees the server.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "LEN",
    "PUBLISHED",
    "VARINT",
    "Field",
    "decode",
    "encode_bytes",
    "encode_varint_field",
    "shape_errors",
]

VARINT = 0
I64 = 1
LEN = 2
I32 = 5

Field = tuple[int, int, int | bytes]  # (number, wire type, value)

#: The published messages: field number -> (name, wire type, nested message or None).
PUBLISHED: dict[str, dict[int, tuple[str, int, str | None]]] = {
    "SessionResponse": {
        1: ("stdout", LEN, None),
        2: ("stderr", LEN, None),
        3: ("exit", VARINT, None),
        4: ("ready", LEN, "Ready"),
        5: ("output_chunk", LEN, "OutputChunk"),
    },
    "Ready": {
        1: ("session_id", LEN, None),
        2: ("terminal_size", LEN, "Resize"),
        3: ("replay_complete", VARINT, None),
    },
    "Resize": {1: ("Width", VARINT, None), 2: ("Height", VARINT, None)},
    "OutputChunk": {
        1: ("sequence", VARINT, None),
        2: ("timestamp", VARINT, None),
        3: ("stdout", LEN, None),
        4: ("stderr", LEN, None),
        5: ("is_replay", VARINT, None),
        6: ("gap_before", VARINT, None),
    },
    "ContainerStatusResponse": {
        1: ("container_id", LEN, None),
        2: ("status", LEN, None),
        3: ("exit_code", VARINT, None),
        4: ("started_at", VARINT, None),
        5: ("finished_at", VARINT, None),
        6: ("resource_usage", LEN, "ResourceUsage"),
    },
    "ResourceUsage": {
        1: ("cpu_percent", I64, None),
        2: ("memory_bytes", VARINT, None),
        3: ("memory_limit", VARINT, None),
        4: ("io_read_bytes", VARINT, None),
        5: ("io_write_bytes", VARINT, None),
    },
    "ContainerLifecycleEvent": {
        1: ("container_id", LEN, None),
        2: ("event_type", LEN, None),
        3: ("status", LEN, None),
        4: ("timestamp", VARINT, None),
        5: ("exit_code", VARINT, None),
        6: ("message", LEN, None),
    },
}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | LEN) + _varint(len(value)) + value


def encode_varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | VARINT) + _varint(value)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data):
            raise ValueError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def decode(data: bytes) -> Iterator[Field]:
    """The fields of one message, in wire order (ValueError on malformed input)."""
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, kind = key >> 3, key & 7
        value: int | bytes
        if kind == VARINT:
            value, at = _read_varint(data, at)
        elif kind == LEN:
            size, at = _read_varint(data, at)
            if at + size > len(data):
                raise ValueError("truncated length-delimited field")
            value, at = data[at : at + size], at + size
        elif kind == I64:
            value, at = data[at : at + 8], at + 8
        elif kind == I32:
            value, at = data[at : at + 4], at + 4
        else:
            raise ValueError(f"wire type {kind} of field {number}")
        if number == 0:
            raise ValueError("field number 0")
        yield number, kind, value


def shape_errors(message: str, data: bytes, path: str = "") -> list[str]:
    """Where ``data`` disagrees with the published shape of ``message``: a published field
    number carried with another wire type, or a nested message that does not parse.  Unknown
    field numbers are fine (added by execstream; ignored by protobuf rules)."""
    where = path or message
    try:
        fields = list(decode(data))
    except ValueError as error:
        return [f"{where}: does not parse ({error})"]
    errors: list[str] = []
    table = PUBLISHED[message]
    for number, kind, value in fields:
        if number not in table:
            continue
        name, want, nested = table[number]
        if kind != want:
            errors.append(f"{where}.{name} (field {number}) has wire type {kind}, not {want}")
        elif nested is not None and isinstance(value, bytes):
            errors.extend(shape_errors(nested, value, f"{where}.{name}"))
    return errors
