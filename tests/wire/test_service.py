"""The generated grpc.aio glue: a real server and the typed stub over 127.0.0.1.

A recording servicer implements all six RPCs of ``dagger.exec.Exec``; it is registered with
``add_ExecServicer_to_server`` and called through ``ExecStub``, so the paths, arities,
serializers and the stub's ``metadata`` / ``timeout`` plumbing are checked end to end. The
METHODS table is checked against the compiled descriptor of spec/exec.proto.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import betterproto2
import grpc
import grpc.aio
import pytest
from google.protobuf.descriptor_pb2 import FileDescriptorProto

from execstream import wire
from execstream.wire import (
    ContainerControlRequest,
    ContainerControlResponse,
    ContainerLifecycleEvent,
    ContainerLifecycleRequest,
    ContainerSignalRequest,
    ContainerStatusRequest,
    ContainerStatusResponse,
    OutputChunk,
    Ready,
    Resize,
    ResourceUsage,
    SessionRequest,
    SessionResponse,
    Start,
)

# Test-only knobs a call can send to the recording servicer.
DELAY = "x-test-delay"  # seconds to sleep before answering
ABORT = "x-test-abort"  # a grpc.StatusCode name to abort with


class RecordingExec:
    """Answers every RPC predictably and remembers the metadata each one received."""

    def __init__(self) -> None:
        self.metadata: dict[str, tuple[tuple[str, str | bytes], ...]] = {}

    async def _enter(self, rpc: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        received = tuple((key, value) for key, value in context.invocation_metadata() or ())
        self.metadata[rpc] = received
        knobs = dict(received)
        if DELAY in knobs:
            await asyncio.sleep(float(knobs[DELAY]))
        if ABORT in knobs:
            code = grpc.StatusCode[str(knobs[ABORT])]
            await context.abort(code, f"{rpc} refused: {code.name} ünïcode")

    async def Session(
        self,
        request_iterator: AsyncIterator[SessionRequest],
        context: grpc.aio.ServicerContext[SessionRequest, SessionResponse],
    ) -> AsyncIterator[SessionResponse]:
        await self._enter("Session", context)
        received = 0
        sequence = 0
        async for request in request_iterator:
            received += 1
            assert betterproto2.which_one_of(request, "msg")[0], "empty SessionRequest"
            if request.start is not None:
                session_id = request.start.session_id or "generated"
                yield SessionResponse(ready=Ready(session_id=session_id))
            elif request.stdin is not None:
                sequence += 1
                chunk = OutputChunk(sequence=sequence, stdout=request.stdin)
                yield SessionResponse(output_chunk=chunk)
            elif request.resize is not None:
                ready = Ready(terminal_size=request.resize, replay_complete=True)
                yield SessionResponse(ready=ready)
        # The client half-closed: the exit code reports how many messages arrived.
        yield SessionResponse(exit=received)

    async def ContainerLifecycle(
        self,
        request: ContainerLifecycleRequest,
        context: grpc.aio.ServicerContext[ContainerLifecycleRequest, ContainerLifecycleEvent],
    ) -> AsyncIterator[ContainerLifecycleEvent]:
        await self._enter("ContainerLifecycle", context)
        first = request.replay_from_sequence if request.replay_from_sequence is not None else 1
        for offset, event_type in enumerate(("created", "started", "exited")):
            yield ContainerLifecycleEvent(
                container_id=request.container_id,
                exec_id=request.exec_id,
                event_type=event_type,
                sequence=first + offset,
                timestamp=-(2**63) if offset == 0 else 2**63 - 1,
                exit_code=-1 if event_type == "exited" else 0,
            )

    async def ContainerStatus(
        self,
        request: ContainerStatusRequest,
        context: grpc.aio.ServicerContext[ContainerStatusRequest, ContainerStatusResponse],
    ) -> ContainerStatusResponse:
        await self._enter("ContainerStatus", context)
        usage = ResourceUsage(cpu_percent=150.5, memory_limit=2**64 - 1)
        return ContainerStatusResponse(
            container_id=request.container_id,
            exec_id=request.exec_id,
            status="exited",
            exit_code=0,
            finished_at=0,
            resource_usage=usage if request.include_resource_usage else None,
            exec_ids=["a", "", "c"],
        )

    async def ContainerPause(
        self,
        request: ContainerControlRequest,
        context: grpc.aio.ServicerContext[ContainerControlRequest, ContainerControlResponse],
    ) -> ContainerControlResponse:
        await self._enter("ContainerPause", context)
        return ContainerControlResponse(success=True, message=f"paused {request.container_id}")

    async def ContainerResume(
        self,
        request: ContainerControlRequest,
        context: grpc.aio.ServicerContext[ContainerControlRequest, ContainerControlResponse],
    ) -> ContainerControlResponse:
        await self._enter("ContainerResume", context)
        return ContainerControlResponse(success=False, message=f"resumed {request.container_id}")

    async def ContainerSignal(
        self,
        request: ContainerSignalRequest,
        context: grpc.aio.ServicerContext[ContainerSignalRequest, ContainerControlResponse],
    ) -> ContainerControlResponse:
        await self._enter("ContainerSignal", context)
        target = f"{request.container_id}/{request.exec_id}"
        return ContainerControlResponse(success=True, message=f"{request.signal} -> {target}")


@pytest.fixture
def servicer() -> RecordingExec:
    return RecordingExec()


@pytest.fixture
async def stub(servicer: RecordingExec) -> AsyncIterator[wire.ExecStub]:
    server = grpc.aio.server()
    try:
        implementation: wire.ExecServicer = servicer
        wire.add_ExecServicer_to_server(implementation, server)
        port = server.add_insecure_port("127.0.0.1:0")
        assert port > 0
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield wire.ExecStub(channel)
        finally:
            await channel.close()
    finally:
        await server.stop(None)


async def _requests(messages: Iterable[SessionRequest]) -> AsyncIterator[SessionRequest]:
    for message in messages:
        yield message


# --- each RPC ------------------------------------------------------------------------------


async def test_session_is_bidirectional(stub: wire.ExecStub) -> None:
    call = stub.Session()
    await call.write(SessionRequest(start=Start(session_id="s-1", env={"": ""}, command=["sh"])))
    assert await call.read() == SessionResponse(ready=Ready(session_id="s-1"))

    # Interleaved: each answer arrives before the next request is sent.
    await call.write(SessionRequest(stdin=b"\x00abc"))
    assert await call.read() == SessionResponse(
        output_chunk=OutputChunk(sequence=1, stdout=b"\x00abc")
    )
    await call.write(SessionRequest(stdin=b""))  # set-but-empty survives both directions
    echoed = await call.read()
    assert isinstance(echoed, SessionResponse)
    assert echoed.output_chunk == OutputChunk(sequence=2, stdout=b"")
    assert echoed.output_chunk.stdout == b""
    await call.write(SessionRequest(resize=Resize(width=80, height=-1)))
    assert await call.read() == SessionResponse(
        ready=Ready(terminal_size=Resize(width=80, height=-1), replay_complete=True)
    )

    await call.done_writing()
    assert await call.read() == SessionResponse(exit=4)
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_session_from_a_request_iterator(stub: wire.ExecStub) -> None:
    requests = [SessionRequest(start=Start()), SessionRequest(stdin=b"x" * 70_000)]
    responses = [r async for r in stub.Session(_requests(requests))]
    assert responses == [
        SessionResponse(ready=Ready(session_id="generated")),
        SessionResponse(output_chunk=OutputChunk(sequence=1, stdout=b"x" * 70_000)),
        SessionResponse(exit=2),
    ]


async def test_container_lifecycle_streams_events(stub: wire.ExecStub) -> None:
    call = stub.ContainerLifecycle(
        ContainerLifecycleRequest(container_id="c", exec_id="e", replay_from_sequence=0)
    )
    events = [e async for e in call]
    assert [(e.event_type, e.sequence) for e in events] == [
        ("created", 0),
        ("started", 1),
        ("exited", 2),
    ]
    assert {(e.container_id, e.exec_id) for e in events} == {("c", "e")}
    assert [e.timestamp for e in events] == [-(2**63), 2**63 - 1, 2**63 - 1]
    assert events[-1].exit_code == -1
    assert await call.code() == grpc.StatusCode.OK

    # Absent replay_from_sequence is not 0: the servicer starts at 1 then.
    unset = [e async for e in stub.ContainerLifecycle(ContainerLifecycleRequest())]
    assert [e.sequence for e in unset] == [1, 2, 3]


@pytest.mark.parametrize("usage", [True, False])
async def test_container_status(stub: wire.ExecStub, usage: bool) -> None:
    request = ContainerStatusRequest(container_id="c", exec_id="e", include_resource_usage=usage)
    response = await stub.ContainerStatus(request)
    assert response == ContainerStatusResponse(
        container_id="c",
        exec_id="e",
        status="exited",
        exit_code=0,
        finished_at=0,
        resource_usage=(
            ResourceUsage(cpu_percent=150.5, memory_limit=2**64 - 1) if usage else None
        ),
        exec_ids=["a", "", "c"],
    )
    assert response.exit_code == 0  # present though zero


async def test_container_control(stub: wire.ExecStub) -> None:
    assert await stub.ContainerPause(ContainerControlRequest(container_id="c")) == (
        ContainerControlResponse(success=True, message="paused c")
    )
    assert await stub.ContainerResume(ContainerControlRequest(container_id="c")) == (
        ContainerControlResponse(success=False, message="resumed c")
    )
    signal = ContainerSignalRequest(container_id="c", exec_id="e", signal="SIGTERM")
    assert await stub.ContainerSignal(signal) == (
        ContainerControlResponse(success=True, message="SIGTERM -> c/e")
    )


# --- what every method of the stub passes on -------------------------------------------------

UNARY_REQUESTS: dict[str, Any] = {
    "ContainerLifecycle": ContainerLifecycleRequest(container_id="c"),
    "ContainerStatus": ContainerStatusRequest(container_id="c"),
    "ContainerPause": ContainerControlRequest(container_id="c"),
    "ContainerResume": ContainerControlRequest(container_id="c"),
    "ContainerSignal": ContainerSignalRequest(container_id="c", signal="KILL"),
}
RPCS = ["Session", *UNARY_REQUESTS]


async def invoke(stub: wire.ExecStub, rpc: str, **options: Any) -> list[Any]:
    """Call ``rpc`` through the stub and return every response it gives."""
    method = getattr(stub, rpc)
    if rpc == "Session":
        call = method(_requests([SessionRequest(start=Start(container_id="c"))]), **options)
        return [r async for r in call]
    if rpc == "ContainerLifecycle":
        return [r async for r in method(UNARY_REQUESTS[rpc], **options)]
    return [await method(UNARY_REQUESTS[rpc], **options)]


def test_every_rpc_is_exercised() -> None:
    assert sorted(RPCS) == sorted(m.name for m in wire.METHODS)


@pytest.mark.parametrize("rpc", RPCS)
async def test_metadata_reaches_the_servicer(
    stub: wire.ExecStub, servicer: RecordingExec, rpc: str
) -> None:
    sent = (
        ("authorization", "Bearer t0k3n"),
        ("x-request-id", rpc),
        ("trace-bin", b"\x00\xff\x01"),
    )
    assert await invoke(stub, rpc, metadata=sent)
    received = servicer.metadata[rpc]
    for item in sent:
        assert item in received


@pytest.mark.parametrize("rpc", RPCS)
async def test_timeout_expires_a_slow_call(stub: wire.ExecStub, rpc: str) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await invoke(stub, rpc, timeout=0.2, metadata=((DELAY, "30"),))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - began < 10


ABORTS = {
    "Session": grpc.StatusCode.INVALID_ARGUMENT,
    "ContainerLifecycle": grpc.StatusCode.NOT_FOUND,
    "ContainerStatus": grpc.StatusCode.UNAUTHENTICATED,
    "ContainerPause": grpc.StatusCode.FAILED_PRECONDITION,
    "ContainerResume": grpc.StatusCode.ALREADY_EXISTS,
    "ContainerSignal": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.mark.parametrize(("rpc", "code"), ABORTS.items())
async def test_abort_reaches_the_client(
    stub: wire.ExecStub, rpc: str, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await invoke(stub, rpc, metadata=((ABORT, code.name),))
    assert error.value.code() == code
    assert error.value.details() == f"{rpc} refused: {code.name} ünïcode"


# --- the METHODS table against the compiled proto ------------------------------------------

ARITY = {
    (False, False): wire.Arity.UNARY_UNARY,
    (False, True): wire.Arity.UNARY_STREAM,
    (True, False): wire.Arity.STREAM_UNARY,
    (True, True): wire.Arity.STREAM_STREAM,
}


def test_methods_table_matches_the_descriptor(descriptor: FileDescriptorProto) -> None:
    (service,) = descriptor.service
    assert wire.SERVICE_NAME == f"{descriptor.package}.{service.name}" == "dagger.exec.Exec"
    prefix = f".{descriptor.package}."
    assert [m.name for m in wire.METHODS] == [m.name for m in service.method]
    for method, proto in zip(wire.METHODS, service.method, strict=True):
        assert method.path == f"/dagger.exec.Exec/{proto.name}"
        assert method.arity is ARITY[(proto.client_streaming, proto.server_streaming)]
        assert method.request_type is getattr(wire, proto.input_type.removeprefix(prefix))
        assert method.response_type is getattr(wire, proto.output_type.removeprefix(prefix))


@pytest.mark.parametrize("method", wire.METHODS, ids=lambda m: m.name)
def test_method_constant_and_codecs(method: wire.Method[Any, Any]) -> None:
    constant = "".join("_" + c if c.isupper() else c for c in method.name).lstrip("_").upper()
    assert getattr(wire, constant) is method
    assert constant in wire.__all__
    request, response = method.request_type(), method.response_type()
    assert method.request_deserializer(b"") == request
    assert method.response_deserializer(b"") == response
    assert type(method.request_deserializer(wire.Method.serialize(request))) is method.request_type
    assert wire.Method.serialize(SessionRequest(stdin=b"")) == b"\x12\x00"
