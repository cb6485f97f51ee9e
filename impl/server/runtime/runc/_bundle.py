"""What a runc container is made of: its root filesystem, its OCI config, its execs' process.

The default root filesystem is assembled from Debian's ``busybox-static``: one static
``busybox`` and a symlink per applet (``sh``, ``cat``, ``head``, ``seq``, ``stty``, ...), plus
the directories a shell expects.  Every container gets its own copy of the root filesystem it
runs on, so what one container writes no other sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..._errors import ErrorCode, ExecError
from .._base import ExecSpec
from ..process._spawn import BASE_PATH, why_not_executable

__all__ = [
    "HOST_TRAMPOLINE",
    "INIT_ARGS",
    "PACKAGES",
    "assemble_busybox_rootfs",
    "can_pass_through",
    "check_exec",
    "container_config",
    "exec_process",
    "find_tool",
]

#: What to install where a tool is missing (Debian package names).
PACKAGES = "apt-get install runc busybox-static"

#: The container's long-running init: pid 1 of the container reaps the orphans re-parented
#: to it (``wait`` reaps any child) and ends on TERM.
INIT_ARGS = ["/bin/sh", "-c", 'trap "exit 0" TERM; while :; do sleep 3600 & wait; done']

_HOME = "/root"
_BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")


def find_tool(name: str) -> Path | None:
    if name == "busybox":
        for candidate in _BUSYBOX_PATHS:
            if os.access(candidate, os.X_OK):
                return Path(candidate)
    found = shutil.which(name, path=BASE_PATH + os.pathsep + os.environ.get("PATH", ""))
    return Path(found) if found else None


def assemble_busybox_rootfs(target: Path, busybox: Path) -> None:
    """A root filesystem of busybox applets in ``target`` (created; must not exist)."""
    listing = subprocess.run(
        [str(busybox), "--list"], capture_output=True, check=True, timeout=30
    ).stdout.decode()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for directory in ("bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr/bin", "var"):
        (partial / directory).mkdir(parents=True, exist_ok=True)
    (partial / "tmp").chmod(0o1777)
    shutil.copy2(busybox, partial / "bin" / "busybox")
    for applet in listing.split():
        if applet != "busybox" and "/" not in applet:
            (partial / "bin" / applet).symlink_to("busybox")
    (partial / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (partial / "etc" / "group").write_text("root:x:0:\n")
    partial.rename(target)  # whole or not at all: a crash leaves only the .partial


def container_config(template: Mapping[str, Any], *, hostname: str) -> dict[str, Any]:
    """The OCI config of a container, from ``runc spec``'s ``template`` of this runc."""
    config: dict[str, Any] = json.loads(json.dumps(template))
    config["root"] = {"path": "rootfs", "readonly": False}
    process = config["process"]
    process.update(terminal=False, args=INIT_ARGS, cwd="/")
    process["env"] = [f"PATH={BASE_PATH}", f"HOME={_HOME}"]
    config["hostname"] = hostname[:63]
    linux = config.setdefault("linux", {})
    # Own pid, mount, uts and ipc namespaces; the host's network (no network to set up).
    linux["namespaces"] = [
        ns for ns in linux.get("namespaces", []) if ns.get("type") not in ("network", "user")
    ]
    return config


#: In the container, for a non-TTY exec: take fds 3-5 (``runc exec --preserve-fds 3``,
#: the server's own pipes) as stdin, stdout and stderr, then become the command.  Without it
#: runc copies the process's output through pipes of its own, merging writes, and stays until
#: every descendant closed them (which defeats PROTOCOL 4.4 and the bounded drain of 5.3).
STDIO_TRAMPOLINE = ["/bin/sh", "-c", 'exec "$@" <&3 >&4 2>&5 3<&- 4>&- 5>&-', "sh"]

#: In the container, for a TTY exec: fd 3 is the slave of a pseudo-terminal the server
#: made.  ``setsid -c`` makes it the command's controlling terminal (SIGWINCH, job control);
#: it needs a process that is not a group leader, so the command runs in a child and this
#: shell, the exec's first process, waits for it and exits with its status (128 + N for
#: signal N, PROTOCOL 5.2).  Signals sent to the exec skip this shell.  runc's own terminal
#: mode is not used: it copies output through a second terminal, clearing ONLCR at an
#: unpredictable moment and dropping the last bytes of a process that exits at once.
TTY_TRAMPOLINE = [
    "/bin/sh",
    "-c",
    'setsid -c "$@" <&3 >&3 2>&3 3<&- 4>&- 5>&- & exec 3<&- 4>&- 5>&-; wait $!',
    "sh",
]

#: On the host, around ``runc exec``: move the pipes from fds 0-2 to 3-5 for
#: ``--preserve-fds 3``; runc keeps stderr, for its own error messages.
HOST_TRAMPOLINE = ["/bin/sh", "-c", 'exec 3<&0 4>&1 5>&2 </dev/null >/dev/null; exec "$@"', "sh"]


def exec_process(
    template: Mapping[str, Any],
    spec: ExecSpec,
    container_id: str,
    exec_id: str,
    *,
    passthrough: bool,
) -> dict[str, Any]:
    """The OCI process of one exec (``runc exec --process``); ``passthrough`` wraps the
    command in :data:`STDIO_TRAMPOLINE` or :data:`TTY_TRAMPOLINE` (the server's stdio, not
    runc's)."""
    process: dict[str, Any] = json.loads(json.dumps(template["process"]))
    env = {"PATH": BASE_PATH, "HOME": _HOME}
    if spec.tty:
        env["TERM"] = "xterm"
    env.update(spec.env)
    env.update({"EXECSTREAM_CONTAINER": container_id, "EXECSTREAM_EXEC": exec_id})
    process.update(
        terminal=spec.tty and not passthrough,
        args=list(spec.command),
        env=[f"{key}={value}" for key, value in env.items()],
        cwd=_container_path(spec.working_dir),
    )
    if passthrough:
        trampoline = TTY_TRAMPOLINE if spec.tty else STDIO_TRAMPOLINE
        process["args"] = [*trampoline, *spec.command]
    if spec.tty and not passthrough:
        process["consoleSize"] = {"width": spec.width, "height": spec.height}  # PROTOCOL 7.3
    else:
        process.pop("consoleSize", None)
    return process


def can_pass_through(rootfs: Path) -> bool:
    """Whether the trampolines can run in ``rootfs``: a shell and ``setsid`` with ``-c``."""
    return all(why_not_executable(rootfs / name) is None for name in ("bin/sh", "bin/setsid"))


def _container_path(working_dir: str) -> str:
    return "/" + working_dir.strip("/") if working_dir else "/"


def _inside(rootfs: Path, path: str) -> Path:
    return rootfs / path.lstrip("/")


def check_exec(rootfs: Path, spec: ExecSpec) -> None:
    """PROTOCOL 3.2: the working directory and the command, looked up in the container's
    root filesystem, before anything runs (an absolute symlink there is not followed right).
    """
    cwd = _container_path(spec.working_dir)
    host_cwd = _inside(rootfs, cwd)
    if not host_cwd.is_dir():
        problem = "is not a directory" if host_cwd.exists() else "does not exist"
        raise ExecError(ErrorCode.INVALID_ARGUMENT, f"working_dir {spec.working_dir!r} {problem}")
    name = spec.command[0]
    search_path = spec.env.get("PATH") or BASE_PATH
    if "/" in name:
        target = _inside(rootfs, name) if name.startswith("/") else host_cwd / name
        if (why := why_not_executable(target)) is not None:
            raise ExecError(ErrorCode.INVALID_ARGUMENT, f"command {name!r} {why}")
        return
    for directory in search_path.split(os.pathsep):
        base = _inside(rootfs, directory) if directory.startswith("/") else host_cwd / directory
        if why_not_executable(base / name) is None:
            return
    raise ExecError(
        ErrorCode.INVALID_ARGUMENT, f"command {name!r} not found in PATH {search_path!r}"
    )
