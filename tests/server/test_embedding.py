"""An engine that embeds the service in its own grpc.aio server and feeds execs through the
executor API (DESIGN: the executor API; README: "Embedding it in an engine")."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from sessions import SteppedClock, attach, until_removed

from execstream import wire
from execstream.server import ExecAttachable, Executor, Limits, Registry

pytestmark = pytest.mark.asyncio


async def test_engine_fed_exec_reaches_every_client_and_is_swept() -> None:
    server = grpc.aio.server()
    clock = SteppedClock()
    attachable = ExecAttachable(
        Executor(Registry(clock=clock)), retention=300, cleanup_interval=0.05
    )
    attachable.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await attachable.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = wire.ExecStub(channel)
            handle = attachable.executor.register("engine-c", "engine-e")
            handle.started()
            early = asyncio.create_task(attach(stub, "engine-c", "engine-e"))
            await asyncio.sleep(0.1)
            handle.stdout.write(b"from the engine\n")
            handle.stderr.write(b"and its stderr\n")
            handle.exit(5)
            late = await attach(stub, "engine-c", "engine-e")
            for result in (await early, late):
                assert result.code == grpc.StatusCode.OK, result.details
                assert result.stdout == b"from the engine\n"
                assert result.stderr == b"and its stderr\n"
                assert result.exit_code == 5
            # Without a runtime this server cannot create execs or control processes.
            created = await attach(stub, "engine-c", "other")
            assert created.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.ContainerPause(wire.ContainerControlRequest(container_id="engine-c"))
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            clock.advance(300)  # PROTOCOL 11.2: past retention, the sweep removes it
            await until_removed(attachable.registry, "engine-e")
            gone = await attach(stub, "engine-c", "engine-e")
            assert gone.code == grpc.StatusCode.NOT_FOUND
    finally:
        await attachable.close()
        await server.stop(None)


async def test_exits_past_the_bound_are_removed_oldest_first_without_waiting_for_a_sweep() -> None:
    """PROTOCOL 11.3 and 13.3: exited execs never block new ones, and their number is bounded."""
    registry = Registry(Limits(max_execs_per_container=1, max_exited_execs=2))
    attachable = ExecAttachable(Executor(registry), retention=300, cleanup_interval=300)
    await attachable.start()
    try:
        for n in range(5):
            handle = attachable.executor.register("c", f"e{n}")  # one live exec at a time
            handle.started()
            handle.exit(0)
        deadline = asyncio.get_running_loop().time() + 5
        while [r.exec_id for r in registry] != ["e3", "e4"]:
            assert asyncio.get_running_loop().time() < deadline, list(registry)
            await asyncio.sleep(0.01)
        removed = [
            e.exec_id for e in registry.events.read(0).items if e.event_type == "unregistered"
        ]
        assert removed == ["e0", "e1", "e2"]
    finally:
        await attachable.close()
