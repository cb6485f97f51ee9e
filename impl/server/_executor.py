"""The executor API: the four points where an engine hands an exec to execstream.

1. :meth:`Executor.register` an exec before its process starts;
2. write its output to :attr:`ExecHandle.stdout` / :attr:`ExecHandle.stderr`, two tees that
   write the file copy first and always, then append to the exec's log for the clients;
3. :meth:`ExecHandle.exit` with the exit code once the process has exited and its output has
   been written;
4. :meth:`ExecHandle.unregister` when the engine (or the retention sweep) is done with it.

The tee never waits for a client (PROTOCOL 6.6): appending to the log only notifies the
clients' writers, each of which reads at its own cursor.  The reference process runtime goes
through this API; an embedding engine can call it directly.  Calls must be made on the event
loop thread that serves the clients.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ._log import Stream
from ._registry import ExecControls, ExecRecord, Registry

__all__ = ["ExecHandle", "Executor", "TeeWriter"]


class TeeWriter:
    """One output stream of an exec: the file copy, then the log (best effort)."""

    def __init__(
        self, record: ExecRecord, stream: Stream, registry: Registry, path: Path | None
    ) -> None:
        self._record = record
        self._stream = stream
        self._registry = registry
        self.path = path
        # Unbuffered: the file copy holds the bytes before any client is told of them.
        self._file: BinaryIO | None = path.open("ab", buffering=0) if path is not None else None
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        if not data or (self._file is None and self._record.log.closed):
            return
        if self._file is not None:
            self._file.write(data)
        self.bytes_written += len(data)
        log = self._record.log
        if not log.closed:
            log.append(self._stream, data, self._registry.clock.wall_ns())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class ExecHandle:
    """What the engine holds for one registered exec."""

    def __init__(
        self,
        registry: Registry,
        record: ExecRecord,
        tee_dir: Path | None,
        forget: Callable[[ExecHandle], None],
    ) -> None:
        self._registry = registry
        self._forget = forget
        self.record = record
        self._tee_dir = tee_dir
        if tee_dir is not None:
            tee_dir.mkdir(parents=True, exist_ok=True)
        self.stdout = TeeWriter(
            record, Stream.STDOUT, registry, tee_dir / "stdout" if tee_dir else None
        )
        self.stderr = TeeWriter(
            record, Stream.STDERR, registry, tee_dir / "stderr" if tee_dir else None
        )

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
        self.stdout.close()
        self.stderr.close()
        self.record.controls = None
        self._registry.mark_exited(self.record, exit_code, message)

    def unregister(self) -> None:
        """Forget the exec: attach is NOT_FOUND from now on (PROTOCOL 11.2)."""
        self.stdout.close()
        self.stderr.close()
        self._registry.remove(self.record)
        self._forget(self)
        if self._tee_dir is not None:
            shutil.rmtree(self._tee_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the container's directory, once empty
                self._tee_dir.parent.rmdir()


class Executor:
    """Registers execs in a :class:`Registry`, with their tee files under ``tee_dir``."""

    def __init__(self, registry: Registry, tee_dir: Path | None = None) -> None:
        self.registry = registry
        self.tee_dir = tee_dir
        self._handles: dict[tuple[str, str], ExecHandle] = {}

    def register(self, container_id: str, exec_id: str, *, tty: bool = False) -> ExecHandle:
        record = self.registry.register(container_id, exec_id, tty=tty)
        tee = self.tee_dir / container_id / exec_id if self.tee_dir is not None else None
        handle = ExecHandle(self.registry, record, tee, self._forget)
        self._handles[(container_id, exec_id)] = handle
        return handle

    def handle(self, record: ExecRecord) -> ExecHandle:
        return self._handles[(record.container_id, record.exec_id)]

    def _forget(self, handle: ExecHandle) -> None:
        del self._handles[(handle.container_id, handle.exec_id)]
