"""spec/exec.proto keeps the published dagger.exec.Exec contract (DESIGN, "The wire contract").

The published service, messages and fields are a literal table here, copied from the design,
so renumbering, retyping, renaming or re-labelling any of them fails. Everything the proto
has beyond that table must say "Added by execstream" in the comment right above it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf.descriptor_pb2 import (
    DescriptorProto,
    FieldDescriptorProto,
    FileDescriptorProto,
)

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "spec" / "exec.proto"
PACKAGE = "dagger.exec"
ADDED = "Added by execstream"


@dataclass(frozen=True)
class Field:
    name: str
    number: int
    type: str  # scalar type, a message of the package, or "map<K,V>"
    repeated: bool = False
    optional: bool = False  # proto3 `optional` (explicit presence)
    oneof: str | None = None


# RPC name -> (request, response, client streams, server streams)
PUBLISHED_SERVICE: dict[str, tuple[str, str, bool, bool]] = {
    "Session": ("SessionRequest", "SessionResponse", True, True),
    "ContainerLifecycle": ("ContainerLifecycleRequest", "ContainerLifecycleEvent", False, True),
    "ContainerStatus": ("ContainerStatusRequest", "ContainerStatusResponse", False, False),
    "ContainerPause": ("ContainerControlRequest", "ContainerControlResponse", False, False),
    "ContainerResume": ("ContainerControlRequest", "ContainerControlResponse", False, False),
    "ContainerSignal": ("ContainerSignalRequest", "ContainerControlResponse", False, False),
}

PUBLISHED_MESSAGES: dict[str, list[Field]] = {
    "SessionRequest": [
        Field("start", 1, "Start", oneof="msg"),
        Field("stdin", 2, "bytes", oneof="msg"),
        Field("resize", 3, "Resize", oneof="msg"),
    ],
    "SessionResponse": [
        Field("stdout", 1, "bytes", oneof="msg"),
        Field("stderr", 2, "bytes", oneof="msg"),
        Field("exit", 3, "int32", oneof="msg"),
        Field("ready", 4, "Ready", oneof="msg"),
        Field("output_chunk", 5, "OutputChunk", oneof="msg"),
    ],
    "Start": [
        Field("container_id", 1, "string"),
        Field("exec_id", 2, "string"),
        Field("command", 3, "string", repeated=True),
        Field("env", 4, "map<string,string>"),
        Field("working_dir", 5, "string"),
        Field("tty", 6, "bool"),
        Field("session_id", 7, "string"),
        Field("replay_from_sequence", 8, "uint64"),
        Field("client_id", 9, "string"),
    ],
    "Resize": [
        Field("Width", 1, "int32"),  # capitalised, as published
        Field("Height", 2, "int32"),
    ],
    "Ready": [
        Field("session_id", 1, "string"),
        Field("terminal_size", 2, "Resize"),
        Field("replay_complete", 3, "bool"),
    ],
    "OutputChunk": [
        Field("sequence", 1, "uint64"),
        Field("timestamp", 2, "int64"),
        Field("stdout", 3, "bytes", oneof="data"),
        Field("stderr", 4, "bytes", oneof="data"),
        Field("is_replay", 5, "bool"),
        Field("gap_before", 6, "uint64"),
    ],
    "ContainerLifecycleRequest": [
        Field("container_id", 1, "string"),
    ],
    "ContainerLifecycleEvent": [
        Field("container_id", 1, "string"),
        Field("event_type", 2, "string"),
        Field("status", 3, "string"),
        Field("timestamp", 4, "int64"),
        Field("exit_code", 5, "int32"),
        Field("message", 6, "string"),
    ],
    "ContainerStatusRequest": [
        Field("container_id", 1, "string"),
        Field("include_resource_usage", 2, "bool"),
    ],
    "ContainerStatusResponse": [
        Field("container_id", 1, "string"),
        Field("status", 2, "string"),
        Field("exit_code", 3, "int32", optional=True),
        Field("started_at", 4, "int64"),
        Field("finished_at", 5, "int64", optional=True),
        Field("resource_usage", 6, "ResourceUsage", optional=True),
    ],
    "ResourceUsage": [
        Field("cpu_percent", 1, "double"),
        Field("memory_bytes", 2, "uint64"),
        Field("memory_limit", 3, "uint64"),
        Field("io_read_bytes", 4, "uint64"),
        Field("io_write_bytes", 5, "uint64"),
    ],
    "ContainerControlRequest": [
        Field("container_id", 1, "string"),
    ],
    "ContainerSignalRequest": [
        Field("container_id", 1, "string"),
        Field("signal", 2, "string"),
    ],
    "ContainerControlResponse": [
        Field("success", 1, "bool"),
        Field("message", 2, "string"),
    ],
}


def _messages(proto: FileDescriptorProto) -> dict[str, DescriptorProto]:
    return {m.name: m for m in proto.message_type}


def _type(message: DescriptorProto, field: FieldDescriptorProto) -> str:
    if field.type in (FieldDescriptorProto.TYPE_MESSAGE, FieldDescriptorProto.TYPE_ENUM):
        nested = {f".{message.name}.{n.name}": n for n in message.nested_type}
        entry = next((n for s, n in nested.items() if field.type_name.endswith(s)), None)
        if entry is not None and entry.options.map_entry:
            key, value = (_type(entry, f) for f in entry.field)
            return f"map<{key},{value}>"
        prefix = f".{PACKAGE}."
        assert field.type_name.startswith(prefix), field.type_name
        return field.type_name.removeprefix(prefix)
    name = FieldDescriptorProto.Type.Name(field.type)
    return name.removeprefix("TYPE_").lower()


def _described(message: DescriptorProto) -> dict[str, Field]:
    """The fields of ``message`` in the same shape as the published table."""
    fields = {}
    for f in message.field:
        is_map = _type(message, f).startswith("map<")
        in_oneof = f.HasField("oneof_index") and not f.proto3_optional
        fields[f.name] = Field(
            f.name,
            f.number,
            _type(message, f),
            repeated=f.label == FieldDescriptorProto.LABEL_REPEATED and not is_map,
            optional=f.proto3_optional,
            oneof=message.oneof_decl[f.oneof_index].name if in_oneof else None,
        )
    return fields


def test_package_and_syntax(descriptor: FileDescriptorProto) -> None:
    assert descriptor.package == PACKAGE
    assert descriptor.syntax == "proto3"


def test_service_is_published_exec(descriptor: FileDescriptorProto) -> None:
    (service,) = descriptor.service
    assert service.name == "Exec"
    have = {
        m.name: (
            m.input_type.removeprefix(f".{PACKAGE}."),
            m.output_type.removeprefix(f".{PACKAGE}."),
            m.client_streaming,
            m.server_streaming,
        )
        for m in service.method
    }
    assert have == PUBLISHED_SERVICE


@pytest.mark.parametrize("name", PUBLISHED_MESSAGES)
def test_published_fields_are_unchanged(name: str, descriptor: FileDescriptorProto) -> None:
    messages = _messages(descriptor)
    assert name in messages, f"published message {name} is missing"
    have = _described(messages[name])
    for want in PUBLISHED_MESSAGES[name]:
        assert have.get(want.name) == want, f"{name}.{want.name}"


def test_added_fields_do_not_reuse_published_numbers_or_oneofs(
    descriptor: FileDescriptorProto,
) -> None:
    for name, message in _messages(descriptor).items():
        published = PUBLISHED_MESSAGES.get(name, [])
        numbers = {f.number for f in published}
        oneofs = {f.oneof for f in published if f.oneof}
        for field in _described(message).values():
            if field not in published:
                assert field.number not in numbers, f"{name}.{field.name} reuses a number"
                # A new member of a published oneof would be unknown, i.e. "nothing set", to
                # an old peer: a silently empty message. New information gets its own field.
                assert field.oneof not in oneofs, f"{name}.{field.name} joins a published oneof"


# --- the proto text: every addition is documented as one ----------------------------------

_BLOCK = re.compile(r"^\s*(message|oneof|service|enum)\s+(\w+)\s*\{")
_FIELD = re.compile(
    r"^\s*(?:(?:optional|repeated)\s+)?(?:map\s*<[^>]*>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*[;\[]"
)


def _proto_text_fields(text: str) -> dict[tuple[str, str], tuple[int, str]]:
    """(message, field) -> (number, the comment block right above the field line)."""
    found: dict[tuple[str, str], tuple[int, str]] = {}
    lines = text.splitlines()
    stack: list[tuple[str, str]] = []
    for i, line in enumerate(lines):
        code = line.split("//", 1)[0]
        if block := _BLOCK.match(code):
            stack.append((block[1], block[2]))
        elif stack and stack[-1][0] != "service" and (field := _FIELD.match(code)):
            message = next(name for kind, name in reversed(stack) if kind == "message")
            above = []
            for prev in reversed(lines[:i]):
                if not prev.strip().startswith("//"):
                    break
                above.append(prev.strip().removeprefix("//").strip())
            found[(message, field[1])] = (int(field[2]), " ".join(reversed(above)))
        if "}" in code and stack:
            stack.pop()
    return found


def test_proto_text_parser_sees_every_field(descriptor: FileDescriptorProto) -> None:
    # The documentation check below is only as good as this parser: it must find exactly the
    # fields protoc finds.
    parsed = {key: number for key, (number, _) in _proto_text_fields(PROTO.read_text()).items()}
    compiled = {(m.name, f.name): f.number for m in descriptor.message_type for f in m.field}
    assert parsed == compiled


def test_every_addition_is_marked_added_by_execstream() -> None:
    published = {(m, f.name) for m, fields in PUBLISHED_MESSAGES.items() for f in fields}
    fields = _proto_text_fields(PROTO.read_text())
    unmarked = [
        f"{message}.{field}"
        for (message, field), (_, comment) in fields.items()
        if (message, field) not in published and ADDED not in comment
    ]
    assert unmarked == [], f'fields not in the published contract need a "{ADDED}" comment'


def test_no_published_field_claims_to_be_added() -> None:
    fields = _proto_text_fields(PROTO.read_text())
    for message, published in PUBLISHED_MESSAGES.items():
        for field in published:
            assert ADDED not in fields[(message, field.name)][1], f"{message}.{field.name}"


def test_added_messages_are_marked(descriptor: FileDescriptorProto) -> None:
    text = PROTO.read_text().splitlines()
    for name in set(_messages(descriptor)) - set(PUBLISHED_MESSAGES):
        (i,) = [n for n, line in enumerate(text) if re.match(rf"\s*message\s+{name}\s*\{{", line)]
        above = []
        for prev in reversed(text[:i]):
            if not prev.strip().startswith("//"):
                break
            above.append(prev)
        assert ADDED in " ".join(above), f'message {name} needs a "{ADDED}" comment'
