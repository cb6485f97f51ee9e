"""The runtime contract: what the server needs from whatever runs its execs.

In the spirit of httpcore's network backends (``_backends/base.py`` beside its
implementations and a mock): the runner and the service talk to a :class:`Runtime` and the
:class:`RunningExec` s it returns, never to a concrete runtime.  Implementations:

- :class:`~execstream.server.runtime.process.ProcessRuntime`: every exec a host process in
  its own session, containers are directories (the default, no extra packages);
- :class:`~execstream.server.runtime.runc.RuncRuntime`: every container an OCI container run
  by ``runc``, every exec a ``runc exec`` in it;
- :class:`~execstream.server.runtime.FakeRuntime`: no processes at all, driven by tests.

Everything is called on the event loop thread.  Failures the client caused or must hear about
are :class:`~execstream.server.ExecError` s with the status the protocol asks for.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from .._errors import ErrorCode, ExecError

__all__ = [
    "ExecSpec",
    "OutputSink",
    "ResourceSample",
    "RunningExec",
    "Runtime",
    "check_terminal_size",
    "in_scope",
    "refused_spawn",
]

_Exec = TypeVar("_Exec")


def in_scope(
    execs: Mapping[tuple[str, str], _Exec], container_id: str, exec_id: str | None = None
) -> list[_Exec]:
    """The execs a control request names (PROTOCOL 10): one exec, or every exec of the
    container; NOT_FOUND when there is none."""
    if exec_id is not None:
        proc = execs.get((container_id, exec_id))
        if proc is None:
            raise ExecError(ErrorCode.NOT_FOUND, f"exec {container_id}/{exec_id} not found")
        return [proc]
    found = [p for (c, _), p in execs.items() if c == container_id]
    if not found:
        raise ExecError(ErrorCode.NOT_FOUND, f"container {container_id!r} not found")
    return found


# Failures of the server's own resources while spawning, not of the request.
_OUT_OF_RESOURCES = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EAGAIN}
)


def refused_spawn(error: OSError | ValueError, command: str) -> ExecError:
    """PROTOCOL 3.7: what the system refused while a runtime looked up or started
    ``command`` (ENAMETOOLONG, ELOOP, EACCES, an embedded NUL...) is the request's fault,
    INVALID_ARGUMENT, never an internal error; the server running out of something is
    RESOURCE_EXHAUSTED (PROTOCOL 13.1)."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    code = ErrorCode.INVALID_ARGUMENT
    if isinstance(error, OSError) and error.errno in _OUT_OF_RESOURCES:
        code = ErrorCode.RESOURCE_EXHAUSTED
    return ExecError(code, f"cannot start {command[:200]!r}: {reason}")


class OutputSink(Protocol):
    def write(self, data: bytes) -> None:
        """Take one read of output; called on the event loop thread, must not block."""


def check_terminal_size(width: int, height: int) -> None:
    """PROTOCOL 7.3: a terminal size is 1..65535 in each direction."""
    if not (0 < width <= 0xFFFF and 0 < height <= 0xFFFF):
        raise ExecError(
            ErrorCode.INVALID_ARGUMENT,
            f"terminal size {width}x{height} is not valid: width and height must be 1..65535",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecSpec:
    """What to run.  Validates itself (PROTOCOL 3.2: bad fields are INVALID_ARGUMENT)."""

    command: Sequence[str]
    #: Added on top of the runtime's base environment (``PATH``, ``HOME``, and ``TERM`` for a
    #: TTY; each runtime documents its own).
    env: Mapping[str, str] = field(default_factory=dict)
    #: "" is the container's default directory; a relative path is relative to it.
    working_dir: str = ""
    tty: bool = False
    width: int = 80
    height: int = 24

    def __post_init__(self) -> None:
        if isinstance(self.command, str) or not self.command:
            raise ExecError(ErrorCode.INVALID_ARGUMENT, "command must be a non-empty argv")
        for arg in self.command:
            if "\0" in arg:
                raise ExecError(ErrorCode.INVALID_ARGUMENT, f"command argument {arg!r} has NUL")
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key:
                raise ExecError(ErrorCode.INVALID_ARGUMENT, f"env key {key!r} is not valid")
            if "\0" in value:
                raise ExecError(ErrorCode.INVALID_ARGUMENT, f"env value of {key!r} has NUL")
        if "\0" in self.working_dir:
            raise ExecError(ErrorCode.INVALID_ARGUMENT, "working_dir contains NUL")
        if self.tty:
            check_terminal_size(self.width, self.height)
        object.__setattr__(self, "command", tuple(self.command))
        object.__setattr__(self, "env", dict(self.env))


@dataclass(frozen=True, slots=True)
class ResourceSample:
    """PROTOCOL 9.4; each runtime's docstring says how it measures each figure."""

    cpu_percent: float
    memory_bytes: int
    memory_limit: int
    io_read_bytes: int
    io_write_bytes: int


class RunningExec(Protocol):
    """One exec a runtime started: its main process, its input, its terminal, its exit."""

    @property
    def pid(self) -> int:
        """The host pid of the process the runtime waits for."""
        ...

    async def wait(self) -> int:
        """The exit code (PROTOCOL 5.2), once the main process exited and its output was
        delivered to the sinks (5.1, bounded as 5.3 says).  Cancelling a waiter cancels
        nothing else."""
        ...

    async def write_stdin(self, data: bytes) -> None:
        """Queue ``data`` (in call order) and wait until the process's input took it;
        FAILED_PRECONDITION once input was closed or the process exited (PROTOCOL 7.1)."""
        ...

    def close_stdin(self) -> None:
        """PROTOCOL 7.1: end of input (the terminal's EOF character on a TTY)."""
        ...

    def resize(self, width: int, height: int) -> None:
        """PROTOCOL 7.3: FAILED_PRECONDITION without a terminal."""
        ...

    async def kill(self) -> None:
        """SIGKILL every process of the exec and wait until none is left alive."""
        ...

    def release(self) -> None:
        """The server is done with the exec: kill what is left of it and forget it."""
        ...


class Runtime(Protocol):
    """Runs execs in containers and controls the containers (PROTOCOL 3.2, 9.4, 10)."""

    @property
    def token(self) -> str:
        """Unique to this runtime object; marks what it starts, so that a server restarted
        on the same state directory finds what a dead one left (the state directory's lock
        records it)."""
        ...

    async def spawn(
        self,
        container_id: str,
        exec_id: str,
        spec: ExecSpec,
        stdout: OutputSink,
        stderr: OutputSink,
    ) -> RunningExec:
        """Start ``spec`` as exec ``container_id/exec_id``, creating the container on its
        first exec; output goes to the sinks (a TTY's to ``stdout`` only).  A command or
        working directory that cannot be used is INVALID_ARGUMENT, before anything runs."""
        ...

    async def pause(self, container_id: str) -> None:
        """PROTOCOL 10.1: every process of the container stops."""
        ...

    async def resume(self, container_id: str) -> None:
        """PROTOCOL 10.2."""
        ...

    def signal(self, container_id: str, signum: int, exec_id: str | None = None) -> None:
        """PROTOCOL 10.3: ``signum`` to every process of the container, or of one exec."""
        ...

    def usage(self, container_id: str, exec_id: str | None = None) -> ResourceSample:
        """PROTOCOL 9.4, for the container or one exec."""
        ...

    async def remove_container(self, container_id: str) -> None:
        """Kill what is left of the container and delete it.  A runtime also deletes a
        container by itself once the last of its execs was released."""
        ...

    async def close(self) -> None:
        """Kill every exec, delete every container.  Idempotent; survives cancellation."""
        ...
