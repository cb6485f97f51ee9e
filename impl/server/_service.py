"""The grpc.aio glue: the ``dagger.exec.Exec`` servicer over the registry and the runner.

Thin on purpose.  Each handler checks the token, turns the request into calls on the core,
and turns the core's :class:`ExecError` into a status code through one table
(``STATUS_OF``); anything else is logged and becomes ``UNKNOWN "Internal Server Error"``
(PROTOCOL 14.1).  Each Session client is served by its own handler reading the exec's log at
its own cursor, so a client that does not read delays nobody (PROTOCOL 6.6).
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn, TypeVar

import betterproto2
import grpc
import grpc.aio

from execstream import wire

from ._encoding import encode_chunk
from ._errors import ErrorCode, ExecError
from ._log import MAX_CHUNK, Chunk, Cursor
from ._metrics import ServerMetrics
from ._registry import EventSubscription, ExecRecord, LifecycleRecord, Registry, validate_id
from ._runner import ExecRunner
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


async def _abort(context: _Ctx, error: ExecError) -> NoReturn:
    await context.abort(STATUS_OF[error.code], error.message)
    raise AssertionError("unreachable: abort raises")


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
        self._wakes: set[asyncio.Event] = set()

    def begin_shutdown(self) -> None:
        """PROTOCOL 13.2: every open stream ends with UNAVAILABLE at its next step."""
        self._closing = True
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
        with self._observed(method) as outcome:
            try:
                self._admit(context)
                return await call()
            except ExecError as error:
                failure = error
            # PROTOCOL 2.3: the one error boundary; a fault ends this call, never the server.
            except Exception:
                log.exception("internal error in %s", method)
                failure = _INTERNAL
            outcome.append(STATUS_OF[failure.code].name)
            await _abort(context, failure)

    @contextlib.contextmanager
    def _observed(self, method: str) -> Iterator[list[str]]:
        """Count the RPC and its duration once it ends; the body appends its status code
        (none appended: OK, or CANCELLED when the client went away)."""
        outcome: list[str] = []
        started = time.monotonic()
        try:
            yield outcome
        except (asyncio.CancelledError, GeneratorExit):
            outcome.append("CANCELLED")
            raise
        finally:
            code = outcome[0] if outcome else "OK"
            self.metrics.rpc(method, code, time.monotonic() - started)

    def _check_live(self) -> None:
        """PROTOCOL 13.2."""
        if self._closing:
            raise ExecError(ErrorCode.UNAVAILABLE, "server shutting down")

    # -- Session ------------------------------------------------------------------------

    async def Session(
        self,
        request_iterator: AsyncIterator[wire.SessionRequest],
        context: grpc.aio.ServicerContext[wire.SessionRequest, wire.SessionResponse],
    ) -> AsyncIterator[wire.SessionResponse | bytes]:
        record: ExecRecord | None = None
        failure: ExecError | None = None
        with self._observed("Session") as outcome:
            try:
                self._admit(context)
                start = await self._first_start(request_iterator)
                record, cursor = await self._open(start)
                # PROTOCOL 1.3, 3.3: a client of the published fields only gets a session_id.
                session_id = start.session_id or f"{self._session_prefix}-{next(self._session_ids)}"
                async for response in self._stream(record, cursor, session_id, request_iterator):
                    yield response
            except ExecError as error:
                failure = error
            except wire.MalformedMessage as error:  # PROTOCOL 2.5
                failure = ExecError(ErrorCode.INVALID_ARGUMENT, str(error))
            except Exception:
                log.exception("internal error in Session")
                failure = _INTERNAL
            finally:
                if record is not None:
                    self.registry.detach(record)
            if failure is not None:
                outcome.append(STATUS_OF[failure.code].name)
                await _abort(context, failure)

    async def _first_start(
        self, request_iterator: AsyncIterator[wire.SessionRequest]
    ) -> wire.Start:
        """PROTOCOL 3.1."""
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            raise ExecError(
                ErrorCode.INVALID_ARGUMENT, "the stream closed before its first message, start"
            ) from None
        field, value = betterproto2.which_one_of(first, "msg")
        if field != "start" or not isinstance(value, wire.Start):
            raise ExecError(
                ErrorCode.INVALID_ARGUMENT,
                f"the first message must be start, got {field or 'an empty message'}",
            )
        return value

    async def _open(self, start: wire.Start) -> tuple[ExecRecord, Cursor[Chunk]]:
        """PROTOCOL 3.2: create or attach; then a cursor for this client (6.1)."""
        validate_id("container_id", start.container_id)
        validate_id("exec_id", start.exec_id)
        if not start.command:
            record = self.registry.get(start.container_id, start.exec_id)
            return record, self.registry.attach(record, start.replay_from_sequence)
        if self.runner is None:
            raise ExecError(
                ErrorCode.NOT_FOUND,
                f"this server does not create execs: exec {start.exec_id!r} not found",
            )
        if start.replay_from_sequence > 1:
            raise ExecError(
                ErrorCode.OUT_OF_RANGE,
                f"replay_from_sequence {start.replay_from_sequence} is past the next "
                "sequence 1 of a new exec",
            )
        if self.registry.find(start.container_id, start.exec_id) is not None:
            raise ExecError(
                ErrorCode.ALREADY_EXISTS,
                f"exec {start.exec_id!r} already exists in container {start.container_id!r}",
            )
        spawning = time.monotonic()
        record = await self.runner.create(
            start.container_id,
            start.exec_id,
            start.command,
            env=start.env,
            working_dir=start.working_dir,
            tty=start.tty,
            terminal_size=(
                (start.terminal_size.width, start.terminal_size.height)
                if start.terminal_size is not None
                else None
            ),
        )
        self.metrics.spawned(time.monotonic() - spawning)
        return record, self.registry.attach(record, 0)

    async def _stream(
        self,
        record: ExecRecord,
        cursor: Cursor[Chunk],
        session_id: str,
        request_iterator: AsyncIterator[wire.SessionRequest],
    ) -> AsyncIterator[wire.SessionResponse | bytes]:
        """PROTOCOL 3.3-6.4 for one client: Ready, replay, Ready, live, exit.  Chunks go
        out as the bytes encoded once for every client (``_encoding``)."""
        wake = asyncio.Event()
        failure: list[ExecError] = []
        log_ = record.log
        log_.add_listener(wake.set)
        self._wakes.add(wake)
        reader = asyncio.create_task(self._read_requests(record, request_iterator, failure, wake))
        try:
            boundary = log_.next_sequence  # PROTOCOL 6.3: N, fixed at attach
            replaying = cursor.position < boundary
            yield self._ready(record, session_id, not replaying, boundary)
            gap = 0
            while True:
                if failure:
                    raise failure[0]
                self._check_live()
                if replaying and cursor.position >= boundary:
                    replaying = False
                    yield self._ready(record, session_id, True, boundary)
                if not cursor.caught_up:
                    # PROTOCOL 6.7: a client behind the memory cache reads from storage.
                    cached = max(cursor.position, log_.first_sequence) >= log_.cached_from
                    read = cursor.read(_READ_BATCH, boundary if replaying else None)
                    gap += read.gap_before
                    for chunk in read.items:
                        if gap:
                            self.metrics.gap(gap)
                        # PROTOCOL 6.2: chunks below the sequence fixed at attach are replay.
                        yield encode_chunk(chunk, chunk.sequence < boundary, gap)
                        gap = 0
                    self.metrics.streamed(
                        len(read.items),
                        sum(len(c.data) for c in read.items),
                        "memory" if cached else "storage",
                    )
                    continue
                if log_.closed:
                    assert log_.exit_code is not None
                    yield wire.SessionResponse(exit=log_.exit_code)  # PROTOCOL 5.1
                    return
                wake.clear()
                if cursor.caught_up and not log_.closed and not failure and not self._closing:
                    await wake.wait()
        finally:
            self._wakes.discard(wake)
            log_.remove_listener(wake.set)
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    @staticmethod
    def _ready(
        record: ExecRecord, session_id: str, complete: bool, boundary: int
    ) -> wire.SessionResponse:
        size = record.terminal_size
        return wire.SessionResponse(
            ready=wire.Ready(
                session_id=session_id,
                terminal_size=wire.Resize(width=size[0], height=size[1]) if size else None,
                replay_complete=complete,
                next_sequence=boundary,
            )
        )

    async def _read_requests(
        self,
        record: ExecRecord,
        request_iterator: AsyncIterator[wire.SessionRequest],
        failure: list[ExecError],
        wake: asyncio.Event,
    ) -> None:
        """The client's messages after start: stdin and resize (PROTOCOL 7)."""
        try:
            async for request in request_iterator:
                field, value = betterproto2.which_one_of(request, "msg")
                if field == "stdin" and isinstance(value, bytes):
                    await self._stdin(record, value)
                elif field == "resize" and isinstance(value, wire.Resize):
                    self._resize(record, value)
                elif field == "start":
                    raise ExecError(ErrorCode.INVALID_ARGUMENT, "start sent twice in a session")
                else:
                    raise ExecError(ErrorCode.INVALID_ARGUMENT, "a message with no member set")
        except ExecError as error:
            failure.append(error)
            wake.set()
        except wire.MalformedMessage as error:  # PROTOCOL 2.5
            failure.append(ExecError(ErrorCode.INVALID_ARGUMENT, str(error)))
            wake.set()

    async def _stdin(self, record: ExecRecord, data: bytes) -> None:
        limit = self.registry.limits.stdin_bytes
        if len(data) > limit:
            raise ExecError(
                ErrorCode.INVALID_ARGUMENT,
                f"stdin message of {len(data)} bytes is over the limit of {limit} bytes",
            )
        if record.stdin_closed and data:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, "stdin was already closed (EOF sent)")
        controls = record.controls
        if controls is None:  # exited, or never started by us: PROTOCOL 7.1 discards it
            return
        if not data:
            record.stdin_closed = True
            controls.close_stdin()
            return
        with contextlib.suppress(ExecError):  # the process exited meanwhile: discarded
            await controls.write_stdin(data)

    def _resize(self, record: ExecRecord, size: wire.Resize) -> None:
        if not record.tty:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, "resize on an exec without a TTY")
        if size.width <= 0 or size.height <= 0:
            raise ExecError(
                ErrorCode.INVALID_ARGUMENT,
                f"terminal size must be positive, got {size.width}x{size.height}",
            )
        record.terminal_size = (size.width, size.height)
        if record.controls is not None:
            record.controls.resize(size.width, size.height)

    # -- lifecycle ----------------------------------------------------------------------

    async def ContainerLifecycle(
        self,
        request: wire.ContainerLifecycleRequest,
        context: grpc.aio.ServicerContext[
            wire.ContainerLifecycleRequest, wire.ContainerLifecycleEvent
        ],
    ) -> AsyncIterator[wire.ContainerLifecycleEvent]:
        failure: ExecError | None = None
        with self._observed("ContainerLifecycle") as outcome:
            try:
                self._admit(context)
                wake = asyncio.Event()
                cursor, last, subscription = self._subscribe(request, wake)
                try:
                    async for event in self._follow(cursor, last, subscription, wake, context):
                        yield event
                finally:
                    self.registry.events.unsubscribe(subscription)
                    self.registry.unsubscribe()
            except ExecError as error:
                failure = error
            except Exception:
                log.exception("internal error in ContainerLifecycle")
                failure = _INTERNAL
            if failure is not None:
                outcome.append(STATUS_OF[failure.code].name)
                await _abort(context, failure)

    def _subscribe(
        self, request: wire.ContainerLifecycleRequest, wake: asyncio.Event
    ) -> tuple[Cursor[LifecycleRecord], int, EventSubscription]:
        """PROTOCOL 8.3, 8.4: check the filter, count the subscriber, fix the cut: the
        history up to ``last`` is read with the cursor, what follows comes through the
        subscription, made in the same step."""
        if request.exec_id and not request.container_id:
            raise ExecError(ErrorCode.INVALID_ARGUMENT, "exec_id needs container_id")
        if request.container_id:
            validate_id("container_id", request.container_id)
        if request.exec_id:
            validate_id("exec_id", request.exec_id)
        events = self.registry.events
        last = events.next_sequence - 1
        start = last + 1
        if request.replay_from_sequence is not None:
            start = max(request.replay_from_sequence, 1)
        cursor = Cursor(events, start)
        self.registry.subscribe()
        subscription = events.subscribe(request.container_id, request.exec_id, wake.set)
        return cursor, last, subscription

    async def _follow(
        self,
        cursor: Cursor[LifecycleRecord],
        last: int,
        subscription: EventSubscription,
        wake: asyncio.Event,
        context: _Ctx,
    ) -> AsyncIterator[wire.ContainerLifecycleEvent]:
        container_id, exec_id = subscription.scope
        self._wakes.add(wake)
        try:
            await context.send_initial_metadata((("execstream-last-sequence", str(last)),))
            gap = 0
            while not cursor.caught_up and cursor.position <= last:  # the replay (8.4)
                self._check_live()
                position = cursor.position
                read = cursor.read(until=last + 1)
                # PROTOCOL 8.5; evicted events past ``last`` are the subscription's, not lost
                gap += min(read.gap_before, last + 1 - position)
                for event in read.items:
                    if _matches(event, container_id, exec_id):
                        yield _event_message(event, True, gap)
                        gap = 0
            while True:  # live: only the matching events wake this subscriber
                self._check_live()
                wake.clear()
                events, dropped = subscription.take()
                gap += dropped  # PROTOCOL 8.5
                for event in events:
                    yield _event_message(event, False, gap)
                    gap = 0
                if not events and not self._closing:
                    await wake.wait()
        finally:
            self._wakes.discard(wake)

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


def _matches(event: LifecycleRecord, container_id: str, exec_id: str) -> bool:
    """PROTOCOL 8.3."""
    if container_id and event.container_id != container_id:
        return False
    return not exec_id or event.exec_id == exec_id


def _event_message(
    event: LifecycleRecord, is_replay: bool, gap: int
) -> wire.ContainerLifecycleEvent:
    return wire.ContainerLifecycleEvent(
        container_id=event.container_id,
        exec_id=event.exec_id,
        event_type=event.event_type,
        status=event.status,
        timestamp=event.timestamp_ns,
        exit_code=event.exit_code,
        message=event.message,
        sequence=event.sequence,
        is_replay=is_replay,
        gap_before=gap,
    )
