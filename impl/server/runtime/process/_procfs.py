"""Readers of /proc and of the cgroup hierarchies: what the process runtime knows of processes.

Plain functions of the kernel's files, no state beyond the cached mount table.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ._spawn import ENV_TAG

__all__ = [
    "CLK_TCK",
    "PAGE_SIZE",
    "ProcStat",
    "boot_seconds",
    "cgroup_mount",
    "cpu_percent",
    "live_usage",
    "main_thread_children",
    "memory_limit",
    "read_io",
    "read_stat",
    "read_stdio",
    "read_tag",
    "scan_proc",
]

K = TypeVar("K")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# cgroup memory limits at or above this are the kernel's "unlimited" (PAGE_COUNTER_MAX).
UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class ProcStat:
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


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb", buffering=0) as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=fields[0].decode(),
        ppid=int(fields[1]),
        session=int(fields[3]),
        cpu_ticks=int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]),
        start_ticks=int(fields[19]),
        rss_pages=int(fields[21]),
    )


def scan_proc() -> dict[int, ProcStat]:
    stats: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := read_stat(int(name))) is not None:
            stats[st.pid] = st
    return stats


def main_thread_children() -> set[int] | None:
    """The pids of the children of this process's main thread, zombies included; None where
    the kernel keeps no list of them (``/proc/<pid>/task/<tid>/children`` needs
    CONFIG_PROC_CHILDREN).

    Those are the children it forked and every orphan the process adopted as a subreaper:
    the kernel gives an orphan, and the children of a thread that ends, to the first live
    thread of the process, which is the main thread while it lives.  Children that other
    threads forked are listed under those threads, not here.  A child can be missed when
    another is reaped during the read, so the file is read twice and a child either read
    lists counts: about 10 us, where a /proc scan costs about 15 us a process.
    """
    me = os.getpid()
    children: set[int] = set()
    for _ in range(2):
        try:
            fd = os.open(f"/proc/{me}/task/{me}/children", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            listing = b""
            while chunk := os.read(fd, 65536):
                listing += chunk
        finally:
            os.close(fd)
        children.update(map(int, listing.split()))
    return children


def read_tag(pid: int) -> str | None:
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


def read_stdio(pid: int) -> set[str]:
    """What fds 0-2 of ``pid`` point at (``pipe:[inode]``, ``/dev/pts/N``)."""
    links = set()
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            links.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return links


def read_io(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            counters = dict(line.split(": ", 1) for line in f.read().splitlines())
    except (OSError, ValueError):
        return 0, 0
    if "read_bytes" in counters:
        written = int(counters["write_bytes"]) - int(counters.get("cancelled_write_bytes", 0))
        return int(counters["read_bytes"]), max(0, written)
    return int(counters.get("rchar", 0)), int(counters.get("wchar", 0))


def live_usage(
    stats: Mapping[int, ProcStat], pids: Iterable[int]
) -> tuple[float, int, list[int], int, int]:
    """What ``pids`` (found in ``stats``, zombies included) use: CPU ticks, resident bytes
    and the live pids among them, and bytes read and written."""
    ticks = 0.0
    rss = read = written = 0
    live = []
    for pid in pids:
        st = stats[pid]
        ticks += st.cpu_ticks
        if st.alive:
            live.append(pid)
            rss += st.rss_pages * PAGE_SIZE
            r, w = read_io(pid)
            read += r
            written += w
    return ticks, rss, live, read, written


def boot_seconds() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


#: A sample under this many seconds after the previous one shares its window (ticks are 10 ms).
_MIN_CPU_WINDOW = 0.1


def cpu_percent(
    windows: dict[K, tuple[float, float]],
    key: K,
    ticks: float,
    first_start_ticks: Callable[[], int],
) -> float:
    """CPU percent over the window since the previous sample of ``key`` (kept in
    ``windows``), or since the earliest process started for a first sample."""
    now = time.monotonic()
    previous = windows.get(key)
    if previous is None:
        window, used = boot_seconds() - first_start_ticks() / CLK_TCK, ticks
        windows[key] = (now, ticks)
    else:
        window, used = now - previous[0], ticks - previous[1]
        if window >= _MIN_CPU_WINDOW:
            windows[key] = (now, ticks)
    if window <= 0:
        return 0.0
    return max(0.0, used / CLK_TCK / window * 100.0)


@functools.cache
def cgroup_mounts() -> tuple[tuple[str, Path, str, frozenset[str]], ...]:
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


def cgroup_mount(controller: str | None) -> Path | None:
    """The mount of a v1 controller's hierarchy, or of the v2 hierarchy for ``None``."""
    for fstype, point, root, options in cgroup_mounts():
        if root != "/":
            continue
        if controller is None and fstype == "cgroup2":
            return point
        if controller is not None and fstype == "cgroup" and controller in options:
            return point
    return None


def read_limit(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    if not text.isdigit():
        return 0  # "max"
    value = int(text)
    return 0 if value >= UNLIMITED else value


def memory_limit(pid: int) -> int:
    """The lowest memory limit of the cgroups above ``pid`` (v1 or v2), 0 for none."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return 0
    limits = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            mount, name = cgroup_mount("memory"), "memory.limit_in_bytes"
        elif hierarchy == "0" and not controllers:
            mount, name = cgroup_mount(None), "memory.max"
        else:
            continue
        if mount is None:
            continue
        group = mount / path.lstrip("/")
        while True:
            if limit := read_limit(group / name):
                limits.append(limit)
            if group == mount or mount not in group.parents:
                break
            group = group.parent
    return min(limits, default=0)
