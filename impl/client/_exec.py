"""One exec's Session seen from the client: typed events, stdin, resize, and resume.

Theory of operation.  An :class:`Exec` is opened by ``run`` or ``attach``: the first
``Start`` is sent and its ``Ready`` awaited, so errors such as ``AlreadyExists`` surface at
the call.  From then on one reader task owns the stream.  It turns each ``SessionResponse``
into typed events (:class:`Output`, :class:`Gap`, :class:`Exit`) and puts them into a small
bounded buffer that the caller's ``async for`` takes from.  Because the buffer is bounded,
a caller that stops reading stops the reader and gRPC flow control pushes back; the server
(whose exec never waits for clients, PROTOCOL 6.6) keeps the output and serves it when the
caller reads again (6.7), so memory stays bounded and nothing is lost for being slow.  Only
output the server's output limit evicted before it was read is missing, reported as a
:class:`Gap` and counted in :attr:`Exec.missed`.

Resume.  The reader remembers the last sequence it accounted for.  When the stream fails with
``UNAVAILABLE`` (a broken connection, a restarted proxy...) but not with the server's
"shutting down" (PROTOCOL 13.2), and not with any other status, it attaches again with
``replay_from_sequence = last + 1`` after the :class:`RetryPolicy`'s backoff, at most
``max_attempts`` times in a row.  The new session's ``Ready`` messages are consumed
internally; chunks at or below ``last`` are dropped (no duplicate); a chunk above ``last + 1``
is preceded by a :class:`Gap` for the chunks in between (no hidden hole).  The caller's
iterator simply continues.  Chunks replayed by the resume carry ``is_replay = True``.

A write racing with the server's end of the call makes grpc.aio replace the server's status
and drop unread messages (grpc/grpc#36066, ``INTERNAL "Internal error from Core"``); the
reader recognises that status and resumes, so the replay recovers the lost output and exit.

Stdin data is never resent.  ``write_stdin`` goes to the session open at the time of the
call; while the connection is down, or when the write meets the break, it raises
:class:`Unavailable`, and bytes written just before a break may or may not have reached the
process.  Resending them could duplicate input, so the caller decides.  ``close_stdin`` and
``resize`` are idempotent, so they are sent again on the resumed session.  Errors a message
causes on the server (stdin over the limit, resize on a non-TTY exec) end the session with a
status (PROTOCOL 7), raised by the iteration and by :meth:`Exec.wait`.

``wait()`` returns the exit code whether or not anyone iterates.  While it waits, a full
buffer no longer stops the reader when nobody takes events (never since the start, or not
for ``STALL_GRACE`` = 1 s): the oldest events are dropped and reported to a later iteration
as one :class:`Gap`.  So ``wait()`` never hangs on unread output (``break`` out of the loop,
then ``wait()``, costs at most that second), and an iterator running alongside it loses
nothing unless it stalls for a second on one event, and then it is told.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass
from types import TracebackType

import betterproto2
import grpc
import grpc.aio

from execstream import wire

from ._connection import Connection
from ._errors import (
    Cancelled,
    DeadlineExceeded,
    ExecStreamError,
    ProtocolError,
    ServerError,
    ServerShuttingDown,
    Unauthenticated,
    Unavailable,
    error_from_rpc,
)
from ._events import ExecEvent, Exit, Gap, Output, StreamName

__all__ = ["Exec"]

#: Events held between the reader and the caller: at most 64 chunks of at most 64 KiB.
BUFFER_EVENTS = 64
#: While wait() runs, how long a full buffer waits for the caller to take an event before
#: it counts the caller as gone and drops events (reported as a Gap).
STALL_GRACE = 1.0

_SessionCall = grpc.aio.StreamStreamCall[wire.SessionRequest, wire.SessionResponse]


def resumable(error: ExecStreamError) -> bool:
    """A broken connection, not a server that is going away nor a status it chose."""
    return isinstance(error, Unavailable) and not isinstance(error, ServerShuttingDown)


def _status_hidden_by_write(error: grpc.aio.AioRpcError) -> Unavailable | None:
    """grpc.aio replaces a call's status with ``INTERNAL "Internal error from Core"`` when a
    write fails because the server has just ended the call (grpc/grpc#36066), and the
    messages not yet read are lost with it.  The server's status is then unknown: the exec
    may well have exited.  Reported as a broken stream, so that the resume finds out (a new
    attach replays what was lost, then the exit)."""
    if error.code() is not grpc.StatusCode.INTERNAL:
        return None
    if "SendMessageOperation" not in (error.debug_error_string() or ""):
        return None
    return Unavailable(
        "the stream ended while a message was being sent, and grpc hid how "
        f"({error.details()}, grpc/grpc#36066)"
    )


#: How many times an open is tried when grpc hides why the server refused it.
_HIDDEN_STATUS_TRIES = 3


class _StartNotSent(Exception):
    """The write of ``start`` failed: the server ended the call without reading it."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


@dataclass(frozen=True, slots=True)
class _End:
    """The last item of the buffer: the stream failed with ``error``, or was closed."""

    error: ExecStreamError | None


_Item = Output | Gap | Exit | _End


class _EventBuffer:
    """A bounded queue of events between the reader and the caller.

    Normally a full buffer makes the reader wait.  While :meth:`Exec.wait` runs, a full
    buffer instead drops its oldest events, counted into one pending :class:`Gap` that the
    next reader gets first, but only when nobody is taking events: at once if nothing was
    ever taken, else after :data:`STALL_GRACE` seconds without a take.
    """

    def __init__(self, limit: int) -> None:
        self._items: collections.deque[_Item] = collections.deque()
        self._limit = limit
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._draining = 0
        self._ever_taken = False
        self._stalled = False
        self._missed = 0
        self._missed_before = 0

    async def put(self, item: _Item) -> None:
        # Exit and _End come last and are never dropped nor held back.
        while not isinstance(item, Exit | _End) and len(self._items) >= self._limit:
            if self._draining and (self._stalled or not self._ever_taken):
                self._drop_oldest()
                continue
            self._writable.clear()
            if not self._draining:
                await self._writable.wait()
                continue
            try:
                async with asyncio.timeout(STALL_GRACE):
                    await self._writable.wait()
            except TimeoutError:
                self._stalled = True
        self._items.append(item)
        self._readable.set()

    def end(self, item: _End) -> None:
        self._items.append(item)
        self._readable.set()

    def _drop_oldest(self) -> None:
        oldest = self._items.popleft()
        if isinstance(oldest, Output):
            self._missed += 1
            self._missed_before = oldest.sequence + 1
        elif isinstance(oldest, Gap):
            self._missed += oldest.missed
            self._missed_before = oldest.before_sequence

    def start_draining(self) -> None:
        self._draining += 1
        self._writable.set()

    def stop_draining(self) -> None:
        self._draining -= 1

    def at_end(self) -> bool:
        """The next item is the end of the stream (no pending gap before it)."""
        return not self._missed and bool(self._items) and isinstance(self._items[0], _End)

    def get_nowait(self) -> _Item | None:
        self._ever_taken, self._stalled = True, False
        if self._missed:
            missed, before = self._missed, self._missed_before
            if self._items and isinstance(self._items[0], Gap):
                server_gap = self._items.popleft()
                assert isinstance(server_gap, Gap)
                missed, before = missed + server_gap.missed, server_gap.before_sequence
            self._missed = 0
            self._writable.set()
            return Gap(missed, before)
        if not self._items:
            return None
        item = self._items.popleft()
        self._writable.set()
        return item

    async def get(self) -> _Item:
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            self._readable.clear()
            await self._readable.wait()


class Exec:
    """A Session with one exec: ``async for event in exec``, ``await exec.wait()``.

    Made by :meth:`AsyncExecClient.run` and :meth:`AsyncExecClient.attach`.  Iterating
    yields :class:`Output`, :class:`Gap` and finally :class:`Exit`; a failure is raised as an
    :class:`ExecStreamError`.  One consumer at a time.  ``async with exec:`` (or
    :meth:`aclose`) detaches this client; the exec itself keeps running (PROTOCOL 3.5).
    """

    def __init__(
        self,
        connection: Connection,
        container_id: str,
        exec_id: str,
        *,
        from_sequence: int = 0,
        timeout: float | None = None,
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self._conn = connection
        loop = asyncio.get_running_loop()
        self._deadline = None if timeout is None else loop.time() + timeout
        #: The last sequence delivered or reported in a gap; the resume point is one more.
        self._last = max(from_sequence - 1, 0)
        #: Chunks the server said this client will never get (PROTOCOL 6.4).
        self._missed = 0
        self._buffer = _EventBuffer(BUFFER_EVENTS)
        self._call: _SessionCall | None = None
        #: Set when the reader is done with the current call (exit, failure or resume).
        self._call_over = asyncio.Event()
        #: Cleared while a resume is in progress.
        self._settled = asyncio.Event()
        self._settled.set()
        self._reader: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._exit_code: int | None = None
        self._error: ExecStreamError | None = None
        self._iteration_over = False
        self._send_lock = asyncio.Lock()
        self._session_id = ""
        self._terminal_size: tuple[int, int] | None = None
        #: How many times the stream was resumed after a broken connection.
        self.resumes = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        """The id the server gave the current session (a resume opens a new session)."""
        return self._session_id

    @property
    def terminal_size(self) -> tuple[int, int] | None:
        """(width, height) from the last ``Ready`` of a TTY exec; None for a non-TTY exec."""
        return self._terminal_size

    @property
    def exit_code(self) -> int | None:
        """The exit code once the exit was received, else None."""
        return self._exit_code

    @property
    def last_sequence(self) -> int:
        """The last output sequence delivered or reported as missed."""
        return self._last

    @property
    def missed(self) -> int:
        """How many chunks of output this client will never get, because the server no longer
        had them (its output limit evicted them, PROTOCOL 6.4, 6.5): 0 means that every chunk
        from the start of this session reached the client.  Chunks that :meth:`wait` dropped
        because nobody iterated are not counted: they were delivered, and left unread."""
        return self._missed

    # -- opening and the reader ----------------------------------------------------------

    async def _begin(self, start: wire.Start) -> None:
        """Open the first session (errors are raised here) and start the reader."""
        await self._open(start)
        self._reader = asyncio.create_task(
            self._read(), name=f"execstream-session-{self.container_id}/{self.exec_id}"
        )

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        left = self._deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise DeadlineExceeded("the exec's timeout passed")
        return left

    async def _open(self, start: wire.Start) -> None:
        """Send ``start`` and wait for the ``Ready``.

        When the write of ``start`` itself fails, the server ended the call before reading it
        (a token refused, a shutdown): nothing was created, and grpc.aio may have hidden the
        status (grpc/grpc#36066), so the open is simply tried again to learn it.
        """
        for _ in range(_HIDDEN_STATUS_TRIES - 1):
            try:
                return await self._open_once(start)
            except _StartNotSent:
                continue
        try:
            return await self._open_once(start)
        except _StartNotSent as failure:
            refusal = await self._refusal(start)
            if refusal is not None:
                raise refusal from None
            raise ServerError(
                f"the server ended the call before reading start, and grpc hid why "
                f"({failure.details}, grpc/grpc#36066)"
            ) from None

    async def _refusal(self, start: wire.Start) -> ExecStreamError | None:
        """Why the server refused the call itself, when grpc hid it: a server ends a Session
        before reading ``start`` only for the token (PROTOCOL 12.1) or a shutdown (13.2), and
        a unary call with the same metadata is told which."""
        request = wire.ContainerStatusRequest(container_id=start.container_id)
        try:
            await self._conn.stub.ContainerStatus(
                request, timeout=self._remaining(), metadata=self._conn.metadata
            )
        except grpc.aio.AioRpcError as error:
            refusal = error_from_rpc(error)
            if isinstance(refusal, Unauthenticated | Unavailable):
                return refusal
        return None

    async def _open_once(self, start: wire.Start) -> None:
        call = self._conn.stub.Session(timeout=self._remaining(), metadata=self._conn.metadata)
        try:
            try:
                await call.write(wire.SessionRequest(start=start))
            except grpc.aio.AioRpcError as error:
                if _status_hidden_by_write(error) is not None:
                    raise _StartNotSent(error.details() or "") from None
                raise
            response = await call.read()
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error) from None
        except BaseException:
            call.cancel()
            raise
        ready = response.ready if isinstance(response, wire.SessionResponse) else None
        if ready is None:
            call.cancel()
            raise ProtocolError("the server's first Session message was not ready (PROTOCOL 3.3)")
        self._call, self._call_over = call, asyncio.Event()
        self._on_ready(ready)

    def _on_ready(self, ready: wire.Ready) -> None:
        self._session_id = ready.session_id
        size = ready.terminal_size
        self._terminal_size = (size.width, size.height) if size is not None else None

    async def _read(self) -> None:
        try:
            while True:
                call = self._call
                assert call is not None
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as error:
                    failure = _status_hidden_by_write(error) or error_from_rpc(error)
                    if not resumable(failure):
                        raise failure from None
                    await self._resume(failure)
                    continue
                if not isinstance(response, wire.SessionResponse):
                    raise ProtocolError("the Session ended without exit (PROTOCOL 5.1)")
                if await self._deliver(response):
                    return
        except ExecStreamError as error:
            self._fail(error)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # aclose() stops the reader
            # grpc.aio raises this when the call was cancelled locally (the channel closed).
            self._fail(Cancelled("the client's channel was closed"))
        except Exception as error:  # a malformed message or a bug: reported, never swallowed
            self._fail(ProtocolError(f"could not read the Session: {error!r}"))
        finally:
            self._call_over.set()
        # After the exit the server ends the call with OK by itself; cancelling it here
        # would make a concurrent write_stdin fail instead of being discarded (7.1).
        if self._error is not None and self._call is not None:
            self._call.cancel()

    async def _deliver(self, response: wire.SessionResponse) -> bool:
        """Turn one message into events; True once the exit was delivered."""
        field, value = betterproto2.which_one_of(response, "msg")
        if isinstance(value, wire.OutputChunk):
            await self._chunk(value)
        elif isinstance(value, wire.Ready):
            self._on_ready(value)  # PROTOCOL 6.3: the end of replay; nothing to deliver
        elif field == "exit" and isinstance(value, int):
            self._exit_code = value
            self._finished.set()
            await self._buffer.put(Exit(value))
            return True
        elif field in ("stdout", "stderr") and isinstance(value, bytes):
            # Published, unsequenced output (PROTOCOL 4.1): passed on, cannot be resumed.
            stream: StreamName = "stdout" if field == "stdout" else "stderr"
            await self._buffer.put(Output(stream, 0, value, 0))
        return False

    async def _chunk(self, chunk: wire.OutputChunk) -> None:
        sequence = chunk.sequence
        if sequence <= self._last:
            if sequence == 0:
                raise ProtocolError("an output chunk without a sequence number (PROTOCOL 4.2)")
            return  # sent again by a resume's replay: already delivered
        if sequence > self._last + 1:  # PROTOCOL 6.4: missed chunks are reported
            self._missed += sequence - self._last - 1
            await self._buffer.put(Gap(sequence - self._last - 1, sequence))
        self._last = sequence
        stream: StreamName = "stdout" if chunk.stdout is not None else "stderr"
        data = chunk.stdout if chunk.stdout is not None else chunk.stderr or b""
        await self._buffer.put(Output(stream, sequence, data, chunk.timestamp, chunk.is_replay))

    async def _resume(self, cause: ExecStreamError) -> None:
        """Attach again from the sequence after the last one accounted for."""
        self._settled.clear()
        try:
            await self._reattach(cause)
        finally:
            self._settled.set()

    async def _reattach(self, cause: ExecStreamError) -> None:
        self._call_over.set()
        broken, self._call = self._call, None
        if broken is not None:
            broken.cancel()
        attempts = 0
        for delay in self._conn.retry.delays():
            attempts += 1
            remaining = self._remaining()
            await asyncio.sleep(delay if remaining is None else min(delay, remaining))
            start = wire.Start(
                container_id=self.container_id,
                exec_id=self.exec_id,
                replay_from_sequence=self._last + 1,
                client_id=self._conn.client_id,
            )
            try:
                await self._open(start)
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

    def _fail(self, error: ExecStreamError) -> None:
        if self._finished.is_set():
            return
        self._error = error
        self._finished.set()
        self._buffer.end(_End(error))

    # -- the caller's side ---------------------------------------------------------------

    def __aiter__(self) -> Exec:
        return self

    async def __anext__(self) -> ExecEvent:
        if self._iteration_over:
            raise StopAsyncIteration
        return self._hand_out(await self._buffer.get())

    def _hand_out(self, item: _Item) -> ExecEvent:
        if isinstance(item, _End):
            self._iteration_over = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        if isinstance(item, Exit):
            self._iteration_over = True
        return item

    async def _take(self, most: int) -> list[ExecEvent]:
        """At least one event and whatever else is ready, up to ``most``; [] at the end.
        A failure after some events is raised by the next call (for the sync bridge)."""
        try:
            events = [await self.__anext__()]
        except StopAsyncIteration:
            return []
        while len(events) < most and not self._iteration_over and not self._buffer.at_end():
            item = self._buffer.get_nowait()
            if item is None:
                break
            events.append(self._hand_out(item))
        return events

    async def wait(self) -> int:
        """The exit code; drains the output nobody reads meanwhile (reported as a Gap).

        Whether output was lost on the way is :attr:`missed` (non-zero: lost), so a caller
        that must have every byte checks it after the exit code."""
        if not self._finished.is_set():
            self._buffer.start_draining()
            try:
                await self._finished.wait()
            finally:
                self._buffer.stop_draining()
        if self._exit_code is not None:
            return self._exit_code
        assert self._error is not None
        raise self._error

    async def write_stdin(self, data: bytes) -> None:
        """Send bytes to the exec's stdin (PROTOCOL 7.1); ``b""`` sends nothing."""
        if data:
            await self._send(wire.SessionRequest(stdin=bytes(data)))

    async def close_stdin(self) -> None:
        """Close the exec's stdin: EOF, or the terminal's EOF character on a TTY (7.1).

        Unlike data, EOF can be sent twice without harm, so when the connection breaks
        meanwhile it is sent again on the resumed session."""
        await self._send_again_if_broken(wire.SessionRequest(stdin=b""))

    async def resize(self, width: int, height: int) -> None:
        """Set the terminal size of a TTY exec (7.3); a non-TTY exec ends this session with
        :class:`FailedPrecondition`, raised by the iteration and by :meth:`wait`.  Like EOF,
        a size can be sent twice: it is sent again on the resumed session if needed."""
        resize = wire.SessionRequest(resize=wire.Resize(width=width, height=height))
        await self._send_again_if_broken(resize)

    async def _send_again_if_broken(self, request: wire.SessionRequest) -> None:
        """For idempotent messages: one more try after a resume."""
        try:
            await self._send(request)
        except Unavailable as error:
            if isinstance(error, ServerShuttingDown):
                raise
            await self._until_settled()
            await self._send(request)

    async def _send(self, request: wire.SessionRequest) -> None:
        if self._exit_code is not None:
            return  # PROTOCOL 7.1: input after the exit is discarded
        if self._error is not None:
            raise self._error
        call, over = self._call, self._call_over
        if call is None:
            raise Unavailable(
                "the connection broke and the session is being resumed: not sent "
                "(stdin is never resent, see execstream.client)"
            )
        async with self._send_lock:
            try:
                await call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                await self._send_failed(over, error)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # grpc.aio raises this for a call cancelled locally: aclose() ran meanwhile.
                raise Cancelled("this session was closed by the client") from None

    async def _until_settled(self, over: asyncio.Event | None = None) -> None:
        """Until the reader has left the call ``over`` belongs to and no resume runs."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30.0):
                if over is not None:
                    await over.wait()
                await self._settled.wait()

    async def _send_failed(self, over: asyncio.Event, error: Exception) -> None:
        """A write fails once its call is over, with a status grpc makes up ("Internal error
        from Core"); what counts is how the reader saw the call end."""
        await self._until_settled(over)
        if self._exit_code is not None:
            return  # PROTOCOL 7.1: input that arrives after the exit is discarded
        if self._error is not None:
            raise self._error
        raise Unavailable(
            f"the session broke before this could be sent ({error}); it is not resent"
        ) from None

    async def aclose(self) -> None:
        """Detach: end this client's session; the exec keeps running (PROTOCOL 3.5)."""
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if self._call is not None:
            self._call.cancel()
        if not self._finished.is_set():
            self._error = Cancelled("the client closed this session before the exec's exit")
            self._finished.set()
            self._buffer.end(_End(None))

    async def __aenter__(self) -> Exec:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"<Exec {self.container_id}/{self.exec_id} session={self._session_id!r} "
            f"last_sequence={self._last} exit_code={self._exit_code}>"
        )
