"""A tiny engine-style server: its execs are started by the engine, never by ``Start{command}``.

This is the README's worked example of checking such a server through a driver.  It embeds
the Exec service the way an engine does (``ExecAttachable`` on its own ``grpc.aio`` server,
no runner: a ``Start`` with a command is answered ``NOT_FOUND``, PROTOCOL 3.2) and starts
execs when asked on a control socket of its own, through the public executor API:
``attachable.executor.register(...)``, ``handle.started(controls)``, ``handle.stdout.write``,
``handle.exit(code)``.

    python tests/conformance/engine_server.py --listen 127.0.0.1:50061 \\
        --control /tmp/engine.sock --retention 5 --cleanup-interval 0.5
    execstream conformance --target 127.0.0.1:50061 --retention 5 --cleanup-interval 0.5 \\
        --driver-command 'python tests/conformance/engine_driver.py /tmp/engine.sock'

``engine_driver.py`` is the driver command: it reads the ``EXECSTREAM_*`` variables the suite
sets, asks the engine over the control socket, and exits 0 once the exec is registered, 1
with the engine's message otherwise.  The engine runs commands with pipes, or on a pseudo-terminal
for a TTY exec, and does not pause, resume or signal (those RPCs answer FAILED_PRECONDITION).

``--fault`` makes the engine misbehave in one way, for the suite's self-tests: each fault
must be caught by the case of the clause it breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import struct
import sys
import termios
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: What ``--fault`` can break, and the clause it breaks.
FAULTS = {
    "exit-code-zero": "5.2: every exec reports exit code 0",
    "drops-stderr": "4.3: stderr never reaches the clients",
    "exit-before-output": "5.1: exit is sent as soon as the process ends, output not drained",
    "ignores-env": "3.2: the exec runs without the env it was given",
}


@dataclass
class _Pipes:
    """:class:`ExecControls` of a piped process (PROTOCOL 7.1)."""

    process: asyncio.subprocess.Process

    async def write_stdin(self, data: bytes) -> None:
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing():
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.write(data)
            await stdin.drain()

    def close_stdin(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()

    def resize(self, width: int, height: int) -> None:
        """Never called: the service refuses resize on a non-TTY exec (7.3)."""


def _set_size(fd: int, width: int, height: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


@dataclass
class _Terminal:
    """:class:`ExecControls` of a process on a pseudo-terminal (PROTOCOL 7.1, 7.3)."""

    process: asyncio.subprocess.Process
    master: int

    async def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except OSError:
                return  # the terminal is gone: the process exited

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.master, b"\x04")  # the terminal's EOF character (7.1)

    def resize(self, width: int, height: int) -> None:
        # The process's session has the terminal as its controlling one, so the kernel
        # sends SIGWINCH to its foreground group (7.3).
        with contextlib.suppress(OSError):
            _set_size(self.master, width, height)


@dataclass
class Engine:
    """Starts execs through the executor API; a JSON line per request on the control socket."""

    attachable: Any
    faults: frozenset[str] = frozenset()
    groups: set[int] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start_exec(self, request: dict[str, Any]) -> None:
        command = [str(arg) for arg in request["command"]]
        if not command:
            raise ValueError("no command")
        env = {**os.environ, **({} if "ignores-env" in self.faults else request.get("env", {}))}
        tty = bool(request.get("tty"))
        handle = self.attachable.executor.register(
            request["container_id"], request["exec_id"], tty=tty
        )
        master = slave = -1
        if tty:
            master, slave = os.openpty()
            _set_size(slave, 80, 24)  # PROTOCOL 7.3: 80x24 unless Start says otherwise
            os.set_blocking(master, False)
            # setsid -c: a session of its own with the terminal as its controlling one.
            command = ["setsid", "-c", *command]
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=slave if tty else asyncio.subprocess.PIPE,
                stdout=slave if tty else asyncio.subprocess.PIPE,
                stderr=slave if tty else asyncio.subprocess.PIPE,
                cwd=request.get("working_dir") or None,
                env=env,
                start_new_session=not tty,
            )
        except OSError as error:
            handle.unregister()
            if tty:
                os.close(master)
            raise ValueError(f"cannot run {command[0]!r}: {error.strerror}") from None
        finally:
            if tty:
                os.close(slave)
        self.groups.add(process.pid)  # its own session and process group
        handle.started(_Terminal(process, master) if tty else _Pipes(process))
        task = asyncio.create_task(self._follow(handle, process, master))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _follow(self, handle: Any, process: asyncio.subprocess.Process, master: int) -> None:
        async def pump(reader: asyncio.StreamReader | None, writer: Any) -> None:
            while reader is not None and (data := await reader.read(65536)):
                writer.write(data)

        stderr = handle.stderr if "drops-stderr" not in self.faults else _Nowhere()
        pumps: asyncio.Future[Any]
        if master >= 0:
            pumps = asyncio.ensure_future(_pump_terminal(master, handle.stdout))
        else:
            pumps = asyncio.gather(
                pump(process.stdout, handle.stdout), pump(process.stderr, stderr)
            )
        code = await _exited(process)
        if "exit-before-output" not in self.faults:
            # Descendants may keep the output open: stop waiting after 2 s (5.3).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pumps), 2)
        code = 128 - code if code < 0 else code  # killed by signal N: 128 + N (5.2)
        handle.exit(0 if "exit-code-zero" in self.faults else code)
        # Descendants holding the output live on until they end or the engine closes (it
        # kills every process group it started): the pipes end with them.
        await pumps
        if master >= 0:
            os.close(master)  # only now: the controls write to it until the exit
        elif process.stdin is not None:
            process.stdin.close()  # so that the process's transport closes with it

    async def serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = json.loads(await reader.readline())
            await self.start_exec(request)
            answer = "ok"
        except Exception as error:  # the driver prints it; the engine goes on
            answer = f"error: {error}"
        writer.write(answer.encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        # Every group it started, exited or not: descendants of an exited exec may live on.
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=5)
            if pending:
                return  # a main process may not be reaped yet: its status is asyncio's
        # The orphans of its execs are this process's children when something in it is a
        # subreaper (the reference runtime, in a test that ran before): reap the killed ones,
        # so that no zombie is left in the process for the tests after.
        for group in self.groups:
            await _reap_group(group)


async def _reap_group(group: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PGID, group, os.WEXITED | os.WNOHANG) is None:  # noqa: ASYNC222
                await asyncio.sleep(0.01)  # killed, not dead yet
        except ChildProcessError:
            return  # no child of this process is left in the group


async def _exited(process: asyncio.subprocess.Process) -> int:
    """The exit status as soon as the process has ended.  Not ``process.wait()``: on Python
    3.11 that returns only once the pipes are closed too, when the process had not exited
    yet as it was called, and a descendant can hold them open (5.3)."""
    while process.returncode is None:  # noqa: ASYNC110 (3.11 has no event for the exit alone)
        await asyncio.sleep(0.01)
    return process.returncode


async def _pump_terminal(master: int, writer: Any) -> None:
    """Read the terminal until it hangs up (EIO once every holder of it is gone)."""
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(master, readable.set)
    try:
        while True:
            await readable.wait()
            readable.clear()
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            writer.write(data)
    finally:
        loop.remove_reader(master)


class _Nowhere:
    def write(self, data: bytes) -> None:
        pass


@contextlib.asynccontextmanager
async def engine(
    control: Path,
    *,
    listen: str = "127.0.0.1:0",
    token: str | None = None,
    retention: float = 300.0,
    cleanup_interval: float = 30.0,
    max_output_bytes: int = 1024 * 1024 * 1024,
    faults: frozenset[str] = frozenset(),
) -> AsyncIterator[str]:
    """Run the engine; yields the address its Exec service listens on."""
    import grpc.aio

    from execstream.server import ExecAttachable, Executor, Limits, Registry

    unknown = faults - FAULTS.keys()
    if unknown:
        raise ValueError(f"unknown faults: {sorted(unknown)}")
    # The engine's own registry: its output limit is the one the suite is told (PROTOCOL 6.5).
    registry = Registry(Limits(max_output_bytes=max_output_bytes))
    attachable = ExecAttachable(
        Executor(registry), token=token, retention=retention, cleanup_interval=cleanup_interval
    )
    server = grpc.aio.server()
    attachable.add_to_server(server)
    port = server.add_insecure_port(listen)
    the_engine = Engine(attachable, faults)
    control_server = await asyncio.start_unix_server(the_engine.serve_control, path=str(control))
    await server.start()
    await attachable.start()
    try:
        yield f"{listen.rsplit(':', 1)[0]}:{port}"
    finally:
        control_server.close()
        await the_engine.close()
        await attachable.close()
        await server.stop(1)
        await control_server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            control.unlink()


def driver_command(control: Path) -> str:
    """The ``--driver-command`` that registers execs with the engine listening on ``control``
    (``-S``: the driver needs nothing outside the standard library, and starts faster)."""
    driver = Path(__file__).resolve().with_name("engine_driver.py")
    return f"{sys.executable} -S {driver} {control}"


async def register(
    *,
    container_id: str,
    exec_id: str,
    command: list[str],
    env: dict[str, str],
    working_dir: str,
    tty: bool,
) -> None:
    """The same driver in Python, for ``--driver engine_server:register``: the engine's
    control socket is ``$ENGINE_CONTROL``."""
    request = {
        "container_id": container_id,
        "exec_id": exec_id,
        "command": command,
        "env": env,
        "working_dir": working_dir,
        "tty": tty,
    }
    reader, writer = await asyncio.open_unix_connection(os.environ["ENGINE_CONTROL"])
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        answer = (await reader.readline()).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()
    if answer != "ok":
        raise RuntimeError(answer or "the engine closed the connection")


async def _serve(args: argparse.Namespace) -> None:
    async with engine(
        args.control,
        listen=args.listen,
        token=args.token,
        retention=args.retention,
        cleanup_interval=args.cleanup_interval,
        max_output_bytes=args.max_output_bytes,
        faults=frozenset(args.fault),
    ) as address:
        print(f"listening on {address}, control socket {args.control}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:50061")
    parser.add_argument("--control", type=Path, required=True, help="the control socket")
    parser.add_argument("--token")
    parser.add_argument("--retention", type=float, default=300.0)
    parser.add_argument("--cleanup-interval", type=float, default=30.0)
    parser.add_argument("--max-output-bytes", type=int, default=1024 * 1024 * 1024)
    parser.add_argument("--fault", action="append", default=[], choices=sorted(FAULTS))
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
