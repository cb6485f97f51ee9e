"""The executor API: the four points where an engine hands an exec to execstream.

1. :meth:`Executor.register` an exec before its process starts;
2. write its output to :attr:`ExecHandle.stdout` / :attr:`ExecHandle.stderr`: each write is
   appended to the exec's log, which stores it first (the file copy, the registry's storage)
   and then tells the clients;
3. :meth:`ExecHandle.exit` with the exit code once the process has exited and its output has
   been written;
4. :meth:`ExecHandle.unregister` when the engine (or the retention sweep) is done with it.

Writing never waits for a client (PROTOCOL 6.6): appending to the log only notifies the
clients' writers, each of which reads at its own cursor, from memory or, when it is far
behind, from storage, so no client loses a byte for being slow (PROTOCOL 6.7).  The
reference process runtime goes through this API; an embedding engine can call it directly.
Calls must be made on the event loop thread that serves the clients.
"""

from __future__ import annotations

from collections.abc import Callable

from ._log import Stream
from ._registry import ExecControls, ExecRecord, Registry

__all__ = ["ExecHandle", "Executor", "TeeWriter"]


class TeeWriter:
    """One output stream of an exec: each write becomes chunks of its log, stored first."""

    def __init__(self, record: ExecRecord, stream: Stream, registry: Registry) -> None:
        self._record = record
        self._stream = stream
        self._registry = registry
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        """Output after the exit code was sent is dropped: the log ended (PROTOCOL 5.1)."""
        log = self._record.log
        if not data or log.closed:
            return
        self.bytes_written += len(data)
        # PROTOCOL 4.5: stamped with the time the server received the bytes.
        log.append(self._stream, data, self._registry.clock.wall_ns())


class ExecHandle:
    """What the engine holds for one registered exec."""

    def __init__(
        self, registry: Registry, record: ExecRecord, forget: Callable[[ExecHandle], None]
    ) -> None:
        self._registry = registry
        self._forget = forget
        self.record = record
        self.stdout = TeeWriter(record, Stream.STDOUT, registry)
        self.stderr = TeeWriter(record, Stream.STDERR, registry)

    @property
    def container_id(self) -> str:
        return self.record.container_id

    @property
    def exec_id(self) -> str:
        return self.record.exec_id

    def started(self, controls: ExecControls | None = None) -> None:
        """The process runs; ``controls`` lets clients write stdin and resize (PROTOCOL 7)."""
        self._registry.mark_started(self.record)
        self.record.controls = controls

    def exit(self, exit_code: int, message: str = "") -> None:
        """The process exited and all its output was written (PROTOCOL 5.1)."""
        self.record.controls = None
        self._registry.mark_exited(self.record, exit_code, message)

    def unregister(self) -> None:
        """Forget the exec and its stored output: attach is NOT_FOUND from now on
        (PROTOCOL 11.2)."""
        self._registry.remove(self.record)
        self._forget(self)


class Executor:
    """Registers execs in a :class:`Registry`, whose storage keeps their output."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._handles: dict[tuple[str, str], ExecHandle] = {}

    def register(self, container_id: str, exec_id: str, *, tty: bool = False) -> ExecHandle:
        record = self.registry.register(container_id, exec_id, tty=tty)
        handle = ExecHandle(self.registry, record, self._forget)
        self._handles[(container_id, exec_id)] = handle
        return handle

    def handle(self, record: ExecRecord) -> ExecHandle:
        return self._handles[(record.container_id, record.exec_id)]

    def _forget(self, handle: ExecHandle) -> None:
        del self._handles[(handle.container_id, handle.exec_id)]
