"""The registry: every container and exec the server knows, their limits and their events.

Theory of operation.  Execs are keyed by (container ID, exec ID) and grouped by container; a
container exists while it has at least one exec (PROTOCOL 11.2).  Every change of an exec's
state goes through :func:`_state.next_state` and is published as a lifecycle event in one
server-wide :class:`EventLog` (PROTOCOL 8).  Clients attach to an exec's :class:`ExecLog`
through a cursor; the registry counts them against the per-exec limit (PROTOCOL 13.1).
Removal after retention, or past the bound on retained exited execs, is decided here
(``expired``, ``over_exited_bound``) and carried out by the caller; an exec's stored output
goes with it.  Limits count only the execs that have not exited (PROTOCOL 13.3), so exited
execs never block new ones.

No asyncio or grpc imports; the clock and where output is stored are injected, so tests
control time and can keep output in memory.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from ._errors import ErrorCode, ExecError, SettingError
from ._log import MAX_CHUNK, MIN_OUTPUT_LIMIT, Chunk, Cursor, ExecLog, SequencedLog, StorageBudget
from ._state import ExecInput, ExecState, next_state
from ._storage import DirectoryArea, StorageArea

__all__ = [
    "Clock",
    "ContainerRecord",
    "EventLog",
    "EventSubscription",
    "ExecControls",
    "ExecRecord",
    "LifecycleRecord",
    "Limits",
    "Registry",
    "SystemClock",
    "validate_id",
]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def validate_id(field: str, value: str) -> str:
    """PROTOCOL 2.1: IDs are 1-128 characters of ``A-Za-z0-9_.-``, starting alphanumeric."""
    if not value:
        raise ExecError(ErrorCode.INVALID_ARGUMENT, f"{field} is required")
    if not _ID.fullmatch(value):
        raise ExecError(
            ErrorCode.INVALID_ARGUMENT,
            f"{field} {value[:140]!r} is not 1-128 characters of A-Z a-z 0-9 _ . - "
            "starting with a letter or digit",
        )
    return value


class Clock(Protocol):
    def wall_ns(self) -> int: ...
    def monotonic(self) -> float: ...


class SystemClock:
    def wall_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Server settings that bound what clients can make the server hold (PROTOCOL 13.1)."""

    #: Execs that have not exited (PROTOCOL 13.3: exited execs do not count).
    max_execs: int = 1024
    max_execs_per_container: int = 128
    #: Exited execs retained in all; past it the oldest exit is removed (PROTOCOL 11.3).
    max_exited_execs: int = 1024
    max_clients_per_exec: int = 64
    max_subscribers: int = 256
    #: PROTOCOL 6.5: output retained per exec, in storage (0: no limit).
    max_output_bytes: int = 1024 * 1024 * 1024
    #: The newest output of each running exec also kept in memory; a cache, not a bound.
    memory_cache_bytes: int = 4 * 1024 * 1024
    #: PROTOCOL 6.5: stored output of all execs together (0: no cap).
    max_stored_bytes: int = 0
    event_history: int = 4096
    stdin_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name in (
            "max_execs",
            "max_execs_per_container",
            "max_exited_execs",
            "max_clients_per_exec",
            "max_subscribers",
            "event_history",
            "stdin_bytes",
        ):
            if getattr(self, name) <= 0:
                raise SettingError(f"limits.{name}", f"must be > 0, got {getattr(self, name)}")
        if self.memory_cache_bytes < MAX_CHUNK:  # PROTOCOL 6.4: the newest chunk is kept
            raise SettingError(
                "limits.memory_cache_bytes",
                f"must be at least {MAX_CHUNK} bytes (one chunk), got {self.memory_cache_bytes}",
            )
        for name in ("max_output_bytes", "max_stored_bytes"):
            value = getattr(self, name)
            if value < 0 or 0 < value < MIN_OUTPUT_LIMIT:
                raise SettingError(
                    f"limits.{name}",
                    f"must be 0 (no limit) or at least {MIN_OUTPUT_LIMIT} bytes, got {value}",
                )


class ExecControls(Protocol):
    """What a runtime lets clients do to a running exec through its session (PROTOCOL 7)."""

    def write_stdin(self, data: bytes) -> Awaitable[None]: ...
    def close_stdin(self) -> None: ...
    def resize(self, width: int, height: int) -> None: ...


@dataclass(frozen=True, slots=True)
class LifecycleRecord:
    """What the registry keeps of one lifecycle event; sent as one ``ContainerLifecycleEvent``
    (PROTOCOL 8.1)."""

    sequence: int
    timestamp_ns: int
    container_id: str
    exec_id: str
    event_type: str
    status: str
    exit_code: int = 0
    message: str = ""


class EventSubscription:
    """One lifecycle subscriber's live events: those emitted after it subscribed that match
    its filter (PROTOCOL 8.3), handed to it by the log as they happen, so that an event costs
    only the subscribers it matches.  At most ``capacity`` wait to be taken; past that the
    oldest go, and the next :meth:`take` counts them as the gap before its first event
    (PROTOCOL 8.5).  Filtered-out events are never seen here, so they never count as gaps."""

    def __init__(
        self, container_id: str, exec_id: str, capacity: int, wake: Callable[[], None]
    ) -> None:
        self.scope = (container_id, exec_id)
        self._capacity = capacity
        self._wake = wake
        self._pending: deque[LifecycleRecord] = deque()
        self._dropped = 0

    def offer(self, event: LifecycleRecord) -> None:
        if len(self._pending) >= self._capacity:
            self._pending.popleft()
            self._dropped += 1
        self._pending.append(event)
        self._wake()

    def take(self) -> tuple[list[LifecycleRecord], int]:
        """The waiting events, oldest first, and how many were dropped right before them."""
        events = list(self._pending)
        self._pending.clear()
        dropped, self._dropped = self._dropped, 0
        return events, dropped


class EventLog(SequencedLog[LifecycleRecord]):
    """The server's lifecycle events (PROTOCOL 8): a bounded history for replay, and the
    live subscriptions, indexed by their filter."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, lambda _event: 1)
        self._capacity = capacity
        # (container_id, exec_id) of the filter, "" where unset -> its subscriptions
        self._scopes: dict[tuple[str, str], dict[EventSubscription, None]] = {}

    def subscribe(
        self, container_id: str, exec_id: str, wake: Callable[[], None]
    ) -> EventSubscription:
        """Every matching event from ``next_sequence`` on goes to the subscription (PROTOCOL
        8.4: none lost or doubled between the replayed history and it)."""
        subscription = EventSubscription(container_id, exec_id, self._capacity, wake)
        self._scopes.setdefault(subscription.scope, {})[subscription] = None
        return subscription

    def unsubscribe(self, subscription: EventSubscription) -> None:
        scope = self._scopes.get(subscription.scope, {})
        scope.pop(subscription, None)
        if not scope:
            self._scopes.pop(subscription.scope, None)

    def _deliver(self, event: LifecycleRecord) -> None:
        """PROTOCOL 8.3: everything; one container's events; one exec's events."""
        scopes = [("", ""), (event.container_id, "")]
        if event.exec_id:
            scopes.append((event.container_id, event.exec_id))
        for scope in scopes:
            for subscription in tuple(self._scopes.get(scope, ())):
                subscription.offer(event)

    def emit(
        self,
        timestamp_ns: int,
        container_id: str,
        exec_id: str,
        event_type: str,
        status: str,
        exit_code: int = 0,
        message: str = "",
    ) -> LifecycleRecord:
        event = LifecycleRecord(
            self.next_sequence,
            timestamp_ns,
            container_id,
            exec_id,
            event_type,
            status,
            exit_code,
            message,
        )
        self._append(event)
        self._deliver(event)
        self._notify()
        return event


class ExecRecord:
    """One exec: its state, its output log and what clients may do to it."""

    def __init__(
        self,
        container: ContainerRecord,
        exec_id: str,
        *,
        tty: bool,
        log: ExecLog,
        registered_at_ns: int,
    ) -> None:
        self.container = container
        self.exec_id = exec_id
        self.tty = tty
        self.state = ExecState.PENDING
        self.log = log
        self.registered_at_ns = registered_at_ns
        self.started_at_ns = 0
        self.finished_at_ns: int | None = None
        self.exited_at: float | None = None  # monotonic, for retention
        self.clients = 0
        self.controls: ExecControls | None = None
        self.stdin_closed = False
        self.terminal_size: tuple[int, int] | None = (80, 24) if tty else None

    @property
    def container_id(self) -> str:
        return self.container.container_id

    @property
    def exit_code(self) -> int | None:
        return self.log.exit_code

    def __repr__(self) -> str:
        return f"<exec {self.container_id}/{self.exec_id} {self.state.value}>"


class ContainerRecord:
    def __init__(self, container_id: str) -> None:
        self.container_id = container_id
        self.execs: dict[str, ExecRecord] = {}  # registration order
        #: How many of ``execs`` have not exited: kept, not counted per registration, which
        #: would cost a pass over every retained exec of the container.
        self.live = 0
        self.paused = False

    @property
    def state(self) -> ExecState:
        """PROTOCOL 9.2, derived from the execs so it cannot disagree with them."""
        states = [e.state for e in self.execs.values()]
        if self.paused:
            return ExecState.PAUSED
        if ExecState.RUNNING in states or ExecState.PAUSED in states:
            return ExecState.RUNNING
        if states and all(s is ExecState.EXITED for s in states):
            return ExecState.EXITED
        return ExecState.PENDING

    def last_exited(self) -> ExecRecord | None:
        exited = [e for e in self.execs.values() if e.finished_at_ns is not None]
        return max(exited, key=lambda e: e.finished_at_ns or 0, default=None)

    def first_started(self) -> ExecRecord | None:
        started = [e for e in self.execs.values() if e.started_at_ns]
        return min(started, key=lambda e: e.started_at_ns, default=None)


class Registry:
    """``storage`` holds the execs' output (PROTOCOL 6.5); by default files in a temporary
    directory made on first use and removed by :meth:`close`."""

    def __init__(
        self,
        limits: Limits | None = None,
        clock: Clock | None = None,
        *,
        storage: StorageArea | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.clock: Clock = clock or SystemClock()
        self.storage: StorageArea = storage or DirectoryArea()
        self.budget = StorageBudget(self.limits.max_stored_bytes)
        self.events = EventLog(self.limits.event_history)
        self._containers: dict[str, ContainerRecord] = {}
        self._live_count = 0  # execs not exited (PROTOCOL 13.3)
        # Exited execs in the order they exited, oldest first (PROTOCOL 11.3).
        self._exited: OrderedDict[ExecRecord, None] = OrderedDict()
        self.subscribers = 0

    # -- lookup ---------------------------------------------------------------------------

    def container(self, container_id: str) -> ContainerRecord:
        validate_id("container_id", container_id)
        try:
            return self._containers[container_id]
        except KeyError:
            raise ExecError(ErrorCode.NOT_FOUND, f"container {container_id!r} not found") from None

    def get(self, container_id: str, exec_id: str) -> ExecRecord:
        validate_id("exec_id", exec_id)  # PROTOCOL 2.1: before any lookup
        validate_id("container_id", container_id)
        container = self._containers.get(container_id)
        if container is None:
            raise ExecError(
                ErrorCode.NOT_FOUND, f"exec {exec_id!r} not found: no container {container_id!r}"
            )
        try:
            return container.execs[exec_id]
        except KeyError:
            raise ExecError(
                ErrorCode.NOT_FOUND, f"exec {exec_id!r} not found in container {container_id!r}"
            ) from None

    def find(self, container_id: str, exec_id: str) -> ExecRecord | None:
        container = self._containers.get(container_id)
        return container.execs.get(exec_id) if container else None

    def __iter__(self) -> Iterator[ExecRecord]:
        for container in list(self._containers.values()):
            yield from list(container.execs.values())

    # -- transitions ----------------------------------------------------------------------

    def register(self, container_id: str, exec_id: str, *, tty: bool = False) -> ExecRecord:
        """A new exec, ``PENDING``; ALREADY_EXISTS while one with these IDs is retained."""
        validate_id("container_id", container_id)
        validate_id("exec_id", exec_id)
        container = self._containers.get(container_id)
        if container is not None and exec_id in container.execs:
            raise ExecError(
                ErrorCode.ALREADY_EXISTS,
                f"exec {exec_id!r} already exists in container {container_id!r}",
            )
        if container is not None and container.paused:
            raise ExecError(
                ErrorCode.FAILED_PRECONDITION,
                f"container {container_id!r} is paused: resume it before creating execs",
            )
        if self._live_count >= self.limits.max_execs:
            raise ExecError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the server runs {self._live_count} execs that have not exited, its limit "
                "(max_execs)",
            )
        if container is not None and container.live >= self.limits.max_execs_per_container:
            raise ExecError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"container {container_id!r} runs {container.live} execs that have not exited, "
                "the limit (max_execs_per_container)",
            )
        now = self.clock.wall_ns()
        if container is None:
            container = self._containers[container_id] = ContainerRecord(container_id)
            self.events.emit(now, container_id, "", "created", ExecState.PENDING.value)
        log = ExecLog(
            self.storage.open(container_id, exec_id),
            cache_bytes=self.limits.memory_cache_bytes,
            max_output_bytes=self.limits.max_output_bytes,
            budget=self.budget,
            name=f"{container_id}/{exec_id}",
        )
        record = ExecRecord(container, exec_id, tty=tty, log=log, registered_at_ns=now)
        container.execs[exec_id] = record
        container.live += 1
        self._live_count += 1
        self.events.emit(now, container_id, exec_id, "registered", record.state.value)
        return record

    def _move(self, record: ExecRecord, event: ExecInput) -> None:
        record.state = next_state(record.state, event)

    def mark_started(self, record: ExecRecord) -> None:
        self._move(record, ExecInput.START)
        record.started_at_ns = self.clock.wall_ns()
        self.events.emit(
            record.started_at_ns, record.container_id, record.exec_id, "started", record.state.value
        )

    def mark_exited(self, record: ExecRecord, exit_code: int, message: str = "") -> None:
        """PROTOCOL 5.1: close the log after its last chunk; retention starts now."""
        self._move(record, ExecInput.EXIT)
        record.finished_at_ns = self.clock.wall_ns()
        record.exited_at = self.clock.monotonic()
        record.container.live -= 1
        self._live_count -= 1
        self._exited[record] = None
        # The clients still reading keep sharing the cached chunks until the last one leaves.
        record.log.close(exit_code, keep_cache=record.clients > 0)
        self.events.emit(
            record.finished_at_ns,
            record.container_id,
            record.exec_id,
            "exited",
            record.state.value,
            exit_code,
            message,
        )

    def remove(self, record: ExecRecord) -> None:
        """PROTOCOL 11.2: forget the exec; the container goes with its last exec."""
        self._move(record, ExecInput.REMOVE)
        if not record.clients:  # else the last attached client's detach destroys it
            record.log.destroy()
        container = record.container
        del container.execs[record.exec_id]
        if record.exited_at is None:
            container.live -= 1
            self._live_count -= 1
        else:
            del self._exited[record]
        now = self.clock.wall_ns()
        self.events.emit(
            now, container.container_id, record.exec_id, "unregistered", record.state.value
        )
        if not container.execs:
            del self._containers[container.container_id]
            self.events.emit(now, container.container_id, "", "removed", ExecState.REMOVED.value)

    def pause(self, container: ContainerRecord) -> None:
        """PROTOCOL 10.1 preconditions and state; the caller stops the processes first."""
        if container.paused:
            raise ExecError(
                ErrorCode.FAILED_PRECONDITION,
                f"container {container.container_id!r} is already paused",
            )
        running = [e for e in container.execs.values() if e.state is ExecState.RUNNING]
        if not running:
            raise ExecError(
                ErrorCode.FAILED_PRECONDITION,
                f"container {container.container_id!r} has no running exec",
            )
        for record in running:
            self._move(record, ExecInput.PAUSE)
        container.paused = True
        self.events.emit(
            self.clock.wall_ns(), container.container_id, "", "paused", container.state.value
        )

    def check_paused(self, container: ContainerRecord) -> None:
        if not container.paused:
            raise ExecError(
                ErrorCode.FAILED_PRECONDITION, f"container {container.container_id!r} is not paused"
            )

    def resume(self, container: ContainerRecord) -> None:
        """PROTOCOL 10.2; the caller has let the processes run again."""
        self.check_paused(container)
        for record in container.execs.values():
            if record.state is ExecState.PAUSED:
                self._move(record, ExecInput.RESUME)
        container.paused = False
        self.events.emit(
            self.clock.wall_ns(), container.container_id, "", "resumed", container.state.value
        )

    # -- retention ------------------------------------------------------------------------

    def expired(self, retention: float) -> list[ExecRecord]:
        """Exited execs whose retention (seconds since exit) has passed (PROTOCOL 11.2)."""
        now = self.clock.monotonic()
        return [
            record
            for record in self
            if record.exited_at is not None and now - record.exited_at >= retention
        ]

    def over_exited_bound(self) -> list[ExecRecord]:
        """PROTOCOL 11.3: the exited execs past ``max_exited_execs``, those that exited first."""
        excess = len(self._exited) - self.limits.max_exited_execs
        return list(itertools.islice(self._exited, excess)) if excess > 0 else []

    # -- clients --------------------------------------------------------------------------

    def attach(self, record: ExecRecord, replay_from_sequence: int) -> Cursor[Chunk]:
        """A cursor for one client (PROTOCOL 6.1); RESOURCE_EXHAUSTED past the limit."""
        if record.clients >= self.limits.max_clients_per_exec:
            raise ExecError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"exec {record.exec_id!r} has {record.clients} clients, the limit "
                "(max_clients_per_exec)",
            )
        cursor = Cursor(record.log, replay_from_sequence)
        record.clients += 1
        return cursor

    def detach(self, record: ExecRecord) -> None:
        """A client left; a removed exec's output goes with its last client, so that one
        still reading behind is served to the end (PROTOCOL 6.7, 11.2)."""
        record.clients -= 1
        if not record.clients and record.state is ExecState.REMOVED:
            record.log.destroy()
        elif not record.clients:
            record.log.drop_cache()  # exited: no memory for its output once nobody reads

    def subscribe(self) -> None:
        if self.subscribers >= self.limits.max_subscribers:
            raise ExecError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"{self.subscribers} lifecycle subscribers, the limit (max_subscribers)",
            )
        self.subscribers += 1

    def unsubscribe(self) -> None:
        self.subscribers -= 1

    def close(self) -> None:
        """Remove every exec's stored output, and the temporary directory if one was made."""
        for record in self:
            record.log.destroy()
        self.storage.close()
