"""The grpc.aio glue: the ``dagger.exec.Exec`` servicer over the registry and the runner.

Thin on purpose: the rules live in the sans-IO core.  Each handler runs inside the one error
boundary (``_Boundary``), which turns the core's :class:`ExecError` into a status code through
one table (``STATUS_OF``), a malformed request into INVALID_ARGUMENT, and anything else into
``UNKNOWN "Internal Server Error"`` with a log line (PROTOCOL 14.1), and counts the call.
Inside it, a handler checks the token and turns the request into calls on the core.

A ``Session`` is a :class:`~._session.SessionFlow` (the session's rules: start first, create
or attach, ready, replay up to the second ready, gaps, exit last, stdin and resize); the
glue feeds it the client's requests, read apart by a task of their own, performs what it
decides (spawning, stdin, resize), and writes the bytes it says are due, waiting on the
exec's log when nothing is.  Each client reads the log at its own cursor, so a client that
does not read delays nobody (PROTOCOL 6.6).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import itertools
import logging
import os
import signal as signal_module
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import betterproto2
import grpc
import grpc.aio

from execstream import wire

from . import _session
from ._errors import ErrorCode, ExecError
from ._lifecycle import LifecycleFlow, Sent
from ._log import MAX_CHUNK
from ._metrics import ServerMetrics
from ._registry import ExecRecord, Registry, validate_id
from ._runner import ExecRunner
from ._session import SessionFlow
from ._state import ExecState

__all__ = ["STATUS_OF", "ExecService", "parse_signal"]

log = logging.getLogger("execstream.server")

STATUS_OF: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INTERNAL: grpc.StatusCode.UNKNOWN,
}

#: How many bytes of output one client's writer takes from the log per wake-up.
_READ_BATCH = 16 * MAX_CHUNK

_Ctx = grpc.aio.ServicerContext[Any, Any]
_R = TypeVar("_R")


def parse_signal(name: str) -> int:
    """PROTOCOL 10.3: a signal name with or without ``SIG``, any case."""
    bare = name.strip().upper().removeprefix("SIG")
    if not bare or bare.startswith("_"):
        raise ExecError(ErrorCode.INVALID_ARGUMENT, f"unknown signal {name!r}")
    try:
        return int(signal_module.Signals["SIG" + bare])
    except KeyError:
        raise ExecError(ErrorCode.INVALID_ARGUMENT, f"unknown signal {name!r}") from None


_INTERNAL = ExecError(ErrorCode.INTERNAL, "Internal Server Error")
_SHUTTING_DOWN = ExecError(ErrorCode.UNAVAILABLE, "server shutting down")
#: How the end of a call reaches its handler when the client went away (cancel, deadline).
_GONE = (asyncio.CancelledError, GeneratorExit)


class _Boundary:
    """The one error boundary, around every RPC (PROTOCOL 2.2, 2.3, 14.1): an
    :class:`ExecError` ends the call with its status from ``STATUS_OF``, a malformed request
    with INVALID_ARGUMENT (PROTOCOL 2.5), anything else with ``UNKNOWN "Internal Server
    Error"`` and one log line; a fault ends this call, never the server.  The call is counted
    once, with its status (CANCELLED when the client went away)."""

    __slots__ = ("_context", "_method", "_metrics", "_started")

    def __init__(self, method: str, context: _Ctx, metrics: ServerMetrics) -> None:
        self._method = method
        self._context = context
        self._metrics = metrics
        self._started = 0.0

    async def __aenter__(self) -> None:
        self._started = time.monotonic()

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: object
    ) -> None:
        if error is None:
            self._count("OK")
            return
        if isinstance(error, ExecError):
            failure = error
        elif isinstance(error, wire.MalformedMessage):
            failure = ExecError(ErrorCode.INVALID_ARGUMENT, str(error))
        elif isinstance(error, Exception):
            log.error("internal error in %s", self._method, exc_info=error)
            failure = _INTERNAL
        else:  # the client went away (CancelledError, GeneratorExit), or the server stops
            self._count("CANCELLED" if isinstance(error, _GONE) else "UNKNOWN")
            return
        status = STATUS_OF[failure.code]
        self._count(status.name)
        await self._context.abort(status, failure.message)

    def _count(self, code: str) -> None:
        self._metrics.rpc(self._method, code, time.monotonic() - self._started)


def render(message: _session.Ready | _session.Exit) -> bytes:
    """The wire bytes of a message the session flow decided to send."""
    if isinstance(message, _session.Exit):
        return bytes(wire.SessionResponse(exit=message.code))
    size = message.terminal_size
    return bytes(
        wire.SessionResponse(
            ready=wire.Ready(
                session_id=message.session_id,
                terminal_size=wire.Resize(width=size[0], height=size[1]) if size else None,
                replay_complete=message.replay_complete,
                next_sequence=message.next_sequence,
            )
        )
    )


def client_event(request: wire.SessionRequest) -> _session.ClientEvent:
    """A client's request as the session flow's event."""
    field, value = betterproto2.which_one_of(request, "msg")
    if field == "start" and isinstance(value, wire.Start):
        size = value.terminal_size
        return _session.Start(
            container_id=value.container_id,
            exec_id=value.exec_id,
            command=value.command,
            env=value.env,
            working_dir=value.working_dir,
            tty=value.tty,
            terminal_size=(size.width, size.height) if size is not None else None,
            session_id=value.session_id,
            replay_from_sequence=value.replay_from_sequence,
            close_stdin=value.close_stdin,
        )
    if field == "stdin" and isinstance(value, bytes):
        return _session.Stdin(data=value)
    if field == "resize" and isinstance(value, wire.Resize):
        return _session.Resize(width=value.width, height=value.height)
    return _session.EmptyMessage()


async def _perform(action: _session.Action | None) -> None:
    """What the session flow decided, done to the exec (PROTOCOL 7)."""
    if isinstance(action, _session.WriteStdin):
        with contextlib.suppress(ExecError):  # the process exited meanwhile: discarded
            await action.controls.write_stdin(action.data)
    elif isinstance(action, _session.CloseStdin):
        action.controls.close_stdin()
    elif isinstance(action, _session.ResizeTerminal):
        action.controls.resize(action.width, action.height)


class ExecService:
    """Implements :class:`execstream.wire.ExecServicer`."""

    def __init__(
        self,
        registry: Registry,
        runner: ExecRunner | None,
        *,
        token: str | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.registry = registry
        self.runner = runner
        self.metrics = metrics or ServerMetrics(registry)
        self._token = token.encode() if token else None
        self._session_ids = itertools.count(1)
        self._session_prefix = os.urandom(4).hex()
        self._closing = False
        self._wakes: set[asyncio.Event] = set()  # lifecycle subscribers'
        self._sessions: dict[SessionFlow, asyncio.Event] = {}

    def begin_shutdown(self) -> None:
        """PROTOCOL 13.2: every open stream ends with UNAVAILABLE at its next step."""
        self._closing = True
        for flow, wake in list(self._sessions.items()):
            flow.fail(_SHUTTING_DOWN)
            wake.set()
        for wake in list(self._wakes):
            wake.set()

    # -- shared -------------------------------------------------------------------------

    def _authorize(self, context: _Ctx) -> None:
        """PROTOCOL 12.1: Bearer or Basic(any user, token), compared in constant time."""
        if self._token is None:
            return
        offered = b""
        headers = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if len(headers) > 1:  # PROTOCOL 12.2: which one counts would be anybody's guess
            raise ExecError(
                ErrorCode.UNAUTHENTICATED,
                f"{len(headers)} authorization headers: send exactly one",
            )
        for value in headers:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, credential = text.strip().partition(" ")
            if scheme.lower() == "bearer":
                offered = credential.strip().encode()
            elif scheme.lower() == "basic":
                try:
                    decoded = base64.b64decode(credential.strip(), validate=True)
                except ValueError:
                    decoded = b""
                offered = decoded.partition(b":")[2]
        if not hmac.compare_digest(offered, self._token):
            raise ExecError(
                ErrorCode.UNAUTHENTICATED,
                "missing or wrong token: send 'authorization: Bearer <token>' metadata",
            )

    def _admit(self, context: _Ctx) -> None:
        self._authorize(context)
        self._check_live()

    async def _unary(self, method: str, context: _Ctx, call: Callable[[], Awaitable[_R]]) -> _R:
        async with _Boundary(method, context, self.metrics):
            self._admit(context)
            return await call()

    def _check_live(self) -> None:
        """PROTOCOL 13.2."""
        if self._closing:
            raise _SHUTTING_DOWN

    # -- Session ------------------------------------------------------------------------

    async def Session(
        self,
        request_iterator: AsyncIterator[wire.SessionRequest],
        context: grpc.aio.ServicerContext[wire.SessionRequest, wire.SessionResponse],
    ) -> AsyncIterator[wire.SessionResponse | bytes]:
        async with _Boundary("Session", context, self.metrics):
            self._admit(context)
            flow = SessionFlow(
                self.registry,
                creates=self.runner is not None,
                new_session_id=self._new_session_id,
                render=render,
                observer=self.metrics,
            )
            wake = asyncio.Event()
            self._sessions[flow] = wake
            try:
                requests = aiter(request_iterator)
                try:
                    first: _session.ClientEvent = client_event(await anext(requests))
                except StopAsyncIteration:
                    first = _session.HalfClose()
                action = flow.receive(first)
                if isinstance(action, _session.CreateExec):
                    await _perform(flow.created(await self._create(action.start)))
                async for response in self._stream(flow, wake, requests):
                    yield response
            finally:
                del self._sessions[flow]
                flow.close()

    def _new_session_id(self) -> str:
        return f"{self._session_prefix}-{next(self._session_ids)}"

    async def _create(self, start: _session.Start) -> ExecRecord:
        """PROTOCOL 3.2: what the flow decided to create, spawned by the runner."""
        spawning = time.monotonic()
        record = await self._runner().create(
            start.container_id,
            start.exec_id,
            start.command,
            env=start.env,
            working_dir=start.working_dir,
            tty=start.tty,
            terminal_size=start.terminal_size,
        )
        self.metrics.spawned(time.monotonic() - spawning)
        return record

    async def _stream(
        self,
        flow: SessionFlow,
        wake: asyncio.Event,
        requests: AsyncIterator[wire.SessionRequest],
    ) -> AsyncIterator[bytes]:
        """Write what the flow says is due, and wait for the exec's log when it says so;
        the client's requests are read meanwhile, apart, so that a client that does not read
        can still be heard (and one that does not write is still sent everything)."""
        assert flow.record is not None
        log_ = flow.record.log
        log_.add_listener(wake.set)
        reader = asyncio.create_task(self._read_requests(flow, requests, wake))
        try:
            while not flow.finished:
                wake.clear()
                messages = flow.next_messages(_READ_BATCH)
                for message in messages:
                    yield message
                if not messages and flow.waiting:
                    await wake.wait()
        finally:
            log_.remove_listener(wake.set)
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    @staticmethod
    async def _read_requests(
        flow: SessionFlow, requests: AsyncIterator[wire.SessionRequest], wake: asyncio.Event
    ) -> None:
        """The client's messages after start (PROTOCOL 7), judged by the flow; whatever ends
        them ends the session, through the writer and its error boundary."""
        try:
            async for request in requests:
                await _perform(flow.receive(client_event(request)))
            flow.receive(_session.HalfClose())
        except Exception as error:
            flow.fail(error)
            wake.set()

    # -- lifecycle ----------------------------------------------------------------------

    async def ContainerLifecycle(
        self,
        request: wire.ContainerLifecycleRequest,
        context: grpc.aio.ServicerContext[
            wire.ContainerLifecycleRequest, wire.ContainerLifecycleEvent
        ],
    ) -> AsyncIterator[wire.ContainerLifecycleEvent]:
        async with _Boundary("ContainerLifecycle", context, self.metrics):
            self._admit(context)
            wake = asyncio.Event()
            flow = LifecycleFlow(
                self.registry,
                request.container_id,
                request.exec_id,
                request.replay_from_sequence,
                wake.set,
            )
            self._wakes.add(wake)
            try:
                last = str(flow.last_sequence)
                await context.send_initial_metadata((("execstream-last-sequence", last),))
                while True:
                    self._check_live()
                    wake.clear()
                    sent = flow.next_events()
                    for event in sent:
                        yield _event_message(event)
                    if not sent and flow.waiting and not self._closing:
                        await wake.wait()
            finally:
                self._wakes.discard(wake)
                flow.close()

    # -- status and control -------------------------------------------------------------

    async def ContainerStatus(
        self,
        request: wire.ContainerStatusRequest,
        context: grpc.aio.ServicerContext[
            wire.ContainerStatusRequest, wire.ContainerStatusResponse
        ],
    ) -> wire.ContainerStatusResponse:
        # PROTOCOL 9.1: answered at once from the registry, never waiting for the exec.
        def status() -> wire.ContainerStatusResponse:
            if request.exec_id:
                validate_id("exec_id", request.exec_id)
            container = self.registry.container(request.container_id)
            finished: ExecRecord | None
            if request.exec_id:
                record = self.registry.get(request.container_id, request.exec_id)
                state, started, finished = record.state, record.started_at_ns, record
            else:
                state = container.state
                first = container.first_started()
                started = first.started_at_ns if first else 0
                finished = container.last_exited()
            # PROTOCOL 9.3: exit code and finish time exactly when exited.
            exited = finished if state is ExecState.EXITED else None
            return wire.ContainerStatusResponse(
                container_id=request.container_id,
                exec_id=request.exec_id,
                status=state.value,
                exit_code=exited.exit_code if exited else None,
                started_at=started,
                finished_at=exited.finished_at_ns if exited else None,
                resource_usage=(
                    self._usage(request.container_id, request.exec_id)
                    if request.include_resource_usage
                    else None
                ),
                exec_ids=list(container.execs),
            )

        return await self._unary("ContainerStatus", context, _sync(status))

    def _usage(self, container_id: str, exec_id: str) -> wire.ResourceUsage:
        if self.runner is None:
            return wire.ResourceUsage()
        sample = self.runner.usage(container_id, exec_id)
        return wire.ResourceUsage(
            cpu_percent=sample.cpu_percent,
            memory_bytes=sample.memory_bytes,
            memory_limit=sample.memory_limit,
            io_read_bytes=sample.io_read_bytes,
            io_write_bytes=sample.io_write_bytes,
        )

    def _runner(self) -> ExecRunner:
        if self.runner is None:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, "this server does not control processes")
        return self.runner

    async def ContainerPause(
        self,
        request: wire.ContainerControlRequest,
        context: grpc.aio.ServicerContext[
            wire.ContainerControlRequest, wire.ContainerControlResponse
        ],
    ) -> wire.ContainerControlResponse:
        async def pause() -> wire.ContainerControlResponse:
            await self._runner().pause(self.registry.container(request.container_id))
            return wire.ContainerControlResponse(success=True, message="paused")

        return await self._unary("ContainerPause", context, pause)

    async def ContainerResume(
        self,
        request: wire.ContainerControlRequest,
        context: grpc.aio.ServicerContext[
            wire.ContainerControlRequest, wire.ContainerControlResponse
        ],
    ) -> wire.ContainerControlResponse:
        async def resume() -> wire.ContainerControlResponse:
            await self._runner().resume(self.registry.container(request.container_id))
            return wire.ContainerControlResponse(success=True, message="resumed")

        return await self._unary("ContainerResume", context, resume)

    async def ContainerSignal(
        self,
        request: wire.ContainerSignalRequest,
        context: grpc.aio.ServicerContext[
            wire.ContainerSignalRequest, wire.ContainerControlResponse
        ],
    ) -> wire.ContainerControlResponse:
        def send() -> wire.ContainerControlResponse:
            if request.exec_id:
                validate_id("exec_id", request.exec_id)
            container = self.registry.container(request.container_id)
            if request.exec_id:
                self.registry.get(request.container_id, request.exec_id)
            signum = parse_signal(request.signal)
            self._runner().signal(container, signum, request.exec_id)
            name = signal_module.Signals(signum).name
            return wire.ContainerControlResponse(success=True, message=f"sent {name}")

        return await self._unary("ContainerSignal", context, _sync(send))


def _sync(call: Callable[[], _R]) -> Callable[[], Awaitable[_R]]:
    async def run() -> _R:
        return call()

    return run


def _event_message(sent: Sent) -> wire.ContainerLifecycleEvent:
    event = sent.event
    return wire.ContainerLifecycleEvent(
        container_id=event.container_id,
        exec_id=event.exec_id,
        event_type=event.event_type,
        status=event.status,
        timestamp=event.timestamp_ns,
        exit_code=event.exit_code,
        message=event.message,
        sequence=event.sequence,
        is_replay=sent.is_replay,
        gap_before=sent.gap_before,
    )
