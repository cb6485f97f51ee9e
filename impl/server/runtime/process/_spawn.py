"""Starting one exec's process: checks, environment, pipes or terminal, the fork.

See the package docstring ("Spawning").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..._errors import ErrorCode, ExecError
from .._base import ExecSpec, OutputSink
from ._stdio import grow_pipe, winsize

if TYPE_CHECKING:
    from ._freezer import Freezer

__all__ = [
    "BASE_PATH",
    "CTTY_TRAMPOLINE",
    "DISCARD",
    "ENV_CONTAINER",
    "ENV_EXEC",
    "ENV_TAG",
    "RESTORED_BY_POPEN",
    "Spawned",
    "become_subreaper",
    "blocked_for_child",
    "check_id",
    "clean_signals_prefix",
    "ctty_prefix",
    "exit_code_of",
    "first_zombie_child",
    "forked_in_new_group",
    "handle_ignored_signals",
    "send_signal",
    "start_process",
]

log = logging.getLogger("execstream.server.process")

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_CONTAINER = "EXECSTREAM_CONTAINER"
ENV_EXEC = "EXECSTREAM_EXEC"
ENV_TAG = "EXECSTREAM_TAG"

_PR_SET_CHILD_SUBREAPER = 36

CTTY_TRAMPOLINE = """\
import fcntl, os, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
try:
    os.execvp(sys.argv[1], sys.argv[1:])
except OSError as exc:
    sys.stderr.write(f"cannot execute {sys.argv[1]!r}: {exc.strerror}\\n")
    os._exit(127)
"""


# Run before the command when the server's own signal state would leak into execs: ignored
# dispositions and the blocked mask survive exec(2); handled ones are reset by the kernel.
CLEAN_SIGNALS_TRAMPOLINE = """\
import os, signal, sys
for signum in signal.valid_signals():
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
signal.pthread_sigmask(signal.SIG_SETMASK, ())
try:
    os.execvp(sys.argv[1], sys.argv[1:])
except OSError as exc:
    sys.stderr.write(f"cannot execute {sys.argv[1]!r}: {exc.strerror}\\n")
    os._exit(127)
"""

# Popen(restore_signals=True) already resets these, which Python itself ignores.
RESTORED_BY_POPEN = frozenset(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name)
)


_RESTORED_MASK = sum(1 << (signum - 1) for signum in RESTORED_BY_POPEN)


def clean_signals_prefix() -> tuple[str, ...]:
    """The argv prefix that gives the exec default dispositions for every signal and an
    empty signal mask (PROTOCOL 10.4), or ``()`` when this thread and process already give it
    that: the server may have been started under ``nohup`` or with signals blocked."""
    if signals_to_clean():
        return (sys.executable, "-I", "-S", "-c", CLEAN_SIGNALS_TRAMPOLINE)
    return ()


def handle_ignored_signals() -> list[int]:
    """Give each signal this process ignores, but Popen does not restore, a handler that does
    nothing; the signals changed.

    The process goes on ignoring them in effect (a server under ``nohup`` still survives a
    hangup), but they are now *handled*, and exec(2) resets handled signals to their default
    action, where it keeps ignored ones.  So the execs start with default dispositions
    (PROTOCOL 10.4) without :data:`CLEAN_SIGNALS_TRAMPOLINE`, which costs a Python start per
    exec (12-15 ms, against 2 ms for all of Start -> exit of ``true``): a shell's ``&`` and
    ``nohup`` both start a server with signals ignored.  A SIGCHLD ignored by whoever started
    the process is handled too, so its children are kept for ``wait4`` rather than reaped by
    the kernel.  Main thread only (``signal.signal``); for a process of its own, such as
    ``execstream serve``, ``demo`` or ``conformance``, never for an embedding engine's."""
    changed: list[int] = []
    for signum in signal.valid_signals():
        if signum in RESTORED_BY_POPEN or signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(signum) != signal.SIG_IGN:
                continue
            signal.signal(signum, _ignore)
        except (OSError, ValueError):  # a signal Python may not handle
            continue
        changed.append(signum)  # a number: most real-time signals have no name
    return changed


def _ignore(signum: int, frame: object) -> None:
    """What a signal the process was started ignoring does now: nothing."""


def signals_to_clean() -> bool:
    """Whether this thread blocks a signal, or the process ignores one Popen does not
    restore.  Asked of the kernel in one read of this thread's status, where the ``signal``
    module costs a call per signal (a quarter of a millisecond per exec)."""
    try:
        with open("/proc/thread-self/status", "rb", buffering=0) as f:
            status = f.read()
        blocked = int(_status_field(status, b"SigBlk:"), 16)
        ignored = int(_status_field(status, b"SigIgn:"), 16)
    except (OSError, ValueError):
        if signal.pthread_sigmask(signal.SIG_BLOCK, ()):
            return True
        return any(
            signum not in RESTORED_BY_POPEN and signal.getsignal(signum) == signal.SIG_IGN
            for signum in signal.valid_signals()
        )
    return bool(blocked or ignored & ~_RESTORED_MASK)


def _status_field(status: bytes, name: bytes) -> bytes:
    start = status.index(name) + len(name)
    return status[start : status.index(b"\n", start)].strip()


@contextlib.contextmanager
def blocked_for_child(block: bool) -> Iterator[None]:
    """Fork with every signal blocked, so that a signal sent before the trampoline reset the
    dispositions stays pending instead of being ignored (Linux never ignores a blocked
    signal); the trampoline unblocks them once they have their default action."""
    if not block:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@functools.cache
def become_subreaper() -> bool:
    """Make the server a child subreaper: escaped descendants are re-parented to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning(
            "PR_SET_CHILD_SUBREAPER failed (%s): orphaned descendants of execs go to init",
            os.strerror(ctypes.get_errno()),
        )
        return False
    return True


@functools.cache
def ctty_prefix() -> tuple[str, ...]:
    """The argv prefix that starts a command in a new session with stdin as its terminal."""
    setsid = shutil.which("setsid", path=BASE_PATH)
    if setsid is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run([setsid, "--help"], capture_output=True, timeout=10)
            if b"-c" in probe.stdout + probe.stderr:
                return (setsid, "-c")
    return (sys.executable, "-I", "-S", "-c", CTTY_TRAMPOLINE)


def check_id(what: str, value: str) -> None:
    if not value or "/" in value or "\0" in value or value in (".", ".."):
        raise ExecError(ErrorCode.INVALID_ARGUMENT, f"{what} {value!r} is not a valid name")


def resolve_working_dir(container_dir: Path, working_dir: str) -> Path:
    path = container_dir / working_dir if working_dir else container_dir
    if not path.exists():
        raise ExecError(ErrorCode.INVALID_ARGUMENT, f"working_dir {working_dir!r} does not exist")
    if not path.is_dir():
        raise ExecError(
            ErrorCode.INVALID_ARGUMENT, f"working_dir {working_dir!r} is not a directory"
        )
    return path


# What Path.exists() takes for "does not exist"; any other error is raised.
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def why_not_executable(path: str | os.PathLike[str]) -> str | None:
    # One stat (plain strings, no Path objects): this runs for each PATH entry of each exec.
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in _MISSING:
            return "does not exist"
        raise
    if stat.S_ISDIR(mode):
        return "is a directory"
    if not os.access(path, os.X_OK):
        return "is not executable"
    return None


def check_command(name: str, search_path: str, cwd: Path) -> None:
    """PROTOCOL 3.2: a command that cannot be executed is INVALID_ARGUMENT, before it runs."""
    if "/" in name:
        if (why := why_not_executable(os.path.join(cwd, name))) is not None:
            raise ExecError(ErrorCode.INVALID_ARGUMENT, f"command {name!r} {why}")
        return
    refused = None
    for directory in search_path.split(os.pathsep):
        candidate = os.path.join(cwd, directory or ".", name)
        why = why_not_executable(candidate)
        if why is None:
            return
        if why == "is not executable":
            refused = candidate
    if refused is not None:
        raise ExecError(
            ErrorCode.INVALID_ARGUMENT, f"command {name!r} ({refused}) is not executable"
        )
    raise ExecError(
        ErrorCode.INVALID_ARGUMENT, f"command {name!r} not found in PATH {search_path!r}"
    )


def send_signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def first_zombie_child() -> int | None:
    """The pid of a child of the server that is waitable, if any; WNOWAIT leaves it unreaped."""
    try:
        found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    return found.si_pid if found is not None else None


def exit_code_of(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


@dataclass(frozen=True, slots=True)
class Spawned:
    """A started process and the parent's ends of its stdio, for the exec to take over."""

    popen: subprocess.Popen[bytes]
    tag: str
    group: Path | None
    stdin_fd: int
    #: (fd, sink, name) of each output stream: stdout and stderr, or the terminal.
    outputs: Sequence[tuple[int, OutputSink, str]]
    #: The pty master of a TTY exec (also ``stdin_fd`` and the one output), else None.
    master: int | None
    #: fds 0-2 of the exec as /proc shows them (``pipe:[inode]``, ``/dev/pts/N``).
    stdio: Sequence[str]


class _Discard:
    def write(self, data: bytes) -> None:
        pass


#: A sink for the output nobody will read (a spawn abandoned by its caller).
DISCARD: OutputSink = _Discard()


async def forked_in_new_group(
    freezer: Freezer, fork: Callable[[Path], Spawned], abandon: Callable[[Spawned], None]
) -> Spawned:
    """``fork(group)`` run by the freezer's spawner thread, inside a new group.  Should the
    caller be cancelled meanwhile, the fork is still waited for (milliseconds) and what it
    started handed to ``abandon``: a process outlives no spawn."""
    forked = asyncio.wrap_future(freezer.fork_in_new_group(fork))
    try:
        return await asyncio.shield(forked)
    except asyncio.CancelledError:
        while not forked.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(forked)
        if not forked.cancelled() and forked.exception() is None:
            abandon(forked.result())
        raise


def start_process(
    container_id: str,
    exec_id: str,
    spec: ExecSpec,
    stdout: OutputSink,
    stderr: OutputSink,
    directory: Path,
    group: Path | None,
    *,
    tag: str,
) -> Spawned:
    """Check ``spec`` (PROTOCOL 3.2) and start it in ``directory``.  ``group`` is the freezer
    group the calling thread is in (where the process is born), if any."""
    cwd = resolve_working_dir(directory, spec.working_dir)
    env = {"PATH": BASE_PATH, "HOME": str(directory)}
    if spec.tty:
        env["TERM"] = "xterm"
    env.update(spec.env)
    env.update({ENV_CONTAINER: container_id, ENV_EXEC: exec_id, ENV_TAG: tag})
    check_command(spec.command[0], env.get("PATH", ""), cwd)
    clean_signals = clean_signals_prefix()
    argv = [*clean_signals, *spec.command]
    parent_fds: list[int] = []
    child_fds: list[int] = []
    try:
        master: int | None = None
        outputs: list[tuple[int, OutputSink, str]]
        if spec.tty:
            master, slave = os.openpty()
            parent_fds.append(master)
            child_fds.append(slave)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize(spec.width, spec.height))
            os.set_blocking(master, False)
            stdio = (slave, slave, slave)
            links = [os.ttyname(slave)]
            argv = [*ctty_prefix(), *argv]
            stdin_fd = master
            # PROTOCOL 4.6: a TTY exec has one output, the terminal, sent as stdout.
            outputs = [(master, stdout, "terminal")]
        else:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            parent_fds += [in_w, out_r, err_r]
            child_fds += [in_r, out_w, err_w]
            for fd in (in_w, out_r, err_r):
                os.set_blocking(fd, False)
                grow_pipe(fd)
            stdio = (in_r, out_w, err_w)
            links = [f"pipe:[{os.fstat(fd).st_ino}]" for fd in stdio]
            stdin_fd = in_w
            outputs = [(out_r, stdout, "stdout"), (err_r, stderr, "stderr")]
        with blocked_for_child(bool(clean_signals)):
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=stdio[0],
                    stdout=stdio[1],
                    stderr=stdio[2],
                    cwd=cwd,
                    env=env,
                    close_fds=True,
                    # setsid -c makes the session itself: it would fork if already leader.
                    start_new_session=not spec.tty,
                )
            except OSError as exc:
                raise ExecError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"cannot execute {spec.command[0]!r}: {exc.strerror or exc}",
                ) from exc
    except BaseException:
        for fd in parent_fds:
            os.close(fd)
        raise
    finally:
        for fd in child_fds:
            os.close(fd)
    return Spawned(popen, tag, group, stdin_fd, outputs, master, links)
