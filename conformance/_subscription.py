"""One recorded ``ContainerLifecycle`` stream: its response headers and every event."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from execstream import wire

from ._case import Failure
from ._recording import OK, WITHIN, Changes

if TYPE_CHECKING:
    from ._context import CaseContext

__all__ = ["Subscription"]


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
        self._changes = Changes()
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
        except (asyncio.CancelledError, grpc.aio.UsageError):
            # Cancelled, or the case's channel closed under the reader: the suite ended it.
            self._end(grpc.StatusCode.CANCELLED, "cancelled by the suite")

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        if self.code is None:
            self.code, self.details = code, details
            self.ctx.log(f"<- {self.label}: {len(self.events)} events, status {code.name}")
            self.ctx.note_status("ContainerLifecycle", code, details)
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
