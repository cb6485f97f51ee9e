"""The cgroup-v1 freezer: one group per exec, so pause, kill and attribution see every process.

See the package docstring ("Finding processes", "Pausing", "Killing").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import itertools
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..._errors import ErrorCode, ExecError
from ._procfs import cgroup_mount

__all__ = ["Freezer", "remove_stale_groups"]

log = logging.getLogger("execstream.server.process")

T = TypeVar("T")
#: How long a move of the spawner into a group may take, at most (a grace period or two).
_MOVE_TIMEOUT = 10.0
#: How long a group may stay FREEZING before it is thawed and frozen again.
_REFREEZE_AFTER = 0.2


class Freezer:
    """One freezer cgroup per exec, under a root that belongs to one runtime.

    Moving a thread into a cgroup-v1 group waits for an RCU grace period: milliseconds (12
    ms was seen under load), which a spawn would wait before its fork.  So execs are forked
    by a thread of their own, the spawner, which moves into the next exec's fresh group
    ahead of time, right after each fork (:meth:`fork_in_new_group`).  Until that move is
    done the spawner is still in the group of the exec just forked: freezing or removing
    that group first waits for it.  The spawner does nothing but fork: a thread it made
    would stay in an exec's group.
    """

    def __init__(self, mount: Path, root: Path) -> None:
        self.mount = mount
        self.root = root
        self._names = itertools.count(1)
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._spawner: threading.Thread | None = None
        #: The group the spawner is leaving (the exec it forked last), until it has.
        self._leaving: Path | None = None
        self._left = threading.Event()
        self._left.set()
        self._spare: Path | None = None  # the group the spawner waits in

    @classmethod
    def create(cls, name: str) -> Freezer:
        mount = cgroup_mount("freezer")
        if mount is None:
            raise OSError(errno.ENOENT, "no cgroup v1 freezer hierarchy is mounted")
        base = mount / "execstream"
        base.mkdir(exist_ok=True)
        remove_stale_groups(base)
        root = base / name
        root.mkdir()
        freezer = cls(mount, root)
        try:
            (root / "freezer.state").write_text("THAWED")
            with freezer.born_in(root):
                pass  # proves that this thread can join a group and come back
        except OSError:
            freezer.close()
            raise
        return freezer

    def fork_in_new_group(self, fork: Callable[[Path], T]) -> concurrent.futures.Future[T]:
        """Run ``fork(group)`` on the spawner, which is inside ``group``, a new group: the
        children it forks are born there."""
        if self._spawner is None:
            # Started by a thread in the server's own group (the runtime never moves its
            # other threads), so the spawner starts there too.
            self._spawner = threading.Thread(
                target=self._spawn_loop, name="execstream-spawner", daemon=True
            )
            self._spawner.start()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put(_Job(fork, future))
        return future

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

    def _make_group(self) -> Path:
        group = self.root / str(next(self._names))
        group.mkdir()
        return group

    def _spawn_loop(self) -> None:
        tid = threading.get_native_id()
        home = self._group_of_thread(tid)
        left: tuple[Path, bool] | None = None  # the last exec's group; whether its fork failed
        while True:
            spare: Path | None = None
            error: OSError | None = None
            try:
                spare = self._make_group()
                try:
                    (spare / "tasks").write_text(str(tid))
                except OSError:
                    spare.rmdir()
                    raise
            except OSError as exc:
                spare, error = None, exc
                if left is not None:
                    self._leave(tid, home)
            self._spare = spare
            if left is not None:
                self._leaving = None
                self._left.set()
                if left[1]:
                    self.remove(left[0])
                left = None
            job = self._jobs.get()
            if job is None:
                return  # the thread leaves its group as it ends
            if spare is None:
                job.future.set_exception(error or OSError("no freezer group"))
                continue
            self._spare = None
            self._leaving = spare
            self._left.clear()
            try:
                job.future.set_result(job.fork(spare))
            except BaseException as exc:  # for the caller to raise
                job.future.set_exception(exc)
                left = (spare, True)
            else:
                left = (spare, False)

    def _vacate(self, group: Path) -> None:
        """Wait until the spawner is out of ``group`` (at most the time of one move)."""
        if group == self._leaving and not self._left.wait(_MOVE_TIMEOUT):
            log.warning("the spawner thread is still in freezer group %s", group)

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
        """The processes in ``group``; never the server, whose spawner may be there for a
        moment after a fork."""
        try:
            pids = [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []
        me = os.getpid()
        return [pid for pid in pids if pid != me]

    async def freeze(self, container_id: str, groups: Sequence[Path], within: float) -> None:
        """Freeze ``groups`` and wait until they are (UNAVAILABLE after ``within`` s)."""
        for group in groups:
            self.set_state(group, "FROZEN")
        deadline = time.monotonic() + within
        refreeze = time.monotonic() + _REFREEZE_AFTER
        while stuck := [group for group in groups if self.state(group) not in ("FROZEN", "")]:
            now = time.monotonic()
            if now > deadline:
                raise ExecError(
                    ErrorCode.UNAVAILABLE,
                    f"the processes of container {container_id!r} did not freeze "
                    f"within {within:.0f} s ({self._holding_out(stuck)})",
                )
            if now >= refreeze:
                # A shell waiting in vfork for a child the freezer stopped before its exec
                # can never freeze (seen: "sh state=D in kernel_clone" beside its child "in
                # __refrigerator"): thaw, so that the child gets to its exec, and freeze
                # again, as runc does.
                for group in stuck:
                    self.set_state(group, "THAWED")
                await asyncio.sleep(0.01)
                for group in stuck:
                    self.set_state(group, "FROZEN")
                refreeze = time.monotonic() + _REFREEZE_AFTER
            await asyncio.sleep(0.002)

    def _holding_out(self, groups: Sequence[Path]) -> str:
        """Who keeps the groups from freezing, for the operator: the processes and threads
        not frozen yet, with their state and what they wait in (a process in disk sleep, D,
        cannot freeze until its I/O is done)."""
        seen: list[str] = []
        for group in groups:
            if self.state(group) in ("FROZEN", ""):
                continue
            try:
                tids = [int(tid) for tid in (group / "tasks").read_text().split()]
            except OSError:
                continue
            for tid in tids:
                seen.append(_describe_task(tid))
        return "; ".join(seen[:8]) or "no task found"

    def set_state(self, group: Path, state: str) -> None:
        if state == "FROZEN":
            self._vacate(group)  # never freeze the spawner
        with contextlib.suppress(FileNotFoundError):
            (group / "freezer.state").write_text(state)

    def state(self, group: Path) -> str:
        try:
            return (group / "freezer.state").read_text().strip()
        except FileNotFoundError:
            return ""

    def remove(self, group: Path) -> bool:
        self._vacate(group)
        try:
            group.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False  # still has tasks: the sweep retries
        return True

    def close(self) -> None:
        if self._spawner is not None:
            self._jobs.put(None)
            self._spawner.join(_MOVE_TIMEOUT)
            self._spawner = None
        if self._spare is not None:
            self.remove(self._spare)
            self._spare = None
        with contextlib.suppress(OSError):
            self.root.rmdir()


@dataclass(frozen=True, slots=True)
class _Job(Generic[T]):
    fork: Callable[[Path], T]
    future: concurrent.futures.Future[T]


def _describe_task(tid: int) -> str:
    """``TID NAME state=S in WCHAN`` from /proc; a thread of the server says so."""
    base = f"/proc/{os.getpid()}/task/{tid}" if tid != os.getpid() else f"/proc/{tid}"
    mine = os.path.exists(base)
    path = base if mine else f"/proc/{tid}"
    try:
        with open(f"{path}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state = stat[stat.rindex(")") + 2]
    except (OSError, ValueError, IndexError):
        return f"{tid} (gone)"
    try:
        with open(f"{path}/wchan", "rb") as f:
            wchan = f.read().decode(errors="replace").strip()
    except OSError:
        wchan = ""
    owner = "a thread of the server, " if mine else ""
    waits = f" in {wchan}" if wchan not in ("", "0") else ""  # "0": hidden by the kernel
    return f"{tid} {owner}{name} state={state}{waits}"


def remove_stale_groups(base: Path) -> None:
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
                    kill_group_members(group)
                    time.sleep(0.02)
            else:
                procs = (group / "cgroup.procs").read_text().split() if group.exists() else []
                log.warning("freezer group %s of a dead server still holds %s", group, procs)


def kill_group_members(group: Path) -> None:
    with contextlib.suppress(OSError):
        (group / "freezer.state").write_text("THAWED")
    try:
        members = (group / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in members:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
