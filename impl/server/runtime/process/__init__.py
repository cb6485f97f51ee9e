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
``<freezer>/execstream/<server pid>.<random>/<n>``: execs are forked by a spawner thread that
waits inside the next exec's fresh group (cgroup v1 moves single threads), so the child is
born inside and every descendant, ``setsid`` or not, stays there unless it writes cgroup
files itself.  A move waits for an RCU grace period (milliseconds), so the spawner makes it
right after each fork, off the event loop and ahead of the next spawn; freezing or removing
a group first waits until the spawner has left it.  The groups
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
When a main process is reaped, its exec's processes are recorded by a /proc scan, unless
nothing of the exec is known to be left and no zombie child of the server is left but the
main processes of other execs (those are reaped there and then, as their pidfds would have
them reaped a moment later): execs ending together cost no scan each.  Nothing is left when
the server's main thread has no child but the main processes of live execs
(``/proc/<pid>/task/<pid>/children``): every orphan is adopted by the server, on its main
thread, so whatever an exec leaves behind has a child of that thread at its top.  An empty
freezer group is no proof: a process leaves its group on its way out, a moment before it
is a zombie.  A child that may be that of a fork under way leaves the exit undecided: no
scan, and the next sweep looks at the exec.
A zombie child that no exec claims but that is outside the server's session is reaped once
it has stayed unreaped for 10 s: an exec's descendant that made a session of its own and
died before any scan saw it (``setsid true &``; a zombie keeps no environment or cgroup),
which a client could otherwise leave behind once per exec.  Limits: a zombie in the
server's session may be the child of other code in the process and is left to its waiter,
so orphans of other components' children that stay in it (the subreaper collects them
too) are never reaped; and a child that other code starts in a session of its own, and
waits for more than 10 s after its exit, loses its status.

**Pausing.**  With the freezer: every cgroup of the container is set FROZEN.  That is
invisible to the processes, they cannot fork while freezing, and resume thaws exactly what
was frozen.  Without it: SIGSTOP to every process, repeated until a scan finds none running
(a stopped process cannot fork, so this ends); parents can observe those stops (SIGCHLD,
``WUNTRACED``), and resume's SIGCONT also continues a process the workload stopped itself.

**Killing.**  SIGKILL to every process of the exec, repeated until none is alive; with the
freezer as freeze, kill, thaw, so nothing forks in between (and a frozen v1 task only dies
once thawed).  ``release`` and ``close`` kill what is left the same way, then the sweep
finishes off stragglers: nothing outlives its container.

**Draining.**  Output pipes (1 MiB where ``F_SETPIPE_SZ`` allows) are read non-blocking, on
the event loop thread: each turn of the loop reads until the pipe is empty (within 4 MiB),
storing each read's full pieces at once, so the producer refills the pipe meanwhile; the
sink gets pieces of ``read_size`` bytes, and one shorter at the end of the turn, each read's
full pieces in one write when ``read_size`` is a multiple of the 64 KiB chunk (one storage
write per read).
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

Modules, one job each: ``_procfs`` (readers of /proc and cgroups), ``_freezer`` (the cgroup-v1
freezer), ``_stdio`` (output readers, the input writer), ``_spawn`` (checks and the fork),
``_finder`` (which process is whose, reaping orphans), ``_exec`` (one exec), ``_runtime``
(containers, control, usage, cleanup).
"""

from ._exec import ProcessExec
from ._finder import end_leftovers
from ._runtime import ProcessRuntime
from ._spawn import BASE_PATH

__all__ = ["BASE_PATH", "ProcessExec", "ProcessRuntime", "end_leftovers"]
