"""A runc container's cgroup, read directly: its processes and its resource counters.

Where the container's cgroup is comes from ``/proc/<init>/cgroup`` (runc may nest it below
the server's own groups), so v1, v2 and hybrid layouts all work.  The counters are those
``runc events --stats`` reports, without a process per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..process._procfs import cgroup_mount

__all__ = ["CgroupStats", "ContainerCgroup"]

# cgroup memory limits at or above this are the kernel's "unlimited".
_UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class CgroupStats:
    cpu_ns: int
    memory_bytes: int
    memory_limit: int
    io_read_bytes: int
    io_write_bytes: int


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _int(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


class ContainerCgroup:
    """The cgroup directories of one container, by controller ("" for the v2 hierarchy)."""

    def __init__(self, init_pid: int) -> None:
        self.paths: dict[str, Path] = {}
        for line in _read(Path(f"/proc/{init_pid}/cgroup")).splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and not controllers:
                mount = cgroup_mount(None)
                if mount is not None:
                    self.paths[""] = mount / path.lstrip("/")
                continue
            for controller in controllers.split(","):
                mount = cgroup_mount(controller)
                if mount is not None:
                    self.paths[controller] = mount / path.lstrip("/")

    def _v1(self, controller: str) -> Path | None:
        path = self.paths.get(controller)
        return path if path is not None and path.is_dir() else None

    def _v2(self, name: str) -> Path | None:
        path = self.paths.get("")
        return path if path is not None and (path / name).exists() else None

    def procs(self) -> list[int]:
        """Host pids of every process of the container (its init included)."""
        for key in ("pids", "freezer", "memory", "cpuacct", ""):
            path = self.paths.get(key)
            if path is not None and (path / "cgroup.procs").exists():
                return [int(pid) for pid in _read(path / "cgroup.procs").split()]
        return []

    def stats(self) -> CgroupStats:
        return CgroupStats(self._cpu_ns(), self._memory(), self._memory_limit(), *self._io())

    def _cpu_ns(self) -> int:
        if (v1 := self._v1("cpuacct")) is not None:
            return _int(_read(v1 / "cpuacct.usage"))
        if (v2 := self._v2("cpu.stat")) is not None:
            for line in _read(v2 / "cpu.stat").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return _int(value) * 1000
        return 0

    def _memory(self) -> int:
        # Resident use: usage without the inactive file cache, as docker stats reports it.
        if (v1 := self._v1("memory")) is not None:
            usage, stat = _int(_read(v1 / "memory.usage_in_bytes")), _read(v1 / "memory.stat")
            inactive_key = "total_inactive_file"
        elif (v2 := self._v2("memory.current")) is not None:
            usage, stat = _int(_read(v2 / "memory.current")), _read(v2 / "memory.stat")
            inactive_key = "inactive_file"
        else:
            return 0
        for line in stat.splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                return max(0, usage - _int(value))
        return usage

    def _memory_limit(self) -> int:
        """The lowest limit at or above the container's group, 0 for none."""
        if (v1 := self._v1("memory")) is not None:
            group, name, mount = v1, "memory.limit_in_bytes", cgroup_mount("memory")
        elif (v2 := self._v2("memory.max")) is not None:
            group, name, mount = v2, "memory.max", cgroup_mount(None)
        else:
            return 0
        limits = []
        while True:
            if (limit := _int(_read(group / name))) and limit < _UNLIMITED:
                limits.append(limit)
            if mount is None or group == mount or mount not in group.parents:
                break
            group = group.parent
        return min(limits, default=0)

    def _io(self) -> tuple[int, int]:
        read = written = 0
        if (v1 := self._v1("blkio")) is not None:
            for name in ("blkio.io_service_bytes_recursive", "blkio.throttle.io_service_bytes"):
                for line in _read(v1 / name).splitlines():
                    fields = line.split()
                    if len(fields) == 3 and fields[1] == "Read":
                        read += _int(fields[2])
                    elif len(fields) == 3 and fields[1] == "Write":
                        written += _int(fields[2])
                if read or written:
                    break
        elif (v2 := self._v2("io.stat")) is not None:
            for line in _read(v2 / "io.stat").splitlines():
                for item in line.split()[1:]:
                    key, _, value = item.partition("=")
                    if key == "rbytes":
                        read += _int(value)
                    elif key == "wbytes":
                        written += _int(value)
        return read, written
