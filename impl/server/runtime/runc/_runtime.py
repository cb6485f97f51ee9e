"""The runc runtime: containers are OCI containers, execs are ``runc exec`` in them.

See the package docstring for the theory of operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ..._errors import ErrorCode, ExecError
from .._base import ExecSpec, OutputSink, ResourceSample, refused_spawn
from ..process._exec import ProcessExec
from ..process._procfs import CLK_TCK, PAGE_SIZE, boot_seconds, read_io, read_stat
from ..process._spawn import check_id, send_signal
from ._bundle import (
    HOST_TRAMPOLINE,
    PACKAGES,
    assemble_busybox_rootfs,
    check_exec,
    container_config,
    exec_process,
    find_tool,
)
from ._container import (
    Container,
    ExecEntry,
    abandon,
    has_content,
    has_exited,
    reap_if_ours,
    remove_empty,
    spawn_runc_exec,
)

__all__ = ["RuncRuntime", "RuntimeUnavailable", "runc_problem"]

log = logging.getLogger("execstream.server.runc")

_KILL_TIMEOUT = 5.0
_START_TIMEOUT = 30.0
_MIN_CPU_WINDOW = 0.1


class RuntimeUnavailable(OSError):
    """The runtime cannot run here; the message says what to install or change."""


def runc_problem() -> str | None:
    """Why the runc runtime cannot run here, or None when it can."""
    missing = [name for name in ("runc", "busybox") if find_tool(name) is None]
    if missing:
        return f"the runc runtime needs {' and '.join(missing)}: {PACKAGES}"
    if os.geteuid() != 0:
        return "the runc runtime needs root (runc creates namespaces and cgroups)"
    return None


class RuncRuntime:
    """Runs every container as an OCI container with ``runc`` (see the package docstring).

    ``rootfs``: the root filesystem each container starts from (copied per container);
    ``None`` assembles one from busybox under ``state_dir``.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        rootfs: Path | None = None,
        drain_timeout: float = 2.0,
        read_size: int = 65536,
    ) -> None:
        if (problem := runc_problem()) is not None:
            raise RuntimeUnavailable(problem)
        if rootfs is not None and not (Path(rootfs) / "bin").is_dir():
            raise RuntimeUnavailable(f"--rootfs {rootfs} is not a root filesystem (no bin/)")
        runc, busybox = find_tool("runc"), find_tool("busybox")
        assert runc is not None and busybox is not None
        self.runc = str(runc)
        self._busybox = busybox
        self.state_dir = Path(state_dir)
        self.home = self.state_dir / "runc"
        self._root = self.home / "state"  # runc --root: where a restart finds old containers
        self._rootfs = Path(rootfs) if rootfs is not None else self.home / "busybox-rootfs"
        self._own_rootfs = rootfs is None
        self.drain_timeout = drain_timeout
        self.read_size = read_size
        self._token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._cgroup_parent = f"execstream-{self._token}"
        #: The per-server groups above the containers' (runc does not remove them).
        self._cgroup_parents: set[Path] = set()
        self._template: dict[str, Any] | None = None
        self._containers: dict[str, Container] = {}
        self._creating: dict[str, asyncio.Task[Container]] = {}
        self._deleting: dict[str, asyncio.Task[None]] = {}
        self._execs: dict[tuple[str, str], ExecEntry] = {}
        self._by_proc: dict[ProcessExec, ExecEntry] = {}
        self._cpu_windows: dict[tuple[str, str | None], tuple[float, float]] = {}
        self._serial = itertools.count(1)
        self._set_up: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._closed = False

    # -- the Runtime contract ------------------------------------------------------------

    async def spawn(
        self,
        container_id: str,
        exec_id: str,
        spec: ExecSpec,
        stdout: OutputSink,
        stderr: OutputSink,
    ) -> ProcessExec:
        """Start ``spec`` with ``runc exec`` in the container, created on its first exec."""
        if self._closed:
            raise ExecError(ErrorCode.UNAVAILABLE, "the runc runtime is closed")
        check_id("container_id", container_id)
        check_id("exec_id", exec_id)
        if (container_id, exec_id) in self._execs:
            raise ExecError(
                ErrorCode.ALREADY_EXISTS, f"exec {container_id}/{exec_id} already exists"
            )
        container = await self._container(container_id)
        if container.paused:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, f"container {container_id!r} is paused")
        try:
            try:
                check_exec(container.bundle / "rootfs", spec)
            except (OSError, ValueError) as exc:
                raise refused_spawn(exc, spec.command[0]) from exc
            entry = await self._start(container, exec_id, spec, stdout, stderr)
        except BaseException:
            if not container.execs:
                self._retire(container)
            raise
        self._execs[(container_id, exec_id)] = entry
        self._by_proc[entry.proc] = entry
        container.execs[exec_id] = entry
        return entry.proc

    async def pause(self, container_id: str) -> None:
        """PROTOCOL 10.1: ``runc pause`` freezes the container's cgroup, init included."""
        container = self._scope(container_id)
        if container.paused:
            return
        await self._runc("pause", container_id)
        container.paused = True

    async def resume(self, container_id: str) -> None:
        container = self._scope(container_id)
        await self._runc("resume", container_id)
        container.paused = False

    @property
    def token(self) -> str:
        """Marks this runtime's cgroups and processes for a restart after a crash."""
        return self._token

    def signal(self, container_id: str, signum: int, exec_id: str | None = None) -> None:
        """PROTOCOL 10.3: to every process of the container (but its init), or of one exec."""
        container = self._scope(container_id, exec_id)
        try:
            signal.Signals(signum)
        except ValueError:
            raise ExecError(ErrorCode.INVALID_ARGUMENT, f"unknown signal {signum}") from None
        skip = {container.init_pid}
        skip.update(e.main_pid() or 0 for e in container.execs.values() if e.wrapped)
        if exec_id is not None:
            pids = self._execs[(container_id, exec_id)].members()
        else:
            pids = container.cgroup.procs()
        pids = [pid for pid in pids if pid not in skip]
        for pid in pids:
            send_signal(pid, signum)

    def usage(self, container_id: str, exec_id: str | None = None) -> ResourceSample:
        """PROTOCOL 9.4: a container from its cgroup, an exec from /proc of its processes."""
        container = self._scope(container_id, exec_id)
        stats = container.cgroup.stats()
        if exec_id is None:
            cpu_seconds = stats.cpu_ns / 1e9
            memory, read, written = stats.memory_bytes, stats.io_read_bytes, stats.io_write_bytes
            start = container.started
        else:
            cpu_ticks = memory = read = written = 0
            entry = self._execs[(container_id, exec_id)]
            for pid in entry.members():
                st = read_stat(pid)
                if st is None or not st.alive:
                    continue
                cpu_ticks += st.cpu_ticks
                memory += st.rss_pages * PAGE_SIZE
                r, w = read_io(pid)
                read, written = read + r, written + w
            # What ended counts too (PROTOCOL 9.4): wait4 of `runc exec` covers the process
            # it reaped, the exec's first one.
            reaped = entry.proc.reaped
            cpu_seconds = (cpu_ticks + reaped.cpu_ticks) / CLK_TCK
            read, written = read + reaped.read_bytes, written + reaped.write_bytes
            main = read_stat(entry.proc.pid)
            start = main.start_ticks / CLK_TCK if main is not None else container.started
        return ResourceSample(
            cpu_percent=self._cpu_percent((container_id, exec_id), cpu_seconds, start),
            memory_bytes=memory,
            memory_limit=stats.memory_limit,
            io_read_bytes=read,
            io_write_bytes=written,
        )

    async def remove_container(self, container_id: str) -> None:
        container = self._containers.get(container_id)
        if container is not None:
            for entry in list(container.execs.values()):
                self.release_exec(entry.proc)
        deleting = self._deleting.get(container_id)
        if deleting is not None:
            await asyncio.shield(deleting)

    async def close(self) -> None:
        """Kill every exec, delete every container.  Idempotent."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.shield(self._closing)

    # -- ExecOwner: what a ProcessExec asks of its runtime -------------------------------

    async def kill_exec(self, proc: ProcessExec) -> None:
        entry = self._by_proc.get(proc)
        deadline = time.monotonic() + _KILL_TIMEOUT
        while True:
            live = entry.members() if entry is not None else []
            for pid in live:
                send_signal(pid, signal.SIGKILL)
            if not live and proc.exit_code is not None:
                return
            if entry is not None and entry.container.paused:
                # A frozen process dies only once thawed, and runc freezes whole containers:
                # killing an exec (the server shutting down) resumes its container.
                log.info("%r: resuming its paused container to kill it", proc)
                with contextlib.suppress(ExecError):
                    await self._runc("resume", entry.container.container_id)
                entry.container.paused = False
            if time.monotonic() > deadline:
                log.warning("%r: processes alive %.0f s after SIGKILL", proc, _KILL_TIMEOUT)
                return
            await asyncio.sleep(0.005)

    def release_exec(self, proc: ProcessExec) -> None:
        if proc.released:
            return
        proc.released = True
        entry = self._by_proc.pop(proc, None)
        try:
            if entry is not None:
                for pid in entry.members():
                    send_signal(pid, signal.SIGKILL)
        finally:
            proc.close_io(f"{proc.label} was released")
            if entry is not None:
                container = entry.container
                self._execs.pop((container.container_id, proc.exec_id), None)
                self._cpu_windows.pop((container.container_id, proc.exec_id), None)
                container.execs.pop(proc.exec_id, None)
                if not container.execs:
                    self._retire(container)

    def note_exit(self, proc: ProcessExec) -> None:
        entry = self._by_proc.get(proc)
        if entry is not None:
            entry.members()  # record descendants while they are still findable

    # -- containers ----------------------------------------------------------------------

    async def _container(self, container_id: str) -> Container:
        deleting = self._deleting.get(container_id)
        if deleting is not None:
            await asyncio.shield(deleting)  # same ID again: the old one must be gone first
        if (container := self._containers.get(container_id)) is not None:
            return container
        creating = self._creating.get(container_id)
        if creating is None:
            creating = asyncio.get_running_loop().create_task(self._create(container_id))
            self._creating[container_id] = creating
            creating.add_done_callback(lambda _: self._creating.pop(container_id, None))
        return await asyncio.shield(creating)

    async def _create(self, container_id: str) -> Container:
        await self._ensure_set_up()
        assert self._template is not None
        bundle = self.home / "bundles" / container_id
        await asyncio.to_thread(self._prepare_bundle, bundle, container_id)
        try:
            await self._runc(
                "run", "--detach", "--bundle", str(bundle), container_id, limit=_START_TIMEOUT
            )
            state = json.loads(await self._runc("state", container_id))
        except BaseException:
            with contextlib.suppress(ExecError):
                await self._runc("delete", "--force", container_id)
            await asyncio.to_thread(shutil.rmtree, bundle, True)
            raise
        container = Container(container_id, bundle, int(state["pid"]), boot_seconds())
        self._containers[container_id] = container
        log.info("container %s created (init pid %d)", container_id, container.init_pid)
        return container

    def _prepare_bundle(self, bundle: Path, container_id: str) -> None:
        assert self._template is not None
        shutil.rmtree(bundle, ignore_errors=True)
        bundle.mkdir(parents=True)
        shutil.copytree(self._rootfs, bundle / "rootfs", symlinks=True)
        config = container_config(self._template, hostname=container_id)
        config["linux"]["cgroupsPath"] = f"{self._cgroup_parent}/{container_id}"
        (bundle / "config.json").write_text(json.dumps(config))

    def _retire(self, container: Container) -> None:
        """The container's last exec is gone: delete it (in the background)."""
        cid = container.container_id
        if self._containers.get(cid) is not container or cid in self._deleting:
            return
        del self._containers[cid]
        self._cpu_windows.pop((cid, None), None)
        task = asyncio.get_running_loop().create_task(self._delete(container))
        self._deleting[cid] = task
        task.add_done_callback(lambda _: self._deleting.pop(cid, None))

    async def _delete(self, container: Container) -> None:
        try:
            await self._runc("delete", "--force", container.container_id)
        except ExecError as error:
            log.warning("could not delete container %s: %s", container.container_id, error)
        reap_if_ours(container.init_pid)
        self._cgroup_parents.update(path.parent for path in container.cgroup.paths.values())
        remove_empty(self._cgroup_parents)
        await asyncio.to_thread(shutil.rmtree, container.bundle, True)

    # -- execs ---------------------------------------------------------------------------

    async def _start(
        self,
        container: Container,
        exec_id: str,
        spec: ExecSpec,
        stdout: OutputSink,
        stderr: OutputSink,
    ) -> ExecEntry:
        assert self._template is not None
        cid = container.container_id
        serial = next(self._serial)
        execs_dir = container.bundle / "execs"
        execs_dir.mkdir(exist_ok=True)
        process_file = execs_dir / f"{serial}.json"
        # The trampolines need a shell and setsid (busybox has them; a --rootfs may not).
        passthrough = container.passthrough
        process = exec_process(self._template, spec, cid, exec_id, passthrough=passthrough)
        process_file.write_text(json.dumps(process))
        pid_file = execs_dir / f"{serial}.pid"
        argv = [self.runc, "--root", str(self._root), "exec", "--process", str(process_file)]
        argv += ["--pid-file", str(pid_file)]
        if passthrough:
            argv = [*HOST_TRAMPOLINE, *argv, "--preserve-fds", "3"]
        argv.append(cid)
        spawned = spawn_runc_exec(argv, spec, stdout, stderr, passthrough=passthrough)
        # runc writes the pid file a moment after the process started; until then nothing
        # could find the exec's processes to signal.  Waited for before the output is read,
        # so that the creator's cursor still starts at sequence 1 (PROTOCOL 6.3).
        deadline = time.monotonic() + _START_TIMEOUT
        try:
            while not has_content(pid_file) and not has_exited(spawned.popen.pid):
                if time.monotonic() > deadline:
                    log.warning("exec %s/%s: runc wrote no pid file", cid, exec_id)
                    break
                await asyncio.sleep(0.005)
        except BaseException:
            abandon(spawned)  # cancelled: what is left goes with the container
            raise
        proc = ProcessExec(
            self,
            asyncio.get_running_loop(),
            spawned,
            container_id=cid,
            exec_id=exec_id,
            spec=spec,
            read_size=self.read_size,
            drain_timeout=self.drain_timeout,
        )
        return ExecEntry(proc, container, pid_file, wrapped=spec.tty and passthrough)

    def _scope(self, container_id: str, exec_id: str | None = None) -> Container:
        if exec_id is not None and (container_id, exec_id) not in self._execs:
            raise ExecError(ErrorCode.NOT_FOUND, f"exec {container_id}/{exec_id} not found")
        container = self._containers.get(container_id)
        if container is None or not container.execs:
            raise ExecError(ErrorCode.NOT_FOUND, f"container {container_id!r} not found")
        return container

    async def _runc(self, *args: str, limit: float = _KILL_TIMEOUT * 2) -> bytes:
        """Run one runc command; its failure is an ExecError quoting runc's message.

        Its stderr goes to a file, not a pipe: ``runc run --detach`` hands its stdio to the
        container's init, which would hold a pipe open for the container's life.
        """
        detached = "--detach" in args
        with tempfile.TemporaryFile() as errors:
            process = await asyncio.create_subprocess_exec(
                self.runc,
                "--root",
                str(self._root),
                *args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if detached else subprocess.PIPE,
                stderr=errors,
            )
            try:
                async with asyncio.timeout(limit):
                    out, _ = await process.communicate()
            except TimeoutError:
                process.kill()
                await process.wait()
                raise ExecError(
                    ErrorCode.INTERNAL, f"runc {args[0]} took over {limit:.0f} s"
                ) from None
            if process.returncode == 0:
                return out or b""
            errors.seek(0)
            message = errors.read().decode(errors="replace").strip().splitlines()
        raise ExecError(
            ErrorCode.INTERNAL,
            f"runc {args[0]} failed: {message[-1] if message else process.returncode}",
        )

    async def _ensure_set_up(self) -> None:
        if self._set_up is None:
            self._set_up = asyncio.get_running_loop().create_task(self._do_set_up())
        await asyncio.shield(self._set_up)

    async def _do_set_up(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        await self._delete_leftovers()
        if self._own_rootfs and not self._rootfs.is_dir():
            await asyncio.to_thread(assemble_busybox_rootfs, self._rootfs, self._busybox)
        template_dir = Path(tempfile.mkdtemp(prefix="spec-", dir=self.home))
        try:
            await asyncio.to_thread(
                subprocess.run,
                [self.runc, "spec", "--bundle", str(template_dir)],
                check=True,
                capture_output=True,
                timeout=30,
            )
            self._template = json.loads((template_dir / "config.json").read_text())
        finally:
            shutil.rmtree(template_dir, ignore_errors=True)

    async def _delete_leftovers(self) -> None:
        """A restart on the same state directory: a dead server's containers are deleted."""
        if not self._root.is_dir():
            return
        for leftover in sorted(p.name for p in self._root.iterdir() if p.is_dir()):
            log.warning("deleting container %s left by an earlier server", leftover)
            with contextlib.suppress(ExecError):
                await self._runc("delete", "--force", leftover)
        await asyncio.to_thread(shutil.rmtree, self.home / "bundles", True)

    def _cpu_percent(self, key: tuple[str, str | None], seconds: float, start: float) -> float:
        """Over the window since the previous sample of ``key`` (since ``start`` at first)."""
        now = time.monotonic()
        previous = self._cpu_windows.get(key)
        if previous is None:
            window, used = boot_seconds() - start, seconds
            self._cpu_windows[key] = (now, seconds)
        else:
            window, used = now - previous[0], seconds - previous[1]
            if window >= _MIN_CPU_WINDOW:
                self._cpu_windows[key] = (now, seconds)
        return max(0.0, used / window * 100.0) if window > 0 else 0.0

    async def _close(self) -> None:
        self._closed = True
        for creating in list(self._creating.values()):
            with contextlib.suppress(Exception):
                await creating
        procs = [entry.proc for entry in self._execs.values()]
        # Killed first, so that their exits are real ones (137), paused containers included.
        await asyncio.gather(*(self.kill_exec(proc) for proc in procs), return_exceptions=True)
        for container in list(self._containers.values()):
            for entry in list(container.execs.values()):
                self.release_exec(entry.proc)
            self._retire(container)
        if self._deleting:
            await asyncio.gather(*self._deleting.values(), return_exceptions=True)
        # The `runc exec` processes end with their container: let their exits be reaped.
        deadline = time.monotonic() + _KILL_TIMEOUT
        while any(p.exit_code is None for p in procs):
            if time.monotonic() > deadline:
                log.warning("runc exec processes still running at close: %s", procs)
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(shutil.rmtree, self.home / "bundles", True)
