"""The one error boundary around all six RPCs (``_service._Boundary``), over real gRPC on
127.0.0.1 with the fake runtime.

PROTOCOL 2.2 and 14.1: a fault the server did not foresee is ``UNKNOWN "Internal Server
Error"``, its details in the server's log (one line), never in the answer; 2.3: it ends that
call only, and the server goes on serving.  Every call is counted once, with its status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
import pytest
from sessions import requests, start

from execstream import wire
from execstream.server import ExecServer
from execstream.server.runtime import FakeRuntime
from execstream.server.testing import serve

pytestmark = pytest.mark.asyncio

SECRET = "a detail for the log only"


class Fault(Exception):
    pass


def fail(*_: object, **__: object) -> None:
    raise Fault(SECRET)


@pytest.fixture
async def server() -> AsyncIterator[ExecServer]:
    async with serve(runtime=FakeRuntime()) as server:
        yield server


@pytest.fixture
async def stub(server: ExecServer) -> AsyncIterator[wire.ExecStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield wire.ExecStub(channel)


def rpc_counts(server: ExecServer, method: str) -> dict[str, float]:
    """``execstream_rpcs_total`` of ``method``, by status code."""
    counts: dict[str, float] = {}
    prefix = "execstream_rpcs_total{"
    for line in server.attachable.metrics.exposition().decode().splitlines():
        if line.startswith(prefix) and f'method="{method}"' in line:
            labels, _, value = line.rpartition(" ")
            code = labels.split('code="', 1)[1].split('"', 1)[0]
            counts[code] = counts.get(code, 0) + float(value)
    return counts


async def session(stub: wire.ExecStub) -> None:
    async for _ in stub.Session(requests(start("c1", "e1"))):
        pass


async def lifecycle(stub: wire.ExecStub) -> None:
    async for _ in stub.ContainerLifecycle(wire.ContainerLifecycleRequest()):
        pass


CALLS: dict[str, tuple[str, Callable[[wire.ExecStub], Awaitable[object]]]] = {
    # method: (the registry method that fails, the call)
    "Session": ("get", session),
    "ContainerLifecycle": ("subscribe", lifecycle),
    "ContainerStatus": (
        "container",
        lambda stub: stub.ContainerStatus(wire.ContainerStatusRequest(container_id="c1")),
    ),
    "ContainerPause": (
        "container",
        lambda stub: stub.ContainerPause(wire.ContainerControlRequest(container_id="c1")),
    ),
    "ContainerResume": (
        "container",
        lambda stub: stub.ContainerResume(wire.ContainerControlRequest(container_id="c1")),
    ),
    "ContainerSignal": (
        "container",
        lambda stub: stub.ContainerSignal(
            wire.ContainerSignalRequest(container_id="c1", signal="TERM")
        ),
    ),
}


@pytest.mark.parametrize("method", list(CALLS))
async def test_an_unforeseen_fault_is_unknown_logged_once_counted_once(
    server: ExecServer,
    stub: wire.ExecStub,
    method: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PROTOCOL 2.2, 2.3, 14.1."""
    broken, call = CALLS[method]
    with monkeypatch.context() as patch:
        patch.setattr(server.registry, broken, fail)
        with (
            caplog.at_level(logging.ERROR, "execstream.server"),
            pytest.raises(grpc.aio.AioRpcError) as failed,
        ):
            await asyncio.wait_for(call(stub), 30)
    assert failed.value.code() is grpc.StatusCode.UNKNOWN
    assert failed.value.details() == "Internal Server Error"
    lines = [r for r in caplog.records if r.getMessage() == f"internal error in {method}"]
    assert len(lines) == 1
    assert lines[0].exc_info is not None and isinstance(lines[0].exc_info[1], Fault)
    assert rpc_counts(server, method) == {"UNKNOWN": 1}
    # The fault ended that call, not the server, which answers the next one as ever.
    with pytest.raises(grpc.aio.AioRpcError) as answered:
        await stub.ContainerStatus(wire.ContainerStatusRequest(container_id="c1"), timeout=30)
    assert answered.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_fault_while_reading_a_clients_stdin_ends_its_session_as_unknown(
    server: ExecServer, stub: wire.ExecStub, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's requests are read apart from the writer, and still pass the boundary:
    the fault ends that session (UNKNOWN, one log line), not the exec."""
    runtime = server.runtime
    assert isinstance(runtime, FakeRuntime)
    hold = asyncio.Event()
    creator = asyncio.create_task(session_of(stub, requests(start("c1", "e1", "cat"), hold=hold)))
    proc = await asyncio.wait_for(runtime.started("c1", "e1"), 30)

    async def broken_write(data: bytes) -> None:
        raise Fault(SECRET)

    proc.write_stdin = broken_write  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, "execstream.server"):
        code, details = await asyncio.wait_for(
            session_of(
                stub,
                requests(
                    start("c1", "e1"), [wire.SessionRequest(stdin=b"boom")], hold=asyncio.Event()
                ),
            ),
            30,
        )
    assert (code, details) == (grpc.StatusCode.UNKNOWN, "Internal Server Error")
    assert [r.getMessage() for r in caplog.records].count("internal error in Session") == 1
    assert proc.exit_code is None  # the exec runs on, and its creator is still attached
    assert not creator.done()
    proc.exit(0)
    hold.set()
    assert await asyncio.wait_for(creator, 30) == (grpc.StatusCode.OK, "")


async def session_of(
    stub: wire.ExecStub, request_stream: AsyncIterator[wire.SessionRequest]
) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in stub.Session(request_stream):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""
