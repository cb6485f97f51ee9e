"""The server against the runtime contract alone: a FakeRuntime plays every process.

The session flow, stdin, resize, control and removal go through the same runner and service
as with a real runtime, so these run fast and without processes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
import pytest
from sessions import collect, requests, run, start

from execstream import wire
from execstream.server import ErrorCode, ExecError, ExecServer
from execstream.server.runtime import ExecSpec, FakeRuntime, ResourceSample
from execstream.server.testing import serve

TIMEOUT = 10.0


@pytest.fixture
def fake() -> FakeRuntime:
    return FakeRuntime(sample=ResourceSample(12.5, 4096, 8192, 1, 2))


@pytest.fixture
async def server(fake: FakeRuntime) -> AsyncIterator[ExecServer]:
    async with serve(runtime=fake, retention=0.2, cleanup_interval=0.1) as server:
        yield server


@pytest.fixture
async def stub(server: ExecServer) -> AsyncIterator[wire.ExecStub]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield wire.ExecStub(channel)


async def eventually(predicate: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_output_and_exit_of_a_fake_exec_reach_the_client(
    fake: FakeRuntime, stub: wire.ExecStub
) -> None:
    session = asyncio.create_task(run(stub, "c1", "e1", "anything", "--at-all"))
    proc = await asyncio.wait_for(fake.started("c1", "e1"), TIMEOUT)
    assert proc.spec.command == ("anything", "--at-all")
    proc.emit(b"out")
    proc.emit(b"err", "stderr")
    proc.emit(b"more")
    proc.exit(3)
    result = await asyncio.wait_for(session, TIMEOUT)
    assert result.code == grpc.StatusCode.OK
    assert result.order == ["ready", "chunk", "chunk", "chunk", "exit"]
    result.assert_contiguous()
    assert (result.stdout, result.stderr, result.exit_code) == (b"outmore", b"err", 3)


async def test_a_refused_spawn_is_its_status_and_leaves_no_exec(
    fake: FakeRuntime, stub: wire.ExecStub
) -> None:
    fake.refuse_next = ExecError(ErrorCode.INVALID_ARGUMENT, "command 'nope' not found")
    result = await run(stub, "c1", "e1", "nope")
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in result.details
    assert fake.execs == {}
    # PROTOCOL 3.2: the same IDs may be created afterwards.
    session = asyncio.create_task(run(stub, "c1", "e1", "true"))
    (await asyncio.wait_for(fake.started("c1", "e1"), TIMEOUT)).exit(0)
    assert (await asyncio.wait_for(session, TIMEOUT)).exit_code == 0


async def test_stdin_and_resize_reach_the_runtime(fake: FakeRuntime, stub: wire.ExecStub) -> None:
    hold = asyncio.Event()
    more = [
        wire.SessionRequest(stdin=b"hello "),
        wire.SessionRequest(stdin=b"world"),
        wire.SessionRequest(resize=wire.Resize(width=100, height=40)),
        wire.SessionRequest(stdin=b""),
    ]
    first = start("c1", "tty", "sh", tty=True, terminal_size=wire.Resize(width=90, height=30))
    session = asyncio.create_task(collect(stub, requests(first, more, hold=hold)))
    proc = await asyncio.wait_for(fake.started("c1", "tty"), TIMEOUT)
    await eventually(lambda: proc.stdin_closed, "EOF to reach the exec")
    assert bytes(proc.stdin) == b"hello world"
    assert proc.sizes == [(90, 30), (100, 40)]
    proc.exit(0)
    hold.set()
    result = await asyncio.wait_for(session, TIMEOUT)
    assert result.readies[0].terminal_size == wire.Resize(width=90, height=30)
    assert result.exit_code == 0


async def test_control_and_usage_go_to_the_runtime(fake: FakeRuntime, stub: wire.ExecStub) -> None:
    session = asyncio.create_task(run(stub, "c1", "e1", "sleep"))
    proc = await asyncio.wait_for(fake.started("c1", "e1"), TIMEOUT)
    control = wire.ContainerControlRequest(container_id="c1")
    assert (await stub.ContainerPause(control)).success
    assert fake.paused == {"c1"}
    assert (await stub.ContainerResume(control)).success
    assert fake.paused == set()
    await stub.ContainerSignal(wire.ContainerSignalRequest(container_id="c1", signal="usr1"))
    await stub.ContainerSignal(
        wire.ContainerSignalRequest(container_id="c1", signal="TERM", exec_id="e1")
    )
    assert fake.signals == [("c1", signal.SIGUSR1, None), ("c1", signal.SIGTERM, "e1")]
    assert proc.signals == [signal.SIGUSR1, signal.SIGTERM]
    status = await stub.ContainerStatus(
        wire.ContainerStatusRequest(container_id="c1", include_resource_usage=True)
    )
    usage = status.resource_usage
    assert usage is not None
    assert (usage.cpu_percent, usage.memory_bytes, usage.memory_limit) == (12.5, 4096, 8192)
    assert (usage.io_read_bytes, usage.io_write_bytes) == (1, 2)
    proc.exit(143)
    assert (await asyncio.wait_for(session, TIMEOUT)).exit_code == 143


async def test_retention_releases_the_exec_and_its_container(
    fake: FakeRuntime, stub: wire.ExecStub
) -> None:
    session = asyncio.create_task(run(stub, "c1", "e1", "true"))
    proc = await asyncio.wait_for(fake.started("c1", "e1"), TIMEOUT)
    proc.exit(0)
    await asyncio.wait_for(session, TIMEOUT)
    await eventually(lambda: proc.released, "the retention sweep to release the exec")
    assert fake.removed == ["c1"]
    assert fake.execs == {}


async def test_close_kills_running_fake_execs(fake: FakeRuntime) -> None:
    async with serve(runtime=fake) as server, grpc.aio.insecure_channel(server.address) as ch:
        session = asyncio.create_task(run(wire.ExecStub(ch), "c1", "e1", "sleep"))
        proc = await asyncio.wait_for(fake.started("c1", "e1"), TIMEOUT)
    assert proc.exit_code == 128 + signal.SIGKILL
    assert fake.closed
    session.cancel()


def test_the_fake_keeps_the_contract_rules() -> None:
    async def scenario() -> None:
        fake = FakeRuntime()
        with pytest.raises(ExecError) as missing:
            await fake.pause("nope")
        assert missing.value.code is ErrorCode.NOT_FOUND
        spec = ExecSpec(command=["x"])
        sink = _Sink()
        await fake.spawn("c", "e", spec, sink, sink)
        with pytest.raises(ExecError) as twice:
            await fake.spawn("c", "e", spec, sink, sink)
        assert twice.value.code is ErrorCode.ALREADY_EXISTS
        await fake.pause("c")
        with pytest.raises(ExecError) as paused:
            await fake.spawn("c", "f", spec, sink, sink)
        assert paused.value.code is ErrorCode.FAILED_PRECONDITION
        with pytest.raises(ExecError) as no_tty:
            fake.execs[("c", "e")].resize(10, 10)
        assert no_tty.value.code is ErrorCode.FAILED_PRECONDITION

    asyncio.run(scenario())


class _Sink:
    def write(self, data: bytes) -> None:
        pass
