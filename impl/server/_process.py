"""The process runtime: every exec is a real OS process whose output feeds the server.

Plain asyncio and ``os``; it knows nothing of grpc or of the output log.  The server core
calls :meth:`ProcessRuntime.spawn` with two :class:`OutputSink` s and awaits
:meth:`ProcessExec.wait`.

Theory of operation
===================

**Spawning.**  ``subprocess.Popen`` starts the command, never with ``preexec_fn`` (the server
is threaded), in its own session and process group, on three pipes; or, for a TTY exec, on a
new pseudo-terminal whose size is set before the child starts, made its controlling terminal
by ``setsid -c`` (util-linux; a three-line Python trampoline where that is missing).  Every
exec's environment carries ``EXECSTREAM_CONTAINER``, ``EXECSTREAM_EXEC`` and
``EXECSTREAM_TAG`` (this runtime and exec, unique).  The main process is reaped by this module
alone, when its pidfd turns readable (``wait4``, which also gives the CPU and I/O it used), not
by asyncio's child watcher.  Standard input is a non-blocking pipe (the pty master for a TTY)
fed from a queue, so writes keep their call order and never block the loop; ``resize`` sets
the pty's size and the kernel sends SIGWINCH to its foreground process group.  Everything is
called on the event loop thread.

**Finding processes.**  With a writable cgroup-v1 freezer hierarchy (there is one on the
reference machine) each exec gets a freezer cgroup of its own,
``<freezer>/execstream/<server pid>.<random>/<n>``: the spawning thread joins it for the
instant of the fork (cgroup v1 moves single threads), so the child is born inside and every
descendant, ``setsid`` or not, stays there unless it writes cgroup files itself.  The groups
of a server that died without ``close`` are emptied (their processes killed) and removed by the
next runtime that starts.
Without the freezer, a /proc scan attributes processes to execs by, in order: the processes
recorded at earlier scans (pid and start time, so a reused pid is not mistaken), the exec's
session, descent from a process already attributed, the ``EXECSTREAM_TAG`` marker read from
``/proc/<pid>/environ``, and holding the exec's stdio (its pipes or terminal as fd 0, 1 or 2).
Limit of that fallback: a process that leaves the session, replaces its environment,
redirects its stdio and loses its parent, all between two scans, is not found.

**Reaping.**  The server process is a child subreaper (``PR_SET_CHILD_SUBREAPER``): orphaned
descendants are re-parented to it instead of init, so they stay in reach.  It reaps such an
orphan only once it has attributed it to one of its execs (zombies keep their session, not
their environment or cgroup): never ``waitpid(-1)``, so no exit status that asyncio or
``subprocess`` waits for elsewhere in the server is stolen.  A sweep (every second, while any
exec exists) records escaped descendants while they live and reaps them once they died.
Limit: an orphan that left its session and died between two scans stays a zombie of the
server; so do orphans of other components' children, which the subreaper now collects too.

**Pausing.**  With the freezer: every cgroup of the container is set FROZEN.  That is
invisible to the processes, they cannot fork while freezing, and resume thaws exactly what
was frozen.  Without it: SIGSTOP to every process, repeated until a scan finds none running
(a stopped process cannot fork, so this ends); parents can observe those stops (SIGCHLD,
``WUNTRACED``), and resume's SIGCONT also continues a process the workload stopped itself.

**Killing.**  SIGKILL to every process of the exec, repeated until none is alive; with the
freezer as freeze, kill, thaw, so nothing forks in between (and a frozen v1 task only dies
once thawed).  ``release`` and ``close`` kill what is left the same way, then the sweep
finishes off stragglers: nothing outlives its container.

**Draining.**  Output pipes (1 MiB where ``F_SETPIPE_SZ`` allows) are read non-blocking,
``read_size`` bytes at a time, and every read is one sink write, on the event loop thread.
:meth:`ProcessExec.wait` resolves once the main process has exited *and* every pipe reached
end of file, so all output precedes the exit code.  Descendants that keep a pipe open would
hold that forever, so the drain is bounded: ``drain_timeout`` seconds after the main process
exited, what the pipes hold is delivered and they are closed.  Later output of such
descendants is lost (they get EPIPE); they live on until the exec is killed or released.

**Usage.**  Summed over the live processes from /proc: ``stat`` for CPU (utime + stime of
each process and of the children it reaped) and RSS, ``io`` for storage I/O (``read_bytes``
and ``write_bytes``, or ``rchar``/``wchar`` where the kernel has no storage accounting), plus
what ``wait4`` reported for the processes this module reaped.  CPU percent is over the window
since the previous sample of the same container or exec (a sample under 100 ms after the
previous one shares its window, as clock ticks are 10 ms), or since the earliest process
started for a first sample.  RSS counts shared pages once per process.  The memory limit is
the lowest cgroup memory limit (v1 or v2) above a live process of the container or exec, 0
when none is set or nothing is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import itertools
import logging
import os
import resource
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._errors import ErrorCode, ExecError
from .runtime._base import ExecSpec, OutputSink, ResourceSample, check_terminal_size

__all__ = [
    "BASE_PATH",
    "ExecSpec",
    "OutputSink",
    "ProcessExec",
    "ProcessRuntime",
    "ResourceSample",
]

log = logging.getLogger("execstream.server.process")

BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_CONTAINER = "EXECSTREAM_CONTAINER"
ENV_EXEC = "EXECSTREAM_EXEC"
ENV_TAG = "EXECSTREAM_TAG"

_PIPE_SIZE = 1 << 20
_SWEEP_INTERVAL = 1.0
_KILL_TIMEOUT = 5.0
_STOP_TIMEOUT = 5.0
_SIGNAL_ROUNDS = 8
_MIN_CPU_WINDOW = 0.1
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_CHILD_SUBREAPER = 36
# cgroup memory limits at or above this are the kernel's "unlimited" (PAGE_COUNTER_MAX).
_UNLIMITED = 1 << 62

# Every runtime's main processes not yet reaped, in this server process: the orphan reaper
# leaves them to their pidfd, whichever runtime owns them.
_MAIN_PIDS: set[int] = set()

_CTTY_TRAMPOLINE = """\
import fcntl, os, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
try:
    os.execvp(sys.argv[1], sys.argv[1:])
except OSError as exc:
    sys.stderr.write(f"cannot execute {sys.argv[1]!r}: {exc.strerror}\\n")
    os._exit(127)
"""


# --- /proc ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ProcStat:
    """What this module needs of one ``/proc/<pid>/stat``."""

    pid: int
    state: str
    ppid: int
    session: int
    cpu_ticks: int  # utime + stime + cutime + cstime
    start_ticks: int
    rss_pages: int

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def _read_stat(pid: int) -> _ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb", buffering=0) as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    return _ProcStat(
        pid=pid,
        state=fields[0].decode(),
        ppid=int(fields[1]),
        session=int(fields[3]),
        cpu_ticks=int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]),
        start_ticks=int(fields[19]),
        rss_pages=int(fields[21]),
    )


def _scan_proc() -> dict[int, _ProcStat]:
    stats: dict[int, _ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _read_stat(int(name))) is not None:
            stats[st.pid] = st
    return stats


def _read_tag(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb", buffering=0) as f:
            environ = f.read()
    except OSError:
        return None
    prefix = ENV_TAG.encode() + b"="
    for item in environ.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def _read_stdio(pid: int) -> set[str]:
    """What fds 0-2 of ``pid`` point at (``pipe:[inode]``, ``/dev/pts/N``)."""
    links = set()
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def _read_io(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            counters = dict(line.split(": ", 1) for line in f.read().splitlines())
    except (OSError, ValueError):
        return 0, 0
    if "read_bytes" in counters:
        written = int(counters["write_bytes"]) - int(counters.get("cancelled_write_bytes", 0))
        return int(counters["read_bytes"]), max(0, written)
    return int(counters.get("rchar", 0)), int(counters.get("wchar", 0))


def _boot_seconds() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@functools.cache
def _cgroup_mounts() -> tuple[tuple[str, Path, str, frozenset[str]], ...]:
    """(fstype, mount point, root inside the hierarchy, super options) of cgroup mounts."""
    mounts = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    for line in lines:
        left, _, right = line.partition(" - ")
        lf, rf = left.split(), right.split()
        if len(lf) >= 5 and len(rf) >= 3 and rf[0] in ("cgroup", "cgroup2"):
            mounts.append((rf[0], Path(lf[4]), lf[3], frozenset(rf[2].split(","))))
    return tuple(mounts)


def _cgroup_mount(controller: str | None) -> Path | None:
    """The mount of a v1 controller's hierarchy, or of the v2 hierarchy for ``None``."""
    for fstype, point, root, options in _cgroup_mounts():
        if root != "/":
            continue
        if controller is None and fstype == "cgroup2":
            return point
        if controller is not None and fstype == "cgroup" and controller in options:
            return point
    return None


def _read_limit(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    if not text.isdigit():
        return 0  # "max"
    value = int(text)
    return 0 if value >= _UNLIMITED else value


def _memory_limit(pid: int) -> int:
    """The lowest memory limit of the cgroups above ``pid`` (v1 or v2), 0 for none."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return 0
    limits = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            mount, name = _cgroup_mount("memory"), "memory.limit_in_bytes"
        elif hierarchy == "0" and not controllers:
            mount, name = _cgroup_mount(None), "memory.max"
        else:
            continue
        if mount is None:
            continue
        group = mount / path.lstrip("/")
        while True:
            if limit := _read_limit(group / name):
                limits.append(limit)
            if group == mount or mount not in group.parents:
                break
            group = group.parent
    return min(limits, default=0)


# --- process plumbing -------------------------------------------------------------------


@functools.cache
def _become_subreaper() -> bool:
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
def _ctty_prefix() -> tuple[str, ...]:
    """The argv prefix that starts a command in a new session with stdin as its terminal."""
    setsid = shutil.which("setsid", path=BASE_PATH)
    if setsid is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run([setsid, "--help"], capture_output=True, timeout=10)
            if b"-c" in probe.stdout + probe.stderr:
                return (setsid, "-c")
    return (sys.executable, "-I", "-S", "-c", _CTTY_TRAMPOLINE)


def _winsize(width: int, height: int) -> bytes:
    return struct.pack("HHHH", height, width, 0, 0)


def _grow_pipe(fd: int) -> None:
    # Larger pipes mean fewer, larger reads (the cost is per message, DESIGN "Engineering
    # facts"); an unprivileged server may be refused beyond /proc/sys/fs/pipe-max-size.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)


def _check_id(what: str, value: str) -> None:
    if not value or "/" in value or "\0" in value or value in (".", ".."):
        raise ExecError(ErrorCode.INVALID_ARGUMENT, f"{what} {value!r} is not a valid name")


def _working_dir(container_dir: Path, working_dir: str) -> Path:
    path = container_dir / working_dir if working_dir else container_dir
    if not path.exists():
        raise ExecError(ErrorCode.INVALID_ARGUMENT, f"working_dir {working_dir!r} does not exist")
    if not path.is_dir():
        raise ExecError(
            ErrorCode.INVALID_ARGUMENT, f"working_dir {working_dir!r} is not a directory"
        )
    return path


def _why_not_executable(path: Path) -> str | None:
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a directory"
    if not os.access(path, os.X_OK):
        return "is not executable"
    return None


def _check_command(name: str, search_path: str, cwd: Path) -> None:
    """PROTOCOL 3.2: a command that cannot be executed is INVALID_ARGUMENT, before it runs."""
    if "/" in name:
        if (why := _why_not_executable(cwd / name)) is not None:
            raise ExecError(ErrorCode.INVALID_ARGUMENT, f"command {name!r} {why}")
        return
    refused = None
    for directory in search_path.split(os.pathsep):
        candidate = cwd / (directory or ".") / name
        why = _why_not_executable(candidate)
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


def _send(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _has_zombie_child() -> bool:
    """Whether any child of the server is waitable; WNOWAIT leaves it unreaped."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return False


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


# --- cgroup v1 freezer ------------------------------------------------------------------


class _Freezer:
    """One freezer cgroup per exec, under a root that belongs to one runtime."""

    def __init__(self, mount: Path, root: Path) -> None:
        self.mount = mount
        self.root = root
        self._names = itertools.count(1)

    @classmethod
    def create(cls, name: str) -> _Freezer:
        mount = _cgroup_mount("freezer")
        if mount is None:
            raise OSError(errno.ENOENT, "no cgroup v1 freezer hierarchy is mounted")
        base = mount / "execstream"
        base.mkdir(exist_ok=True)
        _remove_stale_groups(base)
        root = base / name
        root.mkdir()
        freezer = cls(mount, root)
        try:
            (root / "freezer.state").write_text("THAWED")
            with freezer.born_in(root):
                pass  # proves that this thread can join a group and come back
        except OSError:
            root.rmdir()
            raise
        return freezer

    def new_group(self) -> Path:
        group = self.root / str(next(self._names))
        group.mkdir()
        return group

    @contextlib.contextmanager
    def born_in(self, group: Path) -> Iterator[None]:
        """Children forked by this thread inside the block start in ``group``."""
        tid = threading.get_native_id()
        home = self._group_of_thread(tid)
        (group / "tasks").write_text(str(tid))
        try:
            yield
        finally:
            self._leave(tid, home)

    def _leave(self, tid: int, home: Path) -> None:
        # Staying would freeze the server's thread with the exec: fall back to the root.
        for target in (home, self.mount):
            try:
                (target / "tasks").write_text(str(tid))
            except OSError:
                log.exception("thread %d could not return to freezer group %s", tid, target)
            else:
                return

    def _group_of_thread(self, tid: int) -> Path:
        for line in Path(f"/proc/self/task/{tid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "freezer" in controllers.split(","):
                return self.mount / path.lstrip("/")
        return self.mount

    def procs(self, group: Path) -> list[int]:
        try:
            return [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def set_state(self, group: Path, state: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (group / "freezer.state").write_text(state)

    def state(self, group: Path) -> str:
        try:
            return (group / "freezer.state").read_text().strip()
        except FileNotFoundError:
            return ""

    def remove(self, group: Path) -> bool:
        try:
            group.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False  # still has tasks: the sweep retries
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.root.rmdir()


def _remove_stale_groups(base: Path) -> None:
    """Clean up after runtimes whose server died without closing: nothing outlives its
    container, so the processes still in a dead server's groups are killed (thawed first:
    a frozen process dies only once thawed), then the groups are removed."""
    for root in base.iterdir():
        owner = root.name.partition(".")[0]
        if not root.is_dir() or not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        for group in [root, *(child for child in root.iterdir() if child.is_dir())][::-1]:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    _kill_group_members(group)
                    time.sleep(0.02)
            else:
                procs = (group / "cgroup.procs").read_text().split() if group.exists() else []
                log.warning("freezer group %s of a dead server still holds %s", group, procs)


def _kill_group_members(group: Path) -> None:
    with contextlib.suppress(OSError):
        (group / "freezer.state").write_text("THAWED")
    try:
        members = (group / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in members:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


# --- stdio ------------------------------------------------------------------------------


class _OutputReader:
    """One output stream of an exec: every read goes to the sink as one write, unsplit."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        sink: OutputSink,
        read_size: int,
        on_closed: Callable[[], None],
        *,
        owns_fd: bool,
        label: str,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._sink = sink
        self._read_size = read_size
        self._on_closed = on_closed
        self._owns_fd = owns_fd
        self._label = label
        self.open = True
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        self._read_once()

    def _read_once(self) -> bool:
        """One read; False once nothing more is readable now."""
        try:
            data = os.read(self._fd, self._read_size)
        except BlockingIOError:
            return False
        except OSError as exc:
            # A pty master reads EIO once no process holds the terminal: its end of file.
            if exc.errno != errno.EIO:
                log.warning("reading %s failed: %s", self._label, exc)
            data = b""
        if not data:
            self.close()
            return False
        try:
            self._sink.write(data)
        except Exception:
            log.exception("the output sink of %s failed", self._label)
        return True

    def finish(self) -> None:
        """Bounded drain: deliver what the pipe holds now, then stop reading.

        The read budget covers a full pipe, and no more: a writer that never stops is not
        chased.
        """
        for _ in range(_PIPE_SIZE // self._read_size + 2):
            if not self.open or not self._read_once():
                break
        self.close()

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self._loop.remove_reader(self._fd)
        if self._owns_fd:
            os.close(self._fd)
        self._on_closed()


class _InputWriter:
    """An exec's standard input: writes go out in call order and never block the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        *,
        owns_fd: bool,
        eof_char: Callable[[], bytes] | None,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._owns_fd = owns_fd
        self._eof_char = eof_char
        self._queue: deque[tuple[memoryview, asyncio.Future[None] | None]] = deque()
        self._watching = False
        #: Why writes are refused, once they are.
        self.refusal: str | None = None

    def write(self, data: bytes) -> asyncio.Future[None]:
        if self.refusal is not None:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, self.refusal)
        done: asyncio.Future[None] = self._loop.create_future()
        if not data:
            done.set_result(None)
            return done
        self._queue.append((memoryview(data), done))
        self._flush()
        return done

    def close(self, refusal: str) -> None:
        """End of input after what is queued: EOF on a pipe, the EOF character on a TTY."""
        if self.refusal is not None:
            return
        self.refusal = refusal
        if self._eof_char is not None:
            self._queue.append((memoryview(self._eof_char()), None))
        self._flush()

    def abort(self, refusal: str) -> None:
        """Nothing more will be written: pending writes fail with ``refusal``."""
        self.refusal = refusal
        pending, self._queue = self._queue, deque()
        for _, done in pending:
            if done is not None and not done.done():
                done.set_exception(ExecError(ErrorCode.FAILED_PRECONDITION, refusal))
        self._stop_watching()
        self._release_fd()

    def _flush(self) -> None:
        while self._queue:
            view, done = self._queue[0]
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                break
            except OSError:
                # EPIPE: nothing reads it any more; EIO: the terminal hung up.
                self.abort("the process no longer reads its standard input")
                return
            if written < len(view):
                self._queue[0] = (view[written:], done)
                break
            self._queue.popleft()
            if done is not None and not done.done():
                done.set_result(None)
        if self._queue:
            if not self._watching:
                self._loop.add_writer(self._fd, self._flush)
                self._watching = True
            return
        self._stop_watching()
        if self.refusal is not None:
            self._release_fd()

    def _stop_watching(self) -> None:
        if self._watching:
            self._loop.remove_writer(self._fd)
            self._watching = False

    def _release_fd(self) -> None:
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(slots=True)
class _Reaped:
    """What ``wait4`` reported for the processes of an exec this module reaped."""

    cpu_ticks: float = 0.0
    read_bytes: int = 0
    write_bytes: int = 0

    def add(self, usage: resource.struct_rusage) -> None:
        self.cpu_ticks += (usage.ru_utime + usage.ru_stime) * _CLK_TCK
        # ru_inblock / ru_oublock are the counters of /proc/<pid>/io, in 512-byte units.
        self.read_bytes += usage.ru_inblock * 512
        self.write_bytes += usage.ru_oublock * 512


# --- execs ------------------------------------------------------------------------------


class ProcessExec:
    """One exec's process tree: its main process, its pipes or terminal, its exit."""

    def __init__(
        self,
        runtime: ProcessRuntime,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen[bytes],
        *,
        container_id: str,
        exec_id: str,
        spec: ExecSpec,
        tag: str,
        group: Path | None,
        stdin_fd: int,
        outputs: Sequence[tuple[int, OutputSink, str]],
        master: int | None,
        stdio: Iterable[str],
    ) -> None:
        self.pid = popen.pid
        self.container_id = container_id
        self.exec_id = exec_id
        self.tty = spec.tty
        self._runtime = runtime
        self._loop = loop
        self._popen: subprocess.Popen[bytes] | None = popen
        self._tag = tag
        self._group = group
        self._master = master
        #: fds 0-2 of the exec as /proc shows them: a process holding one is of this exec.
        self._stdio = frozenset(stdio)
        self._size = (spec.width, spec.height)
        st = _read_stat(self.pid)
        self._start_ticks = st.start_ticks if st is not None else 0
        self._session_active = True
        #: Processes attributed to this exec at the last scan: pid -> start ticks.
        self._known: dict[int, int] = {self.pid: self._start_ticks}
        self._reaped = _Reaped()
        self._exit_code: int | None = None
        self._finished: asyncio.Future[int] = loop.create_future()
        self._drain_timer: asyncio.TimerHandle | None = None
        self._released = False
        label = f"exec {container_id}/{exec_id}"
        self._label = label
        self._readers = [
            _OutputReader(
                loop,
                fd,
                sink,
                runtime.read_size,
                self._check_finished,
                owns_fd=master is None,
                label=f"{label} {name}",
            )
            for fd, sink, name in outputs
        ]
        self._stdin = _InputWriter(
            loop,
            stdin_fd,
            owns_fd=master is None,
            eof_char=self._terminal_eof if master is not None else None,
        )
        self._pidfd = -1
        _MAIN_PIDS.add(self.pid)
        self._watch_main()

    def __repr__(self) -> str:
        state = "running" if self._exit_code is None else f"exited {self._exit_code}"
        return f"<ProcessExec {self.container_id}/{self.exec_id} pid={self.pid} {state}>"

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
        if self._exit_code is None and not self._released:
            self._stdin.close(f"standard input of {self._label} was closed")

    def resize(self, width: int, height: int) -> None:
        """PROTOCOL 7.3.  The kernel signals SIGWINCH to the foreground process group."""
        if not self.tty:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, f"{self._label} has no terminal")
        check_terminal_size(width, height)
        self._size = (width, height)
        if self._master is not None:
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, _winsize(width, height))

    async def kill(self) -> None:
        """SIGKILL every process of the exec and wait until none is left alive."""
        await self._runtime._kill(self)

    def release(self) -> None:
        """The server is done with this exec: kill what is left, forget it."""
        self._runtime._release(self)

    # -- internals, driven by the runtime --

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

    def _reap_main(self) -> bool:
        try:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone called waitpid(-1) (asyncio's FastChildWatcher does): status lost.
            log.error("the exit status of %s was reaped by someone else", self._label)
            pid, status, usage = self.pid, 255 << 8, None
        if pid == 0:
            return False
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        _MAIN_PIDS.discard(self.pid)
        self._known.pop(self.pid, None)
        self._exit_code = _exit_code(status)
        if usage is not None:
            self._reaped.add(usage)
        if self._popen is not None:
            self._popen.returncode = self._exit_code  # so Popen never waits for it again
            self._popen = None
        self._stdin.abort(f"{self._label} has exited")
        if any(reader.open for reader in self._readers):
            self._drain_timer = self._loop.call_later(
                self._runtime.drain_timeout, self._stop_draining
            )
        self._runtime._note_exit(self)
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

    def _close_io(self, refusal: str) -> None:
        self._stdin.abort(refusal)
        for reader in self._readers:
            reader.close()
        self._close_terminal()

    def _close_terminal(self) -> None:
        if self._master is not None:
            self._stdin.abort(self._stdin.refusal or f"{self._label} has exited")
            os.close(self._master)
            self._master = None


# --- the runtime ------------------------------------------------------------------------


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
        self._freezer: _Freezer | None = None
        self._set_up = False
        self._token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._serial = itertools.count(1)
        self._execs: dict[tuple[str, str], ProcessExec] = {}
        #: Released execs whose processes, zombies or cgroup are not gone yet.
        self._graveyard: set[ProcessExec] = set()
        self._paused: set[str] = set()
        self._cpu_windows: dict[tuple[str, str | None], tuple[float, float]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pause_method(self) -> str:
        """``"freezer"`` (cgroup v1) or ``"signals"`` (SIGSTOP/SIGCONT)."""
        self._set_up_once()
        return "freezer" if self._freezer is not None else "signals"

    def container_dir(self, container_id: str) -> Path:
        _check_id("container_id", container_id)
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
        _check_id("exec_id", exec_id)
        directory = self.container_dir(container_id)
        if (container_id, exec_id) in self._execs:
            raise ExecError(
                ErrorCode.ALREADY_EXISTS, f"exec {container_id}/{exec_id} already exists"
            )
        if container_id in self._paused:
            raise ExecError(ErrorCode.FAILED_PRECONDITION, f"container {container_id!r} is paused")
        self._set_up_once()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            proc = self._start(loop, container_id, exec_id, spec, stdout, stderr, directory)
        except BaseException:
            if not self._has_execs(container_id):
                shutil.rmtree(directory, ignore_errors=True)
            raise
        self._execs[(container_id, exec_id)] = proc
        self._ensure_sweeper(loop)
        return proc

    def processes_of(self, container_id: str) -> list[int]:
        """Live pids of every process of the container (released stragglers included)."""
        execs = [e for e in self._all_execs() if e.container_id == container_id]
        if not execs:
            return []
        stats = _scan_proc()
        found = self._members(stats, execs)
        return sorted(pid for pids in found.values() for pid in pids if stats[pid].alive)

    async def pause(self, container_id: str) -> None:
        """PROTOCOL 10.1: stop every process of the container (see :attr:`pause_method`)."""
        execs = self._scope(container_id)
        if container_id in self._paused:
            return
        self._paused.add(container_id)
        try:
            if self._freezer is not None:
                await self._freeze(container_id, execs)
            else:
                await self._stop(container_id, execs)
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
            stats = _scan_proc()
            found = self._members(stats, execs)
            fresh = [p for ps in found.values() for p in ps if stats[p].alive and p not in sent]
            if not fresh:
                break
            for pid in fresh:
                _send(pid, signum)
            sent.update(fresh)
        if signum == signal.SIGKILL and self._freezer is not None:
            # A frozen v1 task dies only once thawed; all of these have SIGKILL pending.
            for proc in execs:
                if proc._group is not None:
                    self._freezer.set_state(proc._group, "THAWED")

    def usage(self, container_id: str, exec_id: str | None = None) -> ResourceSample:
        """PROTOCOL 9.4, measured as the module docstring says."""
        execs = self._scope(container_id, exec_id)
        stats = _scan_proc()
        found = self._members(stats, execs)
        ticks = sum(proc._reaped.cpu_ticks for proc in execs)
        read = sum(proc._reaped.read_bytes for proc in execs)
        written = sum(proc._reaped.write_bytes for proc in execs)
        rss = 0
        live = []
        for pids in found.values():
            for pid in pids:
                st = stats[pid]
                ticks += st.cpu_ticks
                if st.alive:
                    live.append(pid)
                    rss += st.rss_pages * _PAGE_SIZE
                    r, w = _read_io(pid)
                    read += r
                    written += w
        return ResourceSample(
            cpu_percent=self._cpu_percent((container_id, exec_id), ticks, execs),
            memory_bytes=rss,
            memory_limit=_memory_limit(min(live)) if live else 0,
            io_read_bytes=read,
            io_write_bytes=written,
        )

    async def remove_container(self, container_id: str) -> None:
        """Release every exec of the container; its directory goes with the last one."""
        for (owner, _), proc in list(self._execs.items()):
            if owner == container_id:
                self._release(proc)

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
        _become_subreaper()
        if self._want_freezer is False:
            return
        try:
            self._freezer = _Freezer.create(self._token)
        except OSError as exc:
            if self._want_freezer:
                raise RuntimeError(f"the cgroup v1 freezer is not usable: {exc}") from exc
            log.info("cgroup v1 freezer not usable (%s): pausing with SIGSTOP/SIGCONT", exc)

    def _start(
        self,
        loop: asyncio.AbstractEventLoop,
        container_id: str,
        exec_id: str,
        spec: ExecSpec,
        stdout: OutputSink,
        stderr: OutputSink,
        directory: Path,
    ) -> ProcessExec:
        cwd = _working_dir(directory, spec.working_dir)
        tag = f"{self._token}.{next(self._serial)}"
        env = {"PATH": BASE_PATH, "HOME": str(directory)}
        if spec.tty:
            env["TERM"] = "xterm"
        env.update(spec.env)
        env.update({ENV_CONTAINER: container_id, ENV_EXEC: exec_id, ENV_TAG: tag})
        _check_command(spec.command[0], env.get("PATH", ""), cwd)
        argv = list(spec.command)
        parent_fds: list[int] = []
        child_fds: list[int] = []
        group: Path | None = None
        try:
            master: int | None = None
            if spec.tty:
                master, slave = os.openpty()
                parent_fds.append(master)
                child_fds.append(slave)
                fcntl.ioctl(slave, termios.TIOCSWINSZ, _winsize(spec.width, spec.height))
                os.set_blocking(master, False)
                stdio = (slave, slave, slave)
                links = [os.ttyname(slave)]
                argv = [*_ctty_prefix(), *argv]
                stdin_fd = master
                outputs = [(master, stdout, "terminal")]
            else:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                out_r, out_w = os.pipe2(os.O_CLOEXEC)
                err_r, err_w = os.pipe2(os.O_CLOEXEC)
                parent_fds += [in_w, out_r, err_r]
                child_fds += [in_r, out_w, err_w]
                for fd in (in_w, out_r, err_r):
                    os.set_blocking(fd, False)
                    _grow_pipe(fd)
                stdio = (in_r, out_w, err_w)
                links = [f"pipe:[{os.fstat(fd).st_ino}]" for fd in stdio]
                stdin_fd = in_w
                outputs = [(out_r, stdout, "stdout"), (err_r, stderr, "stderr")]
            if self._freezer is not None:
                group = self._freezer.new_group()
            birth = self._freezer.born_in(group) if self._freezer and group else None
            with birth or contextlib.nullcontext():
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
            if group is not None and self._freezer is not None:
                self._freezer.remove(group)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        return ProcessExec(
            self,
            loop,
            popen,
            container_id=container_id,
            exec_id=exec_id,
            spec=spec,
            tag=tag,
            group=group,
            stdin_fd=stdin_fd,
            outputs=outputs,
            master=master,
            stdio=links,
        )

    def _has_execs(self, container_id: str) -> bool:
        return any(c == container_id for c, _ in self._execs)

    def _all_execs(self) -> list[ProcessExec]:
        return [*self._execs.values(), *self._graveyard]

    def _scope(self, container_id: str, exec_id: str | None = None) -> list[ProcessExec]:
        if exec_id is not None:
            proc = self._execs.get((container_id, exec_id))
            if proc is None:
                raise ExecError(ErrorCode.NOT_FOUND, f"exec {container_id}/{exec_id} not found")
            return [proc]
        execs = [p for (c, _), p in self._execs.items() if c == container_id]
        if not execs:
            raise ExecError(ErrorCode.NOT_FOUND, f"container {container_id!r} not found")
        return execs

    def _members(
        self, stats: Mapping[int, _ProcStat], execs: Iterable[ProcessExec]
    ) -> dict[ProcessExec, set[int]]:
        """Every process of each exec, zombies included; recorded for the next scans."""
        execs = list(execs)
        found: dict[ProcessExec, set[int]] = {proc: set() for proc in execs}
        if not execs:
            return found
        owner: dict[int, ProcessExec] = {}
        children: dict[int, list[int]] = {}
        for st in stats.values():
            children.setdefault(st.ppid, []).append(st.pid)

        def claim(pid: int, proc: ProcessExec) -> None:
            # A process's descendants belong to its exec.
            stack = [pid]
            while stack:
                p = stack.pop()
                if p not in owner:
                    owner[p] = proc
                    found[proc].add(p)
                    stack.extend(children.get(p, ()))

        freezer = self._freezer
        if freezer is not None:
            for proc in execs:
                if proc._group is not None:
                    for pid in freezer.procs(proc._group):
                        if pid in stats:
                            claim(pid, proc)
        for proc in execs:
            for pid, start in proc._known.items():
                known = stats.get(pid)
                if known is not None and known.start_ticks == start:
                    claim(pid, proc)
        sessions = {proc.pid: proc for proc in execs if proc._session_active}
        tags = {proc._tag: proc for proc in execs} if freezer is None else {}
        if sessions or tags:
            floor = min(proc._start_ticks for proc in execs)
            me = os.getpid()
            for pid, st in stats.items():
                if pid in owner or pid == me or st.start_ticks < floor or st.ppid == 2:
                    continue
                leader = sessions.get(st.session)
                if leader is not None and st.start_ticks >= leader._start_ticks:
                    claim(pid, leader)
                elif tags and st.alive:
                    if tagged := tags.get(_read_tag(pid) or ""):
                        claim(pid, tagged)
                    elif (holder := self._stdio_holder(pid, execs)) is not None:
                        claim(pid, holder)
        present = {st.session for st in stats.values()}
        for proc in execs:
            proc._known = {pid: stats[pid].start_ticks for pid in found[proc]}
            # Once its leader is reaped and no process is left in it, a session id may be
            # reused by an unrelated process: stop matching on it.
            if proc._exit_code is not None and proc.pid not in present:
                proc._session_active = False
        return found

    @staticmethod
    def _stdio_holder(pid: int, execs: Iterable[ProcessExec]) -> ProcessExec | None:
        links = _read_stdio(pid)
        for proc in execs:
            # A pts number is reused once closed everywhere: trust it only while ours is open.
            if (not proc.tty or proc._master is not None) and links & proc._stdio:
                return proc
        return None

    def _reap_orphans(self, stats: Mapping[int, _ProcStat]) -> None:
        """Reap zombies re-parented to the server that belong to an exec, and only those."""
        me = os.getpid()
        known: dict[int, tuple[ProcessExec, int]] = {}
        sessions: dict[int, ProcessExec] = {}
        for proc in self._all_execs():
            for pid, start in proc._known.items():
                known[pid] = (proc, start)
            if proc._session_active:
                sessions[proc.pid] = proc
        for pid, st in stats.items():
            if st.ppid != me or st.alive or pid in _MAIN_PIDS:
                continue
            owner: ProcessExec | None = None
            if (entry := known.get(pid)) is not None and entry[1] == st.start_ticks:
                owner = entry[0]
            elif (leader := sessions.get(st.session)) and st.start_ticks >= leader._start_ticks:
                owner = leader
            if owner is None:
                continue
            try:
                reaped, _, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if reaped == pid:
                owner._reaped.add(usage)
                owner._known.pop(pid, None)

    def _note_exit(self, proc: ProcessExec) -> None:
        # Record the main process's descendants now, while they are alive and findable:
        # re-parented and dead, an escaped one could no longer be told apart.
        freezer, group = self._freezer, proc._group
        if (
            freezer is not None
            and group is not None
            and not proc._known
            and not freezer.procs(group)
            and not _has_zombie_child()
        ):
            # Nothing of the exec is alive or unreaped: skip the scan (a cost per exit).
            proc._session_active = False
            return
        try:
            stats = _scan_proc()
            self._members(stats, [proc])
            self._reap_orphans(stats)
        except OSError:
            log.exception("scanning the processes of %s failed", proc._label)

    def _kill_now(self, proc: ProcessExec) -> int:
        """One round of SIGKILL to the live processes of ``proc``; how many there were."""
        stats = _scan_proc()
        live = [pid for pid in self._members(stats, [proc])[proc] if stats[pid].alive]
        self._sigkill(proc, live)
        return len(live)

    def _sigkill(self, proc: ProcessExec, pids: Iterable[int]) -> None:
        freezer, group = self._freezer, proc._group
        if freezer is not None and group is not None:
            freezer.set_state(group, "FROZEN")  # nothing forks while we kill
        for pid in pids:
            _send(pid, signal.SIGKILL)
        if freezer is not None and group is not None:
            freezer.set_state(group, "THAWED")  # a frozen v1 task dies only once thawed

    async def _kill(self, proc: ProcessExec) -> None:
        deadline = time.monotonic() + _KILL_TIMEOUT
        while self._kill_now(proc) or proc._exit_code is None:
            if time.monotonic() > deadline:
                log.warning("%s: processes still alive %.0f s after SIGKILL", proc, _KILL_TIMEOUT)
                break
            await asyncio.sleep(0.005)
        self._reap_orphans(_scan_proc())

    def _release(self, proc: ProcessExec) -> None:
        if proc._released:
            return
        proc._released = True
        key = (proc.container_id, proc.exec_id)
        if self._execs.get(key) is proc:
            del self._execs[key]
        self._cpu_windows.pop(key, None)
        try:
            self._kill_now(proc)
        finally:
            proc._close_io(f"{proc._label} was released")
            self._graveyard.add(proc)
            if not self._has_execs(proc.container_id):
                self._paused.discard(proc.container_id)
                self._cpu_windows.pop((proc.container_id, None), None)
                shutil.rmtree(self.container_dir(proc.container_id), ignore_errors=True)

    def _ensure_sweeper(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep_loop(), name="execstream-process-sweep")

    async def _sweep_loop(self) -> None:
        while self._execs or self._graveyard:
            await asyncio.sleep(_SWEEP_INTERVAL)
            try:
                # Off the loop thread: a scan costs ~15 us per process on the machine.
                self._sweep(await asyncio.to_thread(_scan_proc))
            except Exception:
                log.exception("the process sweep failed")

    def _sweep(self, stats: Mapping[int, _ProcStat] | None = None) -> None:
        """Record escaped descendants, finish off released execs, reap orphans."""
        execs = self._all_execs()
        if not execs:
            return
        if stats is None:
            stats = _scan_proc()
        found = self._members(stats, execs)
        for proc in list(self._graveyard):
            pids = found[proc]
            self._sigkill(proc, [pid for pid in pids if stats[pid].alive])
            if proc._exit_code is None or pids:
                continue
            if proc._group is not None and self._freezer is not None:
                if not self._freezer.remove(proc._group):
                    continue
                proc._group = None
            self._graveyard.discard(proc)
        self._reap_orphans(stats)

    async def _freeze(self, container_id: str, execs: Sequence[ProcessExec]) -> None:
        assert self._freezer is not None
        freezer = self._freezer
        groups = [proc._group for proc in execs if proc._group is not None]
        for group in groups:
            freezer.set_state(group, "FROZEN")
        deadline = time.monotonic() + _STOP_TIMEOUT
        while not all(freezer.state(group) in ("FROZEN", "") for group in groups):
            if time.monotonic() > deadline:
                raise ExecError(
                    ErrorCode.UNAVAILABLE,
                    f"the processes of container {container_id!r} did not freeze "
                    f"within {_STOP_TIMEOUT:.0f} s",
                )
            await asyncio.sleep(0.002)

    async def _stop(self, container_id: str, execs: Sequence[ProcessExec]) -> None:
        deadline = time.monotonic() + _STOP_TIMEOUT
        while True:
            stats = _scan_proc()
            found = self._members(stats, execs)
            running = [
                pid
                for pids in found.values()
                for pid in pids
                if stats[pid].alive and stats[pid].state not in ("T", "t")
            ]
            if not running:
                return
            if time.monotonic() > deadline:
                states = ", ".join(f"{pid} in state {stats[pid].state}" for pid in running)
                raise ExecError(
                    ErrorCode.UNAVAILABLE,
                    f"processes of container {container_id!r} did not stop within "
                    f"{_STOP_TIMEOUT:.0f} s: {states}",
                )
            for pid in running:
                _send(pid, signal.SIGSTOP)
            await asyncio.sleep(0.002)

    def _continue(self, execs: Sequence[ProcessExec]) -> None:
        if self._freezer is not None:
            for proc in execs:
                if proc._group is not None:
                    self._freezer.set_state(proc._group, "THAWED")
            return
        stats = _scan_proc()
        for pids in self._members(stats, execs).values():
            for pid in pids:
                if stats[pid].alive:
                    _send(pid, signal.SIGCONT)

    def _cpu_percent(
        self, key: tuple[str, str | None], ticks: float, execs: Sequence[ProcessExec]
    ) -> float:
        now = time.monotonic()
        previous = self._cpu_windows.get(key)
        if previous is None:
            start = min(proc._start_ticks for proc in execs) / _CLK_TCK
            window, used = _boot_seconds() - start, ticks
            self._cpu_windows[key] = (now, ticks)
        else:
            window, used = now - previous[0], ticks - previous[1]
            if window >= _MIN_CPU_WINDOW:
                self._cpu_windows[key] = (now, ticks)
        if window <= 0:
            return 0.0
        return max(0.0, used / _CLK_TCK / window * 100.0)

    async def _close(self) -> None:
        self._closed = True
        for proc in list(self._execs.values()):
            self._release(proc)
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
