"""Which processes belong to which exec, and reaping the orphans that are ours.

See the package docstring ("Finding processes", "Reaping").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import TYPE_CHECKING

from ..._errors import ErrorCode, ExecError
from ._freezer import remove_stale_groups
from ._procfs import (
    ProcStat,
    cgroup_mount,
    main_thread_children,
    read_stdio,
    read_tag,
    scan_proc,
)
from ._spawn import first_zombie_child, send_signal

if TYPE_CHECKING:
    from ._exec import ProcessExec
    from ._freezer import Freezer

__all__ = ["ProcessFinder", "end_leftovers", "live_main", "reap_exited_mains"]

#: Rounds of killing a dead runtime's processes: they may fork while being killed.
_KILL_ROUNDS = 8
#: How long a pause by signals waits on a process in disk sleep before it lets the stopped
#: ones go on for a moment and stops them again.
_RESTOP_AFTER = 0.2
#: How long a zombie child that no exec claims, outside the server's session, is left for a
#: waiter of its own before it is reaped (see :meth:`ProcessFinder.reap_orphans`).
_STRAY_GRACE = 10.0


def end_leftovers(token: str) -> int:
    """Kill every process a runtime that died without ``close`` left behind (its
    ``ProcessRuntime.token``), found by the ``EXECSTREAM_TAG`` it gave them and by its
    freezer groups; returns how many processes were killed.  For a restart after a crash:
    nothing outlives its container, even when its server did not."""
    killed: set[int] = set()
    prefix = f"{token}."
    for _ in range(_KILL_ROUNDS):
        fresh = [
            pid
            for pid, st in scan_proc().items()
            if st.alive and pid not in killed and (read_tag(pid) or "").startswith(prefix)
        ]
        if not fresh:
            break
        for pid in fresh:
            send_signal(pid, signal.SIGKILL)
        killed.update(fresh)
    mount = cgroup_mount("freezer")
    if mount is not None and (mount / "execstream" / token).is_dir():
        with contextlib.suppress(OSError):
            remove_stale_groups(mount / "execstream")
    return len(killed)


def live_main(mains: Mapping[int, ProcessExec], pid: int) -> ProcessExec | None:
    """The exec whose main process ``pid`` is, and not yet reaped; ``mains`` by pid (an entry
    left after its reap has an exit code, and a reused pid is then no exec's main)."""
    main = mains.get(pid)
    return main if main is not None and main.exit_code is None else None


def reap_exited_mains(
    mains: Mapping[int, ProcessExec], forking: Set[int], forks_under_way: Callable[[], bool]
) -> bool | None:
    """Reap the main processes of execs (``mains``, by pid) that exited and whose pidfd
    callback has not run yet (many execs end together in a burst); whether a zombie child is
    left that is none of them: an orphan, which only a scan can attribute.  None when that
    cannot be told: the zombie in view is the main process of an exec still being spawned
    (``forking``), or may be the child of a fork under way whose pid is not known yet (asked
    after the zombie was seen: the spawner counts a fork before it forks), which only its own
    exec may reap."""
    while (pid := first_zombie_child()) is not None:
        main = live_main(mains, pid)
        if main is None:
            # The spawner adds the pid before it uncounts the fork: asked in the other order,
            # a fork finishing in between would be missed by both.
            return None if forks_under_way() or pid in forking else True
        if not main.reap_if_exited():
            return True
    return False


class ProcessFinder:
    """Attributes processes to execs: by freezer group, earlier scans, session, descent, the
    ``EXECSTREAM_TAG`` marker and stdio, in that order; records what it found on each exec."""

    def __init__(self) -> None:
        #: Set once the runtime decided to use the freezer.
        self.freezer: Freezer | None = None
        #: Whether the server is its execs' subreaper: set when the runtime has made it one.
        self.subreaper = False
        #: Counts what was learnt that a /proc scan could contradict: processes attributed or
        #: reaped here, an exec spawned or exited (the runtime counts those).  A scan taken
        #: before the count last moved is older than what is known: not to be read as the truth.
        self.changes = 0
        #: Seconds a zombie child that no exec claims, outside the server's session, is left
        #: to a waiter of its own before it is reaped.
        self.stray_grace = _STRAY_GRACE
        #: Zombie children no exec claims, outside the server's session, by (pid, start
        #: ticks): when a scan first saw them.
        self._strays_seen: dict[tuple[int, int], float] = {}

    @property
    def strays_waiting(self) -> bool:
        """Whether a zombie that no exec claims waits out its grace (the sweep goes on)."""
        return bool(self._strays_seen)

    def may_have_left(
        self,
        exits: Iterable[ProcessExec],
        mains: Mapping[int, ProcessExec],
        forking: Set[int],
        forks_under_way: Callable[[], bool],
    ) -> tuple[list[ProcessExec], bool]:
        """Those of ``exits`` (execs whose main process was reaped) that may have left a
        process, alive or a zombie: only a /proc scan (about 15 us a process of the machine,
        on the event loop) can find it; and whether the others surely left none.

        An exec none of whose other processes was seen by an earlier scan left none when
        each child of the server's main thread is the main process of a live exec (``mains``,
        by pid) or of one ``forking``: as their subreaper the server adopts every orphan, on
        its main thread, so the topmost process of whatever an exec leaves behind is a child
        of that thread.  Not sure when another child may be that of a fork under way, whose
        pid is not known yet (asked after the children were read, as in
        :func:`reap_exited_mains`); then an exec whose freezer group holds a process left
        one.  An empty group proves nothing: a process leaves its group on its way out, a
        moment before it is a zombie (and a process in the group has a child of the main
        thread at its top, so the group is read only when the children leave it undecided)."""
        left: list[ProcessExec] = []
        strays: bool | None = False
        checked = False
        for proc in exits:
            if proc.ended:
                continue
            if proc.exit_code is None or proc.known:
                left.append(proc)
                continue
            if not checked:
                checked = True
                strays = self._strays(mains, forking, forks_under_way)
            if strays or (strays is None and self._in_group(proc)):
                left.append(proc)
        return left, strays is not None

    def _in_group(self, proc: ProcessExec) -> bool:
        """Whether ``proc``'s freezer group holds a process."""
        return (
            self.freezer is not None
            and proc.group is not None
            and bool(self.freezer.procs(proc.group))
        )

    def _strays(
        self,
        mains: Mapping[int, ProcessExec],
        forking: Set[int],
        forks_under_way: Callable[[], bool],
    ) -> bool | None:
        """Whether the server's main thread may have a child that is no live exec's main
        process; None when the only such children may be those of a fork under way."""
        children = main_thread_children() if self.subreaper else None
        if children is None:
            return True
        if all(live_main(mains, pid) is not None for pid in children - forking):
            return False
        return None if forks_under_way() else True

    def members(
        self, stats: Mapping[int, ProcStat], execs: Iterable[ProcessExec]
    ) -> dict[ProcessExec, set[int]]:
        """Every process of each exec, zombies included; recorded for the next scans."""
        self.changes += 1
        found: dict[ProcessExec, set[int]] = {proc: set() for proc in execs}
        execs = [proc for proc in found if not proc.ended]
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

        freezer = self.freezer
        if freezer is not None:
            for proc in execs:
                if proc.group is not None:
                    for pid in freezer.procs(proc.group):
                        if pid in stats:
                            claim(pid, proc)
        for proc in execs:
            if proc.exit_code is None and proc.pid in stats:
                claim(proc.pid, proc)  # not reaped yet: its pid is still its own
            for pid, start in proc.known.items():
                known = stats.get(pid)
                if known is not None and known.start_ticks == start:
                    claim(pid, proc)
        sessions = {proc.pid: proc for proc in execs if proc.session_active}
        tags = {proc.tag: proc for proc in execs} if freezer is None else {}
        if sessions or tags:
            floor = min(proc.start_ticks for proc in execs)
            me = os.getpid()
            for pid, st in stats.items():
                if pid in owner or pid == me or st.start_ticks < floor or st.ppid == 2:
                    continue
                leader = sessions.get(st.session)
                if leader is not None and st.start_ticks >= leader.start_ticks:
                    claim(pid, leader)
                elif tags and st.alive:
                    if tagged := tags.get(read_tag(pid) or ""):
                        claim(pid, tagged)
                    elif (holder := self._stdio_holder(pid, execs)) is not None:
                        claim(pid, holder)
        present = {st.session for st in stats.values()}
        for proc in execs:
            proc.known = {pid: stats[pid].start_ticks for pid in found[proc]}
            # Once its leader is reaped and no process is left in it, a session id may be
            # reused by an unrelated process: stop matching on it.
            if proc.exit_code is not None and proc.pid not in present:
                proc.session_active = False
        return found

    async def stop(self, container_id: str, execs: Sequence[ProcessExec], within: float) -> None:
        """SIGSTOP every process of ``execs`` until none runs (UNAVAILABLE after ``within``
        s); a stopped process cannot fork, so this ends."""
        deadline = time.monotonic() + within
        restart = time.monotonic() + _RESTOP_AFTER
        while True:
            stats = scan_proc()
            found = self.members(stats, execs)
            alive = [pid for pids in found.values() for pid in pids if stats[pid].alive]
            running = [pid for pid in alive if stats[pid].state not in ("T", "t")]
            if not running:
                return
            now = time.monotonic()
            if now > deadline:
                states = ", ".join(f"{pid} in state {stats[pid].state}" for pid in running)
                raise ExecError(
                    ErrorCode.UNAVAILABLE,
                    f"processes of container {container_id!r} did not stop within "
                    f"{within:.0f} s: {states}",
                )
            if now >= restart and any(stats[pid].state == "D" for pid in running):
                # A shell waiting in vfork (state D) for a child stopped before its exec
                # would wait forever: let the stopped ones go on for a moment, then stop
                # them all again (the freezer's refreeze, by signals).
                for pid in alive:
                    send_signal(pid, signal.SIGCONT)
                await asyncio.sleep(0.01)
                restart = time.monotonic() + _RESTOP_AFTER
            for pid in running:
                send_signal(pid, signal.SIGSTOP)
            await asyncio.sleep(0.002)

    @staticmethod
    def _stdio_holder(pid: int, execs: Iterable[ProcessExec]) -> ProcessExec | None:
        links = read_stdio(pid)
        for proc in execs:
            # A pts number is reused once closed everywhere: trust it only while ours is open.
            if (not proc.tty or proc.terminal_open) and links & proc.stdio:
                return proc
        return None

    def reap_orphans(self, stats: Mapping[int, ProcStat], execs: Iterable[ProcessExec]) -> None:
        """Reap zombies re-parented to the server that belong to an exec; and those that no
        exec claims but left the server's session, once they have stayed unreaped for
        :attr:`stray_grace` s.  Those are an exec's descendants that made a session of their
        own and died before any scan saw them: a zombie keeps neither its environment nor
        its cgroup, so nothing ties them to their exec, and a client could otherwise leave
        the server a zombie per exec (``setsid true &``).  A child that the server's own code
        started is in the server's session, or waited for long before the grace is out."""
        self.changes += 1
        me, session, now = os.getpid(), os.getsid(0), time.monotonic()
        known: dict[int, tuple[ProcessExec, int]] = {}
        sessions: dict[int, ProcessExec] = {}
        mains: set[int] = set()
        for proc in execs:
            if proc.exit_code is None:
                mains.add(proc.pid)  # left to its pidfd: reaping it here would lose its status
            for pid, start in proc.known.items():
                known[pid] = (proc, start)
            if proc.session_active:
                sessions[proc.pid] = proc
        seen, self._strays_seen = self._strays_seen, {}
        for pid, st in stats.items():
            if st.ppid != me or st.alive or pid in mains:
                continue
            owner: ProcessExec | None = None
            if (entry := known.get(pid)) is not None and entry[1] == st.start_ticks:
                owner = entry[0]
            elif (leader := sessions.get(st.session)) and st.start_ticks >= leader.start_ticks:
                owner = leader
            elif st.session == session:
                continue  # perhaps a child of the server's own code: its waiter's to reap
            else:
                stray = (pid, st.start_ticks)
                first = self._strays_seen[stray] = seen.get(stray, now)
                if now - first < self.stray_grace:
                    continue
            try:
                reaped, _, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if reaped != pid:
                continue
            if owner is not None:
                owner.reaped.add(usage)
                owner.known.pop(pid, None)
            else:
                del self._strays_seen[(pid, st.start_ticks)]
