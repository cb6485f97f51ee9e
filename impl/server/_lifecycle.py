"""The lifecycle flow: what one ``ContainerLifecycle`` subscriber is sent, and when.

Theory of operation.  A subscriber names a filter (PROTOCOL 8.3) and, optionally, where its
replay starts.  Subscribing fixes a cut, the last event already in the history: the history up
to the cut is replayed from the server's event log, and every event after it comes through a
subscription made in the same step, which the log hands only the events the filter matches
(8.4: none lost or doubled between the two).  Events that left the history before the replay
reached them, and live events dropped because the subscriber fell too far behind, are counted
and reported as ``gap_before`` on the next event sent (8.5).

:class:`LifecycleFlow` is driven by the grpc glue (``_service``): it sends
:attr:`~LifecycleFlow.last_sequence` in the response headers, writes what
:meth:`~LifecycleFlow.next_events` returns, and waits for the wake it passed in whenever
:attr:`~LifecycleFlow.waiting` says so.  No I/O, and no asyncio, grpc or wire imports: every
rule here is tested synchronously (``tests/server/test_lifecycle_flow.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ._errors import ErrorCode, ExecError
from ._log import Cursor
from ._registry import LifecycleRecord, Registry, validate_id

__all__ = ["LifecycleFlow", "Sent"]


class Sent(NamedTuple):
    """One event for the subscriber, as it is to be sent."""

    event: LifecycleRecord
    is_replay: bool
    gap_before: int


class LifecycleFlow:
    """One subscriber, from its request to its end; :meth:`close` exactly once."""

    def __init__(
        self,
        registry: Registry,
        container_id: str,
        exec_id: str,
        replay_from_sequence: int | None,
        wake: Callable[[], None],
    ) -> None:
        # PROTOCOL 8.3: a filter names a container, or one exec of one container.
        if exec_id and not container_id:
            raise ExecError(ErrorCode.INVALID_ARGUMENT, "exec_id needs container_id")
        if container_id:
            validate_id("container_id", container_id)
        if exec_id:
            validate_id("exec_id", exec_id)
        self._registry = registry
        self._scope = (container_id, exec_id)
        events = registry.events
        #: PROTOCOL 8.4: the cut, sent in the headers before any event.
        self.last_sequence = events.next_sequence - 1
        start = self.last_sequence + 1
        if replay_from_sequence is not None:
            start = max(replay_from_sequence, 1)
        self._cursor = Cursor(events, start)  # OUT_OF_RANGE past the history
        registry.subscribe()  # PROTOCOL 13.1: RESOURCE_EXHAUSTED past the limit
        self._subscription = events.subscribe(container_id, exec_id, wake)
        self._gap = 0  # PROTOCOL 8.5: missed, not yet reported
        self._closed = False

    @property
    def replaying(self) -> bool:
        """The history up to the cut is not all read yet."""
        return not self._cursor.caught_up and self._cursor.position <= self.last_sequence

    @property
    def waiting(self) -> bool:
        """Nothing more is due until the wake is called."""
        return not self.replaying

    def next_events(self) -> list[Sent]:
        """What is due now: a batch of the replay, or else the live events that arrived.  An
        empty list while :attr:`replaying` only means the batch matched nothing: ask again."""
        if self.replaying:
            return self._replay()
        events, dropped = self._subscription.take()
        self._gap += dropped  # PROTOCOL 8.5
        return [self._sent(event, False) for event in events]

    def _replay(self) -> list[Sent]:
        position = self._cursor.position
        read = self._cursor.read(until=self.last_sequence + 1)
        # PROTOCOL 8.5: evicted events past the cut reach the subscription: not lost here.
        self._gap += min(read.gap_before, self.last_sequence + 1 - position)
        return [self._sent(event, True) for event in read.items if self._matches(event)]

    def _sent(self, event: LifecycleRecord, is_replay: bool) -> Sent:
        sent = Sent(event, is_replay, self._gap)
        self._gap = 0
        return sent

    def _matches(self, event: LifecycleRecord) -> bool:
        """PROTOCOL 8.3: everything; one container's events; one exec's events."""
        container_id, exec_id = self._scope
        if container_id and event.container_id != container_id:
            return False
        return not exec_id or event.exec_id == exec_id

    def close(self) -> None:
        """The subscriber is gone: it stops receiving, and no longer counts (PROTOCOL 13.1)."""
        if self._closed:
            return
        self._closed = True
        self._registry.events.unsubscribe(self._subscription)
        self._registry.unsubscribe()
