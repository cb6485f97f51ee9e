"""What a case works with: its own channel, fresh IDs, recorded streams, and cleanup.

Every case runs in a :class:`CaseContext`.  It opens its own channel to the target (so a case
that breaks a connection on purpose harms no other), names its containers and execs with fresh
unique IDs (so cases share a target and run concurrently), and at the end cancels every stream
it opened and kills every exec it left running — also when the case failed or timed out.

Streams are *recorded*, not interpreted: a :class:`SessionClient` keeps every message the
server sent, in order, and its final status; a :class:`Subscription` does the same for
lifecycle events.  Cases wait on them with :meth:`SessionClient.until`, which wakes on every
message (no polling, no fixed sleeps) and turns a bound that passes into a :class:`Failure`
that shows what the stream held.  Every request the case sends and every stream's outcome go
to the case's log, which the JSON report keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import betterproto2
import grpc
import grpc.aio

from execstream import wire

from ._case import Case, Failure
from ._target import Target

__all__ = [
    "WITHIN",
    "CaseContext",
    "Outcome",
    "SessionClient",
    "Subscription",
    "describe_chunks",
    "expect_code",
    "gather_all",
]

OK = grpc.StatusCode.OK
_T = TypeVar("_T")

#: Default bound for the server to finish something the case waits for.
WITHIN = 45.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a unary call ended: the status code and details, and the response if OK."""

    code: grpc.StatusCode
    details: str
    response: Any = None

    def __str__(self) -> str:
        if self.code is OK:
            return f"OK {_brief(self.response)}"
        return f"{self.code.name} {self.details!r}"


def expect_code(outcome: Outcome, code: grpc.StatusCode, what: str) -> None:
    """``what`` must end with status ``code``, and a failure must say what was wrong (2.2)."""
    if outcome.code is not code:
        raise Failure(f"{what} fails with {code.name}", f"{outcome}")
    if code is not OK and not outcome.details.strip():
        raise Failure(f"{what} fails with {code.name} and a message", "an empty message")


def _brief(message: Any, limit: int = 200) -> str:
    if message is None:
        return ""
    text = repr(message)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_chunks(chunks: Sequence[wire.OutputChunk]) -> str:
    """Chunks as runs: ``#1-#40 stdout 1.2 KiB, stderr 40 B; #43 (gap_before 2) ...``."""
    parts: list[str] = []
    run: list[wire.OutputChunk] = []

    def flush() -> None:
        if not run:
            return
        first, last = run[0], run[-1]
        out = sum(len(c.stdout or b"") for c in run)
        err = sum(len(c.stderr or b"") for c in run)
        span = f"#{first.sequence}" if first is last else f"#{first.sequence}-#{last.sequence}"
        flags = []
        if first.gap_before:
            flags.append(f"gap_before {first.gap_before}")
        if first.is_replay:
            flags.append("replay")
        note = f" ({', '.join(flags)})" if flags else ""
        parts.append(f"chunk{'s' if len(run) > 1 else ''} {span}{note}: {out} B out, {err} B err")
        run.clear()

    for chunk in chunks:
        if run and (
            chunk.sequence != run[-1].sequence + 1
            or chunk.gap_before
            or chunk.is_replay != run[-1].is_replay
        ):
            flush()
        run.append(chunk)
    flush()
    return "; ".join(parts)


class _Changes:
    """Wakes waiters whenever a recorded stream changes; :meth:`until` bounds the wait."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.done = False

    def notify(self) -> None:
        self._event.set()

    async def until(
        self, predicate: Callable[[], bool], what: str, within: float, seen: Callable[[], str]
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not predicate():
            if self.done:
                raise Failure(what, f"the stream ended first: {seen()}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Failure(f"{what} within {within:g} s", seen())
            self._event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)


class SessionClient:
    """One ``Session`` stream: the requests the case sends and every response, in order."""

    def __init__(
        self,
        ctx: CaseContext,
        call: grpc.aio.StreamStreamCall[wire.SessionRequest, wire.SessionResponse],
        label: str,
        start: wire.Start | None,
    ) -> None:
        self.ctx = ctx
        self.call = call
        self.label = label
        self.start = start
        self.readies: list[wire.Ready] = []
        self.chunks: list[wire.OutputChunk] = []
        #: Kinds in arrival order: ready, chunk, exit, stdout, stderr (published), empty.
        self.order: list[str] = []
        self.exit_code: int | None = None
        #: The final status; ``None`` while the stream is open.
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.stdout_bytes = 0
        self.send_errors: list[str] = []
        self._changes = _Changes()
        self._reader: asyncio.Task[None] | None = None

    # -- reading ------------------------------------------------------------------------

    def read_in_background(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_all(), name=f"read {self.label}")

    async def read_one(self, within: float = WITHIN) -> str:
        """Read one message in the foreground (for a client that then stops reading)."""
        try:
            response = await asyncio.wait_for(self.call.read(), within)
        except TimeoutError:
            raise Failure(f"a message within {within:g} s", self.describe()) from None
        except grpc.aio.AioRpcError as error:
            self._end(error.code(), error.details() or "")
            return "end"
        if not isinstance(response, wire.SessionResponse):  # grpc.aio.EOF
            self._end(OK, "")
            return "end"
        return self._record(response)

    async def _read_all(self) -> None:
        try:
            while True:
                response = await self.call.read()
                if not isinstance(response, wire.SessionResponse):  # grpc.aio.EOF
                    break
                self._record(response)
            self._end(OK, "")
        except grpc.aio.AioRpcError as error:
            self._end(error.code(), error.details() or "")
        except asyncio.CancelledError:
            self._end(grpc.StatusCode.CANCELLED, "cancelled by the suite")

    def _record(self, response: wire.SessionResponse) -> str:
        kind, value = betterproto2.which_one_of(response, "msg")
        if isinstance(value, wire.Ready):
            self.readies.append(value)
            kind = "ready"
        elif isinstance(value, wire.OutputChunk):
            self.chunks.append(value)
            self.stdout_bytes += len(value.stdout or b"")
            kind = "chunk"
        elif kind == "exit" and isinstance(value, int):
            self.exit_code = value
        elif not kind:
            kind = "empty"
        self.order.append(kind)
        self._changes.notify()
        return kind

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        if self.code is None:
            self.code, self.details = code, details
            self.ctx.log(f"<- {self.label}: {self.describe()}")
        self._changes.done = True
        self._changes.notify()

    # -- sending ------------------------------------------------------------------------

    async def send(self, request: wire.SessionRequest, note: str = "") -> bool:
        """Send one request; False (and noted) when the stream no longer takes requests."""
        kind, value = betterproto2.which_one_of(request, "msg")
        if isinstance(value, bytes):
            note = note or f"{len(value)} bytes"
        self.ctx.log(f"-> {self.label}: {kind or 'empty message'} {note}".rstrip())
        try:
            await self.call.write(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as error:
            self.send_errors.append(f"{type(error).__name__}: {error}")
            return False
        return True

    async def stdin(self, data: bytes) -> bool:
        return await self.send(wire.SessionRequest(stdin=data))

    async def resize(self, width: int, height: int) -> bool:
        return await self.send(
            wire.SessionRequest(resize=wire.Resize(width=width, height=height)),
            f"{width}x{height}",
        )

    async def half_close(self) -> None:
        self.ctx.log(f"-> {self.label}: half-close")
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.done_writing()

    def cancel(self) -> None:
        self.ctx.log(f"-> {self.label}: cancel")
        self.call.cancel()
        if self._reader is None:  # nobody reads to see the end: it ended here
            self._end(grpc.StatusCode.CANCELLED, "cancelled by the suite")

    # -- what came back -----------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.code is not None

    @property
    def status_lost(self) -> bool:
        """The server ended the call while the request was being sent, and grpc-python then
        reports ``INTERNAL "Internal error from Core"`` locally instead of the server's
        status (grpc.aio ``_write``): what the server said is unknown, not wrong."""
        return (
            self.code is grpc.StatusCode.INTERNAL
            and self.details == "Internal error from Core"
            and bool(self.send_errors)
        )

    @property
    def ok(self) -> bool:
        return self.code is OK

    def stream(self, name: str) -> bytes:
        return b"".join(getattr(c, name) or b"" for c in self.chunks)

    @property
    def stdout(self) -> bytes:
        return self.stream("stdout")

    @property
    def stderr(self) -> bytes:
        return self.stream("stderr")

    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    async def until(self, predicate: Callable[[], bool], what: str, within: float = WITHIN) -> None:
        await self._changes.until(predicate, f"{self.label}: {what}", within, self.describe)

    async def until_ready(self, within: float = WITHIN) -> wire.Ready:
        await self.until(lambda: bool(self.readies), "ready", within)
        return self.readies[0]

    async def until_ready_or_end(self, within: float = WITHIN) -> None:
        await self.until(lambda: bool(self.readies) or self.done, "ready, or an end", within)

    async def until_chunks(self, count: int, within: float = WITHIN) -> None:
        await self.until(lambda: len(self.chunks) >= count, f"{count} chunks", within)

    async def until_output(self, data: bytes, within: float = WITHIN) -> None:
        await self.until(lambda: data in self.stdout, f"stdout containing {data!r}", within=within)

    async def finished(self, within: float = WITHIN) -> SessionClient:
        """Wait for the stream to end (any status)."""
        await self._changes.until(
            lambda: self.done, f"{self.label}: the stream to end", within, self.describe
        )
        return self

    async def completed(self, within: float = WITHIN) -> SessionClient:
        """Wait for the stream to end, and require the normal end: exit, then OK (5.1)."""
        await self.finished(within)
        if not self.ok or self.exit_code is None:
            raise Failure(f"{self.label}: exit, then status OK", self.describe())
        return self

    def describe(self) -> str:
        parts: list[str] = []
        chunk_run: list[wire.OutputChunk] = []
        ready_index = chunk_index = 0
        for kind in self.order:
            if kind == "chunk":
                chunk_run.append(self.chunks[chunk_index])
                chunk_index += 1
                continue
            if chunk_run:
                parts.append(describe_chunks(chunk_run))
                chunk_run = []
            if kind == "ready":
                r = self.readies[ready_index]
                ready_index += 1
                size = (
                    f", terminal_size {r.terminal_size.width}x{r.terminal_size.height}"
                    if r.terminal_size is not None
                    else ""
                )
                parts.append(
                    f"ready(session_id {r.session_id!r}, replay_complete {r.replay_complete}, "
                    f"next_sequence {r.next_sequence}{size})"
                )
            elif kind == "exit":
                parts.append(f"exit {self.exit_code}")
            else:
                parts.append(f"{kind} message")
        if chunk_run:
            parts.append(describe_chunks(chunk_run))
        if self.code is None:
            parts.append("(still open)")
        else:
            end = self.code.name + (f" {self.details!r}" if self.details else "")
            parts.append(f"status {end}")
        if self.send_errors:
            parts.append(f"send errors: {self.send_errors[:2]}")
        text = "; ".join(parts) or "nothing"
        return text if len(text) < 1500 else text[:700] + " ... " + text[-700:]


class Subscription:
    """One ``ContainerLifecycle`` stream: its initial metadata and every event."""

    def __init__(
        self,
        ctx: CaseContext,
        call: grpc.aio.UnaryStreamCall[
            wire.ContainerLifecycleRequest, wire.ContainerLifecycleEvent
        ],
        label: str,
    ) -> None:
        self.ctx = ctx
        self.call = call
        self.label = label
        self.events: list[wire.ContainerLifecycleEvent] = []
        self.metadata: dict[str, str] | None = None
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self._changes = _Changes()
        self._reader: asyncio.Task[None] | None = None

    async def open(self, within: float = WITHIN) -> Subscription:
        """Wait for the response headers (8.4: sent once the subscription is in place)."""
        try:
            metadata = await asyncio.wait_for(self.call.initial_metadata(), within)
        except TimeoutError:
            raise Failure(f"{self.label}: response headers within {within:g} s", "none") from None
        except grpc.aio.AioRpcError as error:
            self._end(error.code(), error.details() or "")
            return self
        self.metadata = {
            str(key): value.decode() if isinstance(value, bytes) else str(value)
            for key, value in (metadata or ())
        }
        return self

    def read_in_background(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_all(), name=f"read {self.label}")

    @property
    def last_sequence(self) -> int:
        """``execstream-last-sequence`` of the headers (a Failure when missing, 8.4)."""
        value = (self.metadata or {}).get("execstream-last-sequence")
        if value is None or not value.isdigit():
            raise Failure(
                f"{self.label}: response headers with execstream-last-sequence (8.4)",
                f"headers {self.metadata!r}",
            )
        return int(value)

    async def _read_all(self) -> None:
        try:
            while True:
                event = await self.call.read()
                if not isinstance(event, wire.ContainerLifecycleEvent):  # grpc.aio.EOF
                    break
                self.events.append(event)
                self._changes.notify()
            self._end(OK, "")
        except grpc.aio.AioRpcError as error:
            self._end(error.code(), error.details() or "")
        except asyncio.CancelledError:
            self._end(grpc.StatusCode.CANCELLED, "cancelled by the suite")

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        if self.code is None:
            self.code, self.details = code, details
            self.ctx.log(f"<- {self.label}: {len(self.events)} events, status {code.name}")
        self._changes.done = True
        self._changes.notify()

    def of(self, container_id: str) -> list[wire.ContainerLifecycleEvent]:
        return [e for e in self.events if e.container_id == container_id]

    def kinds(self, container_id: str | None = None) -> list[tuple[str, str]]:
        return [
            (e.exec_id, e.event_type)
            for e in self.events
            if container_id is None or e.container_id == container_id
        ]

    async def until(self, predicate: Callable[[], bool], what: str, within: float = WITHIN) -> None:
        await self._changes.until(predicate, f"{self.label}: {what}", within, self.describe)

    async def until_event(
        self, container_id: str, exec_id: str, event_type: str, within: float = WITHIN
    ) -> wire.ContainerLifecycleEvent:
        def found() -> bool:
            return any(
                e.container_id == container_id
                and e.exec_id == exec_id
                and e.event_type == event_type
                for e in self.events
            )

        await self.until(found, f"a {event_type!r} event of {container_id}/{exec_id}", within)
        return next(
            e
            for e in self.events
            if e.container_id == container_id
            and e.exec_id == exec_id
            and e.event_type == event_type
        )

    def describe(self) -> str:
        shown = [
            f"#{e.sequence} {e.container_id}/{e.exec_id or '-'} {e.event_type}->{e.status}"
            + (" replay" if e.is_replay else "")
            + (f" gap_before {e.gap_before}" if e.gap_before else "")
            for e in self.events[-40:]
        ]
        more = f"{len(self.events) - 40} earlier events, " if len(self.events) > 40 else ""
        end = "open" if self.code is None else f"status {self.code.name} {self.details!r}"
        return f"{more}{shown}, {end}"

    def cancel(self) -> None:
        self.call.cancel()


class CaseContext:
    """The case's view of the target; ``async with`` opens and cleans up."""

    def __init__(self, target: Target, case: Case) -> None:
        self.target = target
        self.case = case
        self.lines: list[str] = []
        self._began = time.monotonic()
        self._channels: list[grpc.aio.Channel] = []
        self._sessions: list[SessionClient] = []
        self._subscriptions: list[Subscription] = []
        self._created: list[tuple[str, str]] = []
        self._paused: set[str] = set()
        self._labels = 0
        self.channel = self.new_channel()
        self.stub = wire.ExecStub(self.channel)

    async def __aenter__(self) -> CaseContext:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.close())

    def log(self, line: str) -> None:
        self.lines.append(f"{time.monotonic() - self._began:7.3f} {line}")

    # -- names --------------------------------------------------------------------------

    def container_id(self) -> str:
        """A fresh container ID, unique on the target (``cf-CLAUSE-RANDOM``)."""
        return f"cf-{self.case.clause}-{uuid.uuid4().hex[:12]}"

    @staticmethod
    def exec_id(stem: str = "x") -> str:
        return f"{stem}-{uuid.uuid4().hex[:8]}"

    def _label(self, stem: str) -> str:
        self._labels += 1
        return f"{stem}#{self._labels}"

    # -- channels and streams -----------------------------------------------------------

    def new_channel(self) -> grpc.aio.Channel:
        channel = self.target.channel()
        self._channels.append(channel)
        return channel

    def new_stub(self) -> tuple[wire.ExecStub, grpc.aio.Channel]:
        channel = self.new_channel()
        return wire.ExecStub(channel), channel

    @staticmethod
    def start_message(
        container_id: str, exec_id: str, command: Sequence[str] = (), **fields: Any
    ) -> wire.Start:
        return wire.Start(
            container_id=container_id, exec_id=exec_id, command=list(command), **fields
        )

    async def session(
        self,
        start: wire.Start | None,
        *,
        stub: wire.ExecStub | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        deadline: float | None = None,
        read: bool = True,
        label: str = "client",
    ) -> SessionClient:
        """Open a Session, send ``start`` (unless None) and read in the background.

        ``deadline`` is the call's gRPC deadline in seconds (default: the case's bound)."""
        call = (stub or self.stub).Session(
            None,
            metadata=self.target.metadata if metadata is None else tuple(metadata),
            timeout=deadline if deadline is not None else self.case.timeout + 30,
        )
        client = SessionClient(self, call, self._label(label), start)
        self._sessions.append(client)
        if start is not None:
            if start.command:
                self._created.append((start.container_id, start.exec_id))
            what = f"{start.container_id}/{start.exec_id}"
            detail = f" {list(start.command)!r}" if start.command else " (attach)"
            if start.replay_from_sequence:
                detail += f" replay_from_sequence {start.replay_from_sequence}"
            if start.tty:
                detail += " tty"
            await client.send(wire.SessionRequest(start=start), what + detail)
        if read:
            client.read_in_background()
        return client

    async def one_shot(
        self,
        start: wire.Start,
        *,
        metadata: Sequence[tuple[str, str]] | None = None,
        label: str = "client",
    ) -> SessionClient:
        """Send ``start``, half-close, and wait for the end.  For a request the server may
        refuse before reading it (a missing token): when the refusal raced the send and the
        status was lost (:attr:`SessionClient.status_lost`), try again."""
        for _ in range(5):
            client = await self.session(start, metadata=metadata, label=label)
            await client.half_close()
            await client.finished()
            if not client.status_lost:
                break
            self.log(f"   {client.label}: status lost to a send race, trying again")
        return client

    async def create(
        self,
        container_id: str,
        exec_id: str,
        command: Sequence[str],
        *,
        half_close: bool = False,
        read: bool = True,
        label: str = "creator",
        **fields: Any,
    ) -> SessionClient:
        """Create an exec; the client stays open (for stdin) unless ``half_close``."""
        start = self.start_message(container_id, exec_id, command, **fields)
        client = await self.session(start, read=read, label=label)
        if half_close:
            await client.half_close()
        return client

    async def run(
        self,
        container_id: str,
        exec_id: str,
        command: Sequence[str],
        *,
        within: float = WITHIN,
        **fields: Any,
    ) -> SessionClient:
        """Create an exec, half-close, and wait for the stream to end (any status)."""
        client = await self.create(
            container_id, exec_id, command, half_close=True, label="run", **fields
        )
        return await client.finished(within)

    async def attach(
        self,
        container_id: str,
        exec_id: str,
        *,
        replay_from: int = 0,
        half_close: bool = True,
        stub: wire.ExecStub | None = None,
        read: bool = True,
        deadline: float | None = None,
        label: str = "attach",
    ) -> SessionClient:
        start = self.start_message(container_id, exec_id, replay_from_sequence=replay_from)
        client = await self.session(start, stub=stub, read=read, deadline=deadline, label=label)
        if half_close:
            await client.half_close()
        return client

    async def subscribe(
        self,
        container_id: str = "",
        exec_id: str = "",
        *,
        replay_from: int | None = None,
        label: str = "subscriber",
        read: bool = True,
    ) -> Subscription:
        request = wire.ContainerLifecycleRequest(
            container_id=container_id, exec_id=exec_id, replay_from_sequence=replay_from
        )
        self.log(
            f"-> subscribe container {container_id!r} exec {exec_id!r} replay_from {replay_from}"
        )
        call = self.stub.ContainerLifecycle(
            request, metadata=self.target.metadata, timeout=self.case.timeout + 30
        )
        subscription = Subscription(self, call, self._label(label))
        self._subscriptions.append(subscription)
        await subscription.open()
        if read:
            subscription.read_in_background()
        return subscription

    # -- unary calls --------------------------------------------------------------------

    async def outcome(self, what: str, call: Awaitable[Any], within: float = WITHIN) -> Outcome:
        """Await a unary call; its status is recorded, not raised."""
        try:
            response = await asyncio.wait_for(call, within)
            result = Outcome(OK, "", response)
        except grpc.aio.AioRpcError as error:
            result = Outcome(error.code(), error.details() or "")
        except TimeoutError:
            raise Failure(f"{what} to answer within {within:g} s", "no answer") from None
        self.log(f"-> {what}: {result}")
        return result

    async def status_outcome(
        self, container_id: str, exec_id: str = "", *, usage: bool = False
    ) -> Outcome:
        request = wire.ContainerStatusRequest(
            container_id=container_id, exec_id=exec_id, include_resource_usage=usage
        )
        return await self.outcome(
            f"ContainerStatus {container_id}/{exec_id or '-'}{' usage' if usage else ''}",
            self.stub.ContainerStatus(request, metadata=self.target.metadata, timeout=WITHIN),
        )

    async def status(
        self, container_id: str, exec_id: str = "", *, usage: bool = False
    ) -> wire.ContainerStatusResponse:
        """ContainerStatus that must succeed."""
        result = await self.status_outcome(container_id, exec_id, usage=usage)
        expect_code(result, OK, f"ContainerStatus of {container_id}/{exec_id or '-'}")
        response: wire.ContainerStatusResponse = result.response
        return response

    async def pause(self, container_id: str) -> Outcome:
        result = await self.outcome(
            f"ContainerPause {container_id}",
            self.stub.ContainerPause(
                wire.ContainerControlRequest(container_id=container_id),
                metadata=self.target.metadata,
                timeout=WITHIN,
            ),
        )
        if result.code is OK:
            self._paused.add(container_id)
        return result

    async def resume(self, container_id: str) -> Outcome:
        result = await self.outcome(
            f"ContainerResume {container_id}",
            self.stub.ContainerResume(
                wire.ContainerControlRequest(container_id=container_id),
                metadata=self.target.metadata,
                timeout=WITHIN,
            ),
        )
        if result.code is OK:
            self._paused.discard(container_id)
        return result

    async def signal(self, container_id: str, name: str, exec_id: str = "") -> Outcome:
        return await self.outcome(
            f"ContainerSignal {container_id}/{exec_id or '-'} {name!r}",
            self.stub.ContainerSignal(
                wire.ContainerSignalRequest(
                    container_id=container_id, signal=name, exec_id=exec_id
                ),
                metadata=self.target.metadata,
                timeout=WITHIN,
            ),
        )

    async def wait_status(
        self,
        container_id: str,
        exec_id: str,
        predicate: Callable[[wire.ContainerStatusResponse], bool],
        what: str,
        within: float = 15.0,
    ) -> wire.ContainerStatusResponse:
        """Poll ContainerStatus until ``predicate`` holds (status has no stream to wait on)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        delay = 0.02
        while True:
            response = await self.status(container_id, exec_id)
            if predicate(response):
                return response
            if loop.time() > deadline:
                raise Failure(f"{what} within {within:g} s", _brief(response, 600))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    # -- cleanup ------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel every stream, kill every exec the case left running, close the channels."""
        for client in self._sessions:
            if not client.done:
                client.call.cancel()
        for subscription in self._subscriptions:
            subscription.call.cancel()
        readers = [c._reader for c in self._sessions if c._reader is not None]
        readers += [s._reader for s in self._subscriptions if s._reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._kill_leftovers(), 10)
        for channel in self._channels:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _kill_leftovers(self) -> None:
        metadata = self.target.metadata
        for container_id in list(self._paused):
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.ContainerResume(
                    wire.ContainerControlRequest(container_id=container_id),
                    metadata=metadata,
                    timeout=5,
                )
        exited = {
            (c.start.container_id, c.start.exec_id)
            for c in self._sessions
            if c.start is not None and c.exit_code is not None
        }
        for container_id, exec_id in self._created:
            if (container_id, exec_id) in exited:
                continue
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.stub.ContainerSignal(
                    wire.ContainerSignalRequest(
                        container_id=container_id, exec_id=exec_id, signal="KILL"
                    ),
                    metadata=metadata,
                    timeout=5,
                )


async def gather_all(*awaitables: Awaitable[_T]) -> list[_T]:
    """``asyncio.gather`` that cancels the rest when one fails."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
