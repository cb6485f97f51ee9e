"""Runs execs created over the wire with a runtime, through the executor API.

The service asks an :class:`ExecRunner` to create an exec (register, spawn, supervise
until exit), to control containers (pause, resume, signal, usage) and to remove execs after
retention.  It knows runtimes only by their contract,
:class:`~execstream.server.runtime.Runtime`.  An engine that runs execs itself needs none of
this: it uses the
:class:`~execstream.server.Executor` directly and serves without a runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

from ._errors import ErrorCode, ExecError
from ._executor import ExecHandle, Executor
from ._registry import ContainerRecord, ExecRecord
from ._state import ExecState
from .runtime import ExecSpec, ResourceSample, RunningExec, Runtime

__all__ = ["ExecRunner"]

log = logging.getLogger("execstream.server")


class ExecRunner:
    def __init__(self, executor: Executor, runtime: Runtime) -> None:
        self.executor = executor
        self.runtime = runtime
        self._procs: dict[tuple[str, str], RunningExec] = {}
        self._supervisors: set[asyncio.Task[None]] = set()

    async def create(
        self,
        container_id: str,
        exec_id: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        working_dir: str,
        tty: bool,
        terminal_size: tuple[int, int] | None = None,
    ) -> ExecRecord:
        """PROTOCOL 3.2: register the exec, start its process and supervise it to its exit."""
        for key in env:
            if not key or "=" in key or "\0" in key:
                raise ExecError(ErrorCode.INVALID_ARGUMENT, f"env key {key!r} is not valid")
        width, height = terminal_size or (80, 24)
        if tty and not (0 < width <= 65535 and 0 < height <= 65535):  # PROTOCOL 7.3
            raise ExecError(
                ErrorCode.INVALID_ARGUMENT,
                f"terminal_size must be 1-65535 each, got {width}x{height}",
            )
        handle = self.executor.register(container_id, exec_id, tty=tty)
        if tty:
            handle.record.terminal_size = (width, height)
        spec = ExecSpec(
            command=list(command),
            env=dict(env),
            working_dir=working_dir,
            tty=tty,
            width=width,
            height=height,
        )
        try:
            proc = await self.runtime.spawn(
                container_id, exec_id, spec, handle.stdout, handle.stderr
            )
        except BaseException:
            handle.unregister()
            raise
        handle.started(proc)
        self._procs[(container_id, exec_id)] = proc
        task = asyncio.create_task(self._supervise(handle, proc))
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        log.info("exec %s/%s started pid=%d: %s", container_id, exec_id, proc.pid, list(command))
        return handle.record

    async def _supervise(self, handle: ExecHandle, proc: RunningExec) -> None:
        code = await proc.wait()
        handle.exit(code)
        log.info("exec %s/%s exited with %d", handle.container_id, handle.exec_id, code)

    def remove(self, record: ExecRecord) -> None:
        """PROTOCOL 11.2: forget an exited exec and release what its process held."""
        proc = self._procs.pop((record.container_id, record.exec_id), None)
        if proc is not None:
            proc.release()
        self.executor.handle(record).unregister()

    async def pause(self, container: ContainerRecord) -> None:
        self.executor.registry.pause(container)
        try:
            await self.runtime.pause(container.container_id)
        except BaseException:
            self.executor.registry.resume(container)
            raise

    async def resume(self, container: ContainerRecord) -> None:
        self.executor.registry.check_paused(container)
        await self.runtime.resume(container.container_id)
        self.executor.registry.resume(container)

    def signal(self, container: ContainerRecord, signum: int, exec_id: str) -> None:
        execs = [container.execs[exec_id]] if exec_id else list(container.execs.values())
        if not any(e.state in (ExecState.RUNNING, ExecState.PAUSED) for e in execs):
            what = f"exec {exec_id!r}" if exec_id else f"container {container.container_id!r}"
            raise ExecError(ErrorCode.FAILED_PRECONDITION, f"{what} has no live process")
        self.runtime.signal(container.container_id, signum, exec_id or None)

    def usage(self, container_id: str, exec_id: str) -> ResourceSample:
        return self.runtime.usage(container_id, exec_id or None)

    async def close(self) -> None:
        """Kill every running exec, let the supervisors record the exits, free the runtime."""
        for proc in list(self._procs.values()):
            with contextlib.suppress(Exception):
                await proc.kill()
        if self._supervisors:
            await asyncio.wait(list(self._supervisors), timeout=5)
        await self.runtime.close()
