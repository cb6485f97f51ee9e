"""One recorded ``Session`` stream: the requests a case sends and every response, in order.

A :class:`SessionClient` keeps every message the server sent and the stream's final status;
cases wait on it with :meth:`SessionClient.until` and compare what it holds with what the
workload must have written.  Every request and the stream's outcome go to the case's log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import betterproto2
import grpc
import grpc.aio

from execstream import wire

from ._case import Failure
from ._recording import OK, WITHIN, Changes

if TYPE_CHECKING:
    from ._context import CaseContext

__all__ = ["SessionClient", "describe_chunks"]


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
        self._changes = Changes()
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
        except (asyncio.CancelledError, grpc.aio.UsageError):
            # Cancelled, or the case's channel closed under the reader: the suite ended it.
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
            self.ctx.note_status("Session", code, details)
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
        try:
            await self.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
            # A half-close that meets the server's end of the call loses its status just as
            # a write does (status_lost).
            self.send_errors.append(f"{type(error).__name__}: {error}")

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
        """The server ended the call while a request or the half-close was being sent, and
        grpc-python then reports ``INTERNAL "Internal error from Core"`` locally instead of
        the server's status (grpc.aio ``_write``, ``done_writing``; grpc/grpc#36066): what
        the server said is unknown, not wrong."""
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
