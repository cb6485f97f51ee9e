"""The process runtime itself: containers of processes, their control, usage and cleanup.

See the package docstring for the theory of operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from ..._errors import ErrorCode, ExecError
from .._base import ExecSpec, OutputSink, ResourceSample, in_scope, refused_spawn
from ._exec import ProcessExec
from ._finder import ProcessFinder, reap_exited_mains
from ._freezer import Freezer
from ._procfs import ProcStat, cpu_percent, live_usage, memory_limit, scan_proc
from ._spawn import (
    DISCARD,
    Spawned,
    become_subreaper,
    check_id,
    forked_in_new_group,
    send_signal,
    start_process,
)

__all__ = ["ProcessRuntime"]

log = logging.getLogger("execstream.server.process")

_SWEEP_INTERVAL = 1.0
_KILL_TIMEOUT = 5.0
# A process in disk sleep (state D) stops only once its I/O is done: seconds on a busy disk.
_STOP_TIMEOUT = 10.0
_SIGNAL_ROUNDS = 8


class ProcessRuntime:
    """Runs execs as processes, grouped in containers (a directory and a set of processes).

    ``cgroup_freezer``: ``None`` uses the cgroup-v1 freezer where one is writable, else
    signals; ``True`` requires it; ``False`` never uses it.  Decided on first use (see
    :attr:`pause_method`).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        drain_timeout: float = 2.0,
        read_size: int = 65536,
        cgroup_freezer: bool | None = None,
    ) -> None:
        if drain_timeout < 0 or read_size <= 0:
            raise ValueError("drain_timeout must be >= 0 and read_size > 0")
        self.state_dir = Path(state_dir)
        self.drain_timeout = drain_timeout
        self.read_size = read_size
        self._want_freezer = cgroup_freezer
        self._freezer: Freezer | None = None
        self._finder = ProcessFinder()
        self._set_up = False
        self._token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._serial = itertools.count(1)
        self._execs: dict[tuple[str, str], ProcessExec] = {}
        #: How many of ``_execs`` each container has: its directory exists while it has one.
        self._exec_counts: dict[str, int] = {}
        self._spawning: set[tuple[str, str]] = set()  # forking on the spawner thread
        self._forking: set[int] = set()  # their pids, once forked (added on that thread)
        self._in_fork = 0  # forks under way: their children may be zombies before the above
        #: Execs by the pid of their main process, until it is reaped (an entry left by any
        #: other way out has an exit code: see ``live_main``).
        self._mains: dict[int, ProcessExec] = {}
        #: Released execs whose processes, zombies or cgroup are not gone yet.
        self._graveyard: set[ProcessExec] = set()
        #: Execs whose main process was reaped, waiting for :meth:`note_exit` to look at them.
        self._exits: list[ProcessExec] = []
        self._noting = False
        self._paused: set[str] = set()
        self._cpu_windows: dict[tuple[str, str | None], tuple[float, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def token(self) -> str:
        """Marks this runtime's execs (``EXECSTREAM_TAG``); ``end_leftovers`` takes it."""
        return self._token

    @property
    def pause_method(self) -> str:
        """``"freezer"`` (cgroup v1) or ``"signals"`` (SIGSTOP/SIGCONT)."""
        self._set_up_once()
        return "freezer" if self._freezer is not None else "signals"

    def container_dir(self, container_id: str) -> Path:
        check_id("container_id", container_id)
        return self.state_dir / "containers" / container_id

    async def spawn(
        self,
        container_id: str,
        exec_id: str,
        spec: ExecSpec,
        stdout: OutputSink,
        stderr: OutputSink,
    ) -> ProcessExec:
        """Start ``spec`` as exec ``container_id/exec_id``; its output goes to the sinks.

        On a TTY both streams are the terminal, written to ``stdout``.
        """
        loop = asyncio.get_running_loop()
        if self._closed:
            raise ExecError(ErrorCode.UNAVAILABLE, "the process runtime is closed")
        check_id("exec_id", exec_id)
        directory = self.container_dir(container_id)
        key = (container_id, exec_id)
        if key in self._execs or key in self._spawning:
            raise ExecError(
                ErrorCode.ALREADY_EXISTS, f"exec {container_id}/{exec_id} already exists"
            )
        self._check_not_paused(container_id)
        self._set_up_once()
        self._make_container_dir(container_id, directory)
        tag = f"{self._token}.{next(self._serial)}"
        start = functools.partial(
            start_process, container_id, exec_id, spec, stdout, stderr, directory, tag=tag
        )

        def fork(group: Path | None) -> Spawned:
            self._in_fork += 1  # before the child exists (see reap_exited_mains)
            try:
                spawned = start(group)
                self._forking.add(spawned.popen.pid)
            finally:
                self._in_fork -= 1
            return spawned

        # Counted from now: releasing a sibling meanwhile must not remove the directory.
        self._exec_counts[container_id] = self._exec_counts.get(container_id, 0) + 1
        self._spawning.add(key)
        try:
            if self._freezer is None:
                spawned = fork(None)
            else:
                abandon = functools.partial(self._abandon, container_id, exec_id, spec)
                spawned = await forked_in_new_group(self._freezer, fork, abandon)
                try:  # as if the spawn had come after a pause or close made meanwhile
                    self._check_not_paused(container_id)
                except ExecError:
                    abandon(spawned)
                    raise
            proc = self._exec_of(spawned, container_id, exec_id, spec)
            self._forking.discard(proc.pid)
        except BaseException as exc:
            self._uncount(container_id)
            if not self._has_execs(container_id):
                shutil.rmtree(directory, ignore_errors=True)
            if isinstance(exc, (OSError, ValueError)):
                raise refused_spawn(exc, spec.command[0]) from exc
            raise
        finally:
            self._spawning.discard(key)
        self._execs[key] = proc
        self._ensure_sweeper(loop)
        return proc

    def _check_not_paused(self, container_id: str) -> None:
        if self._closed:
            raise ExecError(ErrorCode.UNAVAILABLE, "the process runtime is closed")
        if container_id in self._paused:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, f"container {container_id!r} is paused")

    def _uncount(self, container_id: str) -> None:
        self._exec_counts[container_id] -= 1
        if not self._exec_counts[container_id]:
            del self._exec_counts[container_id]

    def processes_of(self, container_id: str) -> list[int]:
        """Live pids of every process of the container (released stragglers included)."""
        execs = [e for e in self._all_execs() if e.container_id == container_id]
        if not execs:
            return []
        stats = scan_proc()
        found = self._finder.members(stats, execs)
        return sorted(pid for pids in found.values() for pid in pids if stats[pid].alive)

    async def pause(self, container_id: str) -> None:
        """PROTOCOL 10.1: stop every process of the container (see :attr:`pause_method`)."""
        execs = self._scope(container_id)
        if container_id in self._paused:
            return
        self._paused.add(container_id)
        try:
            if self._freezer is not None:
                groups = [proc.group for proc in execs if proc.group is not None]
                await self._freezer.freeze(container_id, groups, _STOP_TIMEOUT)
            else:
                await self._finder.stop(container_id, execs, _STOP_TIMEOUT)
        except BaseException:
            self._paused.discard(container_id)
            self._continue(execs)
            raise

    async def resume(self, container_id: str) -> None:
        """PROTOCOL 10.2."""
        execs = self._scope(container_id)
        self._paused.discard(container_id)
        self._continue(execs)

    def signal(self, container_id: str, signum: int, exec_id: str | None = None) -> None:
        """PROTOCOL 10.3: ``signum`` to every live process of the container or exec."""
        execs = self._scope(container_id, exec_id)
        try:
            signal.Signals(signum)
        except ValueError:
            raise ExecError(ErrorCode.INVALID_ARGUMENT, f"unknown signal {signum}") from None
        sent: set[int] = set()
        # Rescan: a process may fork while its siblings are being signalled.
        for _ in range(_SIGNAL_ROUNDS):
            stats = scan_proc()
            found = self._finder.members(stats, execs)
            fresh = [p for ps in found.values() for p in ps if stats[p].alive and p not in sent]
            if not fresh:
                break
            # Oldest first, so parents before children: a shell whose job died first could
            # otherwise exit on its own before its signal arrives (exit 0, not 128 + N).
            for pid in sorted(fresh, key=lambda pid: (stats[pid].start_ticks, pid)):
                send_signal(pid, signum)
            sent.update(fresh)
        if signum == signal.SIGKILL and self._freezer is not None:
            # A frozen v1 task dies only once thawed; all of these have SIGKILL pending.
            for proc in execs:
                if proc.group is not None:
                    self._freezer.set_state(proc.group, "THAWED")

    def usage(self, container_id: str, exec_id: str | None = None) -> ResourceSample:
        """PROTOCOL 9.4, measured as the module docstring says."""
        execs = self._scope(container_id, exec_id)
        stats = scan_proc()
        found = self._finder.members(stats, execs)
        ticks, rss, live, read, written = live_usage(stats, itertools.chain(*found.values()))
        ticks += sum(proc.reaped.cpu_ticks for proc in execs)
        read += sum(proc.reaped.read_bytes for proc in execs)
        written += sum(proc.reaped.write_bytes for proc in execs)
        return ResourceSample(
            cpu_percent=cpu_percent(
                self._cpu_windows,
                (container_id, exec_id),
                ticks,
                lambda: min(proc.start_ticks for proc in execs),
            ),
            memory_bytes=rss,
            memory_limit=memory_limit(min(live)) if live else 0,
            io_read_bytes=read,
            io_write_bytes=written,
        )

    async def remove_container(self, container_id: str) -> None:
        """Release every exec of the container; its directory goes with the last one."""
        for (owner, _), proc in list(self._execs.items()):
            if owner == container_id:
                self.release_exec(proc)

    async def close(self) -> None:
        """Kill everything still running, reap it, remove the container dirs.  Idempotent."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        # Shielded: a cancelled caller must not leave processes behind.
        await asyncio.shield(self._closing)

    # -- internals --

    def _set_up_once(self) -> None:
        if self._set_up:
            return
        self._set_up = True
        self._finder.subreaper = become_subreaper()
        if self._want_freezer is False:
            return
        try:
            self._freezer = Freezer.create(self._token)
            self._finder.freezer = self._freezer
        except OSError as exc:
            if self._want_freezer:
                raise RuntimeError(f"the cgroup v1 freezer is not usable: {exc}") from exc
            log.info("cgroup v1 freezer not usable (%s): pausing with SIGSTOP/SIGCONT", exc)

    def _abandon(self, container_id: str, exec_id: str, spec: ExecSpec, spawned: Spawned) -> None:
        """A process forked for a spawn that failed or was cancelled since: released."""
        outputs = [(fd, DISCARD, name) for fd, _, name in spawned.outputs]
        spawned = dataclasses.replace(spawned, outputs=outputs)
        self.release_exec(self._exec_of(spawned, container_id, exec_id, spec))
        self._forking.discard(spawned.popen.pid)
        self._ensure_sweeper(asyncio.get_running_loop())

    def _exec_of(
        self, spawned: Spawned, container_id: str, exec_id: str, spec: ExecSpec
    ) -> ProcessExec:
        self._finder.changes += 1
        self._mains[spawned.popen.pid] = proc = ProcessExec(
            self,
            asyncio.get_running_loop(),
            spawned,
            container_id=container_id,
            exec_id=exec_id,
            spec=spec,
            read_size=self.read_size,
            drain_timeout=self.drain_timeout,
        )
        return proc

    def _make_container_dir(self, container_id: str, directory: Path) -> None:
        # A stat where a mkdir would fail (EEXIST) and then stat anyway; an exec may have
        # removed its own HOME, so it is made again.
        if not self._has_execs(container_id) or not os.path.isdir(directory):
            directory.mkdir(parents=True, exist_ok=True)

    def _has_execs(self, container_id: str) -> bool:
        return container_id in self._exec_counts

    def _all_execs(self) -> Iterator[ProcessExec]:
        """Live and released execs, lazily."""
        return itertools.chain(self._execs.values(), self._graveyard)

    def _scope(self, container_id: str, exec_id: str | None = None) -> list[ProcessExec]:
        return in_scope(self._execs, container_id, exec_id)

    def note_exit(self, proc: ProcessExec) -> None:
        """:class:`ExecOwner`: the main process of ``proc`` was reaped."""
        self._finder.changes += 1
        self._exits.append(proc)
        if self._noting:
            return  # reaped by the call below (reap_if_exited): that call notes it too
        self._noting = True
        try:
            unknown_zombie = reap_exited_mains(
                self._mains, self._forking, lambda: self._in_fork > 0
            )
            exits, self._exits = self._exits, []
            # Record the main process's descendants now, while they are alive and findable:
            # re-parented and dead, an escaped one could no longer be told apart.
            for done in exits:
                if self._mains.get(done.pid) is done:
                    del self._mains[done.pid]
            left, sure = (exits, True) if unknown_zombie else self._may_have_left(exits)
            for done in exits:
                if done not in left and sure and unknown_zombie is False:
                    # Nothing of the exec is alive or unreaped: no scan (a cost per exit).
                    # (Undecided: its session is matched until the next sweep sees it empty.)
                    done.session_active = False
                    done.ended = True
            if left:
                stats = scan_proc()
                self._finder.members(stats, left)
                self._finder.reap_orphans(stats, self._all_execs())
        except OSError:
            log.exception("scanning the processes of %s failed", proc.label)
        finally:
            self._noting = False

    def _may_have_left(self, exits: Sequence[ProcessExec]) -> tuple[list[ProcessExec], bool]:
        return self._finder.may_have_left(
            exits, self._mains, self._forking, lambda: self._in_fork > 0
        )

    def _left_nothing(self, proc: ProcessExec) -> bool:
        return self._may_have_left([proc]) == ([], True)  # and sure of it

    def _kill_now(self, proc: ProcessExec) -> int:
        """One round of SIGKILL to the live processes of ``proc``; how many there were."""
        if self._left_nothing(proc):
            return 0  # removing an exited exec (PROTOCOL 11.2) scans nothing
        stats = scan_proc()
        live = [pid for pid in self._finder.members(stats, [proc])[proc] if stats[pid].alive]
        self._sigkill(proc, live)
        return len(live)

    def _sigkill(self, proc: ProcessExec, pids: Iterable[int]) -> None:
        freezer, group = self._freezer, proc.group
        if freezer is not None and group is not None:
            freezer.set_state(group, "FROZEN")  # nothing forks while we kill
        for pid in pids:
            send_signal(pid, signal.SIGKILL)
        if freezer is not None and group is not None:
            freezer.set_state(group, "THAWED")  # a frozen v1 task dies only once thawed

    async def kill_exec(self, proc: ProcessExec) -> None:
        """:class:`ExecOwner`: what :meth:`ProcessExec.kill` does."""
        if self._left_nothing(proc):
            return  # a server closing with many retained exited execs scans nothing for them
        deadline = time.monotonic() + _KILL_TIMEOUT
        while self._kill_now(proc) or proc.exit_code is None:
            if time.monotonic() > deadline:
                log.warning("%s: processes still alive %.0f s after SIGKILL", proc, _KILL_TIMEOUT)
                break
            await asyncio.sleep(0.005)
        self._finder.reap_orphans(scan_proc(), self._all_execs())

    def release_exec(self, proc: ProcessExec) -> None:
        """:class:`ExecOwner`: what :meth:`ProcessExec.release` does."""
        if proc.released:
            return
        proc.released = True
        key = (proc.container_id, proc.exec_id)
        if self._execs.get(key) is proc:
            del self._execs[key]
            self._uncount(proc.container_id)
        self._cpu_windows.pop(key, None)
        try:
            self._kill_now(proc)
        finally:
            proc.close_io(f"{proc.label} was released")
            self._graveyard.add(proc)
            if not self._has_execs(proc.container_id):
                self._paused.discard(proc.container_id)
                self._cpu_windows.pop((proc.container_id, None), None)
                shutil.rmtree(self.container_dir(proc.container_id), ignore_errors=True)

    def _ensure_sweeper(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep_loop(), name="execstream-process-sweep")

    async def _sweep_loop(self) -> None:
        while self._execs or self._graveyard or self._finder.strays_waiting:
            await asyncio.sleep(_SWEEP_INTERVAL)
            try:
                # Off the loop thread: ~15 us a process.  Older than what was learnt meanwhile
                # (an orphan recorded, then dead: never reaped), it would undo that: rescanned.
                changes = self._finder.changes
                stats = await asyncio.to_thread(scan_proc)
                self._sweep(stats if self._finder.changes == changes else None)
            except Exception:
                log.exception("the process sweep failed")

    def _sweep(self, stats: Mapping[int, ProcStat] | None = None) -> None:
        """Record escaped descendants, finish off released execs, reap orphans."""
        execs = list(self._all_execs())
        if not execs and not self._finder.strays_waiting:
            return
        if stats is None:
            stats = scan_proc()
        found = self._finder.members(stats, execs)
        for proc in list(self._graveyard):
            pids = found[proc]
            if live := [pid for pid in pids if stats[pid].alive]:
                self._sigkill(proc, live)  # no freeze and thaw (two writes) for nothing
            if proc.exit_code is None or pids:
                continue
            if proc.group is not None and self._freezer is not None:
                if not self._freezer.remove(proc.group):
                    continue
                proc.group = None
            self._graveyard.discard(proc)
        self._finder.reap_orphans(stats, self._all_execs())

    def _continue(self, execs: Sequence[ProcessExec]) -> None:
        if self._freezer is not None:
            for proc in execs:
                if proc.group is not None:
                    self._freezer.set_state(proc.group, "THAWED")
            return
        stats = scan_proc()
        for pids in self._finder.members(stats, execs).values():
            for pid in pids:
                if stats[pid].alive:
                    send_signal(pid, signal.SIGCONT)

    async def _close(self) -> None:
        self._closed = True
        for proc in list(self._execs.values()):
            self.release_exec(proc)
        deadline = time.monotonic() + _KILL_TIMEOUT
        while self._graveyard:
            self._sweep()
            if not self._graveyard or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        if self._graveyard:
            log.warning("processes of %s survived SIGKILL", sorted(map(repr, self._graveyard)))
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._freezer is not None and not self._graveyard:
            self._freezer.close()
        with contextlib.suppress(OSError):
            (self.state_dir / "containers").rmdir()
