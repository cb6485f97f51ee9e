"""The asynchronous client: :class:`AsyncExecClient` and the lifecycle :class:`EventStream`.

Each method is one RPC, with the server's failures raised as :class:`ExecStreamError`
subclasses.  ``run`` and ``attach`` return an :class:`Exec` (see ``_exec`` for its reader,
its bounded buffer and how it resumes); ``events`` returns an :class:`EventStream`, which
resumes a broken subscription the same way, from the last event sequence it handed out.

``timeout`` parameters are gRPC deadlines, sent to the server with the call (hence
``noqa: ASYNC109``: ``asyncio.timeout`` would only stop waiting locally).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import grpc
import grpc.aio

from execstream import wire

from ._connection import DEFAULT_TARGET, ChannelOption, Connection, RetryPolicy
from ._errors import ExecStreamError, ProtocolError, error_from_rpc
from ._events import LifecycleEvent, Status
from ._exec import Exec, resumable

__all__ = ["AsyncExecClient", "EventStream"]

#: PROTOCOL 8.4: the header that says where a new subscription starts.
LAST_SEQUENCE_HEADER = "execstream-last-sequence"


class AsyncExecClient:
    """A connection to an execstream server, for asyncio.

    ``target`` is ``HOST:PORT`` or ``unix:PATH``.  ``token`` is sent as ``authorization:
    Bearer <token>`` on every call.  ``tls`` (implied by ``ca_file``) uses TLS with the
    system's roots or the PEM file ``ca_file``; ``cert_file`` and ``key_file`` (PEM, implying
    TLS) present a client certificate to a server that requires one (mTLS).  ``timeout``
    (seconds) bounds each unary call unless the call passes its own; streams have no
    deadline unless given one.
    ``keepalive_time`` (None: off) and ``keepalive_timeout`` make a dead server noticed while
    a call is open.  ``retry`` bounds how a broken stream is resumed.  Use ``async with``,
    or call :meth:`aclose`; the channel is opened on first use in the running loop.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        timeout: float | None = 30.0,
        keepalive_time: float | None = 30.0,
        keepalive_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        client_id: str = "execstream-python",
        options: Sequence[ChannelOption] = (),
    ) -> None:
        self._conn = Connection(
            target,
            token=token,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            timeout=timeout,
            keepalive_time=keepalive_time,
            keepalive_timeout=keepalive_timeout,
            retry=retry if retry is not None else RetryPolicy(),
            client_id=client_id,
            options=options,
        )
        self._streams: weakref.WeakSet[Exec | EventStream] = weakref.WeakSet()

    @property
    def target(self) -> str:
        return self._conn.target

    # -- Session -------------------------------------------------------------------------

    async def run(
        self,
        container_id: str,
        exec_id: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        working_dir: str = "",
        tty: bool = False,
        terminal_size: tuple[int, int] | None = None,
        close_stdin: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Exec:
        """Create the exec and run ``command`` (an argv list, no shell) in the container.

        Returns once the server answered ``Ready``: a refusal (``AlreadyExists``,
        ``InvalidArgument``...) is raised here.  The first session is not resumed: whether
        a create that broke in flight happened cannot be known.  A TTY starts at
        ``terminal_size`` (columns, rows), 80x24 if not given (PROTOCOL 7.3).
        ``close_stdin``: the exec starts with its stdin closed, for a caller that sends no
        input and may leave at once (an EOF sent later is lost if the session ends before
        the server read it; PROTOCOL 7.5).
        """
        if isinstance(command, str) or not command:
            raise ValueError("command must be a non-empty list of arguments, e.g. ['ls', '-l']")
        start = wire.Start(
            container_id=container_id,
            exec_id=exec_id,
            command=list(command),
            env=dict(env or {}),
            working_dir=working_dir,
            tty=tty,
            terminal_size=(
                wire.Resize(width=terminal_size[0], height=terminal_size[1])
                if terminal_size is not None
                else None
            ),
            client_id=self._conn.client_id,
            close_stdin=close_stdin,
        )
        return await self._session(container_id, exec_id, start, 0, timeout)

    async def attach(
        self,
        container_id: str,
        exec_id: str,
        *,
        from_sequence: int = 0,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Exec:
        """Follow an existing exec: its retained output from ``from_sequence`` (0: from the
        start), then live output, then its exit (PROTOCOL 6, 11.1)."""
        if from_sequence < 0:
            raise ValueError(f"from_sequence must be >= 0, got {from_sequence}")
        start = wire.Start(
            container_id=container_id,
            exec_id=exec_id,
            replay_from_sequence=from_sequence,
            client_id=self._conn.client_id,
        )
        return await self._session(container_id, exec_id, start, from_sequence, timeout)

    async def _session(
        self,
        container_id: str,
        exec_id: str,
        start: wire.Start,
        from_sequence: int,
        timeout: float | None,  # noqa: ASYNC109
    ) -> Exec:
        session = Exec(
            self._conn, container_id, exec_id, from_sequence=from_sequence, timeout=timeout
        )
        await session._begin(start)
        self._streams.add(session)
        return session

    # -- unary calls ---------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float | None:
        return self._conn.timeout if timeout is None else timeout

    async def status(
        self,
        container_id: str,
        exec_id: str | None = None,
        *,
        resources: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Status:
        """The status of a container, or of one of its execs (PROTOCOL 9)."""
        request = wire.ContainerStatusRequest(
            container_id=container_id,
            exec_id=exec_id or "",
            include_resource_usage=resources,
        )
        try:
            response = await self._conn.stub.ContainerStatus(
                request, timeout=self._timeout(timeout), metadata=self._conn.metadata
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        return Status.from_wire(response)

    async def pause(self, container_id: str, *, timeout: float | None = None) -> str:  # noqa: ASYNC109
        """Stop every process of the container (PROTOCOL 10.1); returns the server's message."""
        request = wire.ContainerControlRequest(container_id=container_id)
        return await self._control(
            self._conn.stub.ContainerPause(
                request, timeout=self._timeout(timeout), metadata=self._conn.metadata
            )
        )

    async def resume(self, container_id: str, *, timeout: float | None = None) -> str:  # noqa: ASYNC109
        """Let a paused container run again (PROTOCOL 10.2); returns the server's message."""
        request = wire.ContainerControlRequest(container_id=container_id)
        return await self._control(
            self._conn.stub.ContainerResume(
                request, timeout=self._timeout(timeout), metadata=self._conn.metadata
            )
        )

    async def signal(
        self,
        container_id: str,
        name: str,
        exec_id: str | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> str:
        """Send signal ``name`` (``TERM``, ``SIGINT``, ``kill``...) to every process of the
        container, or of one exec (PROTOCOL 10.3); returns the server's message."""
        request = wire.ContainerSignalRequest(
            container_id=container_id, signal=name, exec_id=exec_id or ""
        )
        return await self._control(
            self._conn.stub.ContainerSignal(
                request, timeout=self._timeout(timeout), metadata=self._conn.metadata
            )
        )

    @staticmethod
    async def _control(
        call: Awaitable[wire.ContainerControlResponse],
    ) -> str:
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        if not response.success:  # PROTOCOL 2.2: a failure is never an OK status
            raise ProtocolError(
                f"the server answered OK with success=false: {response.message!r} (PROTOCOL 2.2)"
            )
        return response.message

    # -- lifecycle -----------------------------------------------------------------------

    def events(
        self,
        container_id: str | None = None,
        exec_id: str | None = None,
        *,
        from_sequence: int | None = None,
    ) -> EventStream:
        """Lifecycle events (PROTOCOL 8), of one container or exec, or of all.

        Without ``from_sequence``, only events after the subscription; with it, the
        retained events from that sequence first (0: the oldest).  Use ``async with`` to have
        the subscription in place before doing what you want to observe.
        """
        stream = EventStream(self._conn, container_id, exec_id, from_sequence)
        self._streams.add(stream)
        return stream

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Detach every open session and subscription, then close the channel."""
        for stream in list(self._streams):
            await stream.aclose()
        await self._conn.close()

    async def __aenter__(self) -> AsyncExecClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<AsyncExecClient {self._conn.target}>"


_LifecycleCall = grpc.aio.UnaryStreamCall[
    wire.ContainerLifecycleRequest, wire.ContainerLifecycleEvent
]


class EventStream:
    """``async for event in client.events(...)``: typed :class:`LifecycleEvent` values.

    ``async with`` (or ``await open()``) subscribes and returns once the subscription is in
    place (PROTOCOL 8.4), so nothing that happens afterwards is missed; iterating opens it
    otherwise.  A broken connection is resumed like an :class:`Exec`, from the last sequence
    handed out (or the subscription's starting point), without duplicates; events the server
    could not keep are counted in ``gap_before``.  One consumer at a time.
    """

    def __init__(
        self,
        connection: Connection,
        container_id: str | None,
        exec_id: str | None,
        from_sequence: int | None,
    ) -> None:
        if from_sequence is not None and from_sequence < 0:
            raise ValueError(f"from_sequence must be >= 0, got {from_sequence}")
        self._conn = connection
        self.container_id = container_id
        self.exec_id = exec_id
        self._from_sequence = from_sequence
        self._call: _LifecycleCall | None = None
        self._opened = False
        self._closed = False
        self._last: int | None = None
        self._lock = asyncio.Lock()
        #: PROTOCOL 8.4: the last event that happened before the subscription (None until
        #: open, or when the server does not send it).
        self.last_sequence: int | None = None
        #: How many times the subscription was resumed after a broken connection.
        self.resumes = 0

    async def open(self) -> None:
        """Subscribe; returns once the server has the subscription in place."""
        if not self._opened:
            await self._subscribe(self._from_sequence)
            self._opened = True
            if self._from_sequence is None:
                self._last = self.last_sequence  # None: a server that cannot be resumed
            else:
                self._last = max(self._from_sequence - 1, 0)

    async def _subscribe(self, replay_from: int | None) -> None:
        request = wire.ContainerLifecycleRequest(
            container_id=self.container_id or "",
            exec_id=self.exec_id or "",
            replay_from_sequence=replay_from,
        )
        call = self._conn.stub.ContainerLifecycle(request, metadata=self._conn.metadata)
        try:
            metadata = await call.initial_metadata()
            if call.done():  # a refusal arrives as a response with no headers of its own
                await call.read()
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        except BaseException:
            call.cancel()
            raise
        for key, value in metadata or ():
            if key == LAST_SEQUENCE_HEADER:
                text = value.decode() if isinstance(value, bytes) else value
                self.last_sequence = int(text)
        self._call = call

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> LifecycleEvent:
        async with self._lock:
            if self._closed:
                raise StopAsyncIteration
            await self.open()
            while True:
                call = self._call
                assert call is not None
                try:
                    message = await call.read()
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._closed and not (task is not None and task.cancelling()):
                        raise StopAsyncIteration from None  # aclose() from another task
                    raise
                except grpc.aio.AioRpcError as error:
                    failure = error_from_rpc(error)
                    if not resumable(failure) or self._last is None:
                        raise failure from None
                    await self._resume(failure)
                    continue
                if not isinstance(message, wire.ContainerLifecycleEvent):
                    self._closed = True
                    raise StopAsyncIteration
                if self._last is not None and message.sequence <= self._last:
                    continue  # sent again by a resume's replay
                self._last = message.sequence
                return LifecycleEvent.from_wire(message)

    async def _resume(self, cause: ExecStreamError) -> None:
        assert self._last is not None
        if self._call is not None:
            self._call.cancel()
        attempts = 0
        for delay in self._conn.retry.delays():
            attempts += 1
            await asyncio.sleep(delay)
            try:
                await self._subscribe(self._last + 1)
            except ExecStreamError as error:
                if not resumable(error):
                    raise
                cause = error
                continue
            self.resumes += 1
            return
        raise type(cause)(
            f"{cause.message} (the stream broke; gave up after {attempts} attempts to resume)",
            cause.code,
        )

    async def aclose(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> EventStream:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
