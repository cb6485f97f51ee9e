"""Shared setup of the wire tests: spec/exec.proto compiled by grpc_tools' protoc, once per run.

The descriptor is what the generated code must match (test_descriptor, test_service); the
protobuf-runtime classes are the reference encoder betterproto2 is compared with
(test_roundtrip).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor_pb2 import FileDescriptorProto, FileDescriptorSet

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "spec" / "exec.proto"


def _protoc(*args: str) -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    argv = ["protoc", f"-I{PROTO.parent}", f"-I{include}", *args, str(PROTO)]
    assert protoc.main(argv) == 0, f"protoc failed: {argv}"


@pytest.fixture(scope="session")
def descriptor(tmp_path_factory: pytest.TempPathFactory) -> FileDescriptorProto:
    """The compiled ``FileDescriptorProto`` of spec/exec.proto."""
    out = tmp_path_factory.mktemp("descriptor") / "exec.desc"
    _protoc(f"--descriptor_set_out={out}")
    (proto,) = FileDescriptorSet.FromString(out.read_bytes()).file
    return proto


@pytest.fixture(scope="session")
def exec_pb2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """``spec/exec.proto`` compiled by grpc_tools' protoc into protobuf-runtime classes."""
    out = tmp_path_factory.mktemp("exec_pb2")
    _protoc(f"--python_out={out}")
    sys.path.insert(0, str(out))
    try:
        module = importlib.import_module("exec_pb2")
        assert Path(module.__file__ or "").parent == out, "imported a stale exec_pb2"
        yield module
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("exec_pb2", None)
