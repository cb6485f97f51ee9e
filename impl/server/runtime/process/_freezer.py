"""The cgroup-v1 freezer: one group per exec, so pause, kill and attribution see every process.

See the package docstring ("Finding processes", "Pausing", "Killing").
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ._procfs import cgroup_mount

__all__ = ["Freezer", "remove_stale_groups"]

log = logging.getLogger("execstream.server.process")


class Freezer:
    """One freezer cgroup per exec, under a root that belongs to one runtime."""

    def __init__(self, mount: Path, root: Path) -> None:
        self.mount = mount
        self.root = root
        self._names = itertools.count(1)
        #: The next exec's group, made after the previous fork so that a spawn waits for
        #: one mkdir less before its fork.
        self._spare: Path | None = None
        #: Each spawning thread's own group, read the first time it spawns: it is where the
        #: thread goes back to after each fork (a read less per spawn).
        self._homes: dict[int, Path] = {}

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

    def new_group(self) -> Path:
        group, self._spare = self._spare, None
        if group is None:
            group = self._make_group()
        return group

    def _make_group(self) -> Path:
        group = self.root / str(next(self._names))
        group.mkdir()
        return group

    @contextlib.contextmanager
    def born_in(self, group: Path) -> Iterator[None]:
        """Children forked by this thread inside the block start in ``group``."""
        tid = threading.get_native_id()
        home = self._homes.get(tid)
        if home is None:
            home = self._homes[tid] = self._group_of_thread(tid)
        (group / "tasks").write_text(str(tid))
        try:
            yield
        finally:
            self._leave(tid, home)
            # While the child just forked gets going.
            # On failure the next spawn makes its group itself, and reports the error.
            if self._spare is None:
                with contextlib.suppress(OSError):
                    self._spare = self._make_group()

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
            if self._spare is not None:
                self._spare.rmdir()
                self._spare = None
            self.root.rmdir()


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
