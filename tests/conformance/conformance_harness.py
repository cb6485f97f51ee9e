"""Targets for testing the conformance suite: the reference server, and broken servers.

A broken server breaks exactly one clause of PROTOCOL.md.  Most are a :class:`MangleProxy`
subclass: a grpc.aio ``dagger.exec.Exec`` servicer in front of a real reference server that
forwards every call and mangles what passes (drops a chunk, sends exit too early, ...), so the
rest of the behaviour is the reference server's own.  A few are the reference server with a
setting that breaks a clause (retention 0 forgets exited execs at once; a one-hour sweep never
cleans up; no token while the suite is told there is one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import betterproto2
import grpc
import grpc.aio

from execstream import wire
from execstream.client._exec import _HIDDEN_STATUS_TRIES, _status_hidden_by_write
from execstream.conformance import Target
from execstream.server import Limits
from execstream.server.testing import serve

#: What grpc.aio raises, and reports as the call's status from then on, when a write meets
#: the server's end of the call (grpc/grpc#36066): for tests that stage that race.
HIDDEN_BY_GRPC = grpc.aio.AioRpcError(
    grpc.StatusCode.INTERNAL,
    grpc.aio.Metadata(),
    grpc.aio.Metadata(),
    details="Internal error from Core",
    debug_error_string='Failed "execute_batch": (SendMessageOperation,)',
)

TOKEN = "conformance-test-token"
RETENTION = 2.0
CLEANUP_INTERVAL = 0.5
#: Below the reference server's 128, so that limits/13.3 (limit + 1 execs in one container)
#: stays cheap in the ten-runs test; no case runs more than 5 execs in one container at once.
MAX_EXECS_PER_CONTAINER = 16
_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]

_Ctx = grpc.aio.ServicerContext[Any, Any]

#: Cases the reference server is known to fail, each a reported non-conformance of the server
#: (never of the case).  The tests require these to FAIL, so that a fix is noticed and the
#: entry removed, and every other case to PASS.
REFERENCE_DEVIATIONS: dict[str, str] = {}


#: The reference server's output limit in these tests (as the embedded target's): small, so
#: that the eviction cases of 6.4 and 6.5 take seconds.
OUTPUT_LIMIT = 8 * 1024 * 1024


def target_for(address: str, token: str | None = TOKEN) -> Target:
    return Target(
        address=address,
        token=token,
        retention=RETENTION,
        cleanup_interval=CLEANUP_INTERVAL,
        max_output_bytes=OUTPUT_LIMIT,
        max_execs_per_container=MAX_EXECS_PER_CONTAINER,
    )


@contextlib.asynccontextmanager
async def reference(**settings: Any) -> AsyncIterator[Target]:
    """The reference server with the suite's short retention, and the suite's view of it.

    ``settings`` override the server's settings only: the suite keeps believing retention 2 s,
    sweep 0.5 s and the token (that is how the misconfigured servers break a clause)."""
    config: dict[str, Any] = {
        "retention": RETENTION,
        "cleanup_interval": CLEANUP_INTERVAL,
        "token": TOKEN,
        "limits": Limits(
            max_output_bytes=OUTPUT_LIMIT, max_execs_per_container=MAX_EXECS_PER_CONTAINER
        ),
    }
    config.update(settings)
    async with serve(**config) as server:
        yield target_for(server.address)


@dataclass
class SessionState:
    """What a proxy knows of one proxied Session."""

    start: wire.Start | None = None
    key: tuple[str, str] = ("", "")
    call: grpc.aio.StreamStreamCall[wire.SessionRequest, wire.SessionResponse] | None = None
    context: _Ctx | None = None
    exited: bool = False
    readies: int = 0
    replaying: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class MangleProxy:
    """Forwards every RPC to ``upstream``; override the hooks to break one clause."""

    def __init__(self, upstream: wire.ExecStub) -> None:
        self.upstream = upstream
        self.sessions: dict[tuple[str, str], list[SessionState]] = {}

    # -- hooks ----------------------------------------------------------------------------

    def first_request(self, state: SessionState, request: wire.SessionRequest) -> None:
        """Called with the first request, before it is forwarded (abort by raising)."""

    def session_responses(
        self, state: SessionState, response: wire.SessionResponse
    ) -> Iterable[wire.SessionResponse]:
        return (response,)

    def session_end(self, state: SessionState) -> Iterable[wire.SessionResponse]:
        return ()

    def idle_after(self, state: SessionState) -> float | None:
        """Seconds without an upstream message after which :meth:`idle` is called."""
        return None

    def idle(self, state: SessionState) -> Iterable[wire.SessionResponse]:
        return ()

    def session_left(self, state: SessionState) -> None:
        """The downstream client left (cancel, deadline, disconnect) before the end."""

    def lifecycle_events(
        self, state: dict[str, Any], event: wire.ContainerLifecycleEvent
    ) -> Iterable[wire.ContainerLifecycleEvent]:
        return (event,)

    def status_response(
        self, response: wire.ContainerStatusResponse
    ) -> wire.ContainerStatusResponse:
        return response

    # -- forwarding -----------------------------------------------------------------------

    @staticmethod
    def _metadata(context: _Ctx) -> tuple[tuple[str, str], ...]:
        return tuple(
            (key, value if isinstance(value, str) else value.decode())
            for key, value in context.invocation_metadata() or ()
            if key == "authorization"
        )

    async def Session(
        self, request_iterator: AsyncIterator[wire.SessionRequest], context: _Ctx
    ) -> AsyncIterator[wire.SessionResponse]:
        state = SessionState(context=context)
        failure: list[tuple[grpc.StatusCode, str]] = []
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is not None:
            try:
                self.first_request(state, first)
            except AbortWith as abort:
                await context.abort(abort.code, abort.details)
            if first.start is not None:
                state.start = first.start
                state.key = (first.start.container_id, first.start.exec_id)
                self.sessions.setdefault(state.key, []).append(state)
        call = await self._open_upstream(first, self._metadata(context))
        state.call = call

        async def pump() -> None:
            async for request in requests:
                await call.write(request)
            await call.done_writing()

        pump_task = asyncio.create_task(pump())
        queue: asyncio.Queue[wire.SessionResponse | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while True:
                    response = await call.read()
                    if not isinstance(response, wire.SessionResponse):
                        break
                    await queue.put(response)
            except grpc.aio.AioRpcError as error:
                failure.append((error.code(), error.details() or ""))
            except asyncio.CancelledError:
                if not failure:
                    failure.append((grpc.StatusCode.CANCELLED, "the upstream call was cancelled"))
            await queue.put(None)

        read_task = asyncio.create_task(read())
        ended = False
        try:
            while True:
                idle = self.idle_after(state)
                try:
                    if idle is None:
                        response = await queue.get()
                    else:
                        response = await asyncio.wait_for(queue.get(), idle)
                except TimeoutError:
                    for out in self.idle(state):
                        yield out
                    continue
                if response is None:
                    break
                kind, _ = betterproto2.which_one_of(response, "msg")
                if kind == "ready":
                    state.readies += 1
                if kind == "exit":
                    state.exited = True
                for out in self.session_responses(state, response):
                    yield out
            if not failure:
                for out in self.session_end(state):
                    yield out
            ended = True
        finally:
            if not ended:
                self.session_left(state)
            for task in (pump_task, read_task):
                task.cancel()
            call.cancel()
            for task in (pump_task, read_task):
                with contextlib.suppress(BaseException):
                    await task
            if state.key in self.sessions and state in self.sessions[state.key]:
                self.sessions[state.key].remove(state)
        if failure:
            await context.abort(*failure[0])

    async def _open_upstream(
        self, first: wire.SessionRequest | None, metadata: tuple[tuple[str, str], ...]
    ) -> grpc.aio.StreamStreamCall[wire.SessionRequest, wire.SessionResponse]:
        """The upstream Session, with the client's first request written.  When that write
        fails, the reference server ended the call before reading it (a refused token), and
        grpc.aio may have put ``INTERNAL "Internal error from Core"`` in place of its status
        for good (grpc/grpc#36066).  Forwarding that would blame the server for grpc, so the
        call is opened again to learn the status, as the client library does; and since on a
        loaded machine the race can be lost time after time, each new call first gives the
        refusal longer to come before the request is written (a server reads it first)."""
        for attempt in range(_HIDDEN_STATUS_TRIES):
            call = self.upstream.Session(metadata=metadata)
            if first is None:
                break
            if attempt:
                ended = asyncio.Event()
                call.add_done_callback(lambda _, ended=ended: ended.set())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25 * attempt):
                        await ended.wait()
                if call.done():
                    break  # refused before the request: its read gives the status
            try:
                await call.write(first)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                if isinstance(error, grpc.aio.AioRpcError) and _status_hidden_by_write(error):
                    continue
            break
        return call

    async def ContainerLifecycle(
        self, request: wire.ContainerLifecycleRequest, context: _Ctx
    ) -> AsyncIterator[wire.ContainerLifecycleEvent]:
        call = self.upstream.ContainerLifecycle(request, metadata=self._metadata(context))
        state: dict[str, Any] = {}
        try:
            metadata = await call.initial_metadata()
            await context.send_initial_metadata(tuple(metadata or ()))
            while True:
                event = await call.read()
                if not isinstance(event, wire.ContainerLifecycleEvent):
                    break
                for out in self.lifecycle_events(state, event):
                    yield out
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")
        finally:
            call.cancel()

    async def _unary(self, context: _Ctx, call: Any) -> Any:
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")

    async def ContainerStatus(
        self, request: wire.ContainerStatusRequest, context: _Ctx
    ) -> wire.ContainerStatusResponse:
        response = await self._unary(
            context, self.upstream.ContainerStatus(request, metadata=self._metadata(context))
        )
        return self.status_response(response)

    async def ContainerPause(
        self, request: wire.ContainerControlRequest, context: _Ctx
    ) -> wire.ContainerControlResponse:
        result: wire.ContainerControlResponse = await self._unary(
            context, self.upstream.ContainerPause(request, metadata=self._metadata(context))
        )
        return result

    async def ContainerResume(
        self, request: wire.ContainerControlRequest, context: _Ctx
    ) -> wire.ContainerControlResponse:
        result: wire.ContainerControlResponse = await self._unary(
            context, self.upstream.ContainerResume(request, metadata=self._metadata(context))
        )
        return result

    async def ContainerSignal(
        self, request: wire.ContainerSignalRequest, context: _Ctx
    ) -> wire.ContainerControlResponse:
        result: wire.ContainerControlResponse = await self._unary(
            context, self.upstream.ContainerSignal(request, metadata=self._metadata(context))
        )
        return result


class AbortWith(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@contextlib.asynccontextmanager
async def proxied(
    make: Callable[[wire.ExecStub], MangleProxy],
    *,
    tls: tuple[bytes, bytes] | None = None,
    **settings: Any,
) -> AsyncIterator[Target]:
    """A broken server: ``make(upstream)`` in front of a reference server (served with TLS
    when ``tls`` gives a PEM key and certificate)."""
    async with (
        reference(**settings) as upstream,
        grpc.aio.insecure_channel(upstream.address, options=_OPTIONS) as channel,
    ):
        server = grpc.aio.server(options=_OPTIONS)
        wire.add_ExecServicer_to_server(make(wire.ExecStub(channel)), server)
        if tls is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials([tls])
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        try:
            yield target_for(f"127.0.0.1:{port}")
        finally:
            await server.stop(0.5)


def chunk_of(response: wire.SessionResponse) -> wire.OutputChunk | None:
    return response.output_chunk


class SessionOnly(MangleProxy):
    """A partial server: Session only; every other RPC answers UNIMPLEMENTED, as the
    servicer base class that grpcio's generated code gives a server does."""

    @staticmethod
    async def _unimplemented(context: _Ctx) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")

    async def ContainerLifecycle(  # type: ignore[override]
        self, request: wire.ContainerLifecycleRequest, context: _Ctx
    ) -> AsyncIterator[wire.ContainerLifecycleEvent]:
        await self._unimplemented(context)
        yield wire.ContainerLifecycleEvent()  # never reached: makes this a generator

    async def ContainerStatus(
        self, request: wire.ContainerStatusRequest, context: _Ctx
    ) -> wire.ContainerStatusResponse:
        result: wire.ContainerStatusResponse = await self._unimplemented(context)
        return result

    async def ContainerPause(
        self, request: wire.ContainerControlRequest, context: _Ctx
    ) -> wire.ContainerControlResponse:
        result: wire.ContainerControlResponse = await self._unimplemented(context)
        return result

    async def ContainerResume(
        self, request: wire.ContainerControlRequest, context: _Ctx
    ) -> wire.ContainerControlResponse:
        result: wire.ContainerControlResponse = await self._unimplemented(context)
        return result

    async def ContainerSignal(
        self, request: wire.ContainerSignalRequest, context: _Ctx
    ) -> wire.ContainerControlResponse:
        result: wire.ContainerControlResponse = await self._unimplemented(context)
        return result
