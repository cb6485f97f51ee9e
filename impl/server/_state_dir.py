"""Owning a state directory: one live server at a time, and a clean restart after a crash.

A server holds an exclusive ``flock`` on ``<state dir>/server.lock`` for as long as it runs, and
writes into it the token its process runtime marks its execs with.  The kernel drops the lock
when the process dies, however it dies.  So at start:

* the lock is held: another live server uses the directory; refuse to start;
* the lock is free but the file names a token: that server died without closing (SIGKILL, a
  crash, the machine's OOM killer).  Its processes are killed at once, before this server
  accepts anything, and its containers' directories and output files are removed;
* no file: a fresh directory, or one a server closed cleanly.

A clean close removes the file, so only a crash leaves work for the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

from .runtime.process import end_leftovers

__all__ = ["StateDirInUse", "StateDirLock"]

log = logging.getLogger("execstream.server")

LOCK_NAME = "server.lock"
#: What a server keeps under its state directory (containers, output copies).
_LEFTOVERS = ("containers", "logs")


class StateDirInUse(OSError):
    """Another live server holds the state directory."""


class StateDirLock:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, token: str) -> int:
        """Take the directory for the runtime ``token``; clean up after a dead owner.

        Returns how many leftover processes were killed.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 256).decode(errors="replace").split()
            os.close(fd)
            pid = f" (pid {owner[1]})" if len(owner) > 1 else ""
            raise StateDirInUse(
                f"state dir {self.state_dir} is in use by a running server{pid}"
            ) from None
        try:
            previous = os.read(fd, 256).decode(errors="replace").split()
            killed = 0
            if previous:
                killed = end_leftovers(previous[0])
                for name in _LEFTOVERS:
                    shutil.rmtree(self.state_dir / name, ignore_errors=True)
                log.warning(
                    "state dir %s was left by a server that died (pid %s): "
                    "killed %d of its processes, removed its containers and output",
                    self.state_dir,
                    previous[1] if len(previous) > 1 else "?",
                    killed,
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{token} {os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return killed

    def release(self) -> None:
        """After a clean close: nothing for the next server to clean up."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
