"""The client subcommands of ``execstream``: run, attach, status, events, pause, resume, signal.

Each is a thin layer over :class:`execstream.client.AsyncExecClient` run with
``asyncio.run``.  Every failure prints one line, ``execstream: <status>: <server's message>``,
and exits non-zero, never with a traceback.  ``run`` and ``attach`` exit with the exec's exit
code, as ``docker exec`` does, or 125 when execstream itself failed; the other commands exit
0 or 1.

``run`` streams stdout to stdout and stderr to stderr as raw bytes.  It forwards local stdin
when stdin is not a terminal, or with ``-i``.  With ``-t`` the exec gets a pseudo-terminal,
whose size follows the local terminal (at start and on ``SIGWINCH``); with ``-it`` on a
terminal, the local terminal is put in raw mode (restored on exit) so that keys, Ctrl-C
included, go to the exec.  Otherwise Ctrl-C sends ``INT`` to the exec (ContainerSignal with
its exec id) and a third Ctrl-C detaches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .client import (
    DEFAULT_TARGET,
    AsyncExecClient,
    Exec,
    ExecStreamError,
    Exit,
    Gap,
    LifecycleEvent,
    Output,
    Status,
    Unavailable,
)

__all__ = ["add_client_commands"]

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

#: Exit status of ``run``/``attach`` when execstream itself failed (as ``docker run``).
CLIENT_FAILURE = 125
INTERRUPTED = 130


def add_client_commands(sub: _SubParsers) -> None:
    """Register the client subcommands on the ``execstream`` parser."""
    common = _connection_options()
    _add_run(sub, common)
    _add_attach(sub, common)
    _add_status(sub, common)
    _add_events(sub, common)
    for name, verb in (("pause", "pause every process of"), ("resume", "resume")):
        p = sub.add_parser(name, parents=[common], help=f"{verb} a container")
        p.add_argument("container")
        p.set_defaults(run=_command(_control, 1), control=name)
    p = sub.add_parser("signal", parents=[common], help="send a signal to a container or exec")
    p.add_argument("container")
    p.add_argument("name", help="signal name: TERM, INT, KILL, HUP, USR1... (with or without SIG)")
    p.add_argument("--exec-id", help="only this exec's processes")
    p.set_defaults(run=_command(_control, 1), control="signal")


# -- options ------------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("EXECSTREAM_TARGET") or DEFAULT_TARGET,
        help="server address, HOST:PORT or unix:PATH (default: $EXECSTREAM_TARGET or "
        f"{DEFAULT_TARGET})",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("EXECSTREAM_TOKEN"),
        help="token sent as 'authorization: Bearer TOKEN' (default: $EXECSTREAM_TOKEN)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca", metavar="FILE", help="PEM file of the CA to trust (implies --tls)")
    group.add_argument(
        "--cert", metavar="FILE", help="client certificate for mutual TLS (PEM; with --key)"
    )
    group.add_argument("--key", metavar="FILE", help="private key of --cert (PEM)")
    group.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of each unary call (default %(default)s)",
    )
    return common


def _connect(args: argparse.Namespace) -> AsyncExecClient:
    return AsyncExecClient(
        args.target,
        token=args.token or None,
        tls=args.tls,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        timeout=args.timeout,
        client_id="execstream-cli",
    )


def _command(
    body: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], failure: int
) -> Callable[[argparse.Namespace], int]:
    """Run ``body``; every failure becomes one line on stderr and the ``failure`` status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(body(args))
        except ExecStreamError as error:
            _complain(str(error))
        except KeyboardInterrupt:
            return INTERRUPTED
        except BrokenPipeError:
            # Our reader went away (``execstream run ... | head``): stop quietly.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except (OSError, ValueError) as error:
            _complain(str(error))
        return failure

    return run


def _complain(message: str) -> None:
    print(f"execstream: {' '.join(message.split())}", file=sys.stderr, flush=True)


# -- run and attach -----------------------------------------------------------------------


def _add_run(sub: _SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a command in a container and stream its output",
        description="Run CMD in a container, stream its stdout and stderr, exit with its "
        "exit code.  Example: execstream run -- sh -c 'echo hi; exit 3'",
    )
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    p.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="forward stdin even when it is a terminal (it is forwarded when it is not)",
    )
    p.add_argument("--container", default="default", help="container id (default %(default)s)")
    p.add_argument("--exec-id", help="exec id (default: generated)")
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable (KEY alone: its local value); repeatable",
    )
    p.add_argument("-w", "--workdir", default="", metavar="DIR", help="working directory")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the command")
    p.set_defaults(run=_command(_run, CLIENT_FAILURE))


def _add_attach(sub: _SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "attach",
        parents=[common],
        help="follow an existing exec's output",
        description="Replay an exec's retained output, follow it live, exit with its code.",
    )
    p.add_argument("container")
    p.add_argument("exec_id", metavar="EXEC")
    p.add_argument(
        "--from-sequence", type=int, default=0, metavar="N", help="first chunk (default: all)"
    )
    p.set_defaults(run=_command(_attach, CLIENT_FAILURE))


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                raise ValueError(f"-e {key}: not set here; give KEY=VALUE")
            value = os.environ[key]
        env[key] = value
    return env


async def _run(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ValueError("run: give the command after --, e.g. execstream run -- ls -l")
    env = _parse_env(args.env)
    exec_id = args.exec_id or f"run-{uuid.uuid4().hex[:12]}"
    stdin_is_tty = _isatty(0)
    forward_stdin = args.interactive or not stdin_is_tty
    raw = args.tty and forward_stdin and stdin_is_tty
    async with _connect(args) as client:
        session = await client.run(
            args.container,
            exec_id,
            argv,
            env=env,
            working_dir=args.workdir,
            tty=args.tty,
            terminal_size=_local_size() if args.tty else None,  # PROTOCOL 7.3: from the start
        )
        async with session:
            return await _follow(
                client,
                session,
                tty=args.tty,
                forward_stdin=forward_stdin,
                raw=raw,
                forward_interrupt=not raw,  # raw: Ctrl-C reaches the exec as a key
                close_stdin=not args.tty,  # a terminal's input is left open, as docker does
            )


async def _attach(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        session = await client.attach(
            args.container, args.exec_id, from_sequence=args.from_sequence
        )
        async with session:
            # Ctrl-C detaches: the exec is not ours to interrupt.
            return await _follow(
                client, session, tty=False, forward_stdin=False, raw=False, forward_interrupt=False
            )


async def _follow(
    client: AsyncExecClient,
    session: Exec,
    *,
    tty: bool,
    forward_stdin: bool,
    raw: bool,
    forward_interrupt: bool,
    close_stdin: bool = False,
) -> int:
    """Copy the exec's output to ours until it exits, forwarding input, size and Ctrl-C."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    background: set[asyncio.Task[None]] = set()
    handled: list[int] = []

    def later(coroutine: Awaitable[object], what: str) -> None:
        async def guarded() -> None:
            try:
                await coroutine
            except ExecStreamError as error:
                _complain(f"{what}: {error}")

        task = loop.create_task(guarded())
        background.add(task)
        task.add_done_callback(background.discard)

    def on_winch() -> None:
        size = _local_size()
        if size is not None:
            later(session.resize(*size), "resize")

    interrupts = 0

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts >= 3 and main is not None:
            main.cancel()  # the third Ctrl-C detaches
            return
        later(client.signal(session.container_id, "INT", session.exec_id), "signal INT")

    with _raw_terminal(0 if raw else None):
        try:
            if tty:
                # The initial size went with Start; changes follow the local terminal.
                loop.add_signal_handler(signal.SIGWINCH, on_winch)
                handled.append(signal.SIGWINCH)
            if forward_interrupt:
                loop.add_signal_handler(signal.SIGINT, on_interrupt)
                handled.append(signal.SIGINT)
            if forward_stdin:
                _forward_stdin(loop, session)
            elif close_stdin:
                # Like `docker exec` without -i: the process reads EOF, it does not wait.
                with contextlib.suppress(Unavailable):
                    await session.close_stdin()
            code = 0
            async for event in session:
                if isinstance(event, Output):
                    out = sys.stdout if event.stream == "stdout" else sys.stderr
                    out.buffer.write(event.data)
                    out.buffer.flush()
                elif isinstance(event, Gap):
                    _complain(
                        f"{event.missed} chunks of output were lost before chunk "
                        f"{event.before_sequence} (the server's history moved past this client)"
                    )
                elif isinstance(event, Exit):
                    code = event.code
        except asyncio.CancelledError:
            if interrupts >= 3:
                raise KeyboardInterrupt from None
            raise
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            for task in list(background):
                task.cancel()
    return code if 0 <= code <= 255 else 255


def _forward_stdin(loop: asyncio.AbstractEventLoop, session: Exec) -> None:
    """Copy our stdin to the exec from a daemon thread: a blocking read (a file, a pipe or a
    terminal alike) cannot hold up the loop, nor the exit when the exec ends first."""

    async def send(data: bytes) -> ExecStreamError | None:
        try:
            if data:
                await session.write_stdin(data)
            else:
                await session.close_stdin()
        except ExecStreamError as error:
            return error
        return None

    def pump() -> None:
        while True:
            try:
                data = os.read(0, 1 << 16)
            except OSError:
                data = b""
            try:
                failure = asyncio.run_coroutine_threadsafe(send(data), loop).result()
            except BaseException:  # the loop is gone: the exec already exited
                return
            if failure is not None:
                if session.exit_code is None:
                    _complain(f"stdin: {failure}")
                return
            if not data:
                return

    threading.Thread(target=pump, name="execstream-stdin", daemon=True).start()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _local_size() -> tuple[int, int] | None:
    """(columns, rows) of our terminal, from stdout, stdin or stderr."""
    for fd in (1, 0, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.columns > 0 and size.lines > 0:
            return size.columns, size.lines
    return None


@contextlib.contextmanager
def _raw_terminal(fd: int | None) -> Iterator[None]:
    """Put the terminal ``fd`` in raw mode and always restore it."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# -- status and events --------------------------------------------------------------------


def _add_status(sub: _SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="show a container's or exec's status")
    p.add_argument("container")
    p.add_argument("exec_id", nargs="?", metavar="EXEC")
    p.add_argument("--resources", action="store_true", help="include resource usage")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_command(_status, 1))


def _add_events(sub: _SubParsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "events",
        parents=[common],
        help="follow lifecycle events, one line each",
        description="Print lifecycle events as they happen (Ctrl-C to stop).",
    )
    p.add_argument("container", nargs="?", help="only this container's events")
    p.add_argument("--exec-id", help="only this exec's events (needs CONTAINER)")
    p.add_argument(
        "--from-sequence",
        type=int,
        default=None,
        metavar="N",
        help="first replay the retained events from N (0: the oldest)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=_command(_events, 1))


def _time(ns: int | None) -> str:
    if not ns:
        return "-"
    moment = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _status_rows(status: Status) -> list[tuple[str, str]]:
    rows = [("container", status.container_id)]
    if status.exec_id is not None:
        rows.append(("exec", status.exec_id))
    rows += [
        ("state", status.state),
        ("exit code", "-" if status.exit_code is None else str(status.exit_code)),
        ("started", _time(status.started_at)),
        ("finished", _time(status.finished_at)),
        ("execs", " ".join(status.exec_ids) or "-"),
    ]
    usage = status.resource_usage
    if usage is not None:
        limit = "no limit" if usage.memory_limit is None else _bytes(usage.memory_limit)
        rows += [
            ("cpu", f"{usage.cpu_percent:.1f}%"),
            ("memory", f"{_bytes(usage.memory_bytes)} ({limit})"),
            ("io", f"read {_bytes(usage.io_read_bytes)}, write {_bytes(usage.io_write_bytes)}"),
        ]
    return rows


async def _status(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        status = await client.status(args.container, args.exec_id, resources=args.resources)
    if args.json:
        print(json.dumps(dataclasses.asdict(status), indent=2))
    else:
        rows = _status_rows(status)
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name.upper():<{width}}  {value}")
    return 0


def _event_line(event: LifecycleEvent) -> str:
    subject = event.container_id + (f"/{event.exec_id}" if event.exec_id else "")
    parts = [_time(event.timestamp), f"#{event.sequence}", subject, event.event_type, event.status]
    if event.exit_code is not None:
        parts.append(f"exit_code={event.exit_code}")
    if event.message:
        parts.append(json.dumps(event.message))
    if event.is_replay:
        parts.append("(replay)")
    if event.gap_before:
        parts.append(f"({event.gap_before} events missed before this one)")
    return " ".join(parts)


async def _events(args: argparse.Namespace) -> int:
    if args.exec_id and not args.container:
        raise ValueError("events: --exec-id needs CONTAINER")
    async with (
        _connect(args) as client,
        client.events(args.container, args.exec_id, from_sequence=args.from_sequence) as stream,
    ):
        async for event in stream:
            line = json.dumps(dataclasses.asdict(event)) if args.json else _event_line(event)
            print(line, flush=True)
    return 0


# -- control ------------------------------------------------------------------------------


async def _control(args: argparse.Namespace) -> int:
    async with _connect(args) as client:
        if args.control == "pause":
            message = await client.pause(args.container)
        elif args.control == "resume":
            message = await client.resume(args.container)
        else:
            message = await client.signal(args.container, args.name, args.exec_id)
    if message:
        print(message)
    return 0
