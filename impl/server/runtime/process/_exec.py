"""One exec of the process runtime: its main process, its pipes or terminal, its exit.

See the package docstring ("Reaping", "Draining").
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import resource
import subprocess
import termios
from dataclasses import dataclass
from typing import Protocol

from ..._errors import ErrorCode, ExecError
from .._base import ExecSpec, check_terminal_size
from ._procfs import CLK_TCK, read_stat
from ._spawn import Spawned, exit_code_of
from ._stdio import InputWriter, OutputReader, winsize

__all__ = ["ExecOwner", "ProcessExec", "Reaped"]

log = logging.getLogger("execstream.server.process")


class ExecOwner(Protocol):
    """What a :class:`ProcessExec` asks of the runtime that started it."""

    async def kill_exec(self, proc: ProcessExec) -> None: ...
    def release_exec(self, proc: ProcessExec) -> None: ...
    def note_exit(self, proc: ProcessExec) -> None:
        """The main process was reaped (its descendants may live on)."""


@dataclass(slots=True)
class Reaped:
    """What ``wait4`` reported for the processes of an exec this module reaped."""

    cpu_ticks: float = 0.0
    read_bytes: int = 0
    write_bytes: int = 0

    def add(self, usage: resource.struct_rusage) -> None:
        self.cpu_ticks += (usage.ru_utime + usage.ru_stime) * CLK_TCK
        # ru_inblock / ru_oublock are the counters of /proc/<pid>/io, in 512-byte units.
        self.read_bytes += usage.ru_inblock * 512
        self.write_bytes += usage.ru_oublock * 512


class ProcessExec:
    """One exec's process tree: its main process, its pipes or terminal, its exit."""

    def __init__(
        self,
        owner: ExecOwner,
        loop: asyncio.AbstractEventLoop,
        spawned: Spawned,
        *,
        container_id: str,
        exec_id: str,
        spec: ExecSpec,
        read_size: int,
        drain_timeout: float,
    ) -> None:
        popen, master = spawned.popen, spawned.master
        self.pid = popen.pid
        self.container_id = container_id
        self.exec_id = exec_id
        self.tty = spec.tty
        self._owner = owner
        self._loop = loop
        self._drain_timeout = drain_timeout
        self._popen: subprocess.Popen[bytes] | None = popen
        #: Marks the exec's processes in their environment (when there is no freezer).
        self.tag = spawned.tag
        #: The exec's freezer cgroup, None without a freezer (or once removed).
        self.group = spawned.group
        self._master = master
        #: fds 0-2 of the exec as /proc shows them: a process holding one is of this exec.
        self.stdio = frozenset(spawned.stdio)
        self._size = (spec.width, spec.height)
        # Read on first use: right after the fork, reading /proc/<pid>/stat waits while the
        # child is still in execve (up to half a millisecond, on the event loop).
        self._start_ticks: int | None = None
        self.session_active = True
        #: Nothing of the exec is left, and nothing can be again: at its exit the server had
        #: no child but live execs' main processes.  Scans pass it by.
        self.ended = False
        #: Processes attributed to this exec at the last scan: pid -> start ticks.  The main
        #: process is the exec's until reaped (its pid cannot be reused before): not listed.
        self.known: dict[int, int] = {}
        self.reaped = Reaped()
        self._exit_code: int | None = None
        self._finished: asyncio.Future[int] = loop.create_future()
        self._drain_timer: asyncio.TimerHandle | None = None
        self.released = False
        label = f"exec {container_id}/{exec_id}"
        self.label = label
        self._readers = [
            OutputReader(
                loop,
                fd,
                sink,
                read_size,
                self._check_finished,
                owns_fd=master is None,
                label=f"{label} {name}",
            )
            for fd, sink, name in spawned.outputs
        ]
        self._stdin = InputWriter(
            loop,
            spawned.stdin_fd,
            owns_fd=master is None,
            eof_char=self._terminal_eof if master is not None else None,
        )
        self._pidfd = -1
        self._watch_main()

    def __repr__(self) -> str:
        state = "running" if self._exit_code is None else f"exited {self._exit_code}"
        return f"<ProcessExec {self.container_id}/{self.exec_id} pid={self.pid} {state}>"

    @property
    def start_ticks(self) -> int:
        """When the main process started, in clock ticks since boot (``/proc``), or 0 when
        it could not be read."""
        if self._start_ticks is None:
            st = read_stat(self.pid) if self._exit_code is None else None
            self._start_ticks = st.start_ticks if st is not None else 0
        return self._start_ticks

    @property
    def exit_code(self) -> int | None:
        """The main process's exit code (128+N for signal N) once reaped, else None."""
        return self._exit_code

    @property
    def terminal_size(self) -> tuple[int, int] | None:
        """(width, height) of the terminal, None when not a TTY."""
        return self._size if self.tty else None

    async def wait(self) -> int:
        """The exit code, once the main process exited and its output was delivered."""
        # Shielded: a cancelled waiter must not cancel the result every waiter shares.
        return await asyncio.shield(self._finished)

    async def write_stdin(self, data: bytes) -> None:
        """Queue ``data`` (in call order) and wait until the process's input took it.

        Cancelling the wait does not unqueue the data.
        """
        await self._stdin.write(data)

    def close_stdin(self) -> None:
        """PROTOCOL 7.1: EOF; on a TTY the terminal's EOF character, the master stays open."""
        if self._exit_code is None and not self.released:
            self._stdin.close(f"standard input of {self.label} was closed")

    def resize(self, width: int, height: int) -> None:
        """PROTOCOL 7.3.  The kernel signals SIGWINCH to the foreground process group."""
        if not self.tty:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, f"{self.label} has no terminal")
        check_terminal_size(width, height)
        self._size = (width, height)
        if self._master is not None:
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, winsize(width, height))

    async def kill(self) -> None:
        """SIGKILL every process of the exec and wait until none is left alive."""
        await self._owner.kill_exec(self)

    def release(self) -> None:
        """The server is done with this exec: kill what is left, forget it."""
        self._owner.release_exec(self)

    @property
    def terminal_open(self) -> bool:
        """Whether the exec's terminal is still open here (a TTY exec until it ended)."""
        return self._master is not None

    # -- internals --

    def _terminal_eof(self) -> bytes:
        try:
            master = self._master
            char = termios.tcgetattr(master)[6][termios.VEOF] if master is not None else b""
        except termios.error:
            char = b""
        if isinstance(char, int):
            char = bytes([char])
        return char or b"\x04"

    def _watch_main(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._poll_main()
        else:
            self._loop.add_reader(self._pidfd, self._reap_main)

    def _poll_main(self) -> None:
        # Without pidfds (Linux < 5.3): look every 50 ms.
        if not self._reap_main():
            self._loop.call_later(0.05, self._poll_main)

    def reap_if_exited(self) -> bool:
        """Reap the main process now if it has exited (its pidfd callback may not have run
        yet); whether it has been reaped."""
        return self._reap_main()

    def _reap_main(self) -> bool:
        if self._exit_code is not None:
            return True  # reaped already, by reap_if_exited: its status is ours, not lost
        _ = self.start_ticks  # readable until reaped (a zombie's stat is)
        try:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone called waitpid(-1) (asyncio's FastChildWatcher does): status lost.
            log.error("the exit status of %s was reaped by someone else", self.label)
            pid, status, usage = self.pid, 255 << 8, None
        if pid == 0:
            return False
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        self.known.pop(self.pid, None)
        self._exit_code = exit_code_of(status)
        if usage is not None:
            self.reaped.add(usage)
        if self._popen is not None:
            self._popen.returncode = self._exit_code  # so Popen never waits for it again
            self._popen = None
        self._stdin.abort(f"{self.label} has exited")
        if any(reader.open for reader in self._readers):
            self._drain_timer = self._loop.call_later(self._drain_timeout, self._stop_draining)
        self._owner.note_exit(self)
        self._check_finished()
        return True

    def _stop_draining(self) -> None:
        self._drain_timer = None
        for reader in self._readers:
            reader.finish()

    def _check_finished(self) -> None:
        if self._finished.done() or self._exit_code is None:
            return
        if any(reader.open for reader in self._readers):
            return
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self._close_terminal()
        self._finished.set_result(self._exit_code)

    def close_io(self, refusal: str) -> None:
        self._stdin.abort(refusal)
        for reader in self._readers:
            reader.close()
        self._close_terminal()

    def _close_terminal(self) -> None:
        if self._master is not None:
            self._stdin.abort(self._stdin.refusal or f"{self.label} has exited")
            os.close(self._master)
            self._master = None
