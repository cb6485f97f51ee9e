"""The typed values the client hands out, converted from the wire messages in one place.

Events of a Session are :class:`Output`, :class:`Gap` and :class:`Exit` (the union
:data:`ExecEvent`); ``match`` on them.  Lifecycle events are :class:`LifecycleEvent`;
``ContainerStatus`` answers are :class:`Status`.  All are frozen, slotted dataclasses; every
time is an ``int`` of nanoseconds since the Unix epoch (PROTOCOL 2.4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from execstream import wire

__all__ = [
    "ExecEvent",
    "Exit",
    "Gap",
    "LifecycleEvent",
    "Output",
    "ResourceUsage",
    "Status",
    "StreamName",
]

StreamName: TypeAlias = Literal["stdout", "stderr"]


@dataclass(frozen=True, slots=True)
class Output:
    """One chunk of output (PROTOCOL 4): ``sequence`` is shared by both streams, from 1.

    ``sequence`` is 0 only for the unsequenced ``stdout``/``stderr`` members that published
    servers send (4.1); such output cannot be resumed.
    """

    stream: StreamName
    sequence: int
    data: bytes
    timestamp: int
    is_replay: bool = False


@dataclass(frozen=True, slots=True)
class Gap:
    """``missed`` chunks right before ``before_sequence`` that this client will never get.

    The server reports a gap when its output limit evicted chunks before this client read
    them (PROTOCOL 6.4, 6.5); the client also reports, the same way, chunks it dropped itself while
    :meth:`Exec.wait` drained output that nobody read.
    """

    missed: int
    before_sequence: int


@dataclass(frozen=True, slots=True)
class Exit:
    """The exec's exit code (128 + N when killed by signal N); always the last event (5.1)."""

    code: int


ExecEvent: TypeAlias = Output | Gap | Exit


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    """PROTOCOL 9.4: ``cpu_percent`` of one CPU (200.0 = two cores); ``memory_limit`` None
    when no limit applies."""

    cpu_percent: float
    memory_bytes: int
    memory_limit: int | None
    io_read_bytes: int
    io_write_bytes: int

    @classmethod
    def from_wire(cls, usage: wire.ResourceUsage) -> ResourceUsage:
        return cls(
            cpu_percent=usage.cpu_percent,
            memory_bytes=usage.memory_bytes,
            memory_limit=usage.memory_limit or None,
            io_read_bytes=usage.io_read_bytes,
            io_write_bytes=usage.io_write_bytes,
        )


@dataclass(frozen=True, slots=True)
class Status:
    """A container's or an exec's status (PROTOCOL 9).

    ``state`` is ``pending``, ``running``, ``paused`` or ``exited`` (9.2); ``exit_code`` and
    ``finished_at`` are set exactly when exited (9.3); ``started_at`` is 0 before the start;
    ``exec_ids`` lists the container's execs in registration order; ``resource_usage`` is set
    when asked for.
    """

    container_id: str
    exec_id: str | None
    state: str
    exit_code: int | None
    started_at: int
    finished_at: int | None
    exec_ids: tuple[str, ...]
    resource_usage: ResourceUsage | None

    @classmethod
    def from_wire(cls, response: wire.ContainerStatusResponse) -> Status:
        usage = response.resource_usage
        return cls(
            container_id=response.container_id,
            exec_id=response.exec_id or None,
            state=response.status,
            exit_code=response.exit_code,
            started_at=response.started_at,
            finished_at=response.finished_at,
            exec_ids=tuple(response.exec_ids),
            resource_usage=ResourceUsage.from_wire(usage) if usage is not None else None,
        )


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """One lifecycle event (PROTOCOL 8).

    ``event_type`` is one of 8.1 (``created``, ``registered``, ``started``, ``paused``,
    ``resumed``, ``exited``, ``unregistered``, ``removed``) or a type this client does not
    know; ``exec_id`` is None for container events; ``exit_code`` is set on ``exited``.
    ``sequence`` is server-wide (8.2); ``gap_before`` counts matching events this subscriber
    will never receive right before this one (8.5): never hidden.
    """

    sequence: int
    timestamp: int
    container_id: str
    exec_id: str | None
    event_type: str
    status: str
    exit_code: int | None
    message: str
    is_replay: bool
    gap_before: int

    @classmethod
    def from_wire(cls, event: wire.ContainerLifecycleEvent) -> LifecycleEvent:
        return cls(
            sequence=event.sequence,
            timestamp=event.timestamp,
            container_id=event.container_id,
            exec_id=event.exec_id or None,
            event_type=event.event_type,
            status=event.status,
            exit_code=event.exit_code if event.event_type == "exited" else None,
            message=event.message,
            is_replay=event.is_replay,
            gap_before=event.gap_before,
        )
