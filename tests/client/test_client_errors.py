"""One exception class per status of PROTOCOL.md section 14, each triggered for real."""

from __future__ import annotations

import asyncio
import pickle
import socket

import grpc
import pytest
from client_support import ids

from execstream.client import (
    AlreadyExists,
    AsyncExecClient,
    Cancelled,
    DeadlineExceeded,
    ExecClient,
    ExecStreamError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    ServerError,
    ServerShuttingDown,
    Unauthenticated,
    Unavailable,
)
from execstream.client._errors import error_from_status
from execstream.server import Limits
from execstream.server.testing import serve


async def test_not_found(client: AsyncExecClient) -> None:
    c, e = ids()
    with pytest.raises(NotFound) as raised:
        await client.attach(c, e)
    assert raised.value.code is grpc.StatusCode.NOT_FOUND
    assert e in raised.value.message
    assert str(raised.value).startswith("not found: ")
    with pytest.raises(NotFound):
        await client.status(c)
    with pytest.raises(NotFound):
        await client.pause(c)


async def test_already_exists(client: AsyncExecClient) -> None:
    c, e = ids()
    await (await client.run(c, e, ["true"])).wait()
    with pytest.raises(AlreadyExists, match=e):
        await client.run(c, e, ["true"])


async def test_invalid_argument(client: AsyncExecClient) -> None:
    with pytest.raises(InvalidArgument, match="container_id"):
        await client.run("../etc", "e", ["true"])
    c, e = ids()
    exec_ = await client.run(c, e, ["sleep", "30"])
    with pytest.raises(InvalidArgument, match="NOPE"):
        await client.signal(c, "NOPE")
    with pytest.raises(InvalidArgument, match="container_id"):
        await anext(client.events(None, e))
    await client.signal(c, "KILL")
    assert await exec_.wait() == 137


async def test_unauthenticated_and_the_token() -> None:
    async with serve(token="s3cret") as server:
        c, e = ids()
        async with AsyncExecClient(server.address) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.run(c, e, ["true"])
            with pytest.raises(Unauthenticated):
                await anonymous.status(c)
        async with AsyncExecClient(server.address, token="wrong") as wrong:
            with pytest.raises(Unauthenticated) as raised:
                await anext(wrong.events())
            assert "s3cret" not in str(raised.value)
        async with AsyncExecClient(server.address, token="s3cret") as client:
            assert await (await client.run(c, e, ["true"])).wait() == 0
            assert (await client.status(c, e)).exit_code == 0
            async with client.events(c, from_sequence=0) as events:
                assert (await anext(events)).event_type == "created"


async def test_resource_exhausted() -> None:
    async with (
        serve(limits=Limits(max_clients_per_exec=1)) as server,
        AsyncExecClient(server.address) as client,
    ):
        c, e = ids()
        first = await client.run(c, e, ["cat"])
        with pytest.raises(ResourceExhausted, match="max_clients_per_exec"):
            await client.attach(c, e)
        await first.close_stdin()
        assert await first.wait() == 0


async def test_failed_precondition(client: AsyncExecClient) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["cat"])
    await exec_.resize(80, 24)  # PROTOCOL 7.3: not a TTY; ends this client's session
    with pytest.raises(FailedPrecondition, match="TTY"):
        async for _event in exec_:
            pass
    with pytest.raises(FailedPrecondition):
        await exec_.wait()
    with pytest.raises(FailedPrecondition):
        await client.resume(c)  # not paused
    assert (await client.status(c, e)).state == "running"  # the exec is unaffected
    other = await client.attach(c, e)
    await other.close_stdin()
    assert await other.wait() == 0


async def test_out_of_range(client: AsyncExecClient) -> None:
    c, e = ids()
    assert await (await client.run(c, e, ["echo", "hi"])).wait() == 0
    with pytest.raises(OutOfRange, match="100"):
        await client.attach(c, e, from_sequence=100)
    with pytest.raises(OutOfRange):
        await anext(client.events(from_sequence=10**9))


async def test_unavailable_on_a_closed_port() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with AsyncExecClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(Unavailable) as raised:
            await client.run("c", "e", ["true"])
        assert not isinstance(raised.value, ServerShuttingDown)
        with pytest.raises(Unavailable):
            await client.status("c")

    def sync_status() -> None:
        with ExecClient(f"127.0.0.1:{port}") as sync:
            sync.status("c")

    with pytest.raises(Unavailable):
        await asyncio.to_thread(sync_status)


async def test_deadline_exceeded(client: AsyncExecClient) -> None:
    c, e = ids()
    exec_ = await client.run(c, e, ["sleep", "30"], timeout=0.5)
    with pytest.raises(DeadlineExceeded):
        await exec_.wait()
    await client.signal(c, "KILL", e)


async def test_the_sync_twin_raises_the_same_classes(client: AsyncExecClient) -> None:
    c, e = ids()

    def attach() -> None:
        with ExecClient(client.target) as sync:
            sync.attach(c, e)

    with pytest.raises(NotFound, match=e):
        await asyncio.to_thread(attach)


# PROTOCOL 14.1: every status of the error table, plus the ones any gRPC call can end with.
TABLE = [
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.UNAVAILABLE, Unavailable),
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    (grpc.StatusCode.ALREADY_EXISTS, AlreadyExists),
    (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
    (grpc.StatusCode.OUT_OF_RANGE, OutOfRange),
    (grpc.StatusCode.UNKNOWN, ServerError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.CANCELLED, Cancelled),
    (grpc.StatusCode.INTERNAL, ServerError),
    (grpc.StatusCode.UNIMPLEMENTED, ServerError),
]


@pytest.mark.parametrize(("code", "cls"), TABLE, ids=[code.name for code, _ in TABLE])
def test_every_status_maps_to_its_class(code: grpc.StatusCode, cls: type[ExecStreamError]) -> None:
    error = error_from_status(code, "what the server said")
    assert type(error) is cls and isinstance(error, ExecStreamError)
    assert error.code is code and error.message == "what the server said"
    assert str(error) == f"{code.name.lower().replace('_', ' ')}: what the server said"
    assert type(pickle.loads(pickle.dumps(error))) is cls


def test_shutting_down_is_its_own_unavailable() -> None:
    error = error_from_status(grpc.StatusCode.UNAVAILABLE, "server shutting down")
    assert isinstance(error, ServerShuttingDown) and isinstance(error, Unavailable)
