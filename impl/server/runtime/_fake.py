"""A runtime without processes, for tests of the runner, the service and the session flow.

The test plays the process: :meth:`FakeExec.emit` writes output through the sinks the server
gave, :meth:`FakeExec.exit` ends it; what clients sent (stdin, resizes) and what the server
asked of the runtime (pause, resume, signals, removals) is recorded for the test to check.
It keeps the contract's rules (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION), so a test
against it exercises the same error paths as one against a real runtime.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Iterator

from .._errors import ErrorCode, ExecError
from ._base import ExecSpec, OutputSink, ResourceSample, check_terminal_size, in_scope

__all__ = ["FakeExec", "FakeRuntime"]


class FakeExec:
    """A :class:`~execstream.server.runtime.RunningExec` whose process is the test."""

    def __init__(
        self,
        runtime: FakeRuntime,
        container_id: str,
        exec_id: str,
        spec: ExecSpec,
        stdout: OutputSink,
        stderr: OutputSink,
        pid: int,
    ) -> None:
        self._runtime = runtime
        self.container_id = container_id
        self.exec_id = exec_id
        self.spec = spec
        self.pid = pid
        self._sinks = {"stdout": stdout, "stderr": stdout if spec.tty else stderr}
        self.stdin = bytearray()
        self.stdin_closed = False
        self.sizes: list[tuple[int, int]] = [(spec.width, spec.height)] if spec.tty else []
        self.signals: list[int] = []
        self.released = False
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"<FakeExec {self.container_id}/{self.exec_id} exit={self.exit_code}>"

    # -- what the test does, playing the process --

    def emit(self, data: bytes, stream: str = "stdout") -> None:
        """The process writes ``data`` to ``stream`` ("stdout" or "stderr")."""
        if self._exit.done():
            raise RuntimeError(f"{self!r} has exited: it cannot write")
        self._sinks[stream].write(data)

    def exit(self, code: int) -> None:
        """The process exits with ``code`` (all its output was emitted before)."""
        if not self._exit.done():
            self._exit.set_result(code)

    @property
    def exit_code(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    # -- the RunningExec contract --

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    async def write_stdin(self, data: bytes) -> None:
        if self.stdin_closed or self._exit.done():
            raise ExecError(ErrorCode.FAILED_PRECONDITION, f"{self!r} takes no more input")
        self.stdin += data

    def close_stdin(self) -> None:
        self.stdin_closed = True

    def resize(self, width: int, height: int) -> None:
        if not self.spec.tty:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, f"{self!r} has no terminal")
        check_terminal_size(width, height)
        self.sizes.append((width, height))

    async def kill(self) -> None:
        self.exit(128 + signal.SIGKILL)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.exit(128 + signal.SIGKILL)
        self._runtime._forget(self)


class FakeRuntime:
    """A :class:`~execstream.server.runtime.Runtime` whose execs are :class:`FakeExec` s."""

    def __init__(self, *, sample: ResourceSample | None = None) -> None:
        self.execs: dict[tuple[str, str], FakeExec] = {}
        self.paused: set[str] = set()
        #: (container_id, signum, exec_id) of every signal asked for, in order.
        self.signals: list[tuple[str, int, str | None]] = []
        #: Containers deleted, in order (their last exec released, or remove_container).
        self.removed: list[str] = []
        self.sample = sample or ResourceSample(0.0, 0, 0, 0, 0)
        #: Raised by the next spawn instead of starting an exec (a command that cannot run).
        self.refuse_next: ExecError | None = None
        self.closed = False
        self.token = f"fake.{id(self):x}"
        self._pids: Iterator[int] = itertools.count(1000)
        self._spawned = asyncio.Condition()

    async def spawn(
        self,
        container_id: str,
        exec_id: str,
        spec: ExecSpec,
        stdout: OutputSink,
        stderr: OutputSink,
    ) -> FakeExec:
        if self.closed:
            raise ExecError(ErrorCode.UNAVAILABLE, "the fake runtime is closed")
        if (container_id, exec_id) in self.execs:
            raise ExecError(
                ErrorCode.ALREADY_EXISTS, f"exec {container_id}/{exec_id} already exists"
            )
        if container_id in self.paused:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, f"container {container_id!r} is paused")
        if self.refuse_next is not None:
            error, self.refuse_next = self.refuse_next, None
            raise error
        proc = FakeExec(self, container_id, exec_id, spec, stdout, stderr, next(self._pids))
        self.execs[(container_id, exec_id)] = proc
        async with self._spawned:
            self._spawned.notify_all()
        return proc

    async def started(self, container_id: str, exec_id: str) -> FakeExec:
        """The exec once the server has spawned it (waits for it)."""
        async with self._spawned:
            await self._spawned.wait_for(lambda: (container_id, exec_id) in self.execs)
        return self.execs[(container_id, exec_id)]

    async def pause(self, container_id: str) -> None:
        self._scope(container_id)
        self.paused.add(container_id)

    async def resume(self, container_id: str) -> None:
        self._scope(container_id)
        self.paused.discard(container_id)

    def signal(self, container_id: str, signum: int, exec_id: str | None = None) -> None:
        for proc in self._scope(container_id, exec_id):
            proc.signals.append(signum)
        self.signals.append((container_id, signum, exec_id))

    def usage(self, container_id: str, exec_id: str | None = None) -> ResourceSample:
        self._scope(container_id, exec_id)
        return self.sample

    async def remove_container(self, container_id: str) -> None:
        for (owner, _), proc in list(self.execs.items()):
            if owner == container_id:
                proc.release()

    async def close(self) -> None:
        self.closed = True
        for proc in list(self.execs.values()):
            proc.release()

    def _scope(self, container_id: str, exec_id: str | None = None) -> list[FakeExec]:
        return in_scope(self.execs, container_id, exec_id)

    def _forget(self, proc: FakeExec) -> None:
        del self.execs[(proc.container_id, proc.exec_id)]
        if not any(c == proc.container_id for c, _ in self.execs):
            self.paused.discard(proc.container_id)
            self.removed.append(proc.container_id)
