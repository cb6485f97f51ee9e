"""The runc runtime: every container a real OCI container, every exec a ``runc exec`` in it.

Theory of operation
===================

**Containers.**  A container is created on its first exec: a bundle under
``<state dir>/runc/bundles/<id>`` holds a copy of the root filesystem (``--rootfs``, or one
assembled once from Debian's ``busybox-static``) and an OCI config derived from this runc's
own ``runc spec``: own pid, mount, uts and ipc namespaces, the host's network, a cgroup below
the server's own (``execstream-<server>/<id>``).  ``runc run --detach`` starts its init, a
shell that reaps what is re-parented to it.  When its last exec is released the container is
deleted (``runc delete --force``), with its bundle; a create of the same ID waits for that.
runc keeps its state in ``<state dir>/runc/state`` (``runc --root``): a server started on
the state directory of one that died deletes the containers it finds there.

**Execs.**  ``runc exec --process`` runs the command with the ``Start``'s argv, env and
working directory (checked in the container's root filesystem first: PROTOCOL 3.2).  The
process gets the server's own stdio through ``--preserve-fds`` and a shell trampoline:
without a TTY the server's pipes, so output is read as the process writes it (runc would
copy it, merging writes and waiting for every descendant); with a TTY the slave of a
pseudo-terminal the server made, sized from the start (7.3), that ``setsid -c`` makes the
command's controlling terminal (SIGWINCH on resize, job control).  (A root filesystem without
``sh`` and ``setsid`` falls back to runc's own stdio handling.)  From there the exec is a
:class:`~execstream.server.runtime.process.ProcessExec`, as in the process runtime: the same
readers, writer, drain and exit, the exit code being ``runc exec``'s own (the process's
status, 128 + N for signal N).  runc writes the exec's host pid to a pid file; the exec's
processes are that one, its session (runc makes every exec a session leader), their
descendants, and what earlier scans found, among the container's cgroup.

**Control.**  Pause and resume are ``runc pause`` / ``runc resume``: the cgroup freezer stops
every process of the container, whatever session it is in.  A container-wide signal goes to
every process of the cgroup but the init; an exec-scoped one to the exec's processes.

**Usage.**  A container's figures are its cgroup's counters (CPU time, memory without the
inactive file cache, the lowest memory limit at or above it, block I/O where the kernel counts
it); an exec's are summed from /proc over its processes, as in the process runtime.

Needs root, ``runc`` and ``busybox`` (``apt-get install runc busybox-static``).
"""

from ._runtime import RuncRuntime, RuntimeUnavailable, runc_problem

__all__ = ["RuncRuntime", "RuntimeUnavailable", "runc_problem"]
