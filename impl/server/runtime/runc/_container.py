"""A runc container and its execs as the runtime keeps them, and starting a ``runc exec``.

See the package docstring ("Containers", "Execs").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import termios
import tty
from collections.abc import Sequence
from pathlib import Path

from .._base import ExecSpec, OutputSink
from ..process._exec import ProcessExec
from ..process._procfs import read_stat
from ..process._spawn import Spawned, ctty_prefix
from ..process._stdio import grow_pipe, winsize
from ._bundle import can_pass_through
from ._cgroup import ContainerCgroup

__all__ = [
    "Container",
    "ExecEntry",
    "abandon",
    "has_content",
    "has_exited",
    "reap_if_ours",
    "remove_empty",
    "spawn_runc_exec",
]


def remove_empty(groups: set[Path]) -> None:
    for group in list(groups):
        try:
            group.rmdir()
        except FileNotFoundError:
            groups.discard(group)
        except OSError:
            pass  # another container of this server is still in it
        else:
            groups.discard(group)


def reap_if_ours(pid: int) -> None:
    """The init was orphaned by ``runc run --detach``: it is our zombie if the server is a
    subreaper (the process runtime makes it one)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def spawn_runc_exec(
    argv: Sequence[str],
    spec: ExecSpec,
    stdout: OutputSink,
    stderr: OutputSink,
    *,
    passthrough: bool,
) -> Spawned:
    """Start ``runc exec`` on the server's pipes or pseudo-terminal.

    With ``passthrough`` (the container has the trampolines' shell and setsid) the stdio goes
    to the process itself as fds 3-5 (``--preserve-fds``): pipes, or one pty of ours that
    :data:`~._bundle.TTY_TRAMPOLINE` makes its controlling terminal, exactly as in the process
    runtime.  Without it, pipes are copied by runc, and a TTY uses runc's own terminal mode:
    runc in the foreground on a host pty that is its controlling terminal (``setsid -c``),
    copying it to the container's pty (sized by ``consoleSize``) and resizing that on
    SIGWINCH.  (runc hands a console to a console socket only when it detaches, and then
    nobody gets the exit status.)  Never ``preexec_fn``: the server is threaded.
    """
    parent_fds: list[int] = []
    child_fds: list[int] = []
    try:
        if spec.tty and passthrough:
            # One terminal, ours, as in the process runtime (TTY_TRAMPOLINE makes it the
            # command's controlling terminal); runc writes its own errors to it too.
            master, slave = os.openpty()
            parent_fds.append(master)
            child_fds.append(slave)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize(spec.width, spec.height))
            os.set_blocking(master, False)
            popen = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                close_fds=True,
                start_new_session=True,
            )
            return Spawned(popen, "", None, master, [(master, stdout, "terminal")], master, [])
        if spec.tty:
            master, slave = os.openpty()
            parent_fds.append(master)
            child_fds.append(slave)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize(spec.width, spec.height))
            # Raw before runc starts (it makes it raw too, later): the host pty must neither
            # echo early input nor take an early EOF character for its own end of file.
            tty.setraw(slave)
            os.set_blocking(master, False)
            popen = subprocess.Popen(
                [*ctty_prefix(), *argv], stdin=slave, stdout=slave, stderr=slave, close_fds=True
            )
            return Spawned(popen, "", None, master, [(master, stdout, "terminal")], master, [])
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        parent_fds += [in_w, out_r, err_r]
        child_fds += [in_r, out_w, err_w]
        for fd in (in_w, out_r, err_r):
            os.set_blocking(fd, False)
            grow_pipe(fd)
        # runc passes these through: the process in the container writes to our pipes.
        popen = subprocess.Popen(
            argv, stdin=in_r, stdout=out_w, stderr=err_w, close_fds=True, start_new_session=True
        )
        outputs = [(out_r, stdout, "stdout"), (err_r, stderr, "stderr")]
        return Spawned(popen, "", None, in_w, outputs, None, [])
    except BaseException:
        for fd in parent_fds:
            os.close(fd)
        raise
    finally:
        for fd in child_fds:
            os.close(fd)


def abandon(spawned: Spawned) -> None:
    """Give up an exec before it was handed over: kill ``runc exec``, close our ends."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        spawned.popen.kill()
        spawned.popen.wait(timeout=2)
    fds = {spawned.stdin_fd, *(fd for fd, _, _ in spawned.outputs)}
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def has_content(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def has_exited(pid: int) -> bool:
    """Whether a child exited, without reaping it (its exec reaps it, for the status)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class Container:
    """One OCI container: its bundle, its init, its cgroup, its execs."""

    def __init__(self, container_id: str, bundle: Path, init_pid: int, started: float) -> None:
        self.container_id = container_id
        self.bundle = bundle
        self.init_pid = init_pid
        self.started = started  # boot seconds, for a first CPU sample
        self.cgroup = ContainerCgroup(init_pid)
        self.passthrough = can_pass_through(bundle / "rootfs")
        self.execs: dict[str, ExecEntry] = {}
        self.paused = False


class ExecEntry:
    """What the runtime keeps of one exec besides its :class:`ProcessExec`."""

    def __init__(
        self, proc: ProcessExec, container: Container, pid_file: Path, *, wrapped: bool
    ) -> None:
        self.proc = proc
        #: Whether the first process is the TTY trampoline, which signals skip.
        self.wrapped = wrapped
        self.container = container
        self.pid_file = pid_file
        #: Host pid of the exec's first process inside the container (from runc's pid file).
        self.main: int | None = None
        #: Processes attributed at the last scan: pid -> start ticks (a reused pid is not ours).
        self.known: dict[int, int] = {}

    def main_pid(self) -> int | None:
        if self.main is None:
            with contextlib.suppress(OSError, ValueError):
                self.main = int(self.pid_file.read_text().strip())
        return self.main

    def members(self) -> list[int]:
        """Live host pids of one exec: its first process, its session, their descendants
        and what earlier scans found (so a process that left the session stays found)."""
        main = self.main_pid()
        stats = {pid: st for pid in self.container.cgroup.procs() if (st := read_stat(pid))}
        owned: set[int] = set()
        for pid, st in stats.items():
            if (
                pid == main
                or (main is not None and st.session == main)
                or self.known.get(pid) == st.start_ticks
            ):
                owned.add(pid)
        children: dict[int, list[int]] = {}
        for st in stats.values():
            children.setdefault(st.ppid, []).append(st.pid)
        stack = list(owned)
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in owned:
                    owned.add(child)
                    stack.append(child)
        owned.discard(self.container.init_pid)
        self.known = {pid: stats[pid].start_ticks for pid in owned}
        return sorted(pid for pid in owned if stats[pid].alive)
